"""Memory over a time-scaled 45-minute interview: voicefsm on ADK against unbounded ADK sessions.

Run from the repository root (needs ``pip install -e '.[testing]'``)::

    python benchmarks/bench_memory.py                 # 700 transcript lines, ~1 min
    python benchmarks/bench_memory.py --lines 300     # quicker
    python benchmarks/bench_memory.py --markdown docs/benchmarks.md

One :class:`voicefsm.host.SessionHost` runs an interview on the real ADK ``Runner`` and genai
client against the loopback fake Live server, which runs in its own process (so its records and
TLS buffers are not measured). The interview is compressed in time, not in content: a 45-minute
interview has about 700 finished transcript lines (interviewer questions and candidate answers,
~15 a minute); the fake plays one every ``--pace`` seconds, with model audio, turn boundaries,
resumption updates and usage reports, and a GoAway every ``--rotate-every`` lines (default 150:
the server's ~10-minute rotations); the client streams 20 ms chunks at the real cadence.

Two variants run one after the other, twice, interleaved:

* **voicefsm** — ``AdkUpstream`` as shipped (``BoundedSessionService``: ADK keeps its newest 64
  events; a new connection copies none);
* **ADK sessions unbounded** — the same, but on ADK's plain ``InMemorySessionService`` and
  ``run_live`` copying the whole session (what ADK does by itself, and what voicefsm did before).

At every checkpoint (each ``--every`` lines) the script runs a full ``gc.collect()`` and records
the bytes ``tracemalloc`` sees allocated (Python objects only, the precise figure) and the
process RSS. It prints both per checkpoint and the growth per transcript line (a least-squares
slope over the second half, after start-up allocations settled). The sink discards what it is
given: the transcript belongs in a store, not in the process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import platform
import ssl
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _harness import rotated, rss_bytes, spawned, write_heading_section
from google.adk.agents import LlmAgent
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.adk.sessions.base_session_service import GetSessionConfig

from voicefsm import Session, SessionConfig, SessionRecord, TranscriptLine
from voicefsm import events as ev
from voicefsm.adk import AdkUpstream
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel
from voicefsm.testing import FakeLiveConnection, FakeLiveServer

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
MODEL_PCM = b"\x10\x00" * 480  # 20 ms of 24 kHz PCM
KIB = 1024.0


class DiscardingSink:
    """A sink that keeps nothing (the transcript belongs in a store)."""

    def __init__(self) -> None:
        self.lines = 0
        self.record: SessionRecord | None = None
        self._line_added = asyncio.Event()

    async def wait_lines(self, count: int) -> None:
        """Wait until ``count`` lines were appended."""
        while self.lines < count:
            self._line_added.clear()
            await self._line_added.wait()

    async def save(self, record: SessionRecord) -> None:
        """Keep only the latest record."""
        self.record = record

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        """Count the line."""
        self.lines += 1
        self._line_added.set()


@dataclass
class Checkpoint:
    """Memory after ``lines`` transcript lines."""

    lines: int
    rotations: int
    traced: int  # bytes tracemalloc sees allocated, after a full collection
    rss: int  # process resident set size, bytes


@dataclass
class Run:
    """One variant's interview."""

    label: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    adk_events: int = 0  # events in the stored ADK session at the end
    seconds: float = 0.0

    def slope(self, attr: str) -> float:
        """Bytes per transcript line over the second half of the checkpoints."""
        points = self.checkpoints[len(self.checkpoints) // 2 :]
        if len(points) < 2:
            return float("nan")
        xs = [p.lines for p in points]
        ys = [getattr(p, attr) for p in points]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def serve_fake(pipe: Connection, lines: int, rotate_every: int, pace: float) -> None:
    """The fake Live server, in its own process: plays the interview, then waits for "stop"."""

    async def main() -> None:
        said = 0

        async def script(conn: FakeLiveConnection) -> None:
            nonlocal said
            await conn.send_setup_complete()
            await conn.send_resumption_update(f"h-{conn.number}")
            while said < lines:
                if said % 2 == 0:
                    for _ in range(5):
                        await conn.send_model_audio(MODEL_PCM)
                    await conn.send_output_transcription(f"Question {said}: tell me more.", True)
                    await conn.send_turn_complete()
                else:
                    await conn.send_input_transcription(f"Answer {said}: an example.", True)
                await conn.send_usage(prompt_tokens=1000 + said, response_tokens=20)
                said += 1
                if said % 10 == 0:
                    await conn.send_resumption_update(f"h-{conn.number}-{said}")
                await asyncio.sleep(pace)
                if said % rotate_every == 0 and said < lines:
                    await conn.send_go_away("10s")
                    break
            await conn.wait_closed(timeout=None)

        async with FakeLiveServer(script=script, record_payloads=False) as server:
            pipe.send((server.port, server.ca_pem))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, pipe.recv)  # "stop"

    asyncio.run(main())


