"""The ``voicefsm`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from voicefsm.admission import DEFAULT_MAX_BUSY, DEFAULT_MAX_STARTING

if TYPE_CHECKING:
    from pydantic import ValidationError

    from voicefsm.model import SessionRecord, SessionUsage, TranscriptLine
    from voicefsm.pricing import TokenPrices
    from voicefsm.serve import ServeSettings
    from voicefsm.stores import SessionStore

EXIT_BROKEN_PIPE = 141
"""Exit status when the reader of stdout went away: what a shell reports for SIGPIPE (128 + 13)."""


def _simulate(args: argparse.Namespace) -> int:
    from voicefsm.simulate import SCENARIOS, simulate

    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name:<18} {scenario.description}")
        return 0
    chosen = args.scenario_name or args.scenario or "interview"
    if args.scenario_name and args.scenario and args.scenario_name != args.scenario:
        raise ValueError(
            f"two scenarios given ({args.scenario_name!r} and --scenario {args.scenario!r})"
        )
    started = time.perf_counter()
    result = simulate(chosen, args.seed, on_line=None if args.quiet else print)
    elapsed = time.perf_counter() - started
    print()
    print(result.summary())
    print(f"  wall time    {elapsed:.2f} s for {result.ended_at_s / 60:.1f} virtual minutes")
    if args.timeline is not None and result.record is not None:
        from voicefsm.pricing import load_prices
        from voicefsm.timeline import render_timeline

        page = render_timeline(result.record, result.transcript, prices=load_prices(args.prices))
        _write_page(page, args.timeline)
    return 0 if result.client_chunks_lost == 0 and result.client_chunks_reordered == 0 else 1


def _serve(args: argparse.Namespace) -> int:
    import logging

    from voicefsm.serve import run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # ADK logs each session's resumption handle at INFO (with the API key, a way back into the
    # conversation), and the connections and ends that voicefsm.host and voicefsm.adk log.
    logging.getLogger("google_adk").setLevel(logging.WARNING)
    settings = _serve_settings(args)
    try:
        run(settings, host=args.host, port=args.port)
    except KeyboardInterrupt:  # Ctrl+C before the server was up: nothing to drain
        return 130
    return 0


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The :class:`~voicefsm.serve.ServeSettings` that ``voicefsm serve``'s arguments ask for."""
    from pydantic import ValidationError

    from voicefsm.limits import ServiceLimits
    from voicefsm.model import SessionConfig
    from voicefsm.serve import ServeSettings

    if not args.minutes > 0:
        raise ValueError(f"--minutes must be a positive number, not {args.minutes:g}")
    try:
        config = SessionConfig(
            time_limit_s=args.minutes * 60,
            warning_before_s=min(300, args.minutes * 60 / 9),
            client_grace_s=args.client_grace,
        )
    except ValidationError as error:
        raise ValueError(_session_config_problems(error)) from None
    return ServeSettings(
        config=config,
        model=args.model,
        fake=True if args.fake else None,
        fake_time_scale=args.fake_time_scale,
        origins=tuple(args.origin),
        store_url=args.store,
        worker_id=args.worker_id,
        lease_ttl_s=args.lease_ttl,
        orphan_sweep_s=args.orphan_sweep or None,
        live_base_url=args.live_base_url,
        live_ca_file=args.live_ca_file,
        upstream=args.upstream,
        model_deflate=args.model_deflate,
        max_loop_lag_ms=args.max_loop_lag_ms,
        max_busy=args.max_busy,
        max_starting=args.max_starting,
        freeze_gc=args.freeze_gc,
        service_limits=(
            ServiceLimits()
            if args.max_sessions is None
            else ServiceLimits(max_sessions=args.max_sessions)
        ),
    )


_PRICES_HELP = (
    "per-token prices for the cost estimate (JSON, fields of voicefsm.pricing.TokenPrices; "
    "default $VOICEFSM_PRICES, else documented default prices)"
)


def _session_config_problems(error: ValidationError) -> str:
    """What ``SessionConfig`` refused, said in terms of the ``voicefsm serve`` flag behind it."""
    flags = {"client_grace_s": "--client-grace"}  # time_limit_s and warning_before_s: --minutes
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        flag = flags.get(field, "--minutes")
        problems.append(f"{flag} ({field or 'session'}={problem['input']!r}): {problem['msg']}")
    return "; ".join(problems)


def _default_store() -> str:
    return os.environ.get("VOICEFSM_STORE", "sqlite://voicefsm-sessions.db")


