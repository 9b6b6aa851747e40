"""Upstream rotation on loopback: GoAway to the new connection being ready, and chunks lost.

Run from the repository root (needs ``pip install -e '.[testing]'``)::

    python benchmarks/bench_rotation.py                      # 50 rotations, ~20 s in all
    python benchmarks/bench_rotation.py --rotations 200
    python benchmarks/bench_rotation.py --markdown docs/benchmarks.md   # append a section

One :class:`voicefsm.host.SessionHost` runs a session on the real ADK ``Runner`` (through
:class:`voicefsm.adk.AdkUpstream`) and the real ``google.genai`` client, against the loopback
fake Gemini Live server (:class:`voicefsm.testing.FakeLiveServer`, TLS on 127.0.0.1). The client
streams numbered 20 ms chunks (16 kHz 16-bit PCM, the sequence number in the first 4 bytes) at
real-time pace for the whole run. Each fake connection answers the setup, plays one short model
turn (audio, a finished transcript, ``turnComplete``) and issues a resumable handle; the benchmark
then waits ``--interval`` seconds with audio flowing and sends a ``goAway`` on that connection.
Since no model turn is open, the session rotates at once: close the old connection, open a new
one resuming the handle.

Measured, per rotation, on one ``time.monotonic()`` clock shared by the fake server's records
(``opened_at``, ``setup_at``, ``closed_at``, audio arrival times), the host's ``on_note``
observer and the client channel:

* **GoAway to live**: from just before the fake writes the ``goAway`` frame to the moment the
  client channel receives ``session_state: live`` for the new connection (the host applies the
  ``resuming -> live`` state change after the buffered audio was handed to the new connection).
* the phases in between (see the breakdown table), and GoAway to the first client chunk
  arriving at the new connection;
* client chunks: every sequence number sent against what the fake received over all connections
  (lost, duplicated, out of order), and the session's buffering counters.

* side by side with bare ADK (one ``run_live`` with resumption on, reconnecting by itself):
  GoAway to the next setup frame and to the first client chunk (first and last rotations, all),
  GoAway to the upgrade request at the fake (the work before the connect, TCP and TLS), and the
  cyclic garbage collections that ran inside the GoAway-to-setup gap (``gc.callbacks``; client,
  host and fake share the loop, so a collection there lengthens the gap by its duration);

* how ADK's ``run_live`` start-up grows with the ADK session's history (the runner's
  ``InMemorySessionService`` is wrapped to time ``get_session``, which deep-copies the session).

Baseline, in the same run: a bare ``client.aio.live.connect()`` of the same ``genai.Client`` to a
second fake server (TCP + TLS + WebSocket handshake + setup until ``setupComplete``), and the
close of such a connection (``__aexit__``), each ``--rotations`` times. The ratio column says
how much of a rotation is the connection itself.

Everything (client, host, ADK, genai, the fake server) shares one event loop and process, as in
the tests; on a 2-CPU shared machine the run-to-run spread of the medians is a few ms. The exit
status is 1 if any client chunk was lost, duplicated or reordered; timing targets are reported,
never enforced. The library is not modified: the instrumentation uses its public hooks (a
``VoiceFsmGemini`` subclass, a wrapping ``Upstream``, a ``MemoryChannel`` subclass, the host's
structured ``on_note`` observer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import itertools
import logging
import os
import platform
import shlex
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _harness import write_heading_section
from google.adk.agents import LiveRequestQueue, LlmAgent, RunConfig
from google.adk.models.base_llm_connection import BaseLlmConnection
from google.adk.models.google_llm import Gemini
from google.adk.models.llm_request import LlmRequest
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.adk.sessions import Session as AdkSession
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import Client, types

from voicefsm import Session, SessionConfig, SessionRecord
from voicefsm import events as ev
from voicefsm.adk import _LINK, AdkConnection, AdkUpstream, BoundedSessionService, VoiceFsmGemini
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel, MemorySink
from voicefsm.ports import HostNote, Report, StateNote, UpstreamCloseNote, UpstreamOpenNote
from voicefsm.protocol import ServerMessage
from voicefsm.testing import FakeLiveConnection, FakeLiveServer

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
CHUNK_SECONDS = 0.020
CHUNK_BYTES = 640  # 20 ms of 16 kHz 16-bit mono PCM
MODEL_TURN_PCM = b"\x10\x00" * 960  # 40 ms of 24 kHz PCM
TARGET_MEDIAN_MS = 100.0
GOAWAY_TIME_LEFT = "10s"
MIN_CHUNKS_PER_CONNECTION = 3
TIMES = "\N{MULTIPLICATION SIGN}"


# --------------------------------------------------------------------------- instrumentation


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One host note, stamped with ``time.monotonic()`` when the host made it."""

    at: float
    kind: str  # "state", "open", "close"
    args: tuple[object, ...]