def genai_client(port: int, ca_pem: bytes) -> Any:
    """A genai client pointed at the fake in the other process."""
    from google import genai
    from google.genai import types

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    options = types.HttpOptions(
        base_url=f"https://127.0.0.1:{port}",
        api_version="v1alpha",
        async_client_args={"ssl": context},
    )
    return genai.Client(api_key="fake-key", http_options=options)


async def interview(
    label: str, lines: int, rotate_every: int, every: int, pace: float, bounded: bool
) -> Run:
    """One session through ``lines`` transcript lines; measure at each checkpoint."""
    run = Run(label)
    with spawned(serve_fake, lines, rotate_every, pace, join_timeout_s=30) as (parent_end, _):
        port, ca_pem = await asyncio.get_running_loop().run_in_executor(None, parent_end.recv)
        client = genai_client(port, ca_pem)
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        if bounded:
            upstream = AdkUpstream(agent, client=client)
        else:
            runner = Runner(
                app_name="voicefsm",
                agent=AdkUpstream(agent, client=client).agent,
                session_service=InMemorySessionService(),
                auto_create_session=True,
            )
            upstream = AdkUpstream(agent, client=client, runner=runner)
            upstream.run_config = upstream.run_config.model_copy(
                update={"get_session_config": GetSessionConfig()}
            )
        config = SessionConfig(time_limit_s=3600, warning_before_s=60, goaway_margin_s=0.5)
        channel = MemoryChannel()
        sink = DiscardingSink()
        session = Session(config, seed=1)
        host = SessionHost(session, upstream, client=channel, sink=sink)
        started = time.monotonic()
        task = asyncio.create_task(host.run())
        stop = asyncio.Event()

        async def client_audio() -> None:
            seq = 0
            while not stop.is_set():
                channel.push(ev.ClientAudio(struct.pack(">I", seq) + bytes(636)))
                channel.audio.clear()  # the client plays and forgets the interviewer's audio
                channel.messages.clear()
                seq += 1
                await asyncio.sleep(0.02)  # the real cadence: 20 ms chunks

        streamer = asyncio.create_task(client_audio())
        try:
            next_at = every
            while next_at <= lines:
                async with asyncio.timeout(120):
                    await sink.wait_lines(next_at)
                gc.collect()
                traced, _ = tracemalloc.get_traced_memory()
                rotations = session.stats.goaways
                run.checkpoints.append(Checkpoint(sink.lines, rotations, traced, rss_bytes()))
                next_at += every
        finally:
            stop.set()
            await streamer
        service = upstream.runner.session_service
        if isinstance(service, InMemorySessionService):
            stored = service.sessions.get(upstream.app_name, {}).get(upstream.user_id, {})
            run.adk_events = max((len(s.events) for s in stored.values()), default=0)
        channel.push(ev.ClientEnd())
        await asyncio.wait_for(task, 30)
        run.seconds = time.monotonic() - started
    return run


