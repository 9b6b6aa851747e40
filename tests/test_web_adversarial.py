"""Hostile and broken clients, against both adapters under real uvicorn and aiohttp servers.

Each test here failed before the fix it guards: a frame or a connection that exhausted memory,
leaked a token into the logs, killed the client link silently, was never capped, started two
hosts for one session, got a demo token through DNS rebinding, or ended an interview for one
burst. The conformance fixtures (``stack``, the server helpers) come from ``test_web``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from live_rig import starlette_service
from loopback import RecordingTransport, chunk, free_port, uvicorn_serving
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from test_web import (
    AUTH,
    SECRET,
    SERVERS,
    Stack,
    close_code,
    next_json,
    open_stack,
    start_session,
)
from websockets.asyncio.client import ClientConnection, connect

from voicefsm.auth import JWTAuthenticator
from voicefsm.limits import Admission, ServiceLimits
from voicefsm.metrics import Metrics
from voicefsm.model import SessionConfig
from voicefsm.service import InterviewService, WebChannel
from voicefsm.web.aiohttp import interview_handler, runner_options
from voicefsm.web.decoder import ProtocolLimits
from voicefsm.web.starlette import StarletteTransport
from voicefsm.web.uvicorn_server import HeaderDeadlineH11Protocol

HERE = Path(__file__).parent


@pytest.fixture(params=sorted(SERVERS))
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """The conformance stack of ``test_web``, once per adapter."""
    async with open_stack(request.param) as opened:
        yield opened


async def until(predicate: Callable[[], bool], within: float = 10) -> None:
    """Wait (bounded) until ``predicate()`` holds: for service internals that notify no one."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def state_live(ws: ClientConnection, within: float = 20) -> dict[str, Any]:
    """The next ``session_state`` that says ``live``."""
    async with asyncio.timeout(within):
        while True:
            message = await next_json(ws, "session_state", within=within)
            if message["state"] == "live":
                return message


# ----------------------------------------------------------------------------- 1. frame size


async def test_an_oversize_frame_is_refused_by_the_server_1009_and_the_session_survives(
    stack: Stack,
) -> None:
    ws, session_id = await start_session(stack)
    await ws.send(b"\x00" * (64 * 1024 + 2))  # the stack's limit is 64 KiB
    assert await close_code(ws) == 1009
    again = await stack.connect("alice", query=f"session={session_id}")
    assert (await state_live(again))["state"] == "live"
    await again.send(json.dumps({"end_session": True}))
    assert (await next_json(again, "session_ended"))["reason"] == "user_ended"


