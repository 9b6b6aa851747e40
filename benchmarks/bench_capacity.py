"""Capacity: how many concurrent interviews one process (one core) carries, per upstream.

Run from the repository root (needs ``pip install -e '.[test]'``, i.e. ADK too)::

    python benchmarks/bench_capacity.py --quick                  # a laptop: ~2 minutes
    python benchmarks/bench_capacity.py --sizes 25,50,100,150 --repeats 3 --cpu 0 --fake-cpu 1
    python benchmarks/bench_capacity.py --quick --markdown docs/benchmarks.md   # write the section

N interviews run concurrently in this process (``--cpu`` pins it to one core with
``os.sched_setaffinity``); the fake Gemini Live server (:class:`voicefsm.testing.FakeLiveServer`,
TLS on loopback) runs in its own process (``--fake-cpu``). Each interview's client sends a
640-byte chunk (20 ms of 16 kHz 16-bit PCM) every 20 ms on an absolute schedule; each fake
connection answers the setup and then speaks: a 40 ms model audio chunk (24 kHz) every 40 ms,
an output-transcript fragment every 0.5 s, a turn end and a resumption update every 2 s.

The same N is measured for four systems, in one run, interleaved (the order rotates every
repeat):

* ``voicefsm-adk``: :class:`voicefsm.host.SessionHost` on :class:`voicefsm.adk.AdkUpstream`
  (its default ``wire="direct"``: client audio written straight to the websocket);
* ``voicefsm-genai``: the host on :class:`voicefsm.genai_live.GenaiUpstream`;
* ``bare-adk``: ADK's ``Runner.run_live`` with a ``LiveRequestQueue`` (same run config);
* ``raw-genai``: ``client.aio.live.connect`` with a sender awaiting ``send_realtime_input``
  and a receiver looping over ``session.receive()`` (same connect config).

Not run unless named in ``--systems``: ``voicefsm-adk-queue``, the host on
``AdkUpstream(wire="adk")`` (client audio through ADK's ``LiveRequestQueue``, as bare ADK).

Per system and N, over a ``--window`` after a ``--warmup`` (both after every session is up):

* **CPU per interview**: this process's CPU time / (N x window), in ms per second;
* **loop lag p50/p99**: how late a 10 ms absolute-schedule timer fires on this event loop;
* **e2e p50/p99**: client-audio latency from a chunk's *scheduled* send time (stamped into the
  chunk) to its arrival at the fake (the fake reads ``time.monotonic()``, the same clock);
* **lost**: chunks scheduled in the run that the fake had not received 1 s after the feeders
  stopped (backlog or loss);
* **RSS per interview**: resident memory at the window's end minus before the sessions, / N.

"Sustains N" means: median loop-lag p99 < 50 ms and no chunk lost in any repeat. Timing targets
are reported, never enforced.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime
import gc
import importlib.metadata
import itertools
import multiprocessing
import multiprocessing.connection
import os
import platform
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import _harness
from _harness import (
    add_size_arguments,
    ask,
    command_line,
    lag_monitor,
    median_of,
    parse_sizes,
    pct,
    pin,
    publish,
    rotated,
    rss_bytes,
    spawned,
)

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
CHUNK_BYTES = 640
CHUNK_S = 0.02
MODEL_CHUNK_BYTES = 1920  # 40 ms of 24 kHz 16-bit mono
MODEL_CHUNK_S = 0.04
STAMP = struct.Struct(">dII")  # scheduled send time, interview id, sequence number
SYSTEMS = ("voicefsm-adk", "voicefsm-adk-queue", "voicefsm-genai", "bare-adk", "raw-genai")
DEFAULT_SYSTEMS = ("voicefsm-adk", "voicefsm-genai", "bare-adk", "raw-genai")
PROFILER: Any = None
"""A ``cProfile.Profile`` enabled during the measured windows (``--profile``)."""
INPUT_MIME = "audio/pcm;rate=16000"


# --------------------------------------------------------------------------- the fake process


class _Collector:
    """Arrival records of client chunks, in the fake's process."""

    def __init__(self) -> None:
        self.scheduled = array.array("d")
        self.latency = array.array("d")
        self.interview = array.array("q")
        self.received: dict[int, int] = {}

    def add(self, payload: bytes, at: float) -> None:
        scheduled, interview, _seq = STAMP.unpack_from(payload)
        self.scheduled.append(scheduled)
        self.latency.append(at - scheduled)
        self.interview.append(interview)
        self.received[interview] = self.received.get(interview, 0) + 1

    def take(self) -> dict[str, Any]:
        out = {
            "scheduled": self.scheduled,
            "latency": self.latency,
            "interview": self.interview,
            "received": self.received,
            "cpu": time.process_time(),
        }
        self.scheduled = array.array("d")
        self.latency = array.array("d")
        self.interview = array.array("q")
        self.received = {}
        return out


