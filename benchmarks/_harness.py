"""Scaffolding the benchmarks share: their helper processes, pinning, sampling, statistics,
the command line and the sections they write into ``docs/benchmarks.md``.

Each benchmark keeps its own measurement; only what several of them did the same way lives
here. The scripts run as ``python benchmarks/bench_x.py``, which puts this folder first on
``sys.path``, so they import this module as ``_harness`` (and so do the processes they spawn,
which inherit that path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LAG_TICK_S = 0.01
"""The period of :func:`lag_monitor`'s timer."""


# --------------------------------------------------------------------------- processes


def pin(cpu: int | None) -> None:
    """Pin this process to ``cpu`` (``None``: leave its affinity as it is)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def spawned(
    target: Callable[..., None], *args: Any, join_timeout_s: float = 10.0
) -> Iterator[tuple[Connection, BaseProcess]]:
    """Run ``target(pipe_end, *args)`` in a spawned process for the duration of the block.

    Yields this side's end of the pipe and the process. On the way out the process is sent
    ``"stop"`` (the helper processes' shared word for it), given ``join_timeout_s`` to exit,
    and killed if it has not.
    """
    context = get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    try:
        yield parent, process
    finally:
        with contextlib.suppress(Exception):
            parent.send("stop")
        process.join(timeout=join_timeout_s)
        if process.is_alive():
            process.kill()


def ask(pipe: Connection, command: str) -> dict[str, Any]:
    """Send ``command`` to a helper process and return its reply."""
    pipe.send(command)
    reply: dict[str, Any] = pipe.recv()
    return reply


def run_profiled(main: Coroutine[Any, Any, T], profile: Path | str | None) -> T:
    """``asyncio.run(main)``; with a ``profile`` path, under cProfile, stats written there."""
    if profile is None:
        return asyncio.run(main)
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(asyncio.run, main)
    finally:
        profiler.dump_stats(profile)


# --------------------------------------------------------------------------- sampling


def rss_bytes() -> int:
    """This process's resident set size from ``/proc`` (0 where that is not available)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


async def lag_monitor(samples: list[float], stop: asyncio.Event) -> None:
    """Until ``stop`` is set, append how late a :data:`LAG_TICK_S` absolute-schedule timer fires
    on this event loop to ``samples``."""
    due = time.monotonic() + LAG_TICK_S
    while not stop.is_set():
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        samples.append(time.monotonic() - due)
        due += LAG_TICK_S


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median_of(runs: Sequence[Any], name: str) -> float:
    """The median over ``runs`` of their attribute ``name``."""
    return float(statistics.median(getattr(run, name) for run in runs))


def paired_ratio(mine: Sequence[Any], theirs: Sequence[Any], name: str) -> float:
    """The median of ``mine[i].name / theirs[i].name`` over the pairs (the same repeat, as both
    lists are in run order); NaN when there is no pair."""
    ratios = [getattr(a, name) / getattr(b, name) for a, b in zip(mine, theirs, strict=False)]
    return float(statistics.median(ratios)) if ratios else float("nan")


def rotated(items: Sequence[T], repeat: int) -> list[T]:
    """``items`` in repeat ``repeat``'s order: each repeat starts one further along, so that
    interleaved runs do not always meet the same neighbour or the same warm state."""
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


# --------------------------------------------------------------------------- the command line


def add_size_arguments(parser: argparse.ArgumentParser, warmup_s: float) -> None:
    """``--sizes``, ``--repeats``, ``--warmup`` and ``--window``: the shape of a run over N."""
    parser.add_argument("--sizes", default="25,50,100", help="comma-separated N values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=warmup_s, help="seconds before the window")
    parser.add_argument("--window", type=float, default=5.0, help="measured seconds")


def parse_sizes(text: object) -> list[int]:
    """``--sizes`` as a list of N."""
    return [int(n) for n in str(text).split(",")]


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How the run was started, for the report: ``python benchmarks/SCRIPT ARGS``."""
    shown = sys.argv[1:] if argv is None else list(argv)
    return f"python benchmarks/{script} {shlex.join(shown)}".strip()


# --------------------------------------------------------------------------- docs/benchmarks.md


def write_marked_section(path: Path, section: str, name: str) -> None:
    """Replace the part of ``path`` between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``
    (the markers included) with ``section``, which carries the markers; append it if there is
    none."""
    text = path.read_text() if path.exists() else ""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def publish(report: str, markdown: Path | None, name: str) -> None:
    """Print the report; with a ``markdown`` path, also write it as section ``name`` there."""
    print()
    print(report)
    if markdown is not None:
        write_marked_section(markdown, report, name)


def write_heading_section(path: Path, section: str, file_title: str | None = None) -> bool:
    """Put ``section`` into ``path``: replace the section with its heading (its first line), or
    append it.

    A section runs from its heading to the next ``#`` or ``##`` heading, so the sections other
    scripts write to the same file are kept. A file that is empty or missing starts with
    ``file_title`` if given. Returns whether an earlier section was replaced.
    """
    heading = section.splitlines()[0]
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = existing.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        if not existing.strip() and file_title is not None:
            existing = f"{file_title}\n\n"
        elif existing and not existing.endswith("\n\n"):
            existing += "\n" if existing.endswith("\n") else "\n\n"
        path.write_text(existing + section, encoding="utf-8")
        return False
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))),
        len(lines),
    )
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + tail if tail else ""), "utf-8")
    return True