async def test_the_starlette_adapter_warns_when_uvicorn_allows_bigger_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import uvicorn
    from starlette.applications import Starlette

    from voicefsm.web.starlette import interview_route

    service = InterviewService(_NoUpstream(), AUTH, config=SessionConfig())
    app = Starlette(routes=[interview_route(service)])
    port = free_port()
    # An embedder's plain configuration: uvicorn's default 16 MiB frame limit.
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, ws="websockets-sansio", log_level="error")
    )
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started)
        with caplog.at_level(logging.WARNING, logger="voicefsm.web.starlette"):
            ws = await connect(
                f"ws://127.0.0.1:{port}/interview",
                subprotocols=["bearer.not-a-jwt"],  # type: ignore[list-item]
            )
            assert await close_code(ws) == 4401
        assert "ws_max_size=262144" in caplog.text
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_a_text_frame_that_is_not_utf8_closes_1007_and_the_session_survives(
    stack: Stack,
) -> None:
    ws, session_id = await start_session(stack)
    await ws.send(b'{"type": "pong", "x": "\xff\xfe"}', text=True)
    assert await close_code(ws) == 1007
    again = await stack.connect("alice", query=f"session={session_id}")
    assert (await state_live(again))["state"] == "live"
    await again.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def flood_one(port: int, frame_bytes: int) -> None:
    """Open a websocket with no token and send one binary frame of ``frame_bytes`` (zeros),
    streamed, until the server stops reading or closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /interview HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    try:
        async with asyncio.timeout(30):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 101 " in head, head
            # FIN + binary, masked, 64-bit length; a zero mask leaves the payload as is.
            writer.write(bytes([0x82, 0xFF]) + frame_bytes.to_bytes(8, "big") + bytes(4))
            block = bytes(64 * 1024)
            sent = 0
            while sent < frame_bytes:
                writer.write(block)
                await writer.drain()
                sent += len(block)
            await reader.read()  # until the server closes
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass  # the server closed on us: what it should do
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.fixture
def server_process(tmp_path: Path) -> Any:
    """Start ``flood_server.py MODE`` on a free port (its output in ``tmp_path/MODE.log``);
    yield ``(pid, port)``; kill it by pid."""
    started: list[subprocess.Popen[bytes]] = []

    def start(mode: str) -> tuple[int, int]:
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("GOOGLE_API_KEY", None)
        log = (tmp_path / f"{mode}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, str(HERE / "flood_server.py"), mode, str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(process)
        return process.pid, port

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=10)


async def wait_listening(port: int, within: float = 90) -> None:
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return


@pytest.mark.parametrize("mode", ["serve", "aiohttp"])
async def test_unauthenticated_giant_frames_do_not_grow_the_server(
    server_process: Callable[[str], tuple[int, int]], mode: str
) -> None:
    pid, port = server_process(mode)
    await wait_listening(port)
    await asyncio.gather(*(flood_one(port, 1024 * 1024) for _ in range(4)))  # warm up
    baseline = rss_bytes(pid)
    peak = baseline
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(flood_one(port, 16 * 1024 * 1024) for _ in range(60)))
    finally:
        done.set()
        await sampler
    peak = max(peak, rss_bytes(pid))
    growth_mb = (peak - baseline) / 2**20
    print(f"{mode}: RSS {baseline / 2**20:.0f} MB, peak growth {growth_mb:.1f} MB")
    assert growth_mb < 50


# ----------------------------------------------------------------------------- 2. tokens in logs


class Everything(logging.Handler):
    """Keeps every formatted record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("websockets.client"):  # the test's own client
            self.lines.append(self.format(record))


@contextlib.contextmanager
def capture_all_logs() -> Any:
    """Every record of the root, uvicorn, aiohttp, websockets and voicefsm loggers, at DEBUG."""
    handler = Everything()
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "aiohttp", "aiohttp.access"]
    names += ["aiohttp.server", "aiohttp.web", "websockets", "voicefsm"]
    saved = {name: logging.getLogger(name).level for name in names}
    attach = ["", "uvicorn", "uvicorn.access"]  # these two do not propagate to the root
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    for name in attach:
        logging.getLogger(name).addHandler(handler)
    try:
        yield handler
    finally:
        for name in attach:
            logging.getLogger(name).removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def test_no_token_appears_in_any_log_line(stack: Stack) -> None:
    tokens = []
    with capture_all_logs() as logs:
        for via in ("subprotocol", "query", "message"):
            token = AUTH.issue(f"user-{via}")
            tokens.append(token)
            ws = await stack.connect(token=token, via=via)
            session_id = (await next_json(ws, "session_created"))["session_id"]
            await ws.send(chunk(0))
            await ws.close()
            again = await stack.connect(token=token, via=via, query=f"session={session_id}")
            await state_live(again)
            await again.send(json.dumps({"end_session": True}))
            await next_json(again, "session_ended")
            assert await close_code(again) == 1000
        wrong = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, "another-secret" * 4)
        tokens.append(wrong)
        refused = await stack.connect(token=wrong, via="query")
        assert await close_code(refused) == 4401
    text = "\n".join(logs.lines)
    assert "WebSocket" in text or "GET /interview" in text or "aiohttp" in text  # URLs logged
    for token in tokens:
        assert token not in text
        assert token.rsplit(".", 1)[1] not in text  # not even the signature


# ----------------------------------------------------------------------------- 3. bad frames


