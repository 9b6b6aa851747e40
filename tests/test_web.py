"""One conformance suite for both web adapters (Starlette on uvicorn, aiohttp on its runner).

Real servers on loopback, a real websocket client, the real ADK upstream against the fake Live
server. Each test runs once per adapter.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from aiohttp import web
from google.adk.agents import LlmAgent
from live_rig import starlette_service
from loopback import MODEL, chunk, fast_config, free_port, sequence_numbers
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from voicefsm.adk import AdkUpstream
from voicefsm.auth import JWTAuthenticator
from voicefsm.model import SessionConfig
from voicefsm.service import InterviewService
from voicefsm.testing import FakeLiveConnection, FakeLiveServer
from voicefsm.web.aiohttp import interview_handler, runner_options
from voicefsm.web.decoder import ProtocolLimits

SECRET = "test-secret-that-is-long-enough-for-hs256"
AUTH = JWTAuthenticator(SECRET)


@asynccontextmanager
async def starlette_server(service: InterviewService) -> AsyncIterator[int]:
    port = free_port()
    async with starlette_service(service, port):
        yield port


@asynccontextmanager
async def aiohttp_server(service: InterviewService) -> AsyncIterator[int]:
    port = free_port()
    app = web.Application()
    app.router.add_get("/interview", interview_handler(service))
    runner = web.AppRunner(app, **runner_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await service.shutdown()
        await runner.cleanup()


SERVERS = {"starlette": starlette_server, "aiohttp": aiohttp_server}


async def live_until_closed(conn: FakeLiveConnection) -> None:
    await conn.send_setup_complete()
    await conn.send_resumption_update(f"h-{conn.number}")
    await conn.wait_closed(timeout=None)


@dataclass
class Stack:
    fake: FakeLiveServer
    service: InterviewService
    url: str

    async def connect(
        self,
        user: str | None = "alice",
        *,
        query: str = "",
        token: str | None = None,
        via: str = "subprotocol",
        origin: str | None = None,
    ) -> ClientConnection:
        token = token if token is not None else (AUTH.issue(user) if user else None)
        protocols = ["voicefsm.v1"]
        url = self.url + (f"?{query}" if query else "")
        if token and via == "subprotocol":
            protocols.append(f"bearer.{token}")
        elif token and via == "query":
            url += ("&" if query else "?") + f"token={token}"
        ws = await connect(
            url,
            subprotocols=protocols,  # type: ignore[arg-type]
            origin=origin,  # type: ignore[arg-type]
            open_timeout=5,
        )
        if token and via == "message":
            await ws.send(json.dumps({"type": "auth", "token": token}))
        return ws


@asynccontextmanager
async def open_stack(kind: str, config: SessionConfig | None = None) -> AsyncIterator[Stack]:
    """The fake Live server, a service on it, and the ``kind`` adapter's server in front."""
    async with FakeLiveServer(script=live_until_closed) as fake:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        service = InterviewService(
            AdkUpstream(agent, client=fake.genai_client()),
            AUTH,
            config=config or fast_config(client_grace_s=5),
            limits=ProtocolLimits(
                messages_per_second=100, burst=60, max_errors=12, max_frame_bytes=64 * 1024
            ),
            origins=None,
        )
        async with SERVERS[kind](service) as port:
            yield Stack(fake, service, f"ws://127.0.0.1:{port}/interview")


@pytest.fixture(params=sorted(SERVERS))
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    config: SessionConfig | None = getattr(request, "param_config", None)
    async with open_stack(request.param, config) as opened:
        yield opened


async def next_json(
    ws: ClientConnection, kind: str | None = None, within: float = 10
) -> dict[str, Any]:
    """The next JSON message (of type ``kind``), skipping audio frames and other messages."""
    async with asyncio.timeout(within):
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                continue
            message: dict[str, Any] = json.loads(frame)
            if kind is None or message.get("type") == kind:
                return message


async def close_code(ws: ClientConnection, within: float = 10) -> int | None:
    """Drain the socket until it closes; return the close code the server sent."""
    try:
        async with asyncio.timeout(within):
            async for _ in ws:
                pass
    except ConnectionClosed:
        pass
    return ws.close_code