class NoteRecorder:
    """Keeps the host's state changes and upstream opens/closes with monotonic timestamps.

    Passed as ``SessionHost(on_note=...)``: the host calls it synchronously while it carries
    out an effect, so the stamp is the moment the host acted.
    """

    def __init__(self) -> None:
        self.entries: list[HostEntry] = []

    def __call__(self, note: HostNote) -> None:
        now = time.monotonic()
        if isinstance(note, StateNote):
            self.entries.append(HostEntry(now, "state", (note.previous, note.state)))
        elif isinstance(note, UpstreamOpenNote):
            self.entries.append(HostEntry(now, "open", (note.connection_id,)))
        elif isinstance(note, UpstreamCloseNote):
            self.entries.append(HostEntry(now, "close", (note.connection_id,)))
        # Other notes (log entries) are not kept: nothing here reads them, and keeping them
        # would add the recorder's own objects to voicefsm's side of the gap.

    def first(self, kind: str, after: float, match: tuple[object, ...] | None = None) -> float:
        """The time of the first entry of ``kind`` at or after ``after`` (matching a prefix)."""
        for entry in self.entries:
            if entry.kind != kind or entry.at < after:
                continue
            if match is None or tuple(str(a) for a in entry.args[: len(match)]) == tuple(
                str(m) for m in match
            ):
                return entry.at
        return float("nan")


class TimedChannel(MemoryChannel):
    """A :class:`MemoryChannel` that also stamps each JSON message with ``time.monotonic()``."""

    def __init__(self) -> None:
        super().__init__()
        self.stamped: list[tuple[float, ServerMessage]] = []
        self.live_count = 0

    async def send_message(self, message: ServerMessage) -> None:
        self.stamped.append((time.monotonic(), message))
        if message.type == "session_state" and message.state in ("live", "warning"):
            self.live_count += 1
        await super().send_message(message)

    def live_times(self) -> list[float]:
        """When each ``session_state`` live message arrived, in order."""
        return [
            at
            for at, message in self.stamped
            if message.type == "session_state" and message.state in ("live", "warning")
        ]


class Stamps:
    """Monotonic timestamps, keyed by connection number (the engine's connection ids and the
    fake's connection numbers coincide: every attempt reaches the fake)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (one rotation run per reset)."""
        self.model_connect: list[float] = []  # ADK asked the model to connect, in order
        self.goaway_reported: dict[int, float] = {}  # the GoAway reached the session's inbox
        self.upstream_open: dict[int, float] = {}  # the host asked the upstream for a connection
        self.ready_reported: dict[int, float] = {}  # UpstreamReady reached the session's inbox
        self.setup_complete_sent: dict[int, float] = {}  # the fake sent setupComplete


STAMPS = Stamps()


class GcPauses:
    """Every cyclic garbage collection of the process: when it started and how long it took.

    Client, host, ADK and the fake share one event loop, so a collection between a GoAway and
    the next setup frame lengthens that gap by its duration.
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float]] = []  # (monotonic start, milliseconds)
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._started = now
        elif self._started is not None:
            self.pauses.append((self._started, (now - self._started) * 1000.0))
            self._started = None

    def between(self, start: float, end: float) -> float:
        """Milliseconds of collections that started in ``[start, end]`` (NaN for no window)."""
        if end != end:
            return NAN
        return sum(ms for at, ms in self.pauses if start <= at <= end)


GC_PAUSES = GcPauses()
gc.callbacks.append(GC_PAUSES)


class TimedGemini(VoiceFsmGemini):
    """:class:`VoiceFsmGemini` that stamps the moment ADK's flow asks it to connect."""

    @contextlib.asynccontextmanager
    async def connect(self, llm_request: LlmRequest) -> AsyncIterator[BaseLlmConnection]:
        link = _LINK.get(None)
        if link is not None and link.armed is not None:
            await link.armed.wait()  # a warm standby: it connects once the session opens it
        STAMPS.model_connect.append(time.monotonic())
        async with super().connect(llm_request) as connection:
            yield connection


class TimedSessionService(BoundedSessionService):
    """voicefsm's ADK session service, timing each ``get_session`` (one per ``run_live``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[tuple[int, float]] = []  # (events in the session, milliseconds)

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> AdkSession | None:
        start = time.perf_counter()
        session = await super().get_session(
            app_name=app_name, user_id=user_id, session_id=session_id, config=config
        )
        elapsed = (time.perf_counter() - start) * 1000.0
        self.gets.append((len(session.events) if session is not None else 0, elapsed))
        return session


class TimedUpstream:
    """An :class:`AdkUpstream` whose reports are stamped on their way to the session."""

    def __init__(self, inner: AdkUpstream) -> None:
        self.inner = inner

    async def forget(self, session_id: str) -> None:
        """Forget the ADK session (as the wrapped upstream does)."""
        await self.inner.forget(session_id)

    def open(
        self,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> AdkConnection:
        STAMPS.upstream_open.setdefault(connection_id, time.monotonic())

        def stamped(event: ev.Event) -> None:
            if isinstance(event, ev.GoAway):
                STAMPS.goaway_reported.setdefault(connection_id, time.monotonic())
            elif isinstance(event, ev.UpstreamReady):
                STAMPS.ready_reported.setdefault(connection_id, time.monotonic())
            report(event)

        return self.inner.open(
            connection_id=connection_id,
            handle=handle,
            session_id=session_id,
            config=config,
            report=stamped,
        )


def chunk(seq: int) -> bytes:
    """A client chunk carrying its sequence number."""
    return struct.pack(">I", seq) + bytes(CHUNK_BYTES - 4)


# --------------------------------------------------------------------------- the rotation run

NAN = float("nan")


@dataclass
class Rotation:
    """The timestamps of one rotation (monotonic seconds; NaN when not observed)."""

    number: int  # the new connection's number (2 for the first rotation)
    goaway_at: float  # just before the fake wrote the goAway frame
    goaway_reported: float = NAN  # the GoAway reached the session's inbox (below ADK)
    old_closed_at: float = NAN  # the fake saw the old connection end
    host_closed_at: float = NAN  # the host finished closing the old connection
    host_open_at: float = NAN  # the host asked the upstream for the new connection (it starts)
    model_connect_at: float = NAN  # ADK's run_live asked the model to connect
    new_opened_at: float = NAN  # the fake received the HTTP upgrade request
    new_setup_at: float = NAN  # the fake received the setup frame
    setup_complete_at: float = NAN  # the fake sent setupComplete
    ready_reported: float = NAN  # UpstreamReady reached the session's inbox
    host_live_at: float = NAN  # the host applied resuming -> live
    client_live_at: float = NAN  # the client channel got session_state: live
    first_chunk_at: float = NAN  # the first client chunk reached the new connection

    def ms(self, start: str, end: str) -> float:
        """Milliseconds between two of the fields above."""
        return float((getattr(self, end) - getattr(self, start)) * 1000.0)

    @property
    def total_ms(self) -> float:
        return self.ms("goaway_at", "client_live_at")


@dataclass
class ChunkReport:
    """What became of the client's chunks across all connections."""

    sent: int
    received: int
    lost: int
    duplicated: int
    out_of_order: int
    buffered: int
    flushed: int
    overflowed: int
    stream_max_late_ms: float  # worst lateness of the 20 ms schedule while measuring
    stream_p99_late_ms: float
    startup_max_late_ms: float  # worst lateness before the measured rotations (warm-up)