async def test_serve_logs_no_token_at_its_default_settings(
    server_process: Callable[[str], tuple[int, int]], tmp_path: Path
) -> None:
    from flood_server import SECRET as SERVE_SECRET

    _, port = server_process("serve")
    await wait_listening(port)
    token = JWTAuthenticator(SERVE_SECRET).issue("alice")
    async with connect(f"ws://127.0.0.1:{port}/interview?token={token}", open_timeout=30) as ws:
        await next_json(ws, "session_created", within=30)
        await ws.send(json.dumps({"end_session": True}))
        await next_json(ws, "session_ended", within=30)
    log = (tmp_path / "serve.log").read_text()
    assert "/interview?token=[redacted]" in log  # uvicorn did log the URL, redacted
    assert token not in log
    assert token.rsplit(".", 1)[1] not in log


async def test_the_serve_command_logs_no_resumption_handle(tmp_path: Path) -> None:
    """``voicefsm serve`` on ADK: the fake issues a handle, and no log line shows it (ADK's
    own INFO line, "Update session resumption handle: new_handle=...", is kept out)."""
    port = free_port()
    secret = "serve-log-test-secret-long-enough-for-hs256"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VOICEFSM_JWT_SECRET": secret}
    env["PYTHONPATH"] = str(HERE.parent)
    env.pop("GOOGLE_API_KEY", None)
    command = [sys.executable, "-m", "voicefsm.cli", "serve", "--port", str(port)]
    command += ["--upstream", "adk", "--store", "memory://", "--fake-time-scale", "20"]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        await wait_listening(port)
        token = JWTAuthenticator(secret).issue("alice")
        url = f"ws://127.0.0.1:{port}/interview"
        async with connect(url, subprotocols=["voicefsm.v1", f"bearer.{token}"]) as ws:  # type: ignore[list-item]
            await next_json(ws, "turn_status", within=30)  # the first question
            for seq in range(250):  # an answer: the fake then issues its first handle
                await ws.send(chunk(seq))
            await next_json(ws, "turn_status", within=30)  # the next question came after it
            await ws.send(json.dumps({"end_session": True}))
            await next_json(ws, "session_ended", within=30)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    log = log_path.read_text()
    assert "voicefsm.host" in log and "upstream: ADK" in log  # INFO lines were written
    assert "handle-1" not in log and "new_handle" not in log


async def test_deep_nesting_as_the_first_message_is_refused_4401(stack: Stack) -> None:
    ws = await stack.connect(None)
    await ws.send("[" * 5000)
    assert await close_code(ws) == 4401
    assert stack.fake.connections == []


NASTY_FRAMES: list[str | bytes] = [
    "[" * 20_000,
    '{"a":' * 10_000 + "1" + "}" * 10_000,
    "1" * 5000,  # more digits than int() takes
    '{"mime_type": "audio/pcm", "data": ' + "[" * 900 + "]" * 900 + "}",
    '{"type": "pong", "seq": 1e400}',
    '{"mime_type": "' + "\u0000" * 500 + '", "data": "AAAA"}',
    '{"end_session": "yes"}',
    '{"mime_type": "text/plain", "data": "\\ud83d"}',  # a lone surrogate, escaped in JSON
    b"\x01",
]


async def test_nasty_frames_each_get_an_error_and_the_session_goes_on(stack: Stack) -> None:
    ws, _ = await start_session(stack)
    for frame in NASTY_FRAMES:
        await ws.send(frame)
        error = await next_json(ws, "error")
        assert error["code"] in {"invalid_json", "invalid_message", "unknown_mime_type"} | {
            "invalid_audio"
        }, (frame[:40], error)
        assert len(error["message"]) < 300
    await ws.send(chunk(0))
    await stack.fake.connections[0].wait_for_audio_chunks(1)
    await ws.send(json.dumps({"end_session": True}))
    assert (await next_json(ws, "session_ended"))["reason"] == "user_ended"