async def start_session(stack: Stack, user: str = "alice") -> tuple[ClientConnection, str]:
    ws = await stack.connect(user)
    created = await next_json(ws, "session_created")
    state = await next_json(ws, "session_state")
    assert state["state"] == "live"
    return ws, created["session_id"]


# ----------------------------------------------------------------------------- happy path


async def test_audio_both_encodings_reaches_the_upstream_and_end_closes_1000(stack: Stack) -> None:
    ws, session_id = await start_session(stack)
    live = stack.service.sessions[session_id]
    assert ws.subprotocol == "voicefsm.v1"
    for seq in range(5):
        await ws.send(chunk(seq))  # binary frames
    for seq in range(5, 8):
        data = base64.b64encode(chunk(seq)).decode()
        await ws.send(json.dumps({"mime_type": "audio/pcm", "data": data}))
    await ws.send(json.dumps({"mime_type": "text/plain", "data": "Hello"}))
    upstream = stack.fake.connections[0]
    await upstream.wait_for_audio_chunks(8)
    await upstream.wait_for_text_inputs(1)
    await ws.send(json.dumps({"end_session": True}))
    ended = await next_json(ws, "session_ended")
    assert ended["reason"] == "user_ended"
    assert await close_code(ws) == 1000
    assert sequence_numbers([upstream]) == list(range(8))
    assert upstream.texts == ["Hello"]
    record = await asyncio.wait_for(live.task, 10)
    assert record.end_reason == "user_ended"
    assert session_id not in stack.service.sessions
    await upstream.wait_closed()


async def test_the_pages_subprotocols_are_taken_without_a_warning(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The page offers ``voicefsm.v1`` and ``bearer.<token>``: no server warns that they do not
    overlap its own (aiohttp did, once per connection, from the handler's upgrade check)."""
    caplog.set_level(logging.WARNING)
    ws, _ = await start_session(stack)
    assert ws.subprotocol == "voicefsm.v1"
    await ws.send(json.dumps({"end_session": True}))
    assert await close_code(ws) == 1000
    server_warnings = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith("voicefsm")
    ]  # (the service's own warning about the memory store is meant)
    assert server_warnings == []


@pytest.mark.parametrize("via", ["query", "message"])
async def test_token_by_query_parameter_or_first_message(stack: Stack, via: str) -> None:
    ws = await stack.connect("alice", via=via)
    assert (await next_json(ws, "session_created"))["session_id"]
    await ws.send(json.dumps({"end_session": True}))
    assert (await next_json(ws, "session_ended"))["reason"] == "user_ended"


# ----------------------------------------------------------------------------- auth


def expired_token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now - 7200, "exp": now - 3600}, SECRET, "HS256")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "missing token"),
        ("not-a-jwt", "invalid token"),
        (
            jwt.encode(
                {"sub": "eve", "exp": int(time.time()) + 600}, "a-different-secret-of-enough-length"
            ),
            "invalid token",
        ),
        (None, "token expired"),
    ],
)
async def test_bad_tokens_close_4401_before_any_upstream(
    stack: Stack, token: str | None, reason: str
) -> None:
    ws = await stack.connect(None, token=expired_token("eve") if token is None else token)
    if token == "":
        await ws.send(json.dumps({"type": "hello"}))  # a first message that is not auth
    assert await close_code(ws) == 4401
    assert ws.close_reason is not None
    assert ws.close_reason.startswith(reason)
    assert stack.fake.connections == []
    assert stack.service.sessions == {}


async def test_another_user_cannot_attach_4403(stack: Stack) -> None:
    ws, session_id = await start_session(stack, "alice")
    intruder = await stack.connect("mallory", query=f"session={session_id}")
    assert await close_code(intruder) == 4403
    await ws.send(chunk(0))
    await stack.fake.connections[0].wait_for_audio_chunks(1)  # alice's session is untouched
    await ws.close()


async def test_origin_allow_list_4403(stack: Stack) -> None:
    stack.service.origins = frozenset({"https://interviews.example"})
    good = await stack.connect("alice", origin="https://interviews.example")
    assert (await next_json(good, "session_created"))["session_id"]
    bad = await stack.connect("alice", origin="https://evil.example")
    assert await close_code(bad) == 4403
    assert len(stack.fake.connections) == 1
    await good.close()