def report(runs: Sequence[Run], args: argparse.Namespace, command: str) -> tuple[str, str]:
    """The terminal table and the Markdown section."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    labels = list(by_label)
    first = by_label[labels[0]][0]
    text = [
        f"Memory over a time-scaled interview: {args.lines} transcript lines, a GoAway every "
        f"{args.rotate_every} lines, {args.repeats} interleaved runs per variant",
        "",
        "Python heap (tracemalloc, after gc.collect), KiB above the first checkpoint, medians:",
        "",
    ]
    header = f"{'lines':>7}{'rotations':>11}" + "".join(f"{label:>26}" for label in labels)
    text.append(header)
    md_rows = [
        "| lines | rotations | " + " | ".join(labels) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in labels) + " |",
    ]
    for index, point in enumerate(first.checkpoints):
        cells = []
        for label in labels:
            growth = [
                (r.checkpoints[index].traced - r.checkpoints[0].traced) / KIB
                for r in by_label[label]
                if len(r.checkpoints) > index
            ]
            cells.append(statistics.median(growth))
        text.append(
            f"{point.lines:>7}{point.rotations:>11}" + "".join(f"{c:>26.0f}" for c in cells)
        )
        md_rows.append(
            f"| {point.lines} | {point.rotations} | "
            + " | ".join(f"{c:.0f} KiB" for c in cells)
            + " |"
        )
    text.append("")
    summary_md = [
        "| variant | heap growth per line | RSS growth per line | ADK session events at the end |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in labels:
        heap = statistics.median(r.slope("traced") for r in by_label[label]) / KIB
        rss = statistics.median(r.slope("rss") for r in by_label[label]) / KIB
        events = statistics.median(r.adk_events for r in by_label[label])
        text.append(
            f"{label}: heap {heap:.2f} KiB/line, RSS {rss:.2f} KiB/line (second half), "
            f"ADK session events at the end {events:.0f}"
        )
        summary_md.append(f"| {label} | {heap:.2f} KiB | {rss:.2f} KiB | {events:.0f} |")
    md = [
        "## Memory over a 45-minute interview (`bench_memory.py`)",
        "",
        "Generated by `benchmarks/bench_memory.py`; re-run the command rather than editing.",
        "",
        f"* **Reproduce:** `{command}` (from the repository root)",
        f"* **Date:** {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"* **Machine:** {platform.platform()}, CPUs: {os.cpu_count()}; Python "
        f"{platform.python_version()}",
        f"* **Method:** {args.lines} finished transcript lines (a 45-minute interview has ~700), "
        f"one every {args.pace:g} s, played by the loopback fake in its own process to one "
        f"`SessionHost` on ADK, with model audio, usage and resumption updates, 20 ms client "
        f"chunks at the real cadence and a GoAway every {args.rotate_every} lines; "
        f"`gc.collect()` then `tracemalloc` at each checkpoint; "
        f"{args.repeats} interleaved runs per variant, medians. Growth per line: least-squares "
        f"slope over the second half.",
        "",
        *summary_md,
        "",
        "Heap above the first checkpoint:",
        "",
        *md_rows,
    ]
    return "\n".join(text), "\n".join(md) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=700, help="transcript lines (default 700)")
    parser.add_argument(
        "--rotate-every", type=int, default=150, help="lines between GoAways (default 150)"
    )
    parser.add_argument("--every", type=int, default=50, help="lines between checkpoints")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (default 2)")
    parser.add_argument(
        "--pace", type=float, default=0.02, help="seconds between transcript lines (default 0.02)"
    )
    parser.add_argument("--markdown", type=Path, help="write the section into this file")
    args = parser.parse_args(argv)
    if args.lines < 2 * args.every or args.every < 2 or args.rotate_every < 2 or args.repeats < 1:
        parser.error("need --lines >= 2 * --every, --every and --rotate-every >= 2, --repeats >= 1")
    tracemalloc.start()
    runs: list[Run] = []
    variants = [("voicefsm", True), ("ADK sessions unbounded", False)]
    for repeat in range(args.repeats):
        for label, bounded in rotated(variants, repeat):
            measured = interview(
                label, args.lines, args.rotate_every, args.every, args.pace, bounded
            )
            runs.append(asyncio.run(measured))
    runs.sort(key=lambda r: [v[0] for v in variants].index(r.label))
    shown = ["python", "benchmarks/bench_memory.py"]
    if args.lines != 700:
        shown += ["--lines", str(args.lines)]
    if args.rotate_every != 150:
        shown += ["--rotate-every", str(args.rotate_every)]
    if args.repeats != 2:
        shown += ["--repeats", str(args.repeats)]
    text, md = report(runs, args, " ".join(shown))
    print(text)
    if args.markdown is not None:
        replaced = write_heading_section(args.markdown, md)
        print(f"\n{'replaced the section in' if replaced else 'appended to'} {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