def _open_existing_store(url: str) -> SessionStore:
    """The store at ``url`` for reading; a SQLite file that is not there is a usage error
    (opening it would create an empty database and report no sessions), and so is memory://,
    which only the process that serves from it can read."""
    from voicefsm.stores import MemoryStore, SQLiteStore, open_store

    store = open_store(url)
    if isinstance(store, MemoryStore):
        raise ValueError(
            f"{url} keeps sessions inside the serving process only, so another process finds "
            "none: serve with --store sqlite://FILE or redis://..., and read that store here"
        )
    if isinstance(store, SQLiteStore) and not store.path.exists():
        raise ValueError(
            f"no session database at {store.path.resolve()} ({url}): voicefsm serve writes "
            "sqlite://voicefsm-sessions.db in the directory it runs in; run this there, or "
            "pass --store sqlite:///absolute/path.db"
        )
    return store


async def _load_session(
    url: str, session_id: str
) -> tuple[SessionRecord, list[TranscriptLine]] | None:
    """A stored session's record and transcript (``None``, said on stderr, when there is none)."""
    store = _open_existing_store(url)
    try:
        stored = await store.load(session_id)
        if stored is None:
            print(f"no session {session_id!r} in {url}", file=sys.stderr)
            return None
        lines = await store.read_transcript(session_id)
    finally:
        await store.close()
    return stored.record, lines


def _transcript(args: argparse.Namespace) -> int:
    import asyncio

    loaded = asyncio.run(_load_session(args.store, args.session_id))
    if loaded is None:
        return 1
    record, lines = loaded
    print(f"session {record.session_id} (user {record.owner or '-'}): {record.state}")
    if record.end_reason is not None:
        print(f"ended: {record.end_reason}: {record.end_detail}")
    stats = record.stats
    print(f"resumes: {stats.resumes}, transcript lines: {len(lines)}")
    print(_usage_line(record, args.prices))
    for line in lines:
        print(f"[{line.seq}] {line.role}: {line.text}")
    return 0


def _usage_line(record: SessionRecord, prices_file: str | None) -> str:
    """``usage: ...`` with token sums, audio seconds and the estimated cost of one record."""
    from voicefsm.pricing import estimate_cost, load_prices, usage_tokens

    usage = record.usage
    cost = estimate_cost(usage_tokens(usage), load_prices(prices_file))
    return (
        f"usage: {usage.prompt_tokens:,} prompt + {usage.response_tokens:,} response tokens "
        f"in {usage.reports} reports, audio {usage.client_audio_s:.0f} s in / "
        f"{usage.model_audio_s:.0f} s out, cost {cost.describe()}"
    )


def _write_page(page: str, target: str) -> None:
    if target == "-":
        sys.stdout.write(page)
        return
    with open(target, "w", encoding="utf-8") as out:
        out.write(page)
    print(f"timeline written to {target}", file=sys.stderr)


def _timeline(args: argparse.Namespace) -> int:
    import asyncio

    from voicefsm.pricing import load_prices
    from voicefsm.timeline import render_timeline

    prices = load_prices(args.prices)
    loaded = asyncio.run(_load_session(args.store, args.session_id))
    if loaded is None:
        return 1
    record, lines = loaded
    # A running session's last band reaches the present (never past the deadline).
    now = None if record.ended_at is not None else min(time.time(), record.deadline)
    page = render_timeline(record, lines, prices=prices, now=now)
    _write_page(page, args.output or f"timeline-{args.session_id}.html")
    return 0


def _operator_token(args: argparse.Namespace) -> int:
    from voicefsm.auth import JWTAuthenticator
    from voicefsm.web.operator import OPERATOR_ROLE

    secret = os.environ.get("VOICEFSM_JWT_SECRET")
    if not secret:
        raise ValueError(
            "VOICEFSM_JWT_SECRET is not set: an operator token must be signed with the secret "
            "`voicefsm serve` verifies (set the same VOICEFSM_JWT_SECRET for both)"
        )
    print(JWTAuthenticator(secret).issue(args.user, ttl_s=args.ttl, roles=[OPERATOR_ROLE]))
    return 0


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _cost(usage: SessionUsage | None, prices: TokenPrices) -> str:
    from voicefsm.pricing import estimate_cost, format_money, usage_tokens

    if usage is None:
        return "-"
    cost = estimate_cost(usage_tokens(usage), prices)
    return format_money(cost.total, cost.currency)


