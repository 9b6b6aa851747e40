"""The ``voicefsm`` command line."""

from __future__ import annotations

import argparse
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
    )
    run(settings, host=args.host, port=args.port)
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
    serve.set_defaults(func=_serve)

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
