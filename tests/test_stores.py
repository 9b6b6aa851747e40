"""One conformance suite for the session stores (memory, SQLite, real Redis), plus the outage path.

Lease times run on an injected clock, so expiry needs no sleeping. Redis is a real
``redis-server`` on a loopback port (see ``redis_server.py``); under ``CI=true`` it must exist.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, require_redis_server

from voicefsm import EndReason, Session, SessionConfig, SessionRecord, State, TranscriptLine
from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel
from voicefsm.ports import Report
from voicefsm.stores import (
    BacklogFull,
    FencedSink,
    Lease,
    LeaseKeeper,
    LeaseLost,
    MemoryStore,
    RedisStore,
    RetryingSink,
    SessionStore,
    SessionSummary,
    SQLiteStore,
    StaleFencingToken,
    StoreClosed,
    StoreUnavailable,
    VersionConflict,
    open_store,
)

T0 = 1_700_000_000.0
CONFIG = SessionConfig(time_limit_s=600, warning_before_s=60, client_grace_s=30)


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Attempts:
    """Counts calls of a store or sink method and wakes a waiter at a given count."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()


def record_of(session_id: str = "s-1", started_at: float = T0, **changes: object) -> SessionRecord:
    values: dict[str, object] = {
        "session_id": session_id,
        "config": CONFIG,
        "state": State.LIVE,
        "started_at": started_at,
        "deadline": started_at + CONFIG.time_limit_s,
    }
    values.update(changes)
    return SessionRecord.model_validate(values)


def line_of(seq: int, text: str | None = None) -> TranscriptLine:
    role = "interviewer" if seq % 2 == 0 else "user"
    return TranscriptLine(seq=seq, role=role, text=text or f"line {seq}", at=T0 + seq)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[SessionStore]:
    made: SessionStore
    if request.param == "memory":
        made = MemoryStore(clock=clock)
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "sessions.db", clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = RedisStore(server.url, prefix=f"test-{uuid.uuid4().hex[:8]}:", clock=clock)
    yield made
    await made.close()


# ---------------------------------------------------------------------------------------- records


def interview() -> tuple[Session, list[fx.Effect]]:
    """A real session taken through a few minutes of an interview, and every effect it made."""
    session = Session(CONFIG, session_id="interview-42", seed=7)
    out = session.start(T0)
    steps: list[tuple[float, ev.Event]] = [
        (0.4, ev.UpstreamReady(connection_id=1)),
        (1.0, ev.ResumptionUpdate(handle="handle-1", resumable=True)),
        (2.0, ev.OutputTranscript("Tell me about a project you led.", finished=True)),
        (9.0, ev.InputTranscript("I led the move to a new billing system.", finished=True)),
        (9.5, ev.TurnComplete()),
        (10.0, ev.ResumptionUpdate(handle="handle-2", resumable=True)),
        (11.0, ev.GoAway(time_left="50s", connection_id=1)),  # between turns: rotate now
        (11.1, ev.ClientAudio(b"\x01\x02" * 320)),  # held while resuming
        (11.2, ev.ClientText("sorry, say that again?")),
    ]
    for offset, event in steps:
        out += session.handle(event, T0 + offset)
    assert session.state is State.RESUMING
    return session, out


async def test_a_real_session_round_trips_and_restores_with_its_deadline_and_handle(
    store: SessionStore,
) -> None:
    session, effects = interview()
    version = 0
    for effect in effects:
        if isinstance(effect, fx.PersistRecord):
            version = await store.save(effect.record, expected_version=version)
        elif isinstance(effect, fx.RecordTranscript):
            await store.append_transcript(session.session_id, effect.line)
    version = await store.save(session.snapshot(), expected_version=version)

    loaded = await store.load(session.session_id)
    assert loaded is not None
    assert loaded.version == version
    assert loaded.record == session.snapshot()
    transcript = await store.read_transcript(session.session_id)
    assert [(t.seq, t.role) for t in transcript] == [(0, "interviewer"), (1, "user")]
    assert transcript[1].text == "I led the move to a new billing system."

    later = T0 + 20
    restored = Session.restore(loaded.record, later, seed=1)
    assert restored.deadline == T0 + CONFIG.time_limit_s
    assert restored.resumption_handle == "handle-2"
    assert (restored.state, restored.client_connected) == (State.RESUMING, False)
    opened = [e for e in restored.start(later) if isinstance(e, fx.OpenUpstream)]
    assert [e.handle for e in opened] == ["handle-2"]
    flushed = restored.handle(ev.UpstreamReady(connection_id=opened[0].connection_id), later + 1)
    assert fx.SendAudioUpstream(b"\x01\x02" * 320) in flushed
    assert fx.SendTextUpstream("sorry, say that again?") in flushed


