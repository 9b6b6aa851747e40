"""The ``voicefsm`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def _simulate(args: argparse.Namespace) -> int:
    from voicefsm.simulate import SCENARIOS, simulate

    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name:<18} {scenario.description}")
        return 0
    started = time.perf_counter()
    result = simulate(args.scenario, args.seed, on_line=None if args.quiet else print)
    elapsed = time.perf_counter() - started
    print()
    print(result.summary())
    print(f"  wall time    {elapsed:.2f} s for {result.ended_at_s / 60:.1f} virtual minutes")
    return 0 if result.client_chunks_lost == 0 and result.client_chunks_reordered == 0 else 1


def _serve(args: argparse.Namespace) -> int:
    import logging

    from voicefsm.model import SessionConfig
    from voicefsm.serve import ServeSettings, run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = SessionConfig(
        time_limit_s=args.minutes * 60, warning_before_s=min(300, args.minutes * 60 / 9)
    )
    settings = ServeSettings(
        config=config,
        model=args.model,
        fake=True if args.fake else None,
        fake_time_scale=args.fake_time_scale,
        origins=tuple(args.origin),
        store_url=args.store,
        worker_id=args.worker_id,
        lease_ttl_s=args.lease_ttl,
        live_base_url=args.live_base_url,
        live_ca_file=args.live_ca_file,
        upstream=args.upstream,
        max_loop_lag_ms=args.max_loop_lag_ms,
    )
    run(settings, host=args.host, port=args.port)
    return 0


def _default_store() -> str:
    return os.environ.get("VOICEFSM_STORE", "sqlite://voicefsm-sessions.db")


def _transcript(args: argparse.Namespace) -> int:
    import asyncio

    from voicefsm.stores import open_store

    async def show() -> int:
        store = open_store(args.store)
        try:
            stored = await store.load(args.session_id)
            if stored is None:
                print(f"no session {args.session_id!r} in {args.store}", file=sys.stderr)
                return 1
            lines = await store.read_transcript(args.session_id)
        finally:
            await store.close()
        record = stored.record
        print(f"session {record.session_id} (user {record.owner or '-'}): {record.state}")
        if record.end_reason is not None:
            print(f"ended: {record.end_reason}: {record.end_detail}")
        stats = record.stats
        print(f"resumes: {stats.resumes}, transcript lines: {len(lines)}")
        for line in lines:
            print(f"[{line.seq}] {line.role}: {line.text}")
        return 0

    return asyncio.run(show())


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
    sim.add_argument("--scenario", default="interview", help="scenario name (see --list)")
    sim.add_argument("--seed", type=int, default=7, help="seed for timings and jitter")
    sim.add_argument("--quiet", action="store_true", help="print only the end summary")
    sim.add_argument("--list", action="store_true", help="list the scenarios and exit")
    sim.set_defaults(func=_simulate)

    serve = commands.add_parser(
        "serve",
        help="serve the browser interview page and websocket (Gemini with GOOGLE_API_KEY, "
        "else a scripted fake interviewer)",
        description="Serve interviews over websockets, with a browser page at /.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--model", default="gemini-2.5-flash-native-audio-preview-09-2025")
    serve.add_argument("--minutes", type=float, default=45, help="interview length")
    serve.add_argument(
        "--fake", action="store_true", help="use the fake interviewer even with a key"
    )
    serve.add_argument(
        "--fake-time-scale", type=float, default=1.0, help="speed up the fake interviewer"
    )
    serve.add_argument(
        "--origin", action="append", default=[], help="allowed Origin (repeatable; default: any)"
    )
    serve.add_argument(
        "--store", default=_default_store(), help="session store URL (sqlite://FILE, redis://...)"
    )
    serve.add_argument("--worker-id", help="this worker's name in leases (default host:port)")
    serve.add_argument("--lease-ttl", type=float, default=15.0, help="session lease seconds")
    serve.add_argument("--live-base-url", help="Live API endpoint to use instead of Google's")
    serve.add_argument("--live-ca-file", help="CA certificate (PEM) for --live-base-url")
    serve.add_argument(
        "--upstream",
        choices=["auto", "adk", "genai"],
        default="auto",
        help="model connection: ADK, direct google-genai, or auto (ADK when installed)",
    )
    serve.add_argument(
        "--max-loop-lag-ms",
        type=float,
        default=25.0,
        help="refuse new sessions (1013, server busy) while the event loop lags more (0: never)",
    )
    serve.set_defaults(func=_serve)

    transcript = commands.add_parser(
        "transcript",
        help="print a stored session's end record and transcript",
        description="Print a session's record and transcript from the store.",
    )
    transcript.add_argument("session_id")
    transcript.add_argument("--store", default=_default_store(), help="session store URL")
    transcript.set_defaults(func=_transcript)

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
    except ValueError as error:
        parser.error(str(error))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