@dataclass
class RotationRun:
    rotations: list[Rotation]
    chunks: ChunkReport
    record: SessionRecord
    connections: int
    wall_s: float
    adk_gets: list[tuple[int, float]]  # per run_live: (ADK session events, get_session ms)
    side: SideRun  # the measured rotations' gaps, for the comparison with bare ADK


@dataclass
class BaselineRun:
    connect_ms: list[float] = field(default_factory=list)
    close_ms: list[float] = field(default_factory=list)


async def rotating_script(conn: FakeLiveConnection) -> None:
    """Answer the setup, play one short model turn, issue a handle, then just record."""
    await conn.send_setup_complete()
    STAMPS.setup_complete_sent[conn.number] = time.monotonic()
    await conn.send_model_audio(MODEL_TURN_PCM)
    await conn.send_output_transcription("Next question, please.", finished=True)
    await conn.send_turn_complete()
    await conn.send_resumption_update(f"h-{conn.number}")
    await conn.wait_closed(timeout=None)


async def run_rotations(rotations: int, interval: float, warmup: int) -> RotationRun:
    """One session, ``warmup + rotations`` GoAways, 20 ms client chunks throughout."""
    STAMPS.reset()
    recorder = NoteRecorder()
    total = warmup + rotations
    started = time.monotonic()
    lateness: list[tuple[float, float]] = []  # (when, how late) per chunk
    async with FakeLiveServer(script=rotating_script) as server:
        model = TimedGemini(model=MODEL, client=server.genai_client())
        agent = LlmAgent(name="interviewer", model=model, instruction="Interview.")
        sessions = TimedSessionService()
        runner = Runner(
            app_name="voicefsm", agent=agent, session_service=sessions, auto_create_session=True
        )
        upstream = TimedUpstream(AdkUpstream(agent, runner=runner))
        channel = TimedChannel()
        config = SessionConfig(time_limit_s=3600, warning_before_s=60)
        session = Session(config, seed=1)
        host = SessionHost(session, upstream, client=channel, sink=MemorySink(), on_note=recorder)
        task = asyncio.create_task(host.run())

        sent = 0
        stop = asyncio.Event()

        async def stream() -> None:
            nonlocal sent
            loop = asyncio.get_running_loop()
            due = loop.time()
            while not stop.is_set():
                now = loop.time()
                lateness.append((time.monotonic(), now - due))
                channel.push(ev.ClientAudio(chunk(sent)))
                sent += 1
                due += CHUNK_SECONDS
                await asyncio.sleep(max(0.0, due - loop.time()))

        def is_live(number: int, _channel: MemoryChannel) -> bool:
            return channel.live_count >= number

        async def wait_live(number: int) -> None:
            await channel.wait_for(functools.partial(is_live, number))

        streamer = asyncio.create_task(stream())
        try:
            goaways = await drive_rotations(server, total, interval, wait_live)
        finally:
            stop.set()
            await streamer
        last = server.connections[-1]
        earlier = sum(c.audio_chunk_count for c in server.connections[:-1])
        with contextlib.suppress(TimeoutError):
            await last.wait_for_audio_chunks(sent - earlier, timeout=5)
        channel.push(ev.ClientEnd())
        record = await asyncio.wait_for(task, 15)
        connections = list(server.connections)
    wall = time.monotonic() - started
    if record.stats.connect_attempts != len(connections):
        raise RuntimeError(
            f"{record.stats.connect_attempts} connection attempts but {len(connections)} "
            "connections reached the fake: the numbering assumption does not hold"
        )

    live_times = channel.live_times()
    results: list[Rotation] = []
    for number, goaway_at in goaways:
        new = connections[number - 1]
        old = connections[number - 2]
        results.append(
            Rotation(
                number=number,
                goaway_at=goaway_at,
                goaway_reported=STAMPS.goaway_reported.get(number - 1, NAN),
                old_closed_at=old.closed_at if old.closed_at is not None else NAN,
                host_closed_at=recorder.first("close", goaway_at, (number - 1,)),
                host_open_at=STAMPS.upstream_open.get(number, NAN),
                model_connect_at=(
                    STAMPS.model_connect[number - 1] if len(STAMPS.model_connect) >= number else NAN
                ),
                new_opened_at=new.opened_at,
                new_setup_at=new.setup_at if new.setup_at is not None else NAN,
                setup_complete_at=STAMPS.setup_complete_sent.get(number, NAN),
                ready_reported=STAMPS.ready_reported.get(number, NAN),
                host_live_at=recorder.first("state", goaway_at, ("resuming", "live")),
                client_live_at=live_times[number - 1] if len(live_times) >= number else NAN,
                first_chunk_at=next((e.at for e in new.timeline if e.kind == "audio"), NAN),
            )
        )

    measured_from = goaways[warmup][1] - interval if len(goaways) > warmup else started
    late_measured = [late * 1000.0 for at, late in lateness if at >= measured_from]
    late_startup = [late * 1000.0 for at, late in lateness if at < measured_from]
    chunks = account_chunks(
        connections,
        sent,
        record,
        late_measured=late_measured,
        late_startup=late_startup,
    )
    return RotationRun(
        results[warmup:],
        chunks,
        record,
        len(connections),
        wall,
        sessions.gets[-len(goaways) :][warmup:],
        gaps_from("voicefsm", connections, goaways[warmup:]),
    )


