"""A session host on the direct google-genai upstream against the loopback fake Live server.

Imports no ADK: the genai-upstream tests also run in an environment without it (and with
google-genai 3.x), see ``.ci/run``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from voicefsm import Session, SessionConfig, SessionRecord
from voicefsm import events as ev
from voicefsm.genai_live import GenaiTool, GenaiUpstream
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel, MemorySink
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


class GenaiRig:
    """One session host on :class:`GenaiUpstream` against a fake server, in-memory client."""

    wire = "direct"
    """The upstream's wire path for rigs built from now on (tests run both)."""

    def __init__(
        self,
        server: FakeLiveServer,
        config: SessionConfig | None = None,
        tools: Sequence[GenaiTool | Any] = (),
        **upstream_options: Any,
    ) -> None:
        self.server = server
        self.upstream = GenaiUpstream(
            MODEL,
            client=server.genai_client(),
            instruction="Interview.",
            tools=tools,
            **{"wire": self.wire, **upstream_options},
        )
        self.channel = MemoryChannel()
        self.sink = MemorySink()
        self.session = Session(config or fast_config(), seed=1)
        self.host = SessionHost(self.session, self.upstream, client=self.channel, sink=self.sink)
        self.task: asyncio.Task[SessionRecord] | None = None
        self.sent = 0

    async def __aenter__(self) -> GenaiRig:
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


def upstream_tasks() -> list[asyncio.Task[Any]]:
    """Upstream connection tasks still alive on this loop."""
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith("voicefsm-upstream-") and not task.done()
    ]