def _fake_script(collector: _Collector) -> Callable[[Any], Any]:
    async def speak(conn: Any) -> None:
        silence = bytes(MODEL_CHUNK_BYTES - 8)
        start = time.monotonic()
        for k in itertools.count():
            due = start + k * MODEL_CHUNK_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # Stamped with its scheduled send time, for latency at the far end (bench_serve).
            await conn.send_model_audio(struct.pack(">d", due) + silence)
            if k % 12 == 11:
                await conn.send_output_transcription("word ", finished=False)
            if k % 50 == 49:
                await conn.send_turn_complete()
                await conn.send_resumption_update()

    async def account(conn: Any) -> None:
        while True:
            await asyncio.sleep(0.2)
            drain(conn)

    def drain(conn: Any) -> None:
        # The benchmark owns these records: read the audio arrivals, then drop everything so
        # the fake's memory stays flat over a long run.
        for event in conn.timeline:
            if event.kind == "audio" and event.payload is not None:
                collector.add(event.payload, event.at)
        conn.timeline.clear()
        conn.audio_chunks.clear()
        conn.frames_received.clear()
        conn.messages_sent.clear()

    async def script(conn: Any) -> None:
        await conn.send_setup_complete()
        tasks = [asyncio.create_task(speak(conn)), asyncio.create_task(account(conn))]
        try:
            await conn.wait_closed(timeout=None)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            drain(conn)

    return script


def fake_process(pipe: multiprocessing.connection.Connection, cpu: int | None) -> None:
    """Entry point of the fake server's process: serve until told to stop."""
    pin(cpu)
    asyncio.run(_serve_fake(pipe))


async def _serve_fake(pipe: multiprocessing.connection.Connection) -> None:
    import logging

    from voicefsm.testing import FakeLiveServer

    logging.disable(logging.WARNING)
    collector = _Collector()
    server = FakeLiveServer(
        script=_fake_script(collector),
        enforce_resumption_handles=False,
        raise_script_errors=False,
    )
    async with server:
        pipe.send({"base_url": server.base_url, "ca_pem": server.ca_pem.decode()})
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "collect":
                for conn in server.connections:
                    if conn.timeline:
                        for event in conn.timeline:
                            if event.kind == "audio" and event.payload is not None:
                                collector.add(event.payload, event.at)
                        conn.timeline.clear()
                pipe.send(collector.take())
            else:
                return


# --------------------------------------------------------------------------- the systems


class Interview(Protocol):
    """One interview of one system, as the benchmark drives it."""

    ready: asyncio.Event
    model_chunks: int

    async def start(self) -> None: ...
    async def push(self, chunk: bytes) -> None: ...
    async def stop(self) -> None: ...


class _BenchChannel:
    """A client channel that counts interviewer audio and discards it."""

    def __init__(self, ready: asyncio.Event) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.model_chunks = 0
        self._ready = ready

    async def receive(self) -> Any:
        return await self.queue.get()

    async def send_audio(self, data: bytes) -> None:
        self.model_chunks += 1
        self._ready.set()

    async def send_message(self, message: Any) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.queue.put_nowait(None)


class _NullSink:
    async def save(self, record: Any) -> None:
        pass

    async def append_transcript(self, session_id: str, line: Any) -> None:
        pass