def account_chunks(
    connections: Sequence[FakeLiveConnection],
    sent: int,
    record: SessionRecord,
    *,
    late_measured: Sequence[float],
    late_startup: Sequence[float],
) -> ChunkReport:
    """Compare what the client sent with what the fake received, over all connections.

    Arrivals are merged across connections by the fake's receive time, so a chunk that reached
    a new connection before an older one's last chunk counts as out of order.
    """
    arrivals = sorted(
        (event.at, index, struct.unpack_from(">I", event.payload)[0])
        for index, connection in enumerate(connections)
        for event in connection.timeline
        if event.kind == "audio" and isinstance(event.payload, bytes)
    )
    received = [seq for _, _, seq in arrivals]
    seen: set[int] = set()
    duplicated = 0
    for seq in received:
        if seq in seen:
            duplicated += 1
        seen.add(seq)
    out_of_order = sum(1 for a, b in itertools.pairwise(received) if b < a)
    lost = sum(1 for seq in range(sent) if seq not in seen)
    stats = record.stats
    return ChunkReport(
        sent=sent,
        received=len(received),
        lost=lost,
        duplicated=duplicated,
        out_of_order=out_of_order,
        buffered=stats.chunks_buffered,
        flushed=stats.chunks_flushed,
        overflowed=stats.chunks_overflowed,
        stream_max_late_ms=max(late_measured, default=NAN),
        stream_p99_late_ms=pct(late_measured, 0.99),
        startup_max_late_ms=max(late_startup, default=NAN),
    )


# --------------------------------------------------------------------------- the baseline


async def run_baseline(count: int, warmup: int) -> BaselineRun:
    """``count`` bare ``client.aio.live.connect()`` calls to a fake that answers the setup."""
    result = BaselineRun()
    config = types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        session_resumption=types.SessionResumptionConfig(),
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
    )
    async with FakeLiveServer() as server:
        client: Client = server.genai_client()
        for i in range(warmup + count):
            start = time.perf_counter()
            manager = client.aio.live.connect(model=MODEL, config=config)
            async with asyncio.timeout(10):
                await manager.__aenter__()
            ready = time.perf_counter()
            await manager.__aexit__(None, None, None)
            closed = time.perf_counter()
            if i >= warmup:
                result.connect_ms.append((ready - start) * 1000.0)
                result.close_ms.append((closed - ready) * 1000.0)
    return result


# --------------------------------------------------------------------------- bare ADK


@dataclass
class SideRun:
    """Per-rotation gaps of one run, in milliseconds, in rotation order."""

    label: str
    to_setup_ms: list[float] = field(default_factory=list)  # goAway sent -> next setup frame
    to_chunk_ms: list[float] = field(default_factory=list)  # goAway sent -> first client chunk
    to_upgrade_ms: list[float] = field(default_factory=list)  # goAway sent -> upgrade request
    gc_ms: list[float] = field(default_factory=list)  # cyclic GC between goAway and setup frame


def gaps_from(
    label: str, connections: Sequence[FakeLiveConnection], goaways: Sequence[tuple[int, float]]
) -> SideRun:
    """The GoAway-to-next-connection gaps, measured on the fake's records."""
    run = SideRun(label)
    for number, goaway_at in goaways:
        new = connections[number - 1]
        setup = new.setup_at if new.setup_at is not None else NAN
        first = next((e.at for e in new.timeline if e.kind == "audio"), NAN)
        run.to_setup_ms.append((setup - goaway_at) * 1000.0)
        run.to_chunk_ms.append((first - goaway_at) * 1000.0)
        run.to_upgrade_ms.append((new.opened_at - goaway_at) * 1000.0)
        run.gc_ms.append(GC_PAUSES.between(goaway_at, setup))
    return run


