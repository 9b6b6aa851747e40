"""A session host wired to the real ADK and genai clients and the loopback fake Live server."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from google.adk.agents import LlmAgent
from starlette.applications import Starlette

from voicefsm import Session, SessionConfig, SessionRecord
from voicefsm import events as ev
from voicefsm.adk import AdkUpstream
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel, MemorySink
from voicefsm.metrics import Metrics
from voicefsm.ports import HostNote
from voicefsm.protocol import ServerMessage
from voicefsm.service import InterviewService
from voicefsm.testing import FakeLiveConnection, FakeLiveServer
from voicefsm.web.starlette import interview_route, uvicorn_options

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


def upstream_tasks() -> list[asyncio.Task[Any]]:
    """voicefsm's upstream tasks (run_live, pings, tear-downs) still running in this loop."""
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith("voicefsm-upstream-") and not task.done()
    ]


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


class Rig:
    """One session host on ADK against a fake server, with an in-memory client."""

    def __init__(
        self,
        server: FakeLiveServer,
        config: SessionConfig | None = None,
        agent: LlmAgent | None = None,
        metrics: Metrics | None = None,
        upstream: AdkUpstream | None = None,
    ) -> None:
        self.server = server
        agent = agent or LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        self.upstream = upstream or AdkUpstream(agent, client=server.genai_client())
        self.channel = MemoryChannel()
        self.sink = MemorySink()
        self.session = Session(config or fast_config(), seed=1)
        self.notes: list[HostNote] = []
        self.host = SessionHost(
            self.session,
            self.upstream,
            client=self.channel,
            sink=self.sink,
            observer=metrics.observer() if metrics is not None else None,
            on_note=self.notes.append,
        )
        self.task: asyncio.Task[SessionRecord] | None = None
        self.sent = 0

    async def __aenter__(self) -> Rig:
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


@asynccontextmanager
async def starlette_service(service: InterviewService, port: int) -> AsyncIterator[str]:
    """``service`` behind a real uvicorn server on loopback ``port``; yields the websocket URL."""
    app = Starlette(routes=[interview_route(service)])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, **uvicorn_options(service.limits, log_level="warning")
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if task.done():
                    task.result()  # startup failed: raise its error
                await asyncio.sleep(0.01)
        yield f"ws://127.0.0.1:{port}/interview"
    finally:
        await service.shutdown()
        server.should_exit = True
        await asyncio.wait_for(task, 15)