def _sessions(args: argparse.Namespace) -> int:
    import asyncio

    from voicefsm.model import State

    states = None
    if args.state:
        try:
            states = [State(value) for value in args.state]
        except ValueError:
            raise ValueError(
                f"--state takes one of {', '.join(str(s) for s in State)}, not {args.state}"
            ) from None

    from voicefsm.pricing import load_prices

    prices = load_prices(args.prices)

    async def listed() -> list[list[str]]:
        store = _open_existing_store(args.store)
        try:
            summaries = await store.list_sessions(
                state=states, owner=args.owner, limit=args.limit, newest_first=True
            )
        finally:
            await store.close()
        now = time.time()
        return [
            [
                s.session_id,
                s.owner or "-",
                str(s.state),
                _when(s.started_at),
                _when(s.deadline),
                _cost(s.usage, prices),
                str(s.end_reason) if s.end_reason is not None else "-",
                s.worker if s.lease_live(now) and s.worker else "-",
            ]
            for s in summaries
        ]

    rows = asyncio.run(listed())
    if not rows:
        print(f"no sessions in {args.store}", file=sys.stderr)
        return 0
    header = ["SESSION", "OWNER", "STATE", "STARTED (UTC)", "DEADLINE (UTC)", "EST.COST"]
    header += ["END", "WORKER"]
    print(
        f"EST.COST: estimated from prices as of {prices.as_of} ({prices.source})", file=sys.stderr
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _diagram(args: argparse.Namespace) -> int:
    from voicefsm.machine import diagram

    sys.stdout.write(diagram(args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``voicefsm``."""
    parser = argparse.ArgumentParser(
        prog="voicefsm",
        description="Keep long Gemini Live interviews alive: a declarative session state machine.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser(
        "simulate",
        help="run a whole 45-minute interview in virtual time through the real engine",
        description="Run a scripted interview in virtual time and print its timeline.",
    )
    sim.add_argument(
        "scenario_name",
        nargs="?",
        metavar="SCENARIO",
        help="scenario name (see --list; default: interview)",
    )
    sim.add_argument("--scenario", help="the same, as an option")
    sim.add_argument("--seed", type=int, default=7, help="seed for timings and jitter")
    sim.add_argument("--quiet", action="store_true", help="print only the end summary")
    sim.add_argument("--list", action="store_true", help="list the scenarios and exit")
    sim.add_argument(
        "--timeline", metavar="FILE.html", help="also draw the interview as an HTML timeline"
    )
    sim.add_argument("--prices", metavar="FILE.json", help=_PRICES_HELP)
    sim.set_defaults(func=_simulate)

    serve = commands.add_parser(
        "serve",
        help="serve the browser interview page and websocket (Gemini with GOOGLE_API_KEY, "
        "else a scripted fake interviewer)",
        description="Serve interviews over websockets, with a browser page at /.",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--model",
        default="gemini-2.5-flash-native-audio-preview-09-2025",
        help="Gemini Live model, with GOOGLE_API_KEY (default: %(default)s)",
    )
    serve.add_argument(
        "--minutes",
        type=float,
        default=45,
        help="interview length in minutes; the warning comes min(5 min, length / 9) before "
        "the end (default: %(default)g)",
    )
    serve.add_argument(
        "--fake", action="store_true", help="use the fake interviewer even with a key"
    )
    serve.add_argument(
        "--fake-time-scale",
        type=float,
        default=1.0,
        help="speed up the fake interviewer's pauses and pacing, not the interview clock "
        "(default: %(default)g)",
    )
    serve.add_argument(
        "--origin", action="append", default=[], help="allowed Origin (repeatable; default: any)"
    )
    serve.add_argument(
        "--store",
        default=_default_store(),
        help="session store URL: memory://, sqlite://FILE, redis://... (default: "
        "$VOICEFSM_STORE, else sqlite://voicefsm-sessions.db)",
    )
    serve.add_argument("--worker-id", help="this worker's name in leases (default host:port)")
    serve.add_argument(
        "--lease-ttl", type=float, default=15.0, help="session lease seconds (default: %(default)g)"
    )
    serve.add_argument(
        "--client-grace",
        type=float,
        default=60.0,
        help="seconds a dropped client may take to come back to its session (default: %(default)g)",
    )
    serve.add_argument(
        "--orphan-sweep",
        type=float,
        default=30.0,
        help="seconds between passes that end sessions nobody drives any more "
        "(default: %(default)g; 0: never)",
    )
    serve.add_argument("--live-base-url", help="Live API endpoint to use instead of Google's")
    serve.add_argument("--live-ca-file", help="CA certificate (PEM) for --live-base-url")
    serve.add_argument(
        "--upstream",
        choices=["auto", "adk", "genai"],
        default="auto",
        help="model connection: ADK, direct google-genai, or auto (ADK when installed)",
    )
    serve.add_argument(
        "--model-deflate",
        action="store_true",
        help="offer permessage-deflate on the websockets to the model (default: not offered; "
        "the base64 audio hardly compresses and deflating it costs CPU)",
    )
    serve.add_argument(
        "--max-loop-lag-ms",
        type=float,
        default=25.0,
        help="refuse new sessions (1013, server busy) while the event loop lags more "
        "(default: %(default)g; 0: no admission guard at all)",
    )
    serve.add_argument(
        "--max-busy",
        type=float,
        default=DEFAULT_MAX_BUSY,
        help="refuse new sessions while the event loop was busy this share (0-1) of the last "
        f"second (default {DEFAULT_MAX_BUSY}; 0: off)",
    )
    serve.add_argument(
        "--max-starting",
        type=int,
        default=DEFAULT_MAX_STARTING,
        help="refuse new sessions while this many are still connecting to the model "
        f"(default {DEFAULT_MAX_STARTING}; 0: off)",
    )
    serve.add_argument(
        "--freeze-gc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="once started, keep the objects alive then out of garbage collection "
        "(gc.freeze), so full collections pause interviews for less (default on)",
    )
    serve.add_argument(
        "--max-sessions",
        type=int,
        help="running sessions this worker takes on; more are refused with 1013 (default 100)",
    )
    serve.set_defaults(func=_serve)

    transcript = commands.add_parser(
        "transcript",
        help="print a stored session's end record and transcript",
        description="Print a session's record and transcript from the store.",
    )
    transcript.add_argument("session_id")
    transcript.add_argument("--store", default=_default_store(), help="session store URL")
    transcript.add_argument("--prices", metavar="FILE.json", help=_PRICES_HELP)
    transcript.set_defaults(func=_transcript)

    timeline = commands.add_parser(
        "timeline",
        help="draw a stored session as a self-contained HTML timeline (for operators)",
        description="Write one interview's timeline page: state bands, rotations and their gaps, "
        "client-away spans, the warning, the end, transcript turns, usage and estimated cost. "
        "The page contains the transcript: keep it among operators.",
    )
    timeline.add_argument("session_id")
    timeline.add_argument("--store", default=_default_store(), help="session store URL")
    timeline.add_argument(
        "-o",
        "--output",
        metavar="FILE.html",
        help="where to write the page ('-': standard output; default timeline-SESSION_ID.html)",
    )
    timeline.add_argument("--prices", metavar="FILE.json", help=_PRICES_HELP)
    timeline.set_defaults(func=_timeline)

    token = commands.add_parser(
        "operator-token",
        help="print a token for the operator pages (signed with $VOICEFSM_JWT_SECRET)",
        description="Sign a JWT with the operator role for /operator of `voicefsm serve`.",
    )
    token.add_argument("--user", default="operator", help="the operator's user id (sub)")
    token.add_argument("--ttl", type=float, default=8 * 3600, help="lifetime in seconds")
    token.set_defaults(func=_operator_token)

    sessions = commands.add_parser(
        "sessions",
        help="list the sessions in a store, newest first",
        description="List the sessions kept in a store, newest first: id, owner (the user), "
        "state, start, deadline, end reason, and the worker that drives it now (if any).",
    )
    sessions.add_argument("--store", default=_default_store(), help="session store URL")
    sessions.add_argument(
        "--state",
        action="append",
        help="only sessions in this state: connecting, live, warning, resuming or ended "
        "(repeatable)",
    )
    sessions.add_argument("--owner", help="only the sessions of this user")
    sessions.add_argument(
        "--limit", type=int, default=None, help="at most this many sessions (default: all)"
    )
    sessions.add_argument("--prices", metavar="FILE.json", help=_PRICES_HELP)
    sessions.set_defaults(func=_sessions)

    from voicefsm import interview_cli  # light: its heavy imports wait until it runs

    interview = commands.add_parser(
        "interview",
        help="run one spoken interview in the terminal (Gemini with GOOGLE_API_KEY, or --fake)",
        description=interview_cli.DESCRIPTION,
        epilog=interview_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    interview_cli.add_arguments(interview)
    interview.set_defaults(func=interview_cli.run)

    diag = commands.add_parser(
        "diagram",
        help="print the state diagram",
        description="Print the state diagram, drawn from the machine's own declaration.",
    )
    diag.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    diag.set_defaults(func=_diagram)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voicefsm`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that left must not fail the exit flush
    except ValueError as error:
        parser.error(str(error))
    except BrokenPipeError:
        # The reader went away (`voicefsm simulate | head`): not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    raise SystemExit(main())