async def drive_rotations(
    server: FakeLiveServer,
    total: int,
    interval: float,
    wait_live: Callable[[int], Awaitable[None]],
) -> list[tuple[int, float]]:
    """Send a GoAway on each of ``total`` connections once it is live and has audio.

    ``wait_live(number)`` returns once connection ``number`` is live for the side under test.
    """
    goaways: list[tuple[int, float]] = []
    for number in range(1, total + 2):
        conn = await server.wait_for_connection(number, timeout=10)
        async with asyncio.timeout(10):
            await wait_live(number)
        await conn.wait_for_audio_chunks(MIN_CHUNKS_PER_CONNECTION, timeout=10)
        if number > total:
            break
        # The model turn and the handle were sent; the session has them before the GoAway
        # (one connection, wire order).
        await conn.wait_for(lambda c: bool(c.issued_handles), timeout=10)
        await asyncio.sleep(interval)
        goaway_at = time.monotonic()
        await conn.send_go_away(GOAWAY_TIME_LEFT)
        goaways.append((number + 1, goaway_at))
    return goaways


async def run_bare_adk(rotations: int, interval: float, warmup: int) -> SideRun:
    """Bare ADK: one ``run_live`` with resumption on; ADK reconnects by itself on each GoAway."""
    async with FakeLiveServer(script=rotating_script) as server:
        model = Gemini(model=MODEL, client=server.genai_client())
        agent = LlmAgent(name="interviewer", model=model, instruction="Interview.")
        runner = Runner(
            app_name="bare",
            agent=agent,
            session_service=InMemorySessionService(),
            auto_create_session=True,
        )
        run_config = RunConfig(
            response_modalities=[types.Modality.AUDIO],
            session_resumption=types.SessionResumptionConfig(),
            input_audio_transcription=types.AudioTranscriptionConfig(),
            output_audio_transcription=types.AudioTranscriptionConfig(),
        )
        queue = LiveRequestQueue()

        async def drain() -> None:
            stream = runner.run_live(
                user_id="candidate",
                session_id="bare-1",
                live_request_queue=queue,
                run_config=run_config,
            )
            async with contextlib.aclosing(stream) as events:
                async for _ in events:
                    pass

        consumer = asyncio.create_task(drain())
        stop = asyncio.Event()

        async def stream_audio() -> None:
            loop = asyncio.get_running_loop()
            due = loop.time()
            seq = 0
            while not stop.is_set():
                queue.send_realtime(types.Blob(data=chunk(seq), mime_type="audio/pcm;rate=16000"))
                seq += 1
                due += CHUNK_SECONDS
                await asyncio.sleep(max(0.0, due - loop.time()))

        streamer = asyncio.create_task(stream_audio())

        def setup_done(number: int) -> bool:
            return len(server.connections) >= number and bool(
                server.connections[number - 1].session_id
            )

        async def wait_set_up(number: int) -> None:
            # ADK reconnects by itself and tells nobody: poll the fake's record of the setup.
            while not setup_done(number):  # noqa: ASYNC110
                await asyncio.sleep(0.002)

        try:
            goaways = await drive_rotations(server, warmup + rotations, interval, wait_set_up)
        finally:
            stop.set()
            await streamer
            queue.close()
            consumer.cancel()
            await asyncio.wait({consumer}, timeout=15)
        return gaps_from("bare ADK", server.connections, goaways[warmup:])