async def test_missing_sessions_load_as_none_with_an_empty_transcript(store: SessionStore) -> None:
    assert await store.load("nobody") is None
    assert await store.read_transcript("nobody") == []
    assert await store.list_sessions() == []


async def test_compare_and_set_refuses_a_stale_version(store: SessionStore) -> None:
    first = record_of(warning_given=False)
    assert await store.save(first, expected_version=0) == 1
    with pytest.raises(VersionConflict) as conflict:
        await store.save(first.model_copy(update={"warning_given": True}), expected_version=0)
    assert (conflict.value.expected, conflict.value.actual) == (0, 1)
    assert "Load the session again" in str(conflict.value)

    second = first.model_copy(update={"warning_given": True})
    assert await store.save(second, expected_version=1) == 2
    with pytest.raises(VersionConflict):
        await store.save(first, expected_version=1)
    with pytest.raises(VersionConflict):
        await store.save(record_of("s-new"), expected_version=3)
    loaded = await store.load("s-1")
    assert loaded is not None
    assert (loaded.version, loaded.record.warning_given) == (2, True)


async def test_concurrent_compare_and_set_lets_exactly_one_writer_win(store: SessionStore) -> None:
    await store.save(record_of(), expected_version=0)
    results = await asyncio.gather(
        store.save(record_of(warning_given=True), expected_version=1),
        store.save(record_of(resumption_handle="h"), expected_version=1),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["VersionConflict", "int"]
    assert 2 in results


async def test_plain_saves_bump_the_version_and_identical_saves_do_not(store: SessionStore) -> None:
    record = record_of()
    assert await store.save(record) == 1
    assert await store.save(record) == 1  # a retried save does not count twice
    assert await store.save(record_of(warning_given=True)) == 2
    assert await store.save(record_of(warning_given=True), expected_version=2) == 2


async def test_bad_arguments_are_refused_with_a_reason(store: SessionStore) -> None:
    with pytest.raises(ValueError, match="expected_version"):
        await store.save(record_of(), expected_version=-1)
    with pytest.raises(ValueError, match="ttl"):
        await store.acquire_lease("s-1", "w", 0)
    with pytest.raises(ValueError, match="worker_id"):
        await store.acquire_lease("s-1", "", 5)


# ---------------------------------------------------------------------------------------- leases


async def test_a_stale_worker_is_fenced_out_after_another_takes_its_expired_lease(
    store: SessionStore, clock: FakeClock
) -> None:
    a = await store.acquire_lease("s-1", "worker-a", ttl_s=10)
    assert a is not None
    assert (a.token, a.expires_at, a.worker_id) == (1, T0 + 10, "worker-a")
    assert await store.acquire_lease("s-1", "worker-b", ttl_s=10) is None
    await store.fenced(a).save(record_of(resumption_handle="from-a"))
    await store.fenced(a).append_transcript("s-1", line_of(0))

    clock.advance(10.5)  # worker A stalls past its lease; B takes the session
    b = await store.acquire_lease("s-1", "worker-b", ttl_s=10)
    assert b is not None
    assert b.token > a.token

    with pytest.raises(StaleFencingToken) as stale:
        await store.save(record_of(resumption_handle="late-a"), fencing_token=a.token)
    assert (stale.value.token, stale.value.current_token) == (a.token, b.token)
    assert stale.value.holder == "worker-b"
    assert "stop driving it" in str(stale.value)
    with pytest.raises(StaleFencingToken):
        await store.fenced(a).append_transcript("s-1", line_of(1, "late line from A"))
    with pytest.raises(StaleFencingToken):
        await store.fenced(a).save(record_of(resumption_handle="late-a"))
    with pytest.raises(StaleFencingToken, match="without a fencing token"):
        await store.save(record_of(resumption_handle="unfenced"))
    with pytest.raises(LeaseLost, match="granted since by worker 'worker-b'"):
        await store.renew_lease(a)

    await store.fenced(b).save(record_of(resumption_handle="from-b"))
    await store.fenced(b).append_transcript("s-1", line_of(1, "from B"))
    loaded = await store.load("s-1")
    assert loaded is not None
    assert loaded.record.resumption_handle == "from-b"
    assert [t.text for t in await store.read_transcript("s-1")] == ["line 0", "from B"]


async def test_two_workers_racing_for_a_lease_get_one_lease(store: SessionStore) -> None:
    leases = await asyncio.gather(
        *(store.acquire_lease("s-1", f"worker-{n}", ttl_s=10) for n in range(4))
    )
    granted = [lease for lease in leases if lease is not None]
    assert len(granted) == 1
    assert granted[0].token == 1


async def test_an_expired_lease_nobody_took_still_writes(
    store: SessionStore, clock: FakeClock
) -> None:
    a = await store.acquire_lease("s-1", "worker-a", ttl_s=10)
    assert a is not None
    clock.advance(100)
    await store.fenced(a).save(record_of())  # the token is still the latest granted
    await store.save(record_of(warning_given=True))  # and nobody holds a live lease


async def test_a_token_that_was_never_granted_is_refused(store: SessionStore) -> None:
    with pytest.raises(StaleFencingToken):
        await store.save(record_of(), fencing_token=1)
    with pytest.raises(StaleFencingToken):
        await store.append_transcript("s-1", line_of(0), fencing_token=3)
    assert await store.load("s-1") is None


async def test_renewing_extends_the_lease_and_keeps_its_token(
    store: SessionStore, clock: FakeClock
) -> None:
    a = await store.acquire_lease("s-1", "worker-a", ttl_s=10)
    assert a is not None
    clock.advance(8)
    renewed = await store.renew_lease(a)
    assert (renewed.token, renewed.expires_at) == (a.token, T0 + 18)
    clock.advance(5)  # past the first expiry, within the renewed one
    assert await store.acquire_lease("s-1", "worker-b", ttl_s=10) is None

    clock.advance(60)  # expired, but nobody took it: renewing still works
    again = await store.renew_lease(renewed, ttl_s=30)
    assert (again.token, again.ttl_s, again.expires_at) == (a.token, 30, clock.now + 30)
    await store.save(record_of(), fencing_token=again.token)
    other = await store.acquire_lease("s-2", "worker-b", ttl_s=10)  # leases are per session
    assert other is not None
    assert other.token == 1


async def test_releasing_lets_another_worker_in_at_once(
    store: SessionStore, clock: FakeClock
) -> None:
    a = await store.acquire_lease("s-1", "worker-a", ttl_s=60)
    assert a is not None
    await store.release_lease(a)
    await store.save(record_of())  # no live lease: an unfenced write is fine
    with pytest.raises(LeaseLost, match="released"):
        await store.renew_lease(a)

    b = await store.acquire_lease("s-1", "worker-b", ttl_s=60)
    assert b is not None
    assert b.token == a.token + 1
    await store.release_lease(a)  # stale: must not release B's lease
    assert await store.acquire_lease("s-1", "worker-c", ttl_s=60) is None
    await store.release_lease(b)
    await store.release_lease(b)  # twice is harmless
    c = await store.acquire_lease("s-1", "worker-c", ttl_s=60)
    assert c is not None
    assert c.token == b.token + 1


async def test_the_same_worker_asking_again_gets_a_new_token(store: SessionStore) -> None:
    first = await store.acquire_lease("s-1", "host-1", ttl_s=60)
    second = await store.acquire_lease("s-1", "host-1", ttl_s=60)  # a restarted process
    assert first is not None
    assert second is not None
    assert second.token == first.token + 1
    with pytest.raises(StaleFencingToken):
        await store.fenced(first).save(record_of())
    await store.fenced(second).save(record_of())


async def test_a_fenced_sink_writes_only_its_own_session(store: SessionStore) -> None:
    lease = await store.acquire_lease("s-1", "worker-a", ttl_s=60)
    assert lease is not None
    sink = store.fenced(lease)
    with pytest.raises(ValueError, match="writes session s-1"):
        await sink.save(record_of("s-2"))
    with pytest.raises(ValueError, match="writes session s-1"):
        await sink.append_transcript("s-2", line_of(0))


async def test_a_lease_keeper_renews_until_the_lease_is_lost(
    store: SessionStore, clock: FakeClock
) -> None:
    lease = await store.acquire_lease("s-1", "worker-a", ttl_s=10)
    assert lease is not None
    renewals = Attempts()
    renew = store.renew_lease

    async def counted_renew(lease: Lease, ttl_s: float | None = None) -> Lease:
        try:
            return await renew(lease, ttl_s)
        finally:
            renewals.hit()

    store.renew_lease = counted_renew  # type: ignore[method-assign]
    lost: list[Exception] = []
    async with LeaseKeeper(store, lease, renew_every_s=0.01, on_lost=lost.append) as keeper:
        clock.advance(5)
        await renewals.reach(1)
        assert keeper.lease.expires_at == T0 + 15
        await store.release_lease(keeper.lease)  # an operator (or a bug) gives it away
        assert await store.acquire_lease("s-1", "worker-b", ttl_s=10) is not None
        async with asyncio.timeout(5):
            await keeper.lost.wait()
    assert len(lost) == 1
    assert isinstance(keeper.lost_reason, LeaseLost)


async def test_a_lease_keeper_rides_out_a_store_outage_longer_than_the_lease(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    class DownStore(MemoryStore):
        down = False
        attempts = Attempts()

        async def renew_lease(self, lease: Lease, ttl_s: float | None = None) -> Lease:
            self.attempts.hit()
            if self.down:
                raise StoreUnavailable("down for the test")
            return await super().renew_lease(lease, ttl_s)

    caplog.set_level(logging.INFO, logger="voicefsm.stores")
    store = DownStore(clock=clock)
    lease = await store.acquire_lease("s-1", "worker-a", ttl_s=10)
    assert lease is not None
    store.down = True
    async with LeaseKeeper(store, lease, renew_every_s=0.01, clock=clock) as keeper:
        await store.attempts.reach(2)
        clock.advance(11)
        await store.attempts.reach(4)
        assert "expired while the store was unreachable" in caplog.text
        store.down = False  # back, and nobody took the session meanwhile
        await store.attempts.reach(6)
        assert not keeper.lost.is_set()
        assert keeper.lease.expires_at > clock.now
        assert "renewed again" in caplog.text

        store.down = True
        clock.advance(11)
        assert await store.acquire_lease("s-1", "worker-b", ttl_s=10) is not None
        store.down = False  # back, and worker B has the session now
        async with asyncio.timeout(5):
            await keeper.lost.wait()
    assert "granted since by worker 'worker-b'" in str(keeper.lost_reason)


# ------------------------------------------------------------------------------------ transcript


async def test_transcript_appends_are_idempotent_on_seq_and_read_back_sorted(
    store: SessionStore,
) -> None:
    for seq in (2, 0, 3, 1):
        await store.append_transcript("s-1", line_of(seq))
    await store.append_transcript("s-1", line_of(1, "a retried line with other text"))
    await store.append_transcript("s-1", line_of(1))
    await store.append_transcript("s-2", line_of(0, "another session"))

    lines = await store.read_transcript("s-1")
    assert [line.seq for line in lines] == [0, 1, 2, 3]
    assert [line.text for line in lines] == ["line 0", "line 1", "line 2", "line 3"]
    assert lines == [line_of(seq) for seq in range(4)]
    assert [line.text for line in await store.read_transcript("s-2")] == ["another session"]


async def test_a_finished_session_is_listed_and_readable(store: SessionStore) -> None:
    await store.save(record_of("late", started_at=T0 + 100))
    ended = record_of(
        "early",
        state=State.ENDED,
        end_reason=EndReason.TIME_LIMIT,
        end_detail="the 600 s limit was reached",
        ended_at=T0 + 600,
        transcript_count=2,
    )
    await store.save(record_of("early"))
    await store.save(ended)
    for seq in range(2):
        await store.append_transcript("early", line_of(seq))

    listed = await store.list_sessions()
    assert [s.session_id for s in listed] == ["early", "late"]
    early = listed[0]
    assert (early.version, early.state, early.end_reason) == (2, State.ENDED, EndReason.TIME_LIMIT)
    assert (early.ended_at, early.transcript_lines, early.deadline) == (T0 + 600, 2, T0 + 600)
    loaded = await store.load("early")
    assert loaded is not None
    assert loaded.record.end_detail == "the 600 s limit was reached"
    assert len(await store.read_transcript("early")) == 2


async def test_sessions_are_listed_with_filters_newest_first_and_their_leases(
    store: SessionStore, clock: FakeClock
) -> None:
    await store.save(record_of("a", started_at=T0, owner="alice"))
    await store.save(record_of("b", started_at=T0 + 10, owner="bob", state=State.RESUMING))
    await store.save(
        record_of(
            "c",
            started_at=T0 + 20,
            owner="alice",
            state=State.ENDED,
            end_reason=EndReason.USER_ENDED,
            end_detail="the client ended the interview",
            ended_at=T0 + 30,
        )
    )
    await store.save(record_of("d", started_at=T0 + 30, owner="alice", state=State.WARNING))
    lease_a = await store.acquire_lease("a", "worker-1", ttl_s=10)
    assert lease_a is not None
    lease_d = await store.acquire_lease("d", "worker-2", ttl_s=10)
    assert lease_d is not None
    clock.advance(4)
    await store.release_lease(lease_d)

    def ids(summaries: list[SessionSummary]) -> list[str]:
        return [s.session_id for s in summaries]

    assert ids(await store.list_sessions()) == ["a", "b", "c", "d"]
    assert ids(await store.list_sessions(newest_first=True)) == ["d", "c", "b", "a"]
    assert ids(await store.list_sessions(newest_first=True, limit=2)) == ["d", "c"]
    assert ids(await store.list_sessions(limit=0)) == []
    assert ids(await store.list_sessions(owner="alice")) == ["a", "c", "d"]
    assert ids(await store.list_sessions(state=State.ENDED)) == ["c"]
    running = [State.CONNECTING, State.LIVE, State.WARNING, State.RESUMING]
    assert ids(await store.list_sessions(state=running, newest_first=True)) == ["d", "b", "a"]
    assert ids(await store.list_sessions(state="live", owner="alice")) == ["a"]
    assert ids(await store.list_sessions(owner="alice", state=running, limit=1)) == ["a"]
    assert ids(await store.list_sessions(worker="worker-1")) == ["a"]
    assert ids(await store.list_sessions(owner="nobody")) == []

    by_id = {s.session_id: s for s in await store.list_sessions()}
    a, b, c, d = (by_id[k] for k in "abcd")
    assert (a.owner, a.worker, a.lease_expires_at) == ("alice", "worker-1", T0 + 10)
    assert a.lease_live(clock.now) and not a.lease_live(T0 + 10)
    assert (b.worker, b.lease_expires_at, b.lease_live(clock.now)) == (None, 0.0, False)
    assert (c.end_reason, c.end_detail) == (EndReason.USER_ENDED, "the client ended the interview")
    # A released lease keeps when it was released: when the session was last driven.
    assert (d.worker, d.lease_expires_at, d.lease_live(clock.now)) == (None, T0 + 4, False)
    with pytest.raises(ValueError, match="limit"):
        await store.list_sessions(limit=-1)

    # A session that ends leaves the running ones (Redis keeps a separate index of those).
    await store.save(
        record_of(
            "b",
            started_at=T0 + 10,
            owner="bob",
            state=State.ENDED,
            end_reason=EndReason.DISCONNECTED,
            end_detail="gone",
            ended_at=T0 + 40,
        )
    )
    assert ids(await store.list_sessions(state=running)) == ["a", "d"]


# ---------------------------------------------------------------------------------------- the host


class InstantUpstream:
    """An upstream whose connections are ready at once and drop whatever they are sent."""

    def open(
        self,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> InstantUpstream:
        report(ev.UpstreamReady(connection_id=connection_id))
        return self

    def send_audio(self, data: bytes) -> None:
        pass

    def send_text(self, text: str) -> None:
        pass

    def close(self) -> list[bytes]:
        return []

    async def wait_closed(self) -> int:
        return 0

    async def forget(self, session_id: str) -> None:
        pass


async def test_a_host_persists_through_a_fenced_retrying_sink(store: SessionStore) -> None:
    session = Session(CONFIG, session_id="hosted")
    lease = await store.acquire_lease(session.session_id, "worker-a", ttl_s=60)
    assert lease is not None
    sink = RetryingSink(store.fenced(lease))
    channel = MemoryChannel()
    host = SessionHost(session, InstantUpstream(), client=channel, sink=sink, clock=time.time)
    host.post(ev.OutputTranscript("Welcome. Shall we begin?", finished=True))
    host.post(ev.InputTranscript("Yes, please.", finished=True))
    channel.push(ev.ClientEnd())
    async with asyncio.timeout(5):
        final = await host.run()
        await sink.flush()
    await store.release_lease(lease)
    await sink.aclose()

    assert final.end_reason is EndReason.USER_ENDED
    loaded = await store.load("hosted")
    assert loaded is not None
    assert loaded.record == final
    assert [t.text for t in await store.read_transcript("hosted")] == [
        "Welcome. Shall we begin?",
        "Yes, please.",
    ]


async def test_a_store_is_a_host_sink_as_it_is(store: SessionStore) -> None:
    session = Session(CONFIG, session_id="plain")
    channel = MemoryChannel()
    channel.push(ev.ClientEnd())
    host = SessionHost(session, InstantUpstream(), client=channel, sink=store)
    async with asyncio.timeout(5):
        final = await host.run()
    loaded = await store.load("plain")
    assert loaded is not None
    assert loaded.record == final


# ---------------------------------------------------------------------------------------- SQLite


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "data" / "sessions.db"
    session, _ = interview()
    async with SQLiteStore(path, clock=clock) as first:
        lease = await first.acquire_lease(session.session_id, "worker-a", ttl_s=30)
        assert lease is not None
        await first.fenced(lease).save(session.snapshot())
        for seq in range(3):
            await first.fenced(lease).append_transcript(session.session_id, line_of(seq))
    with pytest.raises(StoreClosed):
        await first.load(session.session_id)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async with SQLiteStore(path, clock=clock) as second:
        loaded = await second.load(session.session_id)
        assert loaded is not None
        assert (loaded.version, loaded.record) == (1, session.snapshot())
        assert await second.read_transcript(session.session_id) == [line_of(s) for s in range(3)]
        assert await second.acquire_lease(session.session_id, "worker-b", ttl_s=30) is None
        clock.advance(31)
        taken = await second.acquire_lease(session.session_id, "worker-b", ttl_s=30)
        assert taken is not None
        assert taken.token == lease.token + 1
        with pytest.raises(StaleFencingToken):
            await second.fenced(lease).save(session.snapshot())


CRASHING_WRITER = """
import asyncio, sys, time
from voicefsm import SessionConfig, SessionRecord, State, TranscriptLine
from voicefsm.stores import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    lease = await store.acquire_lease("crash", "worker-a", ttl_s=60)
    sink = store.fenced(lease)
    record = SessionRecord(session_id="crash", config=SessionConfig(), state=State.LIVE,
                           started_at=1.0, deadline=2701.0)
    for seq in range(50):
        await sink.append_transcript("crash", TranscriptLine(seq=seq, role="user", text="x", at=1))
        await sink.save(record.model_copy(update={"transcript_count": seq + 1}))
    print("written", flush=True)
    time.sleep(60)  # killed here, the store never closed

asyncio.run(main())
"""


async def test_sqlite_loses_nothing_when_the_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_WRITER, str(path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert writer.stdout is not None
        async with asyncio.timeout(20):
            assert await writer.stdout.readline() == b"written\n"
    finally:
        writer.kill()  # SIGKILL: no close, no checkpoint
        await writer.wait()
    async with SQLiteStore(path) as store:
        loaded = await store.load("crash")
        assert loaded is not None
        assert (loaded.version, loaded.record.transcript_count) == (50, 50)
        assert [line.seq for line in await store.read_transcript("crash")] == list(range(50))
        assert await store.acquire_lease("crash", "worker-b", ttl_s=60) is None  # still leased


async def test_two_sqlite_stores_on_one_file_share_compare_and_set(tmp_path: Path) -> None:
    async with (
        SQLiteStore(tmp_path / "s.db") as one,
        SQLiteStore(tmp_path / "s.db") as two,
    ):
        assert await one.save(record_of(), expected_version=0) == 1
        with pytest.raises(VersionConflict):
            await two.save(record_of(warning_given=True), expected_version=0)
        assert await two.save(record_of(warning_given=True), expected_version=1) == 2


async def test_an_unwritable_sqlite_file_is_reported_as_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = SQLiteStore(blocker / "sessions.db")
    with pytest.raises(StoreUnavailable, match="writable"):
        await store.load("s-1")
    await store.close()


# ---------------------------------------------------------------------------------------- outage


class FlakySink:
    """A sink that fails with StoreUnavailable while ``down`` and records what landed, in order."""

    def __init__(self) -> None:
        self.down = False
        self.refuse: Exception | None = None
        self.landed: list[tuple[str, object]] = []
        self.refusals = Attempts()

    async def save(self, record: SessionRecord) -> None:
        self._check()
        self.landed.append(("save", record.transcript_count))

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        self._check()
        self.landed.append(("line", line.seq))

    def _check(self) -> None:
        if self.refuse is not None:
            raise self.refuse
        if self.down:
            self.refusals.hit()
            raise StoreUnavailable("the test took the backend down")


async def test_retrying_sink_holds_writes_in_order_while_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicefsm.stores")
    backend = FlakySink()
    sink = RetryingSink(backend, backoff_initial_s=0.001, backoff_max_s=0.01)
    await sink.save(record_of(transcript_count=0))
    await sink.flush()
    backend.down = True
    for seq in range(5):
        await sink.append_transcript("s-1", line_of(seq, "private words"))
        await sink.save(record_of(transcript_count=seq + 1))
    await backend.refusals.reach(3)
    assert sink.failing
    assert sink.pending == 10
    backend.down = False
    async with asyncio.timeout(5):
        await sink.flush()
    expected: list[tuple[str, object]] = [("save", 0)]
    for seq in range(5):
        expected += [("line", seq), ("save", seq + 1)]
    assert backend.landed == expected
    assert (sink.written, sink.pending, sink.failing) == (11, 0, False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert "failing" in warnings[0].getMessage()
    assert "recovered" in infos[0].getMessage()
    assert "private words" not in caplog.text
    await sink.aclose()


async def test_retrying_sink_stops_a_fenced_out_session_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = FlakySink()
    sink = RetryingSink(backend)
    backend.refuse = StaleFencingToken("s-1", 1, 2, "worker-b")
    await sink.save(record_of())
    await sink.append_transcript("s-1", line_of(0))
    async with asyncio.timeout(5):
        await sink.flush()
    assert backend.landed == []
    assert isinstance(sink.errors["s-1"], StaleFencingToken)
    with pytest.raises(StaleFencingToken):
        await sink.save(record_of())
    backend.refuse = None
    await sink.save(record_of("s-2"))  # other sessions carry on
    await sink.flush()
    assert backend.landed == [("save", 0)]
    assert "refused for good" in caplog.text
    await sink.aclose()


async def test_retrying_sink_with_on_refused_reports_once_and_then_discards() -> None:
    backend = FlakySink()
    refused: list[tuple[str, str]] = []

    def on_refused(session_id: str, error: BaseException) -> None:
        refused.append((session_id, type(error).__name__))

    sink = RetryingSink(backend, on_refused=on_refused)
    backend.refuse = StaleFencingToken("s-1", 1, 2, "worker-b")
    await sink.save(record_of())
    await sink.append_transcript("s-1", line_of(0))
    async with asyncio.timeout(5):
        await sink.flush()
    assert refused == [("s-1", "StaleFencingToken")]
    backend.refuse = None
    await sink.append_transcript("s-1", line_of(1))  # no raise: the host detaches meanwhile
    await sink.save(record_of())
    await sink.flush()
    assert (backend.landed, sink.discarded, refused) == ([], 2, [("s-1", "StaleFencingToken")])
    await sink.save(record_of("s-2"))  # other sessions carry on
    await sink.flush()
    assert backend.landed == [("save", 0)]
    await sink.aclose()


async def test_retrying_sink_is_bounded_and_drops_only_superseded_saves() -> None:
    backend = FlakySink()
    backend.down = True
    sink = RetryingSink(backend, max_pending=3, backoff_initial_s=0.001, backoff_max_s=0.005)
    await sink.save(record_of(transcript_count=0))
    await sink.append_transcript("s-1", line_of(0))
    await sink.save(record_of(transcript_count=1))
    await sink.save(record_of(transcript_count=2))  # supersedes the queued save of count 1
    assert (sink.pending, sink.dropped) == (3, 1)
    with pytest.raises(BacklogFull, match="raise max_pending"):
        await sink.append_transcript("s-1", line_of(1))
    backend.down = False
    async with asyncio.timeout(5):
        await sink.flush()
    assert backend.landed == [("save", 0), ("line", 0), ("save", 2)]
    await sink.aclose()


class Watched:
    """A sink that passes writes on and counts the ones that failed."""

    def __init__(self, sink: FencedSink) -> None:
        self.sink = sink
        self.failures = Attempts()

    async def save(self, record: SessionRecord) -> None:
        try:
            await self.sink.save(record)
        except Exception:
            self.failures.hit()
            raise

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        try:
            await self.sink.append_transcript(session_id, line)
        except Exception:
            self.failures.hit()
            raise


def returned_without_waiting(step: Coroutine[Any, Any, None]) -> bool:
    """Run ``step`` up to its first suspension: whether it had finished by then (it waited for
    nothing, so it cannot have blocked on a store, however slow the machine)."""
    try:
        step.send(None)
    except StopIteration:
        return True
    step.close()
    return False


async def test_redis_outage_mid_stream_loses_nothing_and_writes_land_once_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicefsm.stores")
    with RedisServer(require_redis_server()) as server:
        store = RedisStore(server.url, prefix="outage:")
        lease = await store.acquire_lease("s-1", "worker-a", ttl_s=600)
        assert lease is not None
        backend = Watched(store.fenced(lease))
        sink = RetryingSink(backend, backoff_initial_s=0.02, backoff_max_s=0.2, log_every_s=0.5)

        def write(seq: int) -> None:
            """One line and one save, as a session makes them: neither may wait for the store."""
            line = line_of(seq, f"confidential answer {seq}")
            assert returned_without_waiting(sink.append_transcript("s-1", line)), seq
            assert returned_without_waiting(sink.save(record_of(transcript_count=seq + 1))), seq

        for seq in range(20):
            write(seq)
        async with asyncio.timeout(5):
            await sink.flush()

        await asyncio.to_thread(server.stop, keep_data=True)
        outage_started = time.monotonic()
        seq = 20
        write(seq)
        await backend.failures.reach(1)
        assert sink.failing
        while time.monotonic() - outage_started < 2.0:  # the session keeps talking meanwhile
            seq += 1
            write(seq)  # writes never block the session while Redis is down
            await asyncio.sleep(0.025)
        assert sink.pending > 0
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(10):
            await sink.flush()

        total = seq + 1
        lines = await store.read_transcript("s-1")
        assert [line.seq for line in lines] == list(range(total))
        assert lines[-1].text == f"confidential answer {seq}"
        loaded = await store.load("s-1")
        assert loaded is not None
        assert loaded.version == total  # every save landed exactly once
        assert loaded.record.transcript_count == total
        assert sink.written == 2 * total
        assert sink.errors == {}

        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert any(lvl == logging.WARNING and "failing" in m for lvl, m in messages)
        assert any(lvl == logging.INFO and "recovered" in m for lvl, m in messages)
        assert "confidential" not in caplog.text
        await sink.aclose()
        await store.close()


# ---------------------------------------------------------------------------------------- urls


async def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    sqlite_store = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(sqlite_store, SQLiteStore)
    assert sqlite_store.path == tmp_path / "a.db"
    plain = open_store(tmp_path / "b.db")
    assert isinstance(plain, SQLiteStore)
    for made in (sqlite_store, plain):
        await made.close()
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("postgres://db/voicefsm")


async def test_open_store_makes_a_redis_store_and_keeps_passwords_out_of_its_name(
    redis_server: RedisServer,
) -> None:
    redis_store = open_store(redis_server.url, prefix="urls:")
    assert isinstance(redis_store, RedisStore)
    assert await redis_store.load("nobody") is None
    await redis_store.close()
    with_password = RedisStore("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(with_password)
    assert "hunter2" not in repr(with_password.fenced(Lease("s", "w", 1, T0, 1.0)))
    await with_password.close()


async def test_redis_reconnects_by_itself_after_a_restart() -> None:
    """A pooled connection that died with the server is retried, not surfaced as an outage."""
    with RedisServer(require_redis_server()) as server:
        store = open_store(server.url, prefix="retry:")
        try:
            record = record_of("s-retry")
            await store.save(record)
            server.restart(keep_data=True)
            loaded = await store.load("s-retry")  # the first call on the old pooled connection
            assert loaded is not None
            assert loaded.record == record
        finally:
            await store.close()


# ---------------------------------------------------------------------------------------- the CLI


def test_voicefsm_sessions_lists_a_store_newest_first_with_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from voicefsm.cli import main

    path = tmp_path / "listed.db"

    async def fill() -> None:
        async with SQLiteStore(path) as store:
            now = time.time()
            await store.save(record_of("old", started_at=now - 100, owner="alice"))
            await store.save(
                record_of(
                    "done",
                    started_at=now - 50,
                    owner="bob",
                    state=State.ENDED,
                    end_reason=EndReason.TIME_LIMIT,
                    end_detail="time",
                    ended_at=now - 10,
                )
            )
            await store.save(record_of("new", started_at=now - 5, owner="alice"))
            assert await store.acquire_lease("new", "worker-7", ttl_s=60) is not None

    asyncio.run(fill())
    url = f"sqlite://{path}"
    assert main(["sessions", "--store", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SESSION", "OWNER", "STATE", "STARTED", "(UTC)", "DEADLINE", "(UTC)", "EST.COST", "END",
        "WORKER",
    ]  # fmt: skip
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[-3], r[-2], r[-1]) for r in rows] == [
        ("new", "alice", "live", "$0.0000", "-", "worker-7"),
        ("done", "bob", "ended", "$0.0000", "time_limit", "-"),
        ("old", "alice", "live", "$0.0000", "-", "-"),
    ]
    assert main(["sessions", "--store", url, "--owner", "alice", "--state", "live"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [
        "new",
        "old",
    ]
    assert main(["sessions", "--store", url, "--state", "ended", "--state", "resuming"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["done"]
    with pytest.raises(SystemExit):
        main(["sessions", "--store", url, "--state", "finished"])
    assert "--state takes one of" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["sessions"], ["transcript", "s1"], ["timeline", "s1"]])
def test_reading_a_sqlite_file_that_is_not_there_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A mistyped path (or another directory than serve's) says so, and creates no empty file
    to report "no sessions" from."""
    from voicefsm.cli import main

    missing = tmp_path / "elsewhere.db"
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--store", f"sqlite://{missing}"])
    assert stopped.value.code == 2
    assert f"no session database at {missing}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["sessions"], ["transcript", "s1"], ["timeline", "s1"]])
def test_reading_a_memory_store_from_another_process_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    from voicefsm.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([*command, "--store", "memory://"])
    assert stopped.value.code == 2
    assert "keeps sessions inside the serving process only" in capsys.readouterr().err