class VoicefsmInterview:
    """voicefsm's host on one of its upstreams."""

    def __init__(self, upstream: Any) -> None:
        from voicefsm import Session, SessionConfig
        from voicefsm.host import SessionHost

        self.ready = asyncio.Event()
        self.channel = _BenchChannel(self.ready)
        config = SessionConfig(heartbeat_interval_s=30, heartbeat_timeout_s=3600)
        self.host = SessionHost(Session(config), upstream, client=self.channel, sink=_NullSink())
        self.task: asyncio.Task[Any] | None = None
        from voicefsm import events

        self._audio = events.ClientAudio
        self._end = events.ClientEnd

    @property
    def model_chunks(self) -> int:
        return self.channel.model_chunks

    async def start(self) -> None:
        self.task = asyncio.create_task(self.host.run())

    async def push(self, chunk: bytes) -> None:
        self.channel.queue.put_nowait(self._audio(chunk))

    async def stop(self) -> None:
        self.channel.queue.put_nowait(self._end())
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=10)


class BareAdkInterview:
    """ADK's ``run_live`` with a ``LiveRequestQueue``, as an ADK app would run it."""

    def __init__(self, runner: Any, run_config: Any, session_id: str) -> None:
        from google.adk.agents import LiveRequestQueue
        from google.genai import types

        self.ready = asyncio.Event()
        self.model_chunks = 0
        self._runner = runner
        self._run_config = run_config
        self._session_id = session_id
        self._queue = LiveRequestQueue()
        self._blob = types.Blob
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        stream = self._runner.run_live(
            user_id="candidate",
            session_id=self._session_id,
            live_request_queue=self._queue,
            run_config=self._run_config,
        )
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                content = event.content
                if content is not None and content.parts:
                    for part in content.parts:
                        if part.inline_data is not None:
                            self.model_chunks += 1
                            self.ready.set()

    async def push(self, chunk: bytes) -> None:
        self._queue.send_realtime(self._blob(data=chunk, mime_type=INPUT_MIME))

    async def stop(self) -> None:
        self._queue.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=10)


class RawGenaiInterview:
    """``client.aio.live.connect``: the sender awaits each send, a task receives."""

    def __init__(self, client: Any, config: Any) -> None:
        from google.genai import types

        self.ready = asyncio.Event()
        self.model_chunks = 0
        self._client = client
        self._config = config
        self._session: Any = None
        self._blob = types.Blob
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self._client.aio.live.connect(model=MODEL, config=self._config) as session:
            self._session = session
            while True:
                async for message in session.receive():
                    content = message.server_content
                    if content is not None and content.model_turn is not None:
                        for part in content.model_turn.parts or ():
                            if part.inline_data is not None:
                                self.model_chunks += 1
                                self.ready.set()

    async def push(self, chunk: bytes) -> None:
        await self._session.send_realtime_input(audio=self._blob(data=chunk, mime_type=INPUT_MIME))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=10)


