"""End-to-end durability: real worker processes, a real Redis, real sockets, the fake Live server.

* Two ``voicefsm serve`` workers share a real ``redis-server``; the one driving a session is
  killed with SIGKILL mid-session and the client reconnects to the other, which takes the session
  over: same deadline, the upstream resumed with the stored handle, the whole transcript, and the
  dead worker's fencing token refused.
* One ``voicefsm serve`` on SQLite is stopped (SIGTERM, and SIGKILL) and started again with the
  same store and worker id; the client's session continues.
* Redis is stopped for a few seconds under a running session: the interview keeps going, the
  writes queue and land once Redis is back, and the logs say so.

The fake Live server runs in the test's event loop; the workers reach it over TLS on loopback
(``--live-base-url``, ``--live-ca-file``). Its script answers the setup and hands out a unique
resumption handle per connection; the test makes it speak transcript lines when it wants them.
Blocking process control runs in threads so the fake keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.adk.agents import LlmAgent
from live_rig import starlette_service
from loopback import MODEL, chunk, fast_config, free_port, sequence_numbers
from redis_server import RedisServer, require_redis_server
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from worker_process import WorkerPool, WorkerProcess, voicefsm_command, worker_env

from voicefsm.adk import AdkUpstream
from voicefsm.auth import JWTAuthenticator
from voicefsm.model import SessionRecord, State, TranscriptLine
from voicefsm.service import InterviewService
from voicefsm.stores import (
    Lease,
    RedisStore,
    RetryingSink,
    SessionStore,
    SQLiteStore,
    StaleFencingToken,
)
from voicefsm.testing import FakeLiveConnection, FakeLiveServer

SECRET = "failover-test-secret-long-enough-for-hs256"
AUTH = JWTAuthenticator(SECRET)
MINUTES = 5
"""Interview length the workers run (``--minutes``): long enough never to end by itself here."""
TIME_LIMIT_S = MINUTES * 60

_T = TypeVar("_T")


# ----------------------------------------------------------------------------- the fake upstream


class Upstream:
    """The fake Live server's side: every connection answers its setup and gets a unique handle.

    Transcript lines are spoken by the test (:meth:`say`) when it wants them, on the connection
    it names.
    """

    def __init__(self, server: FakeLiveServer, tag: str) -> None:
        self.server = server
        self.tag = tag

    def handle_of(self, number: int) -> str:
        """The resumption handle connection ``number`` hands out."""
        return f"resume-{self.tag}-{number}"

    async def connection(self, number: int, within: float = 30.0) -> FakeLiveConnection:
        """Connection ``number`` once its handle went out (so the session has it)."""
        conn = await self.server.wait_for_connection(number, timeout=within)
        await conn.wait_for(
            lambda c: self.handle_of(number) in c.issued_handles,
            description="the resumption handle to go out",
            timeout=within,
        )
        return conn

    @staticmethod
    async def say(conn: FakeLiveConnection, lines: Sequence[tuple[str, str]]) -> None:
        """Send finished transcriptions: ``("interviewer", text)`` or ``("user", text)``."""
        for role, text in lines:
            if role == "interviewer":
                await conn.send_output_transcription(text, finished=True)
            else:
                await conn.send_input_transcription(text, finished=True)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    tag = uuid.uuid4().hex[:12]

    async def script(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update(f"resume-{tag}-{conn.number}")

    async with FakeLiveServer(script=script) as server:
        yield Upstream(server, tag)


def live_args(upstream: Upstream) -> list[str]:
    """``voicefsm serve`` options that point a worker at the shared fake Live server."""
    return [
        "--live-base-url",
        upstream.server.base_url,
        "--live-ca-file",
        str(upstream.server.ca_pem_path),
        "--minutes",
        str(MINUTES),
    ]


# ----------------------------------------------------------------------------- processes, stores


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server())  # skips without redis-server, unless CI=true
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(tmp_path, SECRET)
    try:
        yield pool
    finally:
        pool.close()  # kills whatever still runs; the logs printed show up for a failed test


async def start_workers(*workers: WorkerProcess) -> None:
    """Start the workers side by side and wait (bounded) until each answers /healthz."""
    for worker in workers:
        worker.start()
    await asyncio.gather(*(asyncio.to_thread(worker.wait_ready) for worker in workers))


async def eventually(
    check: Callable[[], Awaitable[_T | None]], what: str, within: float = 20.0
) -> _T:
    """Poll ``check`` (a store in another process has no change notification) until truthy."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def _true_when(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``predicate`` as a check for :func:`eventually` (for state with no change event)."""

    async def check() -> bool:
        return predicate()

    return check