class FailingTransport(RecordingTransport):
    """A transport whose reader breaks."""

    async def receive(self) -> str | bytes | None:
        raise RuntimeError("the framework's reader broke")


async def test_a_failing_reader_closes_the_link_with_1011_and_reports_the_client_gone() -> None:
    transport = FailingTransport()
    channel = WebChannel(transport, ProtocolLimits(), Metrics())
    assert await channel.receive() is None  # the host treats this as the client leaving
    assert transport.closed is not None and transport.closed[0] == 1011
    assert channel.done.is_set()


async def test_closing_an_already_closed_starlette_socket_does_not_raise() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] != "websocket.accept":
            raise OSError("the client is gone")
        sent.append(message)

    scope = {"type": "websocket", "path": "/interview", "headers": [], "query_string": b""}
    websocket = WebSocket(scope, receive, send)
    transport = StarletteTransport(websocket)
    await transport.accept(None)
    await transport.close(1000, "bye")  # raised WebSocketDisconnect before


# ----------------------------------------------------------------------------- 4. caps


async def test_sessions_per_user_are_capped_4429(stack: Stack) -> None:
    stack.service.admission = Admission(ServiceLimits(max_sessions_per_user=1))
    first, _ = await start_session(stack, "alice")
    second = await stack.connect("alice")
    assert (await next_json(second, "error"))["code"] == "too_many_sessions"
    assert await close_code(second) == 4429
    other, _ = await start_session(stack, "bob")  # another user is not affected
    await first.send(json.dumps({"end_session": True}))
    await next_json(first, "session_ended")
    await until(lambda: stack.service.admission.sessions_of("alice") == 0)
    again, _ = await start_session(stack, "alice")  # a place is free again
    assert len(stack.fake.connections) == 3
    for ws in (other, again):
        await ws.close()


async def test_sessions_per_worker_are_capped_1013(stack: Stack) -> None:
    stack.service.admission = Admission(ServiceLimits(max_sessions=1))
    first, _ = await start_session(stack, "alice")
    refused = await stack.connect("bob")
    assert (await next_json(refused, "error"))["code"] == "server_busy"
    assert await close_code(refused) == 1013
    assert len(stack.fake.connections) == 1
    await first.close()


async def test_connections_per_worker_are_capped_1013(stack: Stack) -> None:
    stack.service.admission = Admission(ServiceLimits(max_connections=2))
    idle = [await stack.connect(None) for _ in range(2)]  # never authenticate
    await until(lambda: stack.service.admission.connections == 2)
    refused = await stack.connect(None)
    assert await close_code(refused) == 1013
    for ws in idle:
        await ws.close()
    await until(lambda: stack.service.admission.connections == 0)


async def test_a_connection_that_never_authenticates_is_closed_4401(stack: Stack) -> None:
    stack.service.auth_timeout_s = 0.5
    ws = await stack.connect(None)  # open, then silence
    assert await close_code(ws) == 4401
    assert ws.close_reason is not None and "within" in ws.close_reason


@contextlib.asynccontextmanager
async def bare_server(kind: str) -> AsyncIterator[int]:
    """A server with the adapter's recommended settings and a 0.5 s idle/header deadline."""
    service = InterviewService(_NoUpstream(), AUTH, config=SessionConfig())
    port = free_port()
    if kind == "starlette":
        async with starlette_service(service, port):
            yield port
        return
    app = web.Application()
    app.router.add_get("/interview", interview_handler(service))
    runner = web.AppRunner(app, **runner_options(idle_timeout_s=0.5))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


class _NoUpstream:
    def open(self, **_: Any) -> Any:
        raise AssertionError("no upstream may be opened for an unauthenticated client")


async def closed_by_server(
    port: int, send: Callable[[asyncio.StreamWriter], Awaitable[None]]
) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    trickler = asyncio.create_task(send(writer))
    try:
        async with asyncio.timeout(10):
            while await reader.read(1024):
                pass
        return True
    except (ConnectionError, TimeoutError):
        return False
    finally:
        trickler.cancel()
        writer.close()


