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