# --------------------------------------------------------------------------- report


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    data = sorted(v for v in values if v == v)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, p90 and max."""
    clean = [v for v in values if v == v]
    if not clean:
        return (float("nan"),) * 3
    return statistics.median(clean), pct(clean, 0.9), max(clean)


def fmt(value: float) -> str:
    if value != value:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


PHASES: tuple[tuple[str, str, str], ...] = (
    ("fake sends goAway → reported to the session (below ADK)", "goaway_at", "goaway_reported"),
    (
        "→ host starts the new connection (engine's handle, then the host's open)",
        "goaway_reported",
        "host_open_at",
    ),
    (
        "→ the model connect starts (ADK's run_live start-up, unless warm)",
        "host_open_at",
        "model_connect_at",
    ),
    ("→ upgrade request at the fake (TCP + TLS)", "model_connect_at", "new_opened_at"),
    ("→ setup frame at the fake (WS upgrade, setup)", "new_opened_at", "new_setup_at"),
    ("→ fake sends setupComplete", "new_setup_at", "setup_complete_at"),
    ("→ UpstreamReady reported to the session", "setup_complete_at", "ready_reported"),
    ("→ host applies resuming → live (buffer flushed)", "ready_reported", "host_live_at"),
    ("→ client gets session_state live", "host_live_at", "client_live_at"),
)


def build_report(
    run: RotationRun, baseline: BaselineRun, args: argparse.Namespace, command: str
) -> tuple[str, str]:
    """The terminal report and the Markdown section."""
    rotations = run.rotations
    total = summary([r.total_ms for r in rotations])
    to_chunk = summary([r.ms("goaway_at", "first_chunk_at") for r in rotations])
    connect = summary(baseline.connect_ms)
    close = summary(baseline.close_ms)
    connect_close = summary(
        [a + b for a, b in zip(baseline.connect_ms, baseline.close_ms, strict=True)]
    )
    # The new connection's share: from the host asking for it to the session being live.
    reconnect = summary([r.ms("host_open_at", "host_live_at") for r in rotations])
    old_close = summary([r.ms("goaway_reported", "host_closed_at") for r in rotations])
    met = total[0] < TARGET_MEDIAN_MS
    chunks = run.chunks

    rows: list[tuple[str, tuple[float, float, float], str]] = [
        ("**GoAway → session live again** (client told)", total, f"1.00{TIMES}"),
        ("GoAway → first client chunk at the new connection", to_chunk, ratio(to_chunk, total)),
        (
            "closing the old connection (reported → closed, after the new one started)",
            old_close,
            ratio(old_close, total),
        ),
        ("opening the new one (host opens → live)", reconnect, ratio(reconnect, total)),
        ("baseline: bare `live.connect()` until setupComplete", connect, ratio(connect, total)),
        ("baseline: bare connection close (`__aexit__`)", close, ratio(close, total)),
        ("baseline: connect + close", connect_close, ratio(connect_close, total)),
    ]
    phase_rows = [(label, summary([r.ms(a, b) for r in rotations])) for label, a, b in PHASES]
    median_total = total[0]
    growth = adk_growth(run)

    lines: list[str] = []
    lines.append(
        f"Rotation on loopback: {len(rotations)} rotations measured "
        f"({args.warmup} warm-up excluded), {run.connections} connections, "
        f"{args.interval:g} s live between GoAways, run took {run.wall_s:.1f} s"
    )
    lines.append("")
    width = max(len(label) for label, _, _ in rows) + 2
    lines.append(
        f"{'metric (ms)'.ljust(width)}{'median':>9}{'p90':>9}{'max':>9}   share of rotation"
    )
    for label, (med, p90, mx), share in rows:
        lines.append(
            f"{label.replace('**', '').replace('`', '').ljust(width)}"
            f"{fmt(med):>9}{fmt(p90):>9}{fmt(mx):>9}   {share}"
        )
    lines.append("")
    lines.append(
        f"target: median GoAway → live < {TARGET_MEDIAN_MS:g} ms: "
        f"{'met' if met else 'NOT MET'} ({fmt(median_total)} ms)"
    )
    lines.append("")
    pwidth = max(len(label) for label, _ in phase_rows) + 2
    lines.append(f"{'where a rotation goes (ms)'.ljust(pwidth)}{'median':>9}{'p90':>9}{'max':>9}")
    for label, (med, p90, mx) in phase_rows:
        lines.append(f"{label.ljust(pwidth)}{fmt(med):>9}{fmt(p90):>9}{fmt(mx):>9}")
    lines.append("")
    lines.append(growth)
    lines.append("")
    lines.append(
        f"client chunks: sent {chunks.sent}, received {chunks.received}, lost {chunks.lost}, "
        f"duplicated {chunks.duplicated}, out of order {chunks.out_of_order} (target: 0 lost)"
    )
    lines.append(
        f"buffered while resuming {chunks.buffered}, flushed {chunks.flushed}, "
        f"overflowed {chunks.overflowed}"
    )
    lines.append(
        f"client streamer lateness vs its 20 ms schedule while measuring: p99 "
        f"{fmt(chunks.stream_p99_late_ms)} ms, max {fmt(chunks.stream_max_late_ms)} ms "
        f"(before: max {fmt(chunks.startup_max_late_ms)} ms, first connection and warm-up)"
    )
    stats = run.record.stats
    lines.append(
        f"session: end {run.record.end_reason}, goaways {stats.goaways}, "
        f"resumes {stats.resumes}, connect attempts {stats.connect_attempts}"
    )
    text = "\n".join(lines)

    md: list[str] = []
    md.append("## Upstream rotation on loopback (`bench_rotation.py`)")
    md.append("")
    md.append(
        "Generated by `benchmarks/bench_rotation.py`; re-run the command rather than editing."
    )
    md.append("")
    md.append(f"* **Reproduce:** `{command}` (from the repository root)")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    md.append(f"* **Date:** {now}; the whole run took {args.elapsed:.0f} s")
    md.append(f"* **Machine:** {machine()}")
    md.append(f"* **Python:** {platform.python_implementation()} {platform.python_version()}")
    md.append(f"* **Libraries:** {libraries()}")
    md.append(
        f"* **Method:** one `SessionHost` on the real ADK `Runner` (`AdkUpstream`) and "
        f"`google.genai` client against `voicefsm.testing.FakeLiveServer` (TLS on 127.0.0.1, "
        f"same process and event loop); {len(rotations)} GoAways measured after "
        f"{args.warmup} warm-up ones, each sent between turns ({args.interval:g} s after the "
        f"connection went live, with audio flowing), so the session rotates at once; the client "
        f"streams numbered 20 ms chunks in real time throughout. All times on one "
        f"`time.monotonic()` clock: the fake's connection records, the host's "
        f"`on_note` observer, the client channel. Baseline: {len(baseline.connect_ms)} bare "
        f"`client.aio.live.connect()` calls of the same `genai.Client` to a second fake."
    )
    md.append("")
    md.append("| metric | median | p90 | max | ÷ rotation (medians) |")
    md.append("| --- | ---: | ---: | ---: | ---: |")
    for label, (med, p90, mx), share in rows:
        md.append(f"| {label} | {fmt(med)} ms | {fmt(p90)} ms | {fmt(mx)} ms | {share} |")
    md.append("")
    md.append(
        f"**Target** median GoAway → live < {TARGET_MEDIAN_MS:g} ms: "
        f"**{'met' if met else 'NOT met'}** ({fmt(median_total)} ms)."
    )
    md.append("")
    md.append(
        "Where a rotation's time goes (consecutive phases from the GoAway to the client being "
        "told; the medians of the phases add up to roughly the first row):"
    )
    md.append("")
    md.append("| phase | median | p90 | max |")
    md.append("| --- | ---: | ---: | ---: |")
    for label, (med, p90, mx) in phase_rows:
        md.append(f"| {label.strip()} | {fmt(med)} ms | {fmt(p90)} ms | {fmt(mx)} ms |")
    md.append("")
    md.append(growth)
    md.append("")
    md.append("Client audio across all rotations:")
    md.append("")
    md.append("| sent | received | lost | duplicated | out of order | buffered | flushed |")
    md.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    md.append(
        f"| {chunks.sent} | {chunks.received} | **{chunks.lost}** | {chunks.duplicated} | "
        f"{chunks.out_of_order} | {chunks.buffered} | {chunks.flushed} |"
    )
    md.append("")
    md.append(
        f"Target 0 lost: **{'met' if chunks.lost == 0 else 'NOT met'}**. Overflowed: "
        f"{chunks.overflowed}. The client streamer's lateness against its 20 ms schedule "
        f"while measuring: p99 {fmt(chunks.stream_p99_late_ms)} ms, max "
        f"{fmt(chunks.stream_max_late_ms)} ms (before, during the first connection and the "
        f"warm-up: max {fmt(chunks.startup_max_late_ms)} ms)."
    )
    return text, "\n".join(md) + "\n"


def adk_growth(run: RotationRun) -> str:
    """How ADK's run_live start-up grows with the ADK session's history over the run."""
    rotations = run.rotations
    gets = run.adk_gets
    n = max(1, min(10, len(rotations) // 4))
    prep = [r.ms("host_open_at", "model_connect_at") for r in rotations]
    first, last = statistics.median(prep[:n]), statistics.median(prep[-n:])
    text = (
        f"Host opens → model connect (ADK's run_live start-up, done ahead by the warm "
        f"standby): median of the first {n} rotations {fmt(first)} ms, of the last {n} "
        f"{fmt(last)} ms."
    )
    if len(gets) >= 2 * n:
        get_first = statistics.median(ms for _, ms in gets[:n])
        get_last = statistics.median(ms for _, ms in gets[-n:])
        text += (
            f" Of that, `InMemorySessionService.get_session` (a deep copy of the ADK session, "
            f"done once per `run_live`, on the event loop): {fmt(get_first)} ms with "
            f"{gets[0][0]} events → {fmt(get_last)} ms with {gets[-1][0]} events."
        )
    return text


def ratio(part: tuple[float, float, float], whole: tuple[float, float, float]) -> str:
    if whole[0] != whole[0] or part[0] != part[0] or whole[0] == 0:
        return "n/a"
    return f"{part[0] / whole[0]:.2f}{TIMES}"


def machine() -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return f"{platform.platform()}, {platform.machine()}, CPUs: {os.cpu_count()} (usable: {usable})"


def libraries() -> str:
    names = ["google-adk", "google-genai", "websockets", "voicefsm"]
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        parts[-1] += f" (git {rev})"
    except (OSError, subprocess.CalledProcessError):
        pass
    return ", ".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time from a GoAway to the new upstream connection being ready, and client chunks "
            "lost across rotations, with the real ADK upstream on the loopback fake server."
        )
    )
    parser.add_argument(
        "--rotations", type=int, default=100, help="rotations to measure per run (default 100)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each side, interleaved with the other side's (default 2)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="rotations run first and not measured (default 2)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.25,
        help="seconds live, with audio flowing, before each GoAway (default 0.25)",
    )
    parser.add_argument(
        "--markdown",
        metavar="PATH",
        type=Path,
        help="append the results to PATH as a Markdown section (replacing the section an "
        "earlier run of this script wrote there)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log voicefsm and the fake server at INFO"
    )
    args = parser.parse_args(argv)
    if args.rotations < 1 or args.repeats < 1 or args.warmup < 0 or args.interval < 0:
        parser.error("--rotations and --repeats must be >= 1, --warmup and --interval >= 0")
    return args


@dataclass
class Comparison:
    """Every run of both sides, in the order they ran (interleaved)."""

    voicefsm: list[SideRun] = field(default_factory=list)
    bare: list[SideRun] = field(default_factory=list)


async def amain(args: argparse.Namespace) -> tuple[RotationRun, BaselineRun, Comparison]:
    baseline = await run_baseline(args.rotations, warmup=3)
    comparison = Comparison()
    run: RotationRun | None = None
    for repeat in range(args.repeats):
        order = ("bare", "voicefsm") if repeat % 2 == 0 else ("voicefsm", "bare")
        for side in order:
            if side == "bare":
                comparison.bare.append(
                    await run_bare_adk(args.rotations, args.interval, args.warmup)
                )
            else:
                run = await run_rotations(args.rotations, args.interval, args.warmup)
                comparison.voicefsm.append(run.side)
    assert run is not None
    return run, baseline, comparison


def side_by_side(comparison: Comparison, window: int) -> tuple[list[str], list[str]]:
    """Terminal lines and Markdown lines comparing voicefsm with bare ADK."""

    def pooled(runs: list[SideRun], attr: str, part: slice) -> float:
        values = [v for run in runs for v in getattr(run, attr)[part]]
        clean = [v for v in values if v == v]
        return statistics.median(clean) if clean else NAN

    first, last, every = slice(0, window), slice(-window, None), slice(None)
    rows: list[tuple[str, list[float]]] = []
    for label, attr in (
        ("GoAway → next setup frame at the fake", "to_setup_ms"),
        ("GoAway → first client chunk at the new connection", "to_chunk_ms"),
    ):
        for part_label, part in (
            (f"first {window}", first),
            (f"last {window}", last),
            ("all", every),
        ):
            ours = pooled(comparison.voicefsm, attr, part)
            bare = pooled(comparison.bare, attr, part)
            rows.append((f"{label}, {part_label}", [ours, bare, ours / bare if bare else NAN]))
    ours = pooled(comparison.voicefsm, "to_upgrade_ms", every)
    bare = pooled(comparison.bare, "to_upgrade_ms", every)
    rows.append(
        (
            "GoAway → upgrade request at the fake (work before the connect, TCP, TLS), all",
            [ours, bare, ours / bare if bare else NAN],
        )
    )

    def quiet(runs: list[SideRun]) -> float:
        values = [
            gap
            for run in runs
            for gap, pause in zip(run.to_setup_ms, run.gc_ms, strict=True)
            if pause == 0.0
        ]
        return statistics.median(values) if values else NAN

    ours, bare = quiet(comparison.voicefsm), quiet(comparison.bare)
    rows.append(
        (
            "GoAway → next setup frame, rotations without a garbage collection in the gap",
            [ours, bare, ours / bare if bare else NAN],
        )
    )

    def collected(runs: list[SideRun]) -> tuple[float, float]:
        pauses = [pause for run in runs for pause in run.gc_ms if pause == pause]
        share = sum(1 for pause in pauses if pause > 0) / len(pauses) if pauses else NAN
        return share * 100.0, statistics.fmean(pauses) if pauses else NAN

    ours_share, ours_ms = collected(comparison.voicefsm)
    bare_share, bare_ms = collected(comparison.bare)
    gc_line = (
        f"A cyclic garbage collection ran inside the GoAway → setup gap in {ours_share:.0f} % of "
        f"voicefsm's rotations ({fmt(ours_ms)} ms a rotation on average) and in "
        f"{bare_share:.0f} % of bare ADK's ({fmt(bare_ms)} ms)."
    )
    runs = len(comparison.voicefsm)
    count = len(comparison.voicefsm[0].to_setup_ms) if comparison.voicefsm else 0
    head = (
        f"voicefsm against bare ADK, {count} rotations per run, {runs} interleaved runs each "
        f"(medians pooled over the runs):"
    )
    width = max(len(label) for label, _ in rows) + 2
    text = [head, "", f"{'gap (ms)'.ljust(width)}{'voicefsm':>10}{'bare ADK':>10}{'ratio':>8}"]
    md = [
        head,
        "",
        "| gap | voicefsm | bare ADK | voicefsm ÷ bare |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, (ours, bare, quotient) in rows:
        text.append(f"{label.ljust(width)}{fmt(ours):>10}{fmt(bare):>10}{fmt(quotient):>8}")
        md.append(f"| {label} | {fmt(ours)} ms | {fmt(bare)} ms | {fmt(quotient)}{TIMES} |")
    text += ["", gc_line]
    md += ["", gc_line]
    return text, md


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(
            level=logging.INFO, format="%(relativeCreated)8.0f %(name)s %(message)s"
        )
    started = time.monotonic()
    run, baseline, comparison = asyncio.run(amain(args))
    args.elapsed = time.monotonic() - started
    shown = ["python", "benchmarks/bench_rotation.py"]
    if args.rotations != 100:
        shown += ["--rotations", str(args.rotations)]
    if args.repeats != 2:
        shown += ["--repeats", str(args.repeats)]
    if args.warmup != 2:
        shown += ["--warmup", str(args.warmup)]
    if args.interval != 0.25:
        shown += ["--interval", f"{args.interval:g}"]
    if args.markdown is not None:
        shown += ["--markdown", str(args.markdown)]
    command = shlex.join(shown)
    text, markdown = build_report(run, baseline, args, command)
    side_text, side_md = side_by_side(comparison, min(10, max(1, args.rotations // 2)))
    text = "\n".join(side_text) + "\n\n" + text
    heading, _, rest = markdown.partition("\n")
    markdown = f"{heading}\n\n" + "\n".join(side_md) + "\n" + rest
    print(text)
    if args.markdown is not None:
        replaced = write_heading_section(args.markdown, markdown)
        print(
            f"\n{'replaced the section in' if replaced else 'appended the results to'} "
            f"{args.markdown}"
        )
    chunks = run.chunks
    return 0 if chunks.lost == chunks.duplicated == chunks.out_of_order == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