async def stored_lines(store: SessionStore, session_id: str, count: int) -> list[TranscriptLine]:
    """The stored transcript once it has (at least) ``count`` lines."""

    seen: list[TranscriptLine] = []

    async def enough() -> list[TranscriptLine] | None:
        seen[:] = await store.read_transcript(session_id)
        return seen if len(seen) >= count else None

    try:
        return await eventually(enough, f"{count} transcript lines in {store!r}")
    except AssertionError as error:
        raise AssertionError(f"{error}; stored: {as_lines(seen)}") from None


async def stored_record(
    store: SessionStore, session_id: str, where: Callable[[SessionRecord], bool], what: str
) -> SessionRecord:
    """The stored record once ``where`` holds for it."""

    async def matching() -> SessionRecord | None:
        stored = await store.load(session_id)
        return stored.record if stored is not None and where(stored.record) else None

    return await eventually(matching, f"a stored record with {what}")


def as_lines(lines: Sequence[TranscriptLine]) -> list[tuple[int, str, str]]:
    return [(line.seq, line.role, line.text) for line in lines]


def numbered(lines: Sequence[tuple[str, str]]) -> list[tuple[int, str, str]]:
    return [(seq, role, text) for seq, (role, text) in enumerate(lines)]


async def redis_lease(store: RedisStore, session_id: str) -> tuple[int, str]:
    """The latest fencing token granted on the session and its holder, from the session's hash.

    The key layout is documented (``<prefix>session:<id>``: ``fence``, ``owner``, ...); the store
    API only hands a lease to the worker that acquires it.
    """
    fence, owner = await store.client.hmget(
        f"{store.prefix}session:{session_id}", ["fence", "owner"]
    )
    assert fence is not None, f"no lease was ever granted on session {session_id}"
    return int(fence), (owner or b"").decode()


# ----------------------------------------------------------------------------- the client


class Client:
    """A real websocket client of the interview service; records every JSON message it gets."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.done = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, user: str = "alice", session_id: str | None = None) -> Client:
        query = f"?session={session_id}" if session_id else ""
        ws = await connect(
            url + query,
            subprotocols=["voicefsm.v1", f"bearer.{AUTH.issue(user)}"],  # type: ignore[list-item]
            open_timeout=15,
        )
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, str):
                    self.messages.append(json.loads(frame))
                    async with self._changed:
                        self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.done = True
            async with self._changed:
                self._changed.notify_all()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def wait_for(
        self,
        kind: str,
        where: Callable[[dict[str, Any]], bool] | None = None,
        within: float = 20.0,
    ) -> dict[str, Any]:
        """The first message of type ``kind`` (matching ``where``), waiting for it (bounded)."""

        def found() -> dict[str, Any] | None:
            return next((m for m in self.of_type(kind) if where is None or where(m)), None)

        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: found() is not None or self.done)
        except TimeoutError:
            raise AssertionError(
                f"no {kind} message within {within:g} s; got {self.messages}"
            ) from None
        message = found()
        if message is None:
            raise AssertionError(
                f"the connection closed ({self.ws.close_code} {self.ws.close_reason!r}) before "
                f"a {kind} message; got {self.messages}"
            )
        return message

    async def live(self, within: float = 20.0) -> dict[str, Any]:
        """The ``session_state`` message that says the session is live."""
        return await self.wait_for("session_state", lambda m: m["state"] == "live", within)

    async def send_chunks(self, seqs: range) -> None:
        for seq in seqs:
            await self.ws.send(chunk(seq))

    async def close_code(self, within: float = 20.0) -> int | None:
        """Wait until the connection is closed; the close code the client saw."""
        async with asyncio.timeout(within):
            await asyncio.shield(self._reader)
        return self.ws.close_code

    async def end(self) -> dict[str, Any]:
        """End the interview; the ``session_ended`` message."""
        await self.ws.send(json.dumps({"end_session": True}))
        return await self.wait_for("session_ended")

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


@asynccontextmanager
async def clients() -> AsyncIterator[list[Client]]:
    """Collects the test's clients and closes them all at the end."""
    opened: list[Client] = []
    try:
        yield opened
    finally:
        for client in opened:
            await client.aclose()