@pytest.mark.parametrize("kind", ["starlette", "aiohttp"])
async def test_idle_and_slow_loris_connections_are_closed(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(HeaderDeadlineH11Protocol, "header_timeout_s", 0.5)

    async def nothing(writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /interview HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while True:
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with bare_server(kind) as port:
        assert await closed_by_server(port, nothing)
        assert await closed_by_server(port, trickle)
        # A websocket is past the request head: the deadline does not cut it.
        ws = await connect(f"ws://127.0.0.1:{port}/interview")
        await asyncio.sleep(1.0)  # twice the deadline; what is tested is that nothing happens
        await ws.send(json.dumps({"type": "auth", "token": "not-a-jwt"}))
        assert await close_code(ws) == 4401
        assert ws.close_reason is not None and ws.close_reason.startswith("invalid token")


# ----------------------------------------------------------------------------- 5. one host


def lock_waiters(service: InterviewService, session_id: str) -> int:
    entry = service._locks.get(session_id)
    lock = getattr(entry, "lock", entry)
    waiters = getattr(lock, "_waiters", None)
    return len(waiters) if waiters else 0


async def test_concurrent_reconnects_while_another_worker_holds_the_lease_start_one_host(
    stack: Stack,
) -> None:
    service, store = stack.service, stack.service.store
    first, session_id = await start_session(stack)
    live = service.sessions[session_id]
    old_lease = live.lease
    live.host.detach("test: the session moves to another worker")
    await asyncio.wait({live.task})
    assert await close_code(first) == 4410
    service.worker_id = "worker-a-restarted"  # the old lease now belongs to "another worker"

    gate, entered = asyncio.Event(), asyncio.Event()
    real_load, real_acquire = store.load, store.acquire_lease
    pollers: set[asyncio.Task[Any] | None] = set()

    async def gated_load(sid: str) -> Any:
        if not gate.is_set():
            entered.set()
            await gate.wait()
        return await real_load(sid)

    async def counted_acquire(sid: str, worker_id: str, ttl_s: float) -> Any:
        pollers.add(asyncio.current_task())
        return await real_acquire(sid, worker_id, ttl_s)

    store.load = gated_load  # type: ignore[method-assign]
    store.acquire_lease = counted_acquire  # type: ignore[method-assign]

    # R1 (someone else) holds the session's lock, stuck in the store; R2 queues behind it.
    intruder = await stack.connect("mallory", query=f"session={session_id}")
    await asyncio.wait_for(entered.wait(), 10)
    second = await stack.connect("alice", query=f"session={session_id}")
    await until(lambda: lock_waiters(service, session_id) == 1)
    gate.set()
    assert await close_code(intruder) == 4403
    await until(lambda: len(pollers) >= 1)  # R2 waits for the other worker's lease
    # R3 arrives while R2 waits: it must queue behind R2, not run beside it.
    third = await stack.connect("alice", query=f"session={session_id}")
    await until(lambda: len(pollers) >= 2 or lock_waiters(service, session_id) == 1)
    await store.release_lease(old_lease)  # the other worker lets go

    await state_live(third)
    assert await close_code(second) == 4409  # R3 replaced R2 on the one host
    assert len(service.sessions) == 1
    assert len(stack.fake.connections) == 2  # the first worker's, and exactly one after
    await third.send(json.dumps({"end_session": True}))
    assert (await next_json(third, "session_ended"))["reason"] == "user_ended"


# ----------------------------------------------------------------------------- 6. DNS rebinding


def demo_client() -> TestClient:
    from voicefsm.serve import ServeSettings, create_app

    settings = ServeSettings(config=SessionConfig(), fake=True, store_url="memory://")
    return TestClient(create_app(settings))  # no lifespan: only the HTTP routes are used


def test_demo_tokens_only_for_the_servers_own_host_and_origin() -> None:
    client = demo_client()
    own = {"host": "127.0.0.1:8000"}
    assert client.get("/demo/token", headers=own).status_code == 200
    assert client.get("/demo/token", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/demo/token", headers={"host": "[::1]:8000"}).status_code == 200
    # A rebinding page: the browser sends the attacker's host name for 127.0.0.1.
    rebound = {"host": "attacker.example:8000", "origin": "http://attacker.example:8000"}
    assert client.get("/demo/token", headers=rebound).status_code == 403
    cross = {**own, "origin": "http://attacker.example", "sec-fetch-site": "cross-site"}
    assert client.get("/demo/token", headers=cross).status_code == 403
    same = {**own, "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert client.get("/demo/token", headers=same).status_code == 200


def test_serve_binds_loopback_unless_told() -> None:
    from voicefsm.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    import inspect

    from voicefsm.serve import run

    assert inspect.signature(run).parameters["host"].default == "127.0.0.1"


# ----------------------------------------------------------------------------- 7. bursts


async def test_one_burst_is_throttled_not_fatal(stack: Stack) -> None:
    ws, _ = await start_session(stack)
    for _ in range(450):  # burst is 60, max_errors 12
        await ws.send(json.dumps({"type": "pong"}))
    error = await next_json(ws, "error")
    assert error["code"] == "rate_limited"
    await asyncio.sleep(0.2)  # the rate limit refills with time; nothing to await instead
    await ws.send(json.dumps({"mime_type": "text/plain", "data": "still here"}))
    await stack.fake.connections[0].wait_for_text_inputs(1)
    await ws.send(json.dumps({"end_session": True}))
    ended = await next_json(ws, "session_ended")
    assert ended["reason"] == "user_ended"
    metrics = stack.service.metrics.render().decode()
    assert 'voicefsm_client_errors_total{code="rate_limited"}' in metrics


# ----------------------------------------------------------------------------- low


def test_security_headers_and_no_api_docs_in_serve() -> None:
    client = demo_client()
    for path in ("/", "/static/app.js", "/config.json"):
        response = client.get(path, headers={"host": "127.0.0.1:8000"})
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 404, path


def rs256_token(user: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, pem, algorithm="RS256")


@pytest.mark.parametrize(
    "claims",
    [{"sub": ""}, {"sub": "alice\nINFO voicefsm.service: session started for user admin"}],
)
async def test_an_empty_or_control_character_subject_is_not_a_user(
    stack: Stack, claims: dict[str, Any]
) -> None:
    token = jwt.encode({**claims, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    ws = await stack.connect(token=token)
    assert await close_code(ws) == 4401
    assert stack.service.sessions == {}


async def test_a_wrong_algorithm_token_with_mixed_algorithms_is_4401(stack: Stack) -> None:
    stack.service.authenticator = JWTAuthenticator(SECRET, algorithms=("RS256", "HS256"))
    ws = await stack.connect(token=rs256_token("eve"))
    assert await close_code(ws) == 4401
    good = await stack.connect("alice")  # the HS256 side still works
    assert (await next_json(good, "session_created"))["session_id"]
    await good.close()


@pytest.mark.parametrize("session_id", ["abc\nINFO forged line", "x" * 129, "a b"])
async def test_an_implausible_session_id_is_unknown_without_a_lookup(
    stack: Stack, session_id: str
) -> None:
    looked_up: list[str] = []
    real_load = stack.service.store.load

    async def load(sid: str) -> Any:
        looked_up.append(sid)
        return await real_load(sid)

    stack.service.store.load = load  # type: ignore[method-assign]
    ws = await stack.connect("alice", query=urlencode({"session": session_id}))
    assert (await next_json(ws, "error"))["code"] == "unknown_session"
    assert await close_code(ws) == 4404
    assert looked_up == []


async def test_a_plain_http_request_to_the_endpoint_is_a_4xx_without_a_logged_error(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A crawler's GET is not a websocket: it gets a client error, not a 500 with tracebacks
    (aiohttp answered 500 and logged two errors)."""
    import httpx

    url = stack.url.replace("ws://", "http://", 1)
    with caplog.at_level(logging.WARNING):
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(url)
    assert 400 <= reply.status_code < 500, reply.status_code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not stack.service.sessions and stack.service.admission.connections == 0


async def test_the_websocket_protocol_pauses_a_client_only_once_its_queue_is_full() -> None:
    """uvicorn_options' websocket protocol queues up to MAX_QUEUED_MESSAGES unread frames, then
    stops reading the socket (TCP holds the client back) until the application caught up."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from websockets.asyncio.client import connect

    from voicefsm.web.starlette import uvicorn_options
    from voicefsm.web.uvicorn_server import MAX_QUEUED_MESSAGES, QueueingWebSocketProtocol

    accepted: asyncio.Future[QueueingWebSocketProtocol] = asyncio.Future()
    paused = asyncio.Event()
    read_on = asyncio.Event()
    got: list[bytes] = []

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        protocol = websocket._receive.__self__  # type: ignore[attr-defined]
        pause = protocol.transport.pause_reading

        def pausing() -> None:
            paused.set()
            pause()

        protocol.transport.pause_reading = pausing
        accepted.set_result(protocol)
        await read_on.wait()
        for _ in range(MAX_QUEUED_MESSAGES):
            got.append(await websocket.receive_bytes())
        await websocket.send_bytes(b"done")
        await websocket.receive()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    options = uvicorn_options(log_level="warning")
    options.pop("http")  # the h11 deadline is not under test
    async with (
        uvicorn_serving(app, **options) as port,
        connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws,
    ):
        protocol = await accepted
        for i in range(MAX_QUEUED_MESSAGES - 1):
            await ws.send(bytes([i]))
            await (await ws.ping())  # answered once the server parsed the frame
            assert not paused.is_set()
            assert not protocol.read_paused
        assert protocol.queue.qsize() == MAX_QUEUED_MESSAGES - 1
        await ws.send(bytes([MAX_QUEUED_MESSAGES - 1]))
        await paused.wait()
        assert protocol.read_paused
        read_on.set()
        assert await ws.recv() == b"done"
        assert not protocol.read_paused  # resumed once the application emptied the queue
    assert got == [bytes([i]) for i in range(MAX_QUEUED_MESSAGES)]


async def test_the_served_websocket_refuses_permessage_deflate_that_browsers_offer() -> None:
    """Browsers offer permessage-deflate on every websocket; PCM barely compresses, so
    ``uvicorn_options`` turns it off (uvicorn would otherwise deflate every audio frame both
    ways). The same server with uvicorn's default takes the same offer."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    from voicefsm.web.starlette import uvicorn_options

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_bytes(bytes(640))
        await websocket.receive()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    # What Chrome sends: "permessage-deflate; client_max_window_bits".
    browser_offer = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    negotiated: dict[bool, list[str]] = {}
    for uvicorn_default in (False, True):
        options = uvicorn_options(log_level="warning")
        options.pop("http")  # the h11 deadline is not under test
        if uvicorn_default:
            options.pop("ws_per_message_deflate")
        async with (
            uvicorn_serving(app, **options) as port,
            connect(
                f"ws://127.0.0.1:{port}/ws", extensions=[browser_offer], compression=None
            ) as ws,
        ):
            assert await ws.recv() == bytes(640)
            negotiated[uvicorn_default] = ws.response.headers.get_all("Sec-WebSocket-Extensions")
    assert negotiated[False] == []
    assert any("permessage-deflate" in value for value in negotiated[True])


@pytest.mark.parametrize("kind", ["starlette", "aiohttp"])
async def test_both_adapters_refuse_the_permessage_deflate_browsers_offer(kind: str) -> None:
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    browser_offer = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    async with bare_server(kind) as port:
        ws = await connect(
            f"ws://127.0.0.1:{port}/interview", extensions=[browser_offer], compression=None
        )
        assert ws.response is not None
        assert ws.response.headers.get_all("Sec-WebSocket-Extensions") == []
        await ws.send(json.dumps({"type": "auth", "token": "not-a-jwt"}))
        assert await close_code(ws) == 4401