class Factory:
    """Builds interviews of every system against one fake server."""

    def __init__(self, base_url: str, ca_pem: str) -> None:
        from google import genai
        from google.adk.agents import LlmAgent, RunConfig
        from google.adk.models.google_llm import Gemini
        from google.adk.runners import Runner
        from google.adk.sessions import InMemorySessionService
        from google.genai import types

        from voicefsm import SessionConfig
        from voicefsm.adk import AdkUpstream
        from voicefsm.genai_live import GenaiUpstream

        context = ssl.create_default_context(cadata=ca_pem)

        def client() -> genai.Client:
            # One client per system: the upstreams hook the client's websocket options.
            return genai.Client(
                api_key="fake-key",
                http_options=types.HttpOptions(
                    base_url=base_url, api_version="v1alpha", async_client_args={"ssl": context}
                ),
            )

        self.client = client()
        instruction = "Interview the candidate."
        self.adk_upstream = AdkUpstream(
            LlmAgent(name="interviewer", model=MODEL, instruction=instruction), client=client()
        )
        self.adk_queue_upstream = AdkUpstream(
            LlmAgent(name="interviewer", model=MODEL, instruction=instruction),
            client=client(),
            wire="adk",
        )
        self.genai_upstream = GenaiUpstream(MODEL, client=client(), instruction=instruction)
        defaults = SessionConfig()
        compression = types.ContextWindowCompressionConfig(
            trigger_tokens=defaults.compression_trigger_tokens,
            sliding_window=types.SlidingWindow(target_tokens=defaults.compression_target_tokens),
        )
        agent = LlmAgent(
            name="interviewer",
            model=Gemini(model=MODEL, client=self.client),
            instruction=instruction,
        )
        self.bare_runner = Runner(
            app_name="bare",
            agent=agent,
            session_service=InMemorySessionService(),
            auto_create_session=True,
        )
        self.bare_run_config = RunConfig(
            response_modalities=[types.Modality.AUDIO],
            input_audio_transcription=types.AudioTranscriptionConfig(),
            output_audio_transcription=types.AudioTranscriptionConfig(),
            session_resumption=types.SessionResumptionConfig(),
            context_window_compression=compression,
        )
        self.raw_config = self.genai_upstream.connect_config(None, defaults)
        self._ids = itertools.count()

    def make(self, system: str) -> Interview:
        if system == "voicefsm-adk":
            return VoicefsmInterview(self.adk_upstream)
        if system == "voicefsm-adk-queue":
            return VoicefsmInterview(self.adk_queue_upstream)
        if system == "voicefsm-genai":
            return VoicefsmInterview(self.genai_upstream)
        if system == "bare-adk":
            return BareAdkInterview(self.bare_runner, self.bare_run_config, f"b-{next(self._ids)}")
        if system == "raw-genai":
            return RawGenaiInterview(self.client, self.raw_config)
        raise ValueError(f"unknown system {system!r}")


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One system at one N, one repeat."""

    system: str
    n: int
    cpu_ms_per_s: float
    lag_p50_ms: float
    lag_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    lost: int
    sent: int
    rss_kib_per_interview: float
    fake_cpu_share: float
    model_chunks: int


async def _feed(
    interview: Interview, ident: int, start: float, stop_at: float, sent: dict[int, int]
) -> None:
    for seq in itertools.count():
        due = start + seq * CHUNK_S
        if due >= stop_at:
            return
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = STAMP.pack(due, ident, seq) + bytes(CHUNK_BYTES - STAMP.size)
        await interview.push(chunk)
        sent[ident] += 1


async def run_once(
    factory: Factory,
    pipe: multiprocessing.connection.Connection,
    system: str,
    n: int,
    warmup: float,
    window: float,
    ids: itertools.count[int],
) -> RunResult:
    """N interviews of ``system``: start, warm up, measure one window, drain, stop."""
    gc.collect()
    ask(pipe, "collect")  # forget arrivals of earlier runs
    rss_before = rss_bytes()
    interviews = [factory.make(system) for _ in range(n)]
    idents = [next(ids) for _ in range(n)]
    for interview in interviews:
        await interview.start()
    async with asyncio.timeout(60):
        await asyncio.gather(*(interview.ready.wait() for interview in interviews))
    sent: dict[int, int] = dict.fromkeys(idents, 0)
    begin = time.monotonic() + 0.1
    window_start = begin + warmup
    window_end = window_start + window
    # Phases spread over one chunk period, as independent clients would be.
    feeders = [
        asyncio.create_task(_feed(interview, ident, begin + (i / n) * CHUNK_S, window_end, sent))
        for i, (interview, ident) in enumerate(zip(interviews, idents, strict=True))
    ]
    lags: list[float] = []
    stop_monitor = asyncio.Event()
    monitor = asyncio.create_task(lag_monitor(lags, stop_monitor))
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    fake_before = ask(pipe, "collect")
    lags.clear()
    cpu_before = time.process_time()
    if PROFILER is not None and n > 2:  # only the measured windows, not the warm-up round
        PROFILER.enable()
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    if PROFILER is not None:
        PROFILER.disable()
    cpu = time.process_time() - cpu_before
    lag_samples = list(lags)
    rss = rss_bytes() - rss_before
    stop_monitor.set()
    await asyncio.wait(feeders)
    await asyncio.sleep(1.0)  # what has not arrived by now counts as lost
    fake_after = ask(pipe, "collect")
    model_chunks = sum(interview.model_chunks for interview in interviews)
    await asyncio.gather(*(interview.stop() for interview in interviews))
    await asyncio.wait({monitor})
    received: dict[int, int] = {}
    for reply in (fake_before, fake_after):
        for ident, count in reply["received"].items():
            received[ident] = received.get(ident, 0) + count
    latencies = [
        latency
        for reply in (fake_before, fake_after)
        for scheduled, latency in zip(reply["scheduled"], reply["latency"], strict=True)
        if window_start <= scheduled < window_end
    ]
    lost = sum(max(0, sent[ident] - received.get(ident, 0)) for ident in idents)
    return RunResult(
        system=system,
        n=n,
        cpu_ms_per_s=cpu / (n * window) * 1000,
        lag_p50_ms=pct(lag_samples, 0.5) * 1000,
        lag_p99_ms=pct(lag_samples, 0.99) * 1000,
        e2e_p50_ms=pct(latencies, 0.5) * 1000,
        e2e_p99_ms=pct(latencies, 0.99) * 1000,
        lost=lost,
        sent=sum(sent.values()),
        rss_kib_per_interview=rss / n / 1024,
        fake_cpu_share=(fake_after["cpu"] - fake_before["cpu"]) / (window + 1.0),
        model_chunks=model_chunks,
    )


# --------------------------------------------------------------------------- the report


@dataclass
class Summary:
    """Medians over the repeats of one system at one N."""

    system: str
    n: int
    runs: list[RunResult] = field(default_factory=list)

    def median(self, name: str) -> float:
        return median_of(self.runs, name)

    @property
    def sustained(self) -> bool:
        return self.median("lag_p99_ms") < 50 and all(run.lost == 0 for run in self.runs)


RATIOS = (
    ("voicefsm-adk", "bare-adk"),
    ("voicefsm-adk-queue", "bare-adk"),
    ("voicefsm-genai", "raw-genai"),
    ("voicefsm-genai", "bare-adk"),
)
"""The paired CPU ratios reported, (system, baseline), when both ran."""


def paired_ratio(results: list[RunResult], system: str, baseline: str, n: int) -> float:
    """Median over repeats of CPU(system) / CPU(baseline), each pair from the same repeat."""
    mine = [r for r in results if r.system == system and r.n == n]
    theirs = [r for r in results if r.system == baseline and r.n == n]
    return _harness.paired_ratio(mine, theirs, "cpu_ms_per_s")


def build_report(results: list[RunResult], args: argparse.Namespace, command: str) -> str:
    """The markdown section: per-N table, ratios, largest sustained N."""
    sizes = sorted({r.n for r in results})
    systems = [s for s in SYSTEMS if any(r.system == s for r in results)]
    summaries = {
        (s, n): Summary(s, n, [r for r in results if r.system == s and r.n == n])
        for s in systems
        for n in sizes
    }
    lines = [
        "<!-- capacity:begin -->",
        "## Capacity",
        "",
        f"`{command}` — {datetime.date.today().isoformat()}, {machine(args)}; {libraries()}.",
        "",
        f"Medians of {args.repeats} interleaved repeat(s); window {args.window:g} s after "
        f"{args.warmup:g} s of warm-up. CPU is this process's, per interview, in ms per second "
        "of interview; e2e is a client chunk's scheduled send time to its arrival at the fake.",
        "",
        "| N | system | CPU ms/s | loop lag p50 / p99 ms | e2e p50 / p99 ms | lost / sent "
        "| RSS KiB/interview | fake CPU |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        for s in systems:
            summary = summaries[(s, n)]
            if not summary.runs:
                continue
            lost = max(run.lost for run in summary.runs)
            sent = int(summary.median("sent"))
            lines.append(
                f"| {n} | {s} | {summary.median('cpu_ms_per_s'):.2f} "
                f"| {summary.median('lag_p50_ms'):.1f} / {summary.median('lag_p99_ms'):.1f} "
                f"| {summary.median('e2e_p50_ms'):.1f} / {summary.median('e2e_p99_ms'):.1f} "
                f"| {lost} / {sent} | {summary.median('rss_kib_per_interview'):.0f} "
                f"| {summary.median('fake_cpu_share'):.0%} |"
            )
    lines += ["", "CPU per interview as paired ratios (same repeat, same N):", ""]
    pairs = [
        (system, baseline)
        for system, baseline in RATIOS
        if system in systems and baseline in systems
    ]
    lines.append("| N | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    lines.append("| ---: |" + " ---: |" * len(pairs))
    for n in sizes:
        cells = [f"{paired_ratio(results, a, b, n):.2f}x" for a, b in pairs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Largest N measured that each system sustains (loop-lag p99 < 50 ms, none lost):",
        "",
    ]
    for s in systems:
        held = [n for n in sizes if summaries[(s, n)].runs and summaries[(s, n)].sustained]
        lines.append(f"* {s}: {max(held) if held else f'< {sizes[0]}'}")
    lines += ["", "<!-- capacity:end -->"]
    return "\n".join(lines) + "\n"


def machine(args: argparse.Namespace) -> str:
    """What the numbers were measured on."""
    pin = f"pinned to CPU {args.cpu}" if args.cpu is not None else "not pinned"
    fake = f"fake on CPU {args.fake_cpu}" if args.fake_cpu is not None else "fake not pinned"
    load = os.getloadavg()[0]
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{pin}, {fake}, load average {load:.1f} at the start (the machine is shared)"
    )


def libraries() -> str:
    """Versions of the libraries in the path."""
    names = ("google-genai", "google-adk", "websockets")
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in names)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, warmup_s=2.0)
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated, from {', '.join(SYSTEMS)}",
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--fake-cpu", type=int, default=None, help="pin the fake's process")
    parser.add_argument("--quick", action="store_true", help="small sizes, one short repeat")
    parser.add_argument("--markdown", type=Path, help="write the section into this file")
    parser.add_argument("--profile", type=Path, help="cProfile this process into this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.window = "10,30", 1, 1.0, 3.0
    args.sizes = parse_sizes(args.sizes)
    args.systems = [s for s in str(args.systems).split(",") if s]
    for system in args.systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    return args


async def amain(
    args: argparse.Namespace, pipe: multiprocessing.connection.Connection
) -> list[RunResult]:
    """Every (N, repeat, system) run, interleaved."""
    import logging

    logging.disable(logging.WARNING)
    hello = pipe.recv()
    factory = Factory(hello["base_url"], hello["ca_pem"])
    ids = itertools.count()
    # First runs pay one-off costs (lazy imports, pydantic schema builds): one discarded round.
    for system in args.systems:
        await run_once(factory, pipe, system, 2, 0.2, 0.5, ids)
    results: list[RunResult] = []
    for n in args.sizes:
        for repeat in range(args.repeats):
            for system in rotated(args.systems, repeat):
                result = await run_once(factory, pipe, system, n, args.warmup, args.window, ids)
                results.append(result)
                print(
                    f"N={n:4d} #{repeat + 1} {system:15s} cpu {result.cpu_ms_per_s:6.2f} ms/s  "
                    f"lag p99 {result.lag_p99_ms:7.1f} ms  e2e p99 {result.e2e_p99_ms:7.1f} ms  "
                    f"lost {result.lost}/{result.sent}  rss {result.rss_kib_per_interview:6.0f} "
                    f"KiB  fake cpu {result.fake_cpu_share:.0%}",
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print (and optionally write) the report."""
    args = parse_args(argv)
    with spawned(fake_process, args.fake_cpu) as (parent, _):
        pin(args.cpu)
        if args.profile is not None:
            import cProfile

            global PROFILER
            PROFILER = cProfile.Profile()
        results = asyncio.run(amain(args, parent))
        if PROFILER is not None:
            PROFILER.dump_stats(args.profile)
    command = command_line("bench_capacity.py", argv)
    publish(build_report(results, args, command), args.markdown, "capacity")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