async def start_session(url: str, opened: list[Client]) -> tuple[Client, str, float]:
    """A new session: the client, the session id and when the client asked for it (epoch s)."""
    asked_at = time.time()
    client = await Client.connect(url)
    opened.append(client)
    created = await client.wait_for("session_created", within=20)
    await client.live()
    return client, created["session_id"], asked_at


async def voicefsm_transcript(session_id: str, store_url: str) -> str:
    """Run ``voicefsm transcript SESSION_ID --store URL``; its standard output."""
    process = await asyncio.create_subprocess_exec(
        *voicefsm_command(),
        "transcript",
        session_id,
        "--store",
        store_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=worker_env(SECRET),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"voicefsm transcript failed:\n{err.decode()}"
    return out.decode()


# ----------------------------------------------------------------------------- 1: SIGKILL, Redis

BEFORE = [
    ("interviewer", "Tell me about a production incident you handled."),
    ("user", "A cache stampede took our checkout down for ten minutes."),
    ("interviewer", "What did you change afterwards?"),
    ("user", "Request coalescing and jittered expiry."),
]
AFTER = [
    ("interviewer", "How did you know it worked?"),
    ("user", "The p99 latency stayed flat through the next sale."),
]


async def test_sigkill_mid_session_the_other_worker_takes_over_from_redis(
    redis_server: RedisServer, upstream: Upstream, workers: WorkerPool
) -> None:
    common = ["--store", redis_server.url, "--lease-ttl", "3", *live_args(upstream)]
    worker_a = workers.add("A", free_port(), [*common, "--worker-id", "worker-a"])
    worker_b = workers.add("B", free_port(), [*common, "--worker-id", "worker-b"])
    await start_workers(worker_a, worker_b)
    store = RedisStore(redis_server.url)

    async with clients() as opened:
        # A session on worker A: audio reaches the model, four lines are said and stored.
        client, session_id, asked_at = await start_session(worker_a.url, opened)
        first = await upstream.connection(1)
        handle = upstream.handle_of(1)
        assert first.resumption_handle is None  # a fresh conversation
        await client.send_chunks(range(10))
        await first.wait_for_audio_chunks(10, timeout=15)
        await upstream.say(first, BEFORE)
        assert as_lines(await stored_lines(store, session_id, 4)) == numbered(BEFORE)
        record = await stored_record(
            store, session_id, lambda r: r.resumption_handle == handle, f"handle {handle}"
        )
        assert record.owner == "alice"
        assert record.state is State.LIVE
        deadline = record.deadline
        assert asked_at + TIME_LIMIT_S <= deadline <= time.time() + TIME_LIMIT_S
        token_a, holder = await redis_lease(store, session_id)
        assert holder == "worker-a"

        # Worker A dies mid-session: no shutdown code runs, its lease just stops being renewed.
        await asyncio.to_thread(worker_a.kill)
        assert await client.close_code() == 1006  # dropped, no close frame
        await first.wait_closed(timeout=15)

        # The client comes back (well within the 60 s grace window) and lands on worker B.
        again = await Client.connect(worker_b.url, session_id=session_id)
        opened.append(again)
        live = await again.live(within=30)  # B waits for A's lease to run out (<= 3 s)
        assert live["remaining_s"] == pytest.approx(deadline - time.time(), abs=2.0)
        # Told on attach that the model connection is being restored, then that it is back.
        assert [m["state"] for m in again.of_type("session_state")] == ["resuming", "live"]

        second = await upstream.connection(2)
        assert second.resumption_handle == handle  # resumed with the stored handle
        assert second.resumed_from is not None and second.resumed_from.connection_number == 1
        assert len(upstream.server.connections) == 2

        token_b, holder = await redis_lease(store, session_id)
        assert holder == "worker-b"
        assert token_b > token_a
        taken = await stored_record(
            store,
            session_id,
            lambda r: r.resumption_handle == upstream.handle_of(2),
            "the new connection's handle",
        )
        assert taken.deadline == deadline  # the original deadline, not a new 5 minutes
        assert taken.started_at == record.started_at
        assert taken.stats.resumes == 1

        # The interview goes on through B: audio reaches the model, new lines are stored.
        await again.send_chunks(range(10, 20))
        await second.wait_for_audio_chunks(10, timeout=15)
        assert sequence_numbers([second]) == list(range(10, 20))
        assert sequence_numbers([first]) == list(range(10))
        await upstream.say(second, AFTER)
        everything = numbered(BEFORE + AFTER)
        lines = await stored_lines(store, session_id, len(everything))
        assert as_lines(lines) == everything  # every line once, in order

        # A's old lease is fenced out: were A to come back, none of its writes would land.
        stale = Lease(session_id, "worker-a", token_a, time.time() + 60, 3.0)
        with pytest.raises(StaleFencingToken) as refused:
            await store.fenced(stale).save(record)
        assert (refused.value.token, refused.value.current_token) == (token_a, token_b)
        assert refused.value.holder == "worker-b"
        with pytest.raises(StaleFencingToken):
            await store.fenced(stale).append_transcript(
                session_id, TranscriptLine(seq=len(everything), role="user", text="zombie", at=0)
            )
        with pytest.raises(StaleFencingToken):
            await store.save(record, fencing_token=token_a)
        assert as_lines(await store.read_transcript(session_id)) == everything
        current = await store.load(session_id)
        assert current is not None and current.record.resumption_handle == upstream.handle_of(2)

        # The client ends the interview; the end record and transcript can be read back.
        ended = await again.end()
        assert ended["reason"] == "user_ended"
        assert await again.close_code() == 1000
        final = await stored_record(
            store, session_id, lambda r: r.state is State.ENDED, "state ended"
        )
        assert final.end_reason == "user_ended"
        assert final.deadline == deadline
        assert as_lines(await store.read_transcript(session_id)) == everything

    output = await voicefsm_transcript(session_id, redis_server.url)
    lines = output.splitlines()
    usage = lines.pop(3)  # tokens, audio and an estimated cost (tests/test_timeline.py)
    assert usage.startswith("usage: ") and "(estimate; prices as of " in usage
    assert lines == [
        f"session {session_id} (user alice): ended",
        "ended: user_ended: the client ended the interview",
        f"resumes: 1, transcript lines: {len(everything)}",
        *(f"[{seq}] {role}: {text}" for seq, role, text in everything),
    ]
    await store.close()


# ----------------------------------------------------------------------------- 2: restart, SQLite


@pytest.mark.parametrize("how", ["sigterm", "sigint", "sigkill"])
async def test_a_restarted_serve_on_sqlite_continues_the_session(
    tmp_path: Path, upstream: Upstream, workers: WorkerPool, how: str
) -> None:
    database = tmp_path / "s.db"
    store_url = f"sqlite://{database}"  # sqlite:///<absolute path>
    worker = workers.add(
        "w1", free_port(), ["--store", store_url, "--worker-id", "w1", *live_args(upstream)]
    )
    await start_workers(worker)
    store = SQLiteStore(database)

    async with clients() as opened:
        client, session_id, asked_at = await start_session(worker.url, opened)
        first = await upstream.connection(1)
        handle = upstream.handle_of(1)
        await client.send_chunks(range(10))
        await first.wait_for_audio_chunks(10, timeout=15)
        await upstream.say(first, BEFORE[:2])
        assert as_lines(await stored_lines(store, session_id, 2)) == numbered(BEFORE[:2])
        record = await stored_record(
            store, session_id, lambda r: r.resumption_handle == handle, f"handle {handle}"
        )
        deadline = record.deadline
        assert asked_at + TIME_LIMIT_S <= deadline <= time.time() + TIME_LIMIT_S

        if how in ("sigterm", "sigint"):
            # Graceful (a deploy, or Ctrl+C): the service hands its sessions back to the store
            # and tells the client, then the server stops and the process exits 0, quietly.
            sig = signal.SIGTERM if how == "sigterm" else signal.SIGINT
            assert await asyncio.to_thread(worker.terminate, sig=sig) == 0, worker.log_tail()
            assert await client.close_code() == 4410
            log = worker.log_text()
            assert "detached without ending the session" in log
            assert "Application shutdown complete." in log
            assert "Traceback" not in log and "KeyboardInterrupt" not in log
        else:
            await asyncio.to_thread(worker.kill)
            assert await client.close_code() == 1006
        await first.wait_closed(timeout=15)

        # The same worker slot comes back on the same port with the same store and worker id.
        await start_workers(worker)
        again = await Client.connect(worker.url, session_id=session_id)
        opened.append(again)
        # The same worker id gets its lease back at once: well under the 15 s lease ttl.
        live = await again.live(within=12)
        assert live["remaining_s"] == pytest.approx(deadline - time.time(), abs=2.0)

        second = await upstream.connection(2)
        assert second.resumption_handle == handle
        restored = await stored_record(
            store,
            session_id,
            lambda r: r.resumption_handle == upstream.handle_of(2),
            "the new connection's handle",
        )
        assert restored.deadline == deadline
        assert restored.stats.resumes == 1

        await again.send_chunks(range(10, 20))
        await second.wait_for_audio_chunks(10, timeout=15)
        assert sequence_numbers([second]) == list(range(10, 20))
        await upstream.say(second, BEFORE[2:])
        lines = await stored_lines(store, session_id, len(BEFORE))
        assert as_lines(lines) == numbered(BEFORE)

        ended = await again.end()
        assert ended["reason"] == "user_ended"
        assert await again.close_code() == 1000
        final = await stored_record(
            store, session_id, lambda r: r.state is State.ENDED, "state ended"
        )
        assert final.end_reason == "user_ended"
        assert final.deadline == deadline
        assert as_lines(await store.read_transcript(session_id)) == numbered(BEFORE)
    await store.close()


# ----------------------------------------------------------------------------- 3: Redis outage


async def stream_audio(client: Client, first_seq: int, sent: list[int]) -> None:
    """Send numbered chunks at the pace of real audio (20 ms each) until cancelled."""
    seq = first_seq
    while True:
        await client.ws.send(chunk(seq))
        sent.append(seq)
        seq += 1
        await asyncio.sleep(0.02)


async def test_a_redis_outage_mid_session_loses_nothing_and_is_logged(
    redis_server: RedisServer, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voicefsm")
    service_store = RedisStore(redis_server.url)
    store = RedisStore(redis_server.url)  # the test's own view of Redis, until the outage
    reader: RedisStore | None = None  # and once Redis is back
    agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
    service = InterviewService(
        AdkUpstream(agent, client=upstream.server.genai_client()),
        AUTH,
        config=fast_config(time_limit_s=120, warning_before_s=10, client_grace_s=30),
        store=service_store,
        worker_id="solo",
        lease_ttl_s=2.0,  # shorter than the outage: the lease runs out unclaimed meanwhile
    )
    outage_lines = [
        ("interviewer", "Which trade-off would you revisit today?"),
        ("user", "I would shard the queue by tenant sooner."),
        ("interviewer", "Why tenant and not region?"),
    ]
    everything = numbered(BEFORE[:2] + outage_lines + AFTER)
    sent: list[int] = []
    streamer: asyncio.Task[None] | None = None
    try:
        async with starlette_service(service, free_port()) as url, clients() as opened:
            client, session_id, _ = await start_session(url, opened)
            conn = await upstream.connection(1)
            live = service.sessions[session_id]
            sink = live.host.sink
            assert isinstance(sink, RetryingSink)
            streamer = asyncio.create_task(stream_audio(client, 0, sent))
            await conn.wait_for_audio_chunks(10, timeout=15)
            await upstream.say(conn, BEFORE[:2])
            assert as_lines(await stored_lines(store, session_id, 2)) == numbered(BEFORE[:2])
            lease_token, holder = await redis_lease(store, session_id)
            assert holder == "solo"

            # Redis goes away (shut down with its data saved, as a persistent Redis would).
            caplog.clear()
            await asyncio.to_thread(redis_server.stop, keep_data=True)
            at_stop = conn.audio_chunk_count
            for number, line in enumerate(outage_lines):
                # ~1 s of audio reaches the model, then the next line is said.
                await conn.wait_for_audio_chunks(at_stop + 50 * (number + 1), timeout=15)
                await upstream.say(conn, [line])
            outage_handle = f"resume-{upstream.tag}-during-outage"
            await conn.send_resumption_update(outage_handle)  # a record save, queued
            await eventually(_true_when(lambda: sink.failing), "the sink to notice the outage")
            await conn.wait_for_audio_chunks(at_stop + 200, timeout=15)  # >= 4 s of outage
            assert not redis_server.ping()
            assert sink.failing and sink.pending > 0
            assert client.of_type("session_ended") == [] and not client.done
            assert live.host.session.state is State.LIVE

            # Redis comes back on the same port: the queue drains in order.
            await asyncio.to_thread(redis_server.start)
            async with asyncio.timeout(20):
                await sink.flush()
            assert not sink.failing and sink.retries > 1 and sink.errors == {}
            reader = RedisStore(redis_server.url)
            stored = await reader.load(session_id)
            assert stored is not None
            assert stored.record.resumption_handle == outage_handle
            # The record is current (audio counters move with every chunk and are saved with
            # the next state change, not per chunk).
            per_chunk = {"stats", "usage"}
            current = live.host.session.snapshot()
            assert stored.record.model_dump(exclude=per_chunk) == current.model_dump(
                exclude=per_chunk
            )
            assert as_lines(await reader.read_transcript(session_id)) == everything[:5]
            assert await redis_lease(reader, session_id) == (lease_token, "solo")
            await eventually(
                _true_when(lambda: "renewed again" in caplog.text), "the lease to be renewed"
            )

            # The session ran all along and goes on.
            at_back = conn.audio_chunk_count
            await conn.wait_for_audio_chunks(at_back + 10, timeout=15)
            await upstream.say(conn, AFTER)
            assert as_lines(await stored_lines(reader, session_id, len(everything))) == everything
            streamer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streamer
            await conn.wait_for_audio_chunks(len(sent), timeout=15)
            assert sequence_numbers([conn]) == sent  # every chunk, in order, one connection
            assert len(upstream.server.connections) == 1
            ended = await client.end()
            assert ended["reason"] == "user_ended"
            assert [m for m in client.messages if m["type"] == "session_ended"] == [ended]
            final = await stored_record(
                reader, session_id, lambda r: r.state is State.ENDED, "state ended"
            )
            assert final.end_reason == "user_ended"
            assert as_lines(await reader.read_transcript(session_id)) == everything
    finally:
        if streamer is not None:
            streamer.cancel()
        await store.close()
        if reader is not None:
            await reader.close()
        await service_store.close()

    records = [r for r in caplog.records if r.name.startswith("voicefsm.stores")]
    said = [(r.levelno, r.name, r.getMessage()) for r in records]
    assert any(
        level == logging.WARNING and name == "voicefsm.stores.retrying" and "failing" in message
        for level, name, message in said
    ), said
    assert any(
        level == logging.INFO and name == "voicefsm.stores.retrying" and "recovered" in message
        for level, name, message in said
    ), said
    assert any(
        level == logging.WARNING and "cannot renew lease" in message for level, _, message in said
    ), said
    assert any("expired while the store was unreachable" in message for _, _, message in said)
    for _, _, message in said:  # counts and error types, never what was said
        assert not any(text in message for _, _, text in everything), message


# ----------------------------------------------------------------------------- 4: fenced out


async def test_a_worker_fenced_out_while_alive_detaches_and_writes_nothing_more(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Worker A's lease runs out (as B sees it) while A still drives the session; B takes it.

    A learns it was fenced out from its next write: it must hand the session over (4410 to its
    client, upstream closed), not end it as ``error`` — the session lives on at B.
    """
    database = tmp_path / "fenced.db"
    skew_s = 120.0  # B's clock runs ahead: A's lease (ttl 30 s) has expired for B
    store_a = SQLiteStore(database)
    store_b = SQLiteStore(database, clock=lambda: time.time() + skew_s)
    reader = SQLiteStore(database)
    agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")

    def service(store: SessionStore, worker_id: str) -> InterviewService:
        return InterviewService(
            AdkUpstream(agent, client=upstream.server.genai_client()),
            AUTH,
            config=fast_config(time_limit_s=300, warning_before_s=10, client_grace_s=60),
            store=store,
            worker_id=worker_id,
            lease_ttl_s=30.0,  # renewed every 10 s: the refused write comes first
        )

    service_a, service_b = service(store_a, "worker-a"), service(store_b, "worker-b")
    try:
        async with (
            starlette_service(service_a, free_port()) as url_a,
            starlette_service(service_b, free_port()) as url_b,
            clients() as opened,
        ):
            client_a, session_id, _ = await start_session(url_a, opened)
            first = await upstream.connection(1)
            await upstream.say(first, BEFORE[:2])
            assert as_lines(await stored_lines(reader, session_id, 2)) == numbered(BEFORE[:2])

            # The client shows up at B (say, after a network blip); B takes the session over.
            client_b = await Client.connect(url_b, session_id=session_id)
            opened.append(client_b)
            await client_b.live(within=30)
            second = await upstream.connection(2)
            assert second.resumption_handle == upstream.handle_of(1)
            taken = await stored_record(
                reader,
                session_id,
                lambda r: r.resumption_handle == upstream.handle_of(2),
                "B's upstream handle",
            )
            assert taken.state is State.LIVE

            # A is alive and its upstream still talks: its next writes are refused.
            await upstream.say(
                first, [("interviewer", "A zombie question?"), ("user", "A zombie answer.")]
            )
            assert await client_a.close_code() == 4410
            assert "reconnect" in (client_a.ws.close_reason or "")
            assert client_a.of_type("session_ended") == []
            await first.wait_closed(timeout=15)
            await eventually(
                _true_when(lambda: session_id not in service_a.sessions), "A to let go"
            )

            # The session lives on at B, untouched by A.
            await upstream.say(second, BEFORE[2:])
            lines = await stored_lines(reader, session_id, len(BEFORE))
            assert as_lines(lines) == numbered(BEFORE)
            current = await reader.load(session_id)
            assert current is not None and current.record.state is State.LIVE
            assert current.record.end_reason is None
            ended = await client_b.end()
            assert ended["reason"] == "user_ended"
            final = await stored_record(
                reader, session_id, lambda r: r.state is State.ENDED, "state ended"
            )
            assert final.end_reason == "user_ended"
            assert as_lines(await reader.read_transcript(session_id)) == numbered(BEFORE)
    finally:
        for store in (store_a, store_b, reader):
            await store.close()


# ----------------------------------------------------------------------------- 5: rolling deploy


async def resuming(upstream: Upstream, handle: str) -> FakeLiveConnection:
    """The upstream connection that resumed ``handle``, once its own handle went out."""

    async def found() -> FakeLiveConnection | None:
        return next((c for c in upstream.server.connections if c.resumption_handle == handle), None)

    conn = await eventually(found, f"a connection resuming {handle}", within=30)
    return await upstream.connection(conn.number)


async def test_a_rolling_restart_of_two_workers_on_redis_loses_no_interview(
    redis_server: RedisServer, upstream: Upstream, workers: WorkerPool
) -> None:
    """Two sessions, one per worker; each worker is restarted in turn (SIGTERM, start again).

    Every client is told 4410 and continues on the other worker: same deadline, the upstream
    resumed with the newest handle, the whole transcript; both interviews end as the user ends
    them, and the store holds no ``error``.
    """
    common = ["--store", redis_server.url, "--lease-ttl", "3", *live_args(upstream)]
    worker_a = workers.add("A", free_port(), [*common, "--worker-id", "worker-a"])
    worker_b = workers.add("B", free_port(), [*common, "--worker-id", "worker-b"])
    await start_workers(worker_a, worker_b)
    store = RedisStore(redis_server.url)
    script = [("interviewer", f"Question {n}?") if n % 2 == 0 else ("user", f"Answer {n}.")
              for n in range(8)]  # fmt: skip
    said: dict[str, int] = {}
    try:
        async with clients() as opened:
            c1, s1, _ = await start_session(worker_a.url, opened)
            conn1 = await upstream.connection(1)
            c2, s2, _ = await start_session(worker_b.url, opened)
            conn2 = await upstream.connection(2)
            handles = {s1: upstream.handle_of(1), s2: upstream.handle_of(2)}
            deadlines: dict[str, float] = {}
            for session_id, conn in ((s1, conn1), (s2, conn2)):
                await upstream.say(conn, script[:2])
                said[session_id] = 2
                await stored_lines(store, session_id, 2)
                record = await stored_record(
                    store, session_id, lambda r, h=handles[session_id]: r.resumption_handle == h,
                    "its first handle",
                )  # fmt: skip
                deadlines[session_id] = record.deadline

            async def move(client: Client, session_id: str, to: WorkerProcess) -> Client:
                """The client was told 4410: it reconnects to ``to``; two more lines there."""
                assert await client.close_code() == 4410
                assert client.of_type("session_ended") == []
                again = await Client.connect(to.url, session_id=session_id)
                opened.append(again)
                live = await again.live(within=30)
                remaining = deadlines[session_id] - time.time()
                assert live["remaining_s"] == pytest.approx(remaining, abs=3.0)
                conn = await resuming(upstream, handles[session_id])
                handles[session_id] = upstream.handle_of(conn.number)
                await upstream.say(conn, script[said[session_id] : said[session_id] + 2])
                said[session_id] += 2
                lines = await stored_lines(store, session_id, said[session_id])
                assert as_lines(lines) == numbered(script[: said[session_id]])
                return again

            # Worker A restarts: its session moves to B; A comes back.
            assert await asyncio.to_thread(worker_a.terminate) == 0
            c1 = await move(c1, s1, worker_b)
            await start_workers(worker_a)
            # Worker B restarts: both sessions move to A; B comes back.
            assert await asyncio.to_thread(worker_b.terminate) == 0
            c1 = await move(c1, s1, worker_a)
            c2 = await move(c2, s2, worker_a)
            await start_workers(worker_b)

            for client, session_id in ((c1, s1), (c2, s2)):
                ended = await client.end()
                assert ended["reason"] == "user_ended"
                final = await stored_record(
                    store, session_id, lambda r: r.state is State.ENDED, "state ended"
                )
                assert final.end_reason == "user_ended"
                assert final.deadline == deadlines[session_id]
                lines = await store.read_transcript(session_id)
                assert as_lines(lines) == numbered(script[: said[session_id]])
            summaries = await store.list_sessions()
            assert sorted(s.session_id for s in summaries) == sorted([s1, s2])
            assert {s.end_reason for s in summaries} == {"user_ended"}
        for worker in (worker_a, worker_b):
            assert "host was cancelled" not in worker.log_text()
    finally:
        await store.close()


# ----------------------------------------------------------------------------- 6: orphans


async def voicefsm_sessions(store_url: str) -> list[list[str]]:
    """Run ``voicefsm sessions --store URL``; its rows, split into columns (header dropped)."""
    process = await asyncio.create_subprocess_exec(
        *voicefsm_command(),
        "sessions",
        "--store",
        store_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=worker_env(SECRET),
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"voicefsm sessions failed:\n{err.decode()}"
    return [line.split() for line in out.decode().splitlines()[1:]]


async def test_a_session_whose_worker_died_and_whose_client_never_came_back_is_ended(
    tmp_path: Path, upstream: Upstream, workers: WorkerPool
) -> None:
    """The demo-mode restart that left ``voicefsm transcript`` saying ``live`` forever."""
    database = tmp_path / "orphans.db"
    store_url = f"sqlite://{database}"
    options = ["--client-grace", "2", "--lease-ttl", "2", "--orphan-sweep", "0.5"]
    worker = workers.add(
        "w1",
        free_port(),
        ["--store", store_url, "--worker-id", "w1", *options, *live_args(upstream)],
    )
    await start_workers(worker)
    store = SQLiteStore(database)
    try:
        async with clients() as opened:
            client, session_id, _ = await start_session(worker.url, opened)
            first = await upstream.connection(1)
            await upstream.say(first, BEFORE[:3])
            await stored_lines(store, session_id, 3)
            await asyncio.to_thread(worker.kill)  # and the client never comes back
            assert await client.close_code() == 1006
        await start_workers(worker)  # the restarted worker sweeps the store
        final = await stored_record(
            store, session_id, lambda r: r.state is State.ENDED, "the orphan to be ended"
        )
        assert final.end_reason == "disconnected"
        assert final.end_detail is not None and "worker stopped" in final.end_detail
        assert final.transcript_count == 3
        assert as_lines(await store.read_transcript(session_id)) == numbered(BEFORE[:3])
        output = await voicefsm_transcript(session_id, store_url)
        assert output.splitlines()[0] == f"session {session_id} (user alice): ended"
        assert output.splitlines()[1].startswith("ended: disconnected: its worker stopped")
        (row,) = await voicefsm_sessions(store_url)
        assert (row[0], row[1], row[2], row[-2], row[-1]) == (
            session_id,
            "alice",
            "ended",
            "disconnected",
            "-",
        )
        assert "finalised orphaned session" in worker.log_text()
    finally:
        await store.close()
