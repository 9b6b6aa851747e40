"""The test shown in docs/testing-offline.md, run as written (the page includes this file).

Your app's interview endpoint, behind a real uvicorn server, driven by a websocket client the
way a browser would, with the real ADK runner and genai client talking to the loopback fake
Live server. No key, no network.
"""

# --8<-- [start:test]
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import uvicorn
import websockets
from google.adk.agents import LlmAgent
from starlette.applications import Starlette

from voicefsm import SessionConfig
from voicefsm.adk import AdkUpstream
from voicefsm.auth import JWTAuthenticator
from voicefsm.service import InterviewService
from voicefsm.testing import (
    FakeLiveServer,
    ModelAudio,
    OutputTranscript,
    ResumptionUpdate,
    SetupComplete,
    TurnComplete,
    WaitForAudio,
)
from voicefsm.web.starlette import interview_route, uvicorn_options

SECRET = "a-test-secret-of-at-least-32-bytes!"
GREETING = b"\x10\x00" * 480  # 20 ms of 24 kHz PCM from the "model"
ANSWER = b"\x01\x00" * 320  # 20 ms of 16 kHz PCM from the "candidate"


def my_app(service: InterviewService) -> Starlette:
    """Stands in for your app: whatever mounts the interview endpoint."""
    return Starlette(routes=[interview_route(service, "/interview")])


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """The app under uvicorn on a free loopback port, in this event loop.

    ``uvicorn_options()`` fits uvicorn's websocket to the protocol (frame limit, no deflate).
    """
    options = uvicorn_options(host="127.0.0.1", port=0, log_level="warning")
    config = uvicorn.Config(app, **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(15):
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/interview"
    finally:
        server.should_exit = True
        await task


async def next_json(ws: websockets.ClientConnection, kind: str) -> dict[str, object]:
    """The next JSON message of type ``kind`` (audio and other messages are skipped)."""
    async with asyncio.timeout(15):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str) and (message := json.loads(frame))["type"] == kind:
                return message


async def next_audio(ws: websockets.ClientConnection) -> bytes:
    """The next binary frame: audio from the model (JSON messages are skipped)."""
    async with asyncio.timeout(15):
        while isinstance(frame := await ws.recv(), str):
            pass
        return frame


async def test_an_interview_offline() -> None:
    # What the "model" does on the first connection: greet once it hears 5 chunks.
    script = [
        SetupComplete(),
        WaitForAudio(5),
        ModelAudio(GREETING),
        OutputTranscript("Welcome! Tell me about a project.", finished=True),
        TurnComplete(),
        ResumptionUpdate(),
    ]
    async with FakeLiveServer(script) as live:
        agent = LlmAgent(
            name="interviewer",
            model="gemini-2.5-flash-native-audio-preview-09-2025",
            instruction="You run a behavioral interview.",
        )
        service = InterviewService(
            AdkUpstream(agent, client=live.genai_client()),  # the fake instead of Google
            JWTAuthenticator(SECRET),
            config=SessionConfig(time_limit_s=120, warning_before_s=30),
        )
        token = JWTAuthenticator(SECRET).issue("alice")
        async with serving(my_app(service)) as url:
            async with websockets.connect(
                url, subprotocols=["voicefsm.v1", f"bearer.{token}"]
            ) as ws:
                created = await next_json(ws, "session_created")
                assert created["time_limit_s"] == 120
                assert (await next_json(ws, "session_state"))["state"] == "live"
                for _ in range(5):
                    await ws.send(ANSWER)  # binary frames: raw 16 kHz PCM
                assert await next_audio(ws) == GREETING  # the model's audio, as it was sent
                await ws.send(json.dumps({"end_session": True}))
                ended = await next_json(ws, "session_ended")
                assert ended["reason"] == "user_ended"
            await service.shutdown()
        # What the model received: the candidate's audio, in order.
        assert live.connections[0].audio_chunks[:5] == [ANSWER] * 5
        # --8<-- [end:test]
