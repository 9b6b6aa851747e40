"""Deploys: the embedding examples run under real servers, are stopped with SIGTERM, and the
interview continues on the next process.

``examples/fastapi_app.py`` runs under ``uvicorn`` and ``examples/aiohttp_app.py`` with
``web.run_app`` (``python examples/aiohttp_app.py``), exactly as their docstrings (and
``docs/embedding.md``) say, in subprocesses pointed at the test's fake Live server through
google-genai's own settings (``GOOGLE_GEMINI_BASE_URL``, ``SSL_CERT_FILE``). A session runs,
the process gets SIGTERM, and the client must be told 4410 (not 1012, not ``session_ended``); a
second process (another worker id) takes the session: same deadline, the upstream resumed with
the same handle, the whole transcript. With the memory store, the end says why instead.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from live_rig import starlette_service
from loopback import free_port, uvicorn_serving
from test_failover import (
    AFTER,
    BEFORE,
    SECRET,
    Client,
    Upstream,
    as_lines,
    clients,
    numbered,
    start_session,
    start_workers,
    stored_lines,
    stored_record,
)
from test_failover import upstream as upstream  # the fixture
from worker_process import WorkerPool, WorkerProcess

from voicefsm.auth import JWTAuthenticator
from voicefsm.model import SessionConfig, State
from voicefsm.serve import ServeSettings, create_app
from voicefsm.service import MEMORY_SHUTDOWN_DETAIL, InterviewService
from voicefsm.stores import MemoryStore, SQLiteStore
from voicefsm.web.lifespan import ServiceLifecycle

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 45 * 60  # the examples' interview length


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[WorkerPool]:
    made = WorkerPool(tmp_path, SECRET)
    try:
        yield made
    finally:
        made.close()


def example_app(
    pool: WorkerPool, framework: str, name: str, upstream: Upstream, store_url: str
) -> WorkerProcess:
    """One process of an example app, started the way its docstring says."""
    port = free_port()
    if framework == "fastapi":
        command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        command += ["--ws-max-size", "262144", "--ws-per-message-deflate", "false"]
    else:
        command = [sys.executable, "examples/aiohttp_app.py"]
    env = {
        "PORT": str(port),
        "VOICEFSM_STORE": store_url,
        "VOICEFSM_WORKER_ID": name,
        "GOOGLE_GEMINI_BASE_URL": upstream.server.base_url,
        "SSL_CERT_FILE": str(upstream.server.ca_pem_path),
        "GOOGLE_API_KEY": "fake-key",
        "PYTHONPATH": str(ROOT),
    }
    return pool.add(name, port, [], command=command, env=env, cwd=ROOT)


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
async def test_sigterm_hands_the_interview_over_and_the_next_process_resumes_it(
    tmp_path: Path, upstream: Upstream, pool: WorkerPool, framework: str
) -> None:
    database = tmp_path / "sessions.db"
    store_url = f"sqlite://{database}"
    first_app = example_app(pool, framework, "deploy-1", upstream, store_url)
    await start_workers(first_app)
    reader = SQLiteStore(database)
    try:
        async with clients() as opened:
            client, session_id, asked_at = await start_session(first_app.url, opened)
            first = await upstream.connection(1)
            handle = upstream.handle_of(1)
            await upstream.say(first, BEFORE)
            assert as_lines(await stored_lines(reader, session_id, 4)) == numbered(BEFORE)
            record = await stored_record(
                reader, session_id, lambda r: r.resumption_handle == handle, f"handle {handle}"
            )
            deadline = record.deadline
            assert asked_at + TIME_LIMIT_S <= deadline <= time.time() + TIME_LIMIT_S

            # The deploy: SIGTERM. The client hears 4410 "reconnect" before the server closes.
            code = await asyncio.to_thread(first_app.terminate)
            assert code in (0, -signal.SIGTERM), first_app.log_tail()
            assert await client.close_code() == 4410, first_app.log_tail()
            assert "reconnect" in (client.ws.close_reason or "")
            assert client.of_type("session_ended") == []
            log = first_app.log_text()
            assert "detached without ending the session" in log
            assert "host was cancelled" not in log
            assert "Traceback" not in log
            # Started as documented, neither server is warned about: no frame limit over the
            # protocol's (uvicorn's default), no subprotocols that "don't overlap" (aiohttp).
            assert "the websocket server accepts frames of up to" not in log
            assert "overlap server-known ones" not in log
            await first.wait_closed(timeout=15)
            handed = await reader.load(session_id)
            assert handed is not None and handed.record.state is not State.ENDED
            (listed,) = await reader.list_sessions()
            assert listed.worker is None  # the lease was released for the next process

            # The next process (another worker id) takes the session at once.
            second_app = example_app(pool, framework, "deploy-2", upstream, store_url)
            await start_workers(second_app)
            again = await Client.connect(second_app.url, session_id=session_id)
            opened.append(again)
            live = await again.live(within=30)
            assert live["remaining_s"] == pytest.approx(deadline - time.time(), abs=5.0)
            second = await upstream.connection(2)
            assert second.resumption_handle == handle  # the same conversation upstream
            await upstream.say(second, AFTER)
            everything = numbered(BEFORE + AFTER)
            assert as_lines(await stored_lines(reader, session_id, len(everything))) == everything
            ended = await again.end()
            assert ended["reason"] == "user_ended"
            final = await stored_record(
                reader, session_id, lambda r: r.state is State.ENDED, "state ended"
            )
            assert final.deadline == deadline
            assert final.stats.resumes == 1
            assert as_lines(await reader.read_transcript(session_id)) == everything
    finally:
        await reader.close()


async def test_with_the_memory_store_a_stop_says_so_at_start_up_and_in_the_end_reason(
    upstream: Upstream, pool: WorkerPool
) -> None:
    app = example_app(pool, "fastapi", "memory-1", upstream, "memory://")
    await start_workers(app)
    assert "stopping or restarting this process ends every running interview" in app.log_text()
    async with clients() as opened:
        client, _, _ = await start_session(app.url, opened)
        await upstream.connection(1)
        await asyncio.to_thread(app.terminate)
        assert await client.close_code() == 1000
        (ended,) = client.of_type("session_ended")
        assert ended["reason"] == "error"
        assert ended["detail"] == MEMORY_SHUTDOWN_DETAIL
    assert "host was cancelled" not in app.log_text()


# ----------------------------------------------------------------------------- create_app


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def test_serve_settings_work_with_defaults() -> None:
    settings = ServeSettings()
    assert settings.config == SessionConfig()
    assert settings.store_url.startswith("sqlite://")
    create_app(settings)  # builds; nothing starts before the server does


@pytest.mark.parametrize("how", ["standalone", "mounted", "mounted-with-lifespan"])
async def test_create_app_serves_interviews_standalone_and_mounted(
    upstream: Upstream, how: str
) -> None:
    settings = ServeSettings(
        store_url="memory://",
        jwt_secret=SECRET,
        live_base_url=upstream.server.base_url,
        live_ca_file=str(upstream.server.ca_pem_path),
    )
    voice = create_app(settings)
    mounted = how != "standalone"
    prefix = "/voice" if mounted else ""
    if mounted:
        # The parent's lifespan knows nothing of the sub-app's, unless the parent runs it.
        parent = FastAPI(lifespan=voice.router.lifespan_context if how.endswith("span") else None)
        parent.mount("/voice", voice)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        await run_interview_through(parent if mounted else voice, prefix, upstream)
    finally:  # a mounted app started on its first request: nobody stopped it to restore them
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


async def run_interview_through(app: Any, prefix: str, upstream: Upstream) -> None:
    async with uvicorn_serving(app) as port:
        base = f"http://127.0.0.1:{port}{prefix}"
        health = await asyncio.to_thread(get_json, f"{base}/healthz")
        assert health == {"ok": True, "sessions": 0}
        page = await asyncio.to_thread(get_json, f"{base}/config.json")
        assert page["demo_tokens"] is False
        async with clients() as opened:
            client, _, _ = await start_session(f"ws://127.0.0.1:{port}{prefix}/interview", opened)
            await upstream.connection(1)
            health = await asyncio.to_thread(get_json, f"{base}/healthz")
            assert health == {"ok": True, "sessions": 1}
            ended = await client.end()
            assert ended["reason"] == "user_ended"


def test_the_embedding_docs_show_the_example_apps_word_for_word() -> None:
    """``docs/embedding.md`` shows the two apps the tests above run, unchanged."""
    text = (ROOT / "docs" / "embedding.md").read_text()
    blocks = text.split("```python\n")[1:]
    shown = [block.split("```")[0] for block in blocks]
    for example in ("fastapi_app.py", "aiohttp_app.py"):
        assert (ROOT / "examples" / example).read_text() in shown, example


# ----------------------------------------------------------------------------- signal ordering


class RecordingService(InterviewService):
    """A service whose drain is recorded (and can be held up) instead of stopping sessions."""

    def __init__(self, events: list[str], hold: asyncio.Event) -> None:
        super().__init__(
            NoUpstream(), JWTAuthenticator(SECRET), store=MemoryStore(), orphan_sweep_s=None
        )
        self.events = events
        self.hold = hold
        self.started_draining = asyncio.Event()

    async def shutdown(self, *, detach: bool | None = None, timeout_s: float | None = None) -> None:
        self.events.append("drain started")
        self.started_draining.set()
        await self.hold.wait()
        self.events.append("drained")


class NoUpstream:
    def open(self, **_: object) -> object:
        raise AssertionError("no session runs here")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_drains_the_service_before_the_server_hears_of_it(
    sig: signal.Signals,
) -> None:
    events: list[str] = []
    hold = asyncio.Event()
    server_heard = asyncio.Event()

    def server_handler(signum: int, frame: object) -> None:  # stands in for uvicorn's
        events.append(f"server got {signal.Signals(signum).name}")
        server_heard.set()

    original = signal.signal(sig, server_handler)
    try:
        service = RecordingService(events, hold)
        lifecycle = ServiceLifecycle(service)
        await lifecycle.start()
        signal.raise_signal(sig)
        async with asyncio.timeout(10):
            await service.started_draining.wait()
        assert events == ["drain started"]  # the server has not heard of it yet
        hold.set()
        async with asyncio.timeout(10):
            await server_heard.wait()
        assert events == ["drain started", "drained", f"server got {sig.name}"]

        # A second signal during a (slow) drain reaches the server at once.
        events.clear()
        server_heard.clear()
        hold.clear()
        slow = RecordingService(events, hold)
        again = ServiceLifecycle(slow)
        await again.start()
        signal.raise_signal(sig)
        async with asyncio.timeout(10):
            await slow.started_draining.wait()
        signal.raise_signal(sig)
        assert events == ["drain started", f"server got {sig.name}"]
        hold.set()
        await again.stop()
        await lifecycle.stop()
        assert signal.getsignal(sig) == server_handler  # put back as it was
    finally:
        signal.signal(sig, original)


async def test_a_draining_service_turns_new_connections_away() -> None:
    service = InterviewService(
        NoUpstream(),  # type: ignore[arg-type]
        JWTAuthenticator(SECRET),
        store=MemoryStore(),
    )
    async with starlette_service(service, free_port()) as url:
        await service.shutdown()
        assert service.draining
        fresh = await Client.connect(url)
        assert await fresh.close_code() == 1013  # a new session: try another worker
        back = await Client.connect(url, session_id="some-session")
        assert await back.close_code() == 4410  # a reconnect: go elsewhere
        assert "shutting down" in (back.ws.close_reason or "")
        for client in (fresh, back):
            await client.aclose()