async def test_unknown_session_4404(stack: Stack) -> None:
    ws = await stack.connect("alice", query="session=nope")
    error = await next_json(ws, "error")
    assert error["code"] == "unknown_session"
    assert await close_code(ws) == 4404


# ----------------------------------------------------------------------------- bad input


async def test_bad_input_is_answered_counted_and_does_not_end_the_session(stack: Stack) -> None:
    ws, _ = await start_session(stack)
    bad: Sequence[str | bytes] = [
        "{not json",
        json.dumps({"mime_type": "audio/pcm", "data": "***"}),
        json.dumps({"mime_type": "video/mp4", "data": "AAAA"}),
        json.dumps({"hello": "world"}),
        json.dumps({"mime_type": "text/plain", "data": ""}),
        b"",
        b"\x00" * 641,
        "[" * 5000,  # deeper than json.loads can recurse
    ]
    for frame in bad:
        await ws.send(frame)
    codes = [(await next_json(ws, "error"))["code"] for _ in bad]
    assert codes == [
        "invalid_json",
        "bad_base64",
        "unknown_mime_type",
        "unknown_message",
        "invalid_message",
        "empty_audio",
        "invalid_audio",
        "invalid_json",
    ]
    await ws.send(chunk(0))
    await stack.fake.connections[0].wait_for_audio_chunks(1)
    metrics = stack.service.metrics.render().decode()
    assert 'voicefsm_client_errors_total{code="bad_base64"} 1.0' in metrics
    await ws.send(json.dumps({"end_session": True}))
    assert (await next_json(ws, "session_ended"))["reason"] == "user_ended"


async def test_a_flood_is_rate_limited(stack: Stack) -> None:
    ws, _ = await start_session(stack)
    for _ in range(100):  # burst is 60
        await ws.send(json.dumps({"type": "pong"}))
    error = await next_json(ws, "error")
    assert error["code"] == "rate_limited"


async def test_too_many_errors_end_the_session_with_error(stack: Stack) -> None:
    ws, _ = await start_session(stack)
    for _ in range(12):
        await ws.send("{not json")
    ended = await next_json(ws, "session_ended")
    assert ended["reason"] == "error"
    assert "broke the protocol 12 times" in ended["detail"]
    assert await close_code(ws) == 1000


# ----------------------------------------------------------------------------- reconnect


async def test_a_client_that_reconnects_in_the_grace_window_continues_the_same_session(
    stack: Stack,
) -> None:
    ws, session_id = await start_session(stack)
    await ws.send(chunk(0))
    await ws.close()  # a browser refresh
    again = await stack.connect("alice", query=f"session={session_id}")
    state = await next_json(again, "session_state")
    assert state["state"] == "live"
    live = stack.service.sessions[session_id]
    assert live.host.session.deadline - time.time() == pytest.approx(state["remaining_s"], abs=2)
    await again.send(chunk(1))
    upstream = stack.fake.connections[0]
    await upstream.wait_for_audio_chunks(2)
    assert sequence_numbers([upstream]) == [0, 1]
    assert len(stack.fake.connections) == 1  # the same upstream: nothing was reconnected
    await again.send(json.dumps({"end_session": True}))
    assert (await next_json(again, "session_ended"))["reason"] == "user_ended"


async def test_a_second_connection_replaces_the_first_4409(stack: Stack) -> None:
    first, session_id = await start_session(stack)
    second = await stack.connect("alice", query=f"session={session_id}")
    await next_json(second, "session_state")
    assert await close_code(first) == 4409
    await second.send(json.dumps({"end_session": True}))
    assert (await next_json(second, "session_ended"))["reason"] == "user_ended"


async def test_reconnecting_to_an_ended_session_says_how_it_ended(stack: Stack) -> None:
    ws, session_id = await start_session(stack)
    await ws.send(json.dumps({"end_session": True}))
    await next_json(ws, "session_ended")
    again = await stack.connect("alice", query=f"session={session_id}")
    ended = await next_json(again, "session_ended")
    assert ended["reason"] == "user_ended"
    assert await close_code(again) == 1000
