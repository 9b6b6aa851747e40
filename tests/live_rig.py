"""A session host wired to the real ADK and genai clients and the loopback fake Live server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from google.adk.agents import LlmAgent
from loopback import MODEL, HostRig, uvicorn_serving
from starlette.applications import Starlette

from voicefsm import SessionConfig
from voicefsm.adk import AdkUpstream
from voicefsm.metrics import Metrics
from voicefsm.ports import HostNote
from voicefsm.service import InterviewService
from voicefsm.testing import FakeLiveServer
from voicefsm.web.starlette import interview_route, uvicorn_options


class Rig(HostRig):
    """One session host on ADK against a fake server, with an in-memory client."""

    def __init__(
        self,
        server: FakeLiveServer,
        config: SessionConfig | None = None,
        agent: LlmAgent | None = None,
        metrics: Metrics | None = None,
        upstream: AdkUpstream | None = None,
        on_note: Callable[[HostNote], None] | None = None,
    ) -> None:
        agent = agent or LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        self.notes: list[HostNote] = []
        also = on_note

        def noted(note: HostNote) -> None:
            self.notes.append(note)
            if also is not None:
                also(note)

        super().__init__(
            server,
            upstream or AdkUpstream(agent, client=server.genai_client()),
            config,
            observer=metrics.observer() if metrics is not None else None,
            on_note=noted,
        )


@asynccontextmanager
async def starlette_service(service: InterviewService, port: int) -> AsyncIterator[str]:
    """``service`` behind a real uvicorn server on loopback ``port``; yields the websocket URL."""
    app = Starlette(routes=[interview_route(service)])
    options = uvicorn_options(service.limits, log_level="warning")
    async with uvicorn_serving(app, port, within=15, **options) as bound:
        try:
            yield f"ws://127.0.0.1:{bound}/interview"
        finally:
            await service.shutdown()  # sessions drain before the server stops
