"""``voicefsm serve`` on the direct google-genai upstream: the whole app, no ADK in the path.

Runs the FastAPI app under uvicorn on loopback with its built-in fake interviewer, and talks to
it as a client would. Imports no ADK (CI also runs it with google-genai 3.x and no ADK).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from loopback import uvicorn_serving
from websockets.asyncio.client import connect

from voicefsm.auth import JWTAuthenticator
from voicefsm.genai_live import GenaiUpstream
from voicefsm.model import SessionConfig
from voicefsm.serve import ServeSettings, create_app, upstream_kind

SECRET = "test-secret-that-is-long-enough-for-hs256"


async def test_serve_with_the_genai_upstream_runs_an_interview_with_the_fake() -> None:
    settings = ServeSettings(
        config=SessionConfig(time_limit_s=60, warning_before_s=10),
        fake=True,
        fake_time_scale=20,
        jwt_secret=SECRET,
        demo_tokens=False,
        store_url="memory://",
        upstream="genai",
    )
    app = create_app(settings)
    token = JWTAuthenticator(SECRET).issue("alice")
    async with uvicorn_serving(app, within=20) as port:
        assert isinstance(app.state.service.upstream, GenaiUpstream)
        url = f"ws://127.0.0.1:{port}/interview?token={token}"
        async with connect(url) as ws:
            created = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert created["type"] == "session_created"
            async with asyncio.timeout(20):
                while not isinstance(await ws.recv(), bytes):  # the interviewer speaks
                    pass
            await ws.send(json.dumps({"end_session": True}))
            async with asyncio.timeout(10):
                while True:
                    frame = await ws.recv()
                    if isinstance(frame, str) and json.loads(frame)["type"] == "session_ended":
                        break
            assert json.loads(frame)["reason"] == "user_ended"


def test_upstream_kind_picks_adk_only_when_it_is_installed() -> None:
    import importlib.util

    has_adk = importlib.util.find_spec("google.adk") is not None
    assert upstream_kind("auto") == ("adk" if has_adk else "genai")
    assert upstream_kind("genai") == "genai"
    with pytest.raises(ValueError, match="unknown upstream"):
        upstream_kind("openai")
