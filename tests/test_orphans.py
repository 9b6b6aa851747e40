"""Orphaned sessions (worker gone, client never back) are finalised exactly once.

Real SQLite files and a real ``redis-server``; several sweepers, each with its own store
connection, race on every pass. Lease times run on one injected clock, so expiry needs no
sleeping. A last test runs the sweeper inside an :class:`InterviewService`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, require_redis_server

from voicefsm import EndReason, SessionConfig, SessionRecord, State, TranscriptLine
from voicefsm.auth import JWTAuthenticator
from voicefsm.model import PendingItem
from voicefsm.orphans import OrphanSweeper
from voicefsm.service import InterviewService
from voicefsm.stores import RedisStore, SessionStore, SQLiteStore

T0 = 1_800_000_000.0
GRACE_S = 60.0
TTL_S = 15.0
CONFIG = SessionConfig(time_limit_s=600, warning_before_s=60, client_grace_s=GRACE_S)
SWEEPERS = 4


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.close()


StoreFactory = Callable[[], SessionStore]


@pytest.fixture(params=["sqlite", "redis"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[StoreFactory]:
    """Makes store connections to one backend (each sweeper gets its own)."""
    made: list[SessionStore] = []
    prefix = f"orphans-{uuid.uuid4().hex[:8]}:"

    def open_one() -> SessionStore:
        store: SessionStore
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "orphans.db", clock=clock)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore(server.url, prefix=prefix, clock=clock)
        made.append(store)
        return store

    yield open_one
    for store in made:
        await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def record_of(session_id: str, **changes: object) -> SessionRecord:
    values: dict[str, object] = {
        "session_id": session_id,
        "owner": "alice",
        "config": CONFIG,
        "state": State.LIVE,
        "started_at": T0,
        "deadline": T0 + CONFIG.time_limit_s,
        "client_connected": True,
    }
    values.update(changes)
    return SessionRecord.model_validate(values)


async def driven_then_dropped(
    store: SessionStore,
    session_id: str,
    *,
    lines: int,
    counted: int,
    release: bool = False,
    at: float = T0,
) -> None:
    """A worker drove the session (``lines`` said, the record counting ``counted`` of them),
    then died (its lease just runs out) or, with ``release``, handed it over on shutdown."""
    lease = await store.acquire_lease(session_id, "dead-worker", TTL_S)
    assert lease is not None
    sink = store.fenced(lease)
    record = record_of(
        session_id,
        started_at=at,
        deadline=at + CONFIG.time_limit_s,
        transcript_count=counted,
        pending=[PendingItem(audio=b"\x00\x01" * 320), PendingItem(text="hello?")],
    )
    await sink.save(record)
    for seq in range(lines):
        line = TranscriptLine(seq=seq, role="user", text=f"line {seq}", at=T0 + seq)
        await sink.append_transcript(session_id, line)
    if release:
        await store.release_lease(lease)


async def race(sweepers: list[OrphanSweeper]) -> list[SessionRecord]:
    """One pass of every sweeper at the same time; everything they finalised."""
    passes = await asyncio.gather(*(sweeper.sweep() for sweeper in sweepers))
    return [record for finalised in passes for record in finalised]


async def test_orphans_are_finalised_once_after_the_lease_and_the_grace_window(
    stores: StoreFactory, clock: Clock
) -> None:
    store = stores()
    await driven_then_dropped(store, "crashed", lines=3, counted=2)  # a line said after the save
    await store.save(
        record_of("ended", state=State.ENDED, end_reason=EndReason.USER_ENDED, ended_at=T0 + 5)
    )
    await driven_then_dropped(store, "still-driven", lines=0, counted=0)
    sweepers = [OrphanSweeper(stores(), f"sweeper-{n}", clock=clock) for n in range(SWEEPERS)]

    # Within the lease, then within the grace window after it: nothing is touched.
    assert await race(sweepers) == []
    clock.now = T0 + TTL_S  # as the crashed worker's lease runs out, another one shuts down
    await driven_then_dropped(store, "handed-over", lines=1, counted=1, release=True)
    clock.now = T0 + TTL_S + GRACE_S - 1
    keeper = await store.acquire_lease("still-driven", "dead-worker", TTL_S)  # renewed: alive
    assert keeper is not None
    assert await race(sweepers) == []
    before = {s.session_id: s.version for s in await store.list_sessions()}

    # The grace window is over: each orphan is finalised by exactly one sweeper.
    clock.now = T0 + TTL_S + GRACE_S + 1
    finalised = await race(sweepers)
    assert sorted(r.session_id for r in finalised) == ["crashed", "handed-over"]
    assert await race(sweepers) == []  # and never again
    assert sum(s.finalised for s in sweepers) == 2

    crashed = await store.load("crashed")
    assert crashed is not None and crashed.version == before["crashed"] + 1  # one end, once
    final = crashed.record
    assert (final.state, final.end_reason, final.ended_at) == (
        State.ENDED,
        EndReason.DISCONNECTED,
        clock.now,
    )
    assert final.end_detail is not None and "did not come back within 60 s" in final.end_detail
    assert final.transcript_count == 3  # the whole stored transcript
    assert len(await store.read_transcript("crashed")) == 3
    assert (final.pending, final.client_connected, final.stats.chunks_unsent_at_end) == (
        [],
        False,
        1,
    )
    assert final.deadline == T0 + CONFIG.time_limit_s
    handed = await store.load("handed-over")
    assert handed is not None and handed.record.end_reason is EndReason.DISCONNECTED
    assert handed.version == before["handed-over"] + 1
    for name in ("ended", "still-driven"):
        untouched = await store.load(name)
        assert untouched is not None and untouched.version == before[name]
    by_id = {s.session_id: s for s in await store.list_sessions()}
    assert by_id["crashed"].worker is None  # the sweeper let go of the lease
    assert by_id["still-driven"].state is State.LIVE


async def test_an_orphan_past_its_deadline_ends_with_time_limit(
    stores: StoreFactory, clock: Clock
) -> None:
    store = stores()
    await driven_then_dropped(store, "late", lines=2, counted=2)
    sweepers = [OrphanSweeper(stores(), f"sweeper-{n}", clock=clock) for n in range(SWEEPERS)]
    clock.now = T0 + CONFIG.time_limit_s + 1  # past the lease and the deadline
    (final,) = await race(sweepers)
    assert (final.session_id, final.end_reason) == ("late", EndReason.TIME_LIMIT)
    stored = await store.load("late")
    assert stored is not None and stored.record == final
    assert await race(sweepers) == []


async def test_a_client_that_came_back_in_time_is_not_finalised(
    stores: StoreFactory, clock: Clock
) -> None:
    store = stores()
    await driven_then_dropped(store, "back", lines=1, counted=1)
    sweeper = OrphanSweeper(stores(), "sweeper", clock=clock)
    clock.now = T0 + TTL_S + GRACE_S + 1
    listed = await store.list_sessions(state=State.LIVE)
    # A worker took the session just after the sweeper listed it, and handed it over again.
    lease = await store.acquire_lease("back", "worker-2", TTL_S)
    assert lease is not None
    stored = await store.load("back")
    assert stored is not None
    await store.fenced(lease).save(stored.record.model_copy(update={"state": State.RESUMING}))
    await store.release_lease(lease)
    assert await sweeper._finalise(listed[0]) is None  # judged afresh: it was driven just now
    current = await store.load("back")
    assert current is not None and current.record.state is State.RESUMING
    assert await sweeper.sweep() == []  # released at T0+76: its grace window starts there


async def test_the_service_sweeps_its_store(tmp_path: Path) -> None:
    database = tmp_path / "service.db"
    long_ago = time.time() - 3600
    planted = SQLiteStore(database, clock=lambda: long_ago)  # a worker that died an hour ago
    await driven_then_dropped(planted, "forgotten", lines=2, counted=1, at=long_ago)
    await planted.close()
    store = SQLiteStore(database)

    class NoUpstream:
        def open(self, **_: object) -> object:
            raise AssertionError("finalising an orphan opens no upstream")

    service = InterviewService(
        NoUpstream(),  # type: ignore[arg-type]
        JWTAuthenticator("orphan-test-secret-long-enough-for-hs256"),
        store=store,
        worker_id="sweeping-worker",
        orphan_sweep_s=0.05,
    )
    try:
        await service.start()
        async with asyncio.timeout(20):
            while True:
                stored = await store.load("forgotten")
                assert stored is not None
                # The sweeper counts the end just after its write: wait for both.
                rendered = service.metrics.render().decode()
                if stored.record.state is State.ENDED and "ended_total{" in rendered:
                    break
                await asyncio.sleep(0.05)
        assert stored.record.end_reason is EndReason.TIME_LIMIT  # its deadline is long past
        assert stored.record.transcript_count == 2
        assert "sweeping-worker" in (stored.record.end_detail or "")
        assert 'voicefsm_sessions_ended_total{reason="time_limit"} 1.0' in rendered
    finally:
        await service.shutdown()
        await store.close()
