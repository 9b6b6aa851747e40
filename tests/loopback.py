"""Helpers every loopback test shares: a fast config, numbered audio, a uvicorn in this loop.

Imports no ADK (the genai-upstream tests also run in an environment without it, see ``.ci/run``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import uvicorn

from voicefsm import Session, SessionConfig, SessionRecord
from voicefsm import events as ev
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel, MemorySink
from voicefsm.ports import Upstream
from voicefsm.protocol import ServerMessage
from voicefsm.testing import FakeLiveConnection, FakeLiveServer

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
CHUNK_BYTES = 640


def fast_config(**overrides: Any) -> SessionConfig:
    """Durations scaled down so an interview's policy plays out in seconds."""
    values: dict[str, Any] = {
        "time_limit_s": 60,
        "warning_before_s": 10,
        "heartbeat_interval_s": 30,
        "heartbeat_timeout_s": 60,
        "client_grace_s": 5,
        "connect_timeout_s": 5,
        "resume_backoff_base_s": 0.05,
        "resume_backoff_cap_s": 0.4,
        "min_remaining_to_resume_s": 0.5,
        "goaway_margin_s": 0.5,
    }
    values.update(overrides)
    return SessionConfig(**values)


def chunk(seq: int) -> bytes:
    """A client audio chunk that carries its sequence number."""
    return struct.pack(">I", seq) + bytes(CHUNK_BYTES - 4)


def sequence_numbers(connections: Sequence[FakeLiveConnection]) -> list[int]:
    """Every client chunk the fake received, across connections, in arrival order."""
    return [
        struct.unpack_from(">I", data)[0]
        for connection in connections
        for data in connection.audio_chunks
    ]


def upstream_tasks() -> list[asyncio.Task[Any]]:
    """voicefsm's upstream tasks (run_live, pings, tear-downs) still running in this loop."""
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith("voicefsm-upstream-") and not task.done()
    ]


class RecordingTransport:
    """A client transport with no socket behind it: it reads nothing and records what the
    service sends (``texts``) and its close (``closed``). Tests override what should fail."""

    def __init__(self, query: dict[str, str] | None = None) -> None:
        self.subprotocols: list[str] = []
        self.query: dict[str, str] = dict(query or {})
        self.origin: str | None = None
        self.texts: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def accept(self, subprotocol: str | None) -> None:
        pass

    async def receive(self) -> str | bytes | None:
        return None

    async def send_text(self, text: str) -> None:
        self.texts.append(text)

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def pretend_adk_is_missing(monkeypatch: Any) -> None:
    """Make ``importlib.util.find_spec("google.adk")`` say ADK is not installed (for this test)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "google.adk" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def uvicorn_serving(
    app: Any, port: int = 0, *, within: float = 30, **options: Any
) -> AsyncIterator[int]:
    """``app`` under a real uvicorn in this event loop on loopback ``port`` (0: a free one).

    Yields the port it listens on; stops the server (bounded by ``within``) on the way out.
    ``options`` go to ``uvicorn.Config`` (default: ``ws="websockets-sansio"``, quiet logs).
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        **{"ws": "websockets-sansio", "log_level": "warning", **options},
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(within):
            while not server.started:
                if task.done():
                    task.result()  # startup failed: raise its error
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, within)


class HostRig:
    """One :class:`SessionHost` on ``upstream`` with an in-memory client and sink.

    ``async with`` runs the host; the upstream-specific rigs (``live_rig.Rig`` on ADK,
    ``genai_rig.GenaiRig``) build the upstream.
    """

    def __init__(
        self,
        server: FakeLiveServer,
        upstream: Upstream,
        config: SessionConfig | None = None,
        **host_options: Any,
    ) -> None:
        self.server = server
        self.upstream = upstream
        self.channel = MemoryChannel()
        self.sink = MemorySink()
        self.session = Session(config or fast_config(), seed=1)
        self.host = SessionHost(
            self.session, upstream, client=self.channel, sink=self.sink, **host_options
        )
        self.task: asyncio.Task[SessionRecord] | None = None
        self.sent = 0

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self.host.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=10)

    def send_audio(self, count: int) -> None:
        """Push ``count`` numbered chunks from the client."""
        for _ in range(count):
            self.channel.push(ev.ClientAudio(chunk(self.sent)))
            self.sent += 1

    async def wait_message(
        self, predicate: Callable[[ServerMessage], bool], within: float = 10
    ) -> None:
        """Wait until the client has received a message matching ``predicate``."""
        async with asyncio.timeout(within):
            await self.channel.wait_for(lambda c: any(predicate(m) for m in c.messages))

    def states(self) -> list[str]:
        """Every state the client was told about, in order."""
        return [m.state for m in self.channel.messages if m.type == "session_state"]

    async def wait_state(self, state: str, count: int = 1, within: float = 10) -> None:
        """Wait until the client was told ``count`` times that the session is in ``state``."""
        async with asyncio.timeout(within):
            await self.channel.wait_for(lambda c: self.states().count(state) >= count)

    async def finish(self, within: float = 15) -> SessionRecord:
        """Wait for the host to return the final record."""
        assert self.task is not None
        async with asyncio.timeout(within):
            return await self.task

    async def end(self) -> SessionRecord:
        """The client ends the interview; wait for the final record."""
        self.channel.push(ev.ClientEnd())
        return await self.finish()


INTERVIEWER_PCM = bytes(range(256)) * 8
"""What :func:`listen_then_speak` answers with."""


async def listen_then_speak(conn: FakeLiveConnection) -> None:
    """A fake script: set up, wait for three client chunks, answer with :data:`INTERVIEWER_PCM`,
    then wait for the client to close."""
    await conn.send_setup_complete()
    await conn.wait_for_audio_chunks(3)
    await conn.send_model_audio(INTERVIEWER_PCM)
    await conn.wait_closed(timeout=None)


def assert_deflate_offered(
    conn: FakeLiveConnection, negotiated: Sequence[str], deflate: bool
) -> None:
    """The client offered permessage-deflate, and the websocket took it, exactly if ``deflate``
    (``negotiated``: the extension names the client's websocket ended up with)."""
    offered = conn.headers.get("sec-websocket-extensions")
    if deflate:
        assert offered is not None and offered.startswith("permessage-deflate")
        assert list(negotiated) == ["permessage-deflate"]
    else:
        assert offered is None
        assert list(negotiated) == []


def assert_every_chunk_in_order_once_resent(server: FakeLiveServer, sent: int) -> int:
    """Every chunk arrived; the second connection starts at or before where the first stopped.

    Returns how many chunks arrived twice (re-sent although the dead peer had read them).
    """
    first, second = (sequence_numbers([c]) for c in server.connections)
    assert first == list(range(len(first)))
    assert second, "nothing reached the resumed connection"
    assert second == list(range(second[0], second[0] + len(second)))
    assert second[0] <= len(first)
    assert set(first) | set(second) == set(range(sent))
    return len(first) - second[0]


async def streaming(rig: HostRig, stop: asyncio.Event) -> None:
    """Send one numbered client chunk every 5 ms until ``stop`` is set."""
    while not stop.is_set():
        rig.send_audio(1)
        await asyncio.sleep(0.005)
