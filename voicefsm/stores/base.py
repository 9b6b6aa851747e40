"""The store contract: what every session store does, its data types and its errors.

A store keeps, per session id:

* the latest :class:`~voicefsm.SessionRecord` and a **version**, a counter that grows by one with
  every save that changes the record (1 after the first save; 0 means "no record yet");
* the **transcript**, one :class:`~voicefsm.TranscriptLine` per ``seq``, read back sorted by
  ``seq``;
* a **lease**: which worker drives the session, until when, and a **fencing token**, a number
  that grows by one every time a lease is granted on the session.

Write rules, the same for every backend (the conformance suite checks them):

* A write carrying ``fencing_token=T`` is accepted only while ``T`` is the latest token granted on
  that session. Once another worker has been granted a lease, every write with an older token is
  refused with :class:`StaleFencingToken`, whatever the old worker believes about its lease.
* A write with no fencing token is accepted only while nobody holds a live lease on the session.
* ``save(record, expected_version=V)`` is a compare-and-set: it is refused with
  :class:`VersionConflict` unless the stored version is ``V`` (``V=0``: no record may exist yet).
* Saving a record identical to the stored one changes nothing and returns the stored version, so a
  retried save cannot count twice.
* Appending a transcript line whose ``seq`` is already stored keeps the stored line.

Lease times come from the store's clock (``time.time`` unless a test injects another), in epoch
seconds like the rest of voicefsm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar, runtime_checkable

from voicefsm.model import EndReason, SessionRecord, SessionUsage, State, TranscriptLine
from voicefsm.tasks import cancel_and_wait

logger = logging.getLogger("voicefsm.stores")

_S = TypeVar("_S", bound="StoreBase")

Clock = Callable[[], float]
"""Epoch seconds (``time.time``); stores and the lease keeper take one so tests can inject time."""


# ---------------------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every error a voicefsm store raises on purpose."""


class VersionConflict(StoreError):
    """A compare-and-set save found another version than the one it expected."""

    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        self.session_id = session_id
        self.expected = expected
        self.actual = actual
        found = f"version {actual}" if actual else "no record"
        wanted = f"version {expected}" if expected else "no record (a new session)"
        super().__init__(
            f"session {session_id}: the save expected {wanted} but the store has {found}; "
            "another writer saved in between. Load the session again, re-apply the change and "
            "save with the version you loaded."
        )


class StaleFencingToken(StoreError):
    """A write was refused because the writer does not hold the session's current lease.

    ``token`` is the token the write carried (``None`` for an unfenced write) and
    ``current_token`` the latest one granted on the session.
    """

    def __init__(
        self, session_id: str, token: int | None, current_token: int, holder: str | None
    ) -> None:
        self.session_id = session_id
        self.token = token
        self.current_token = current_token
        self.holder = holder
        by = f" (held by worker {holder!r})" if holder else ""
        if token is None:
            message = (
                f"session {session_id}: a write without a fencing token was refused because "
                f"lease {current_token}{by} is live; write through store.fenced(lease) with a "
                "lease of your own, or wait until that lease expires or is released."
            )
        else:
            message = (
                f"session {session_id}: a write with fencing token {token} was refused; the "
                f"current token is {current_token}{by}. This worker no longer owns the session: "
                "stop driving it (another worker has taken it over)."
            )
        super().__init__(message)


class LeaseLost(StoreError):
    """A lease could not be renewed: it was released, or it expired and another worker took it."""

    def __init__(self, lease: Lease, why: str) -> None:
        self.lease = lease
        super().__init__(
            f"session {lease.session_id}: worker {lease.worker_id!r} lost lease {lease.token}: "
            f"{why}. Stop driving the session; its writes are now refused."
        )


class StoreUnavailable(StoreError):
    """The backend could not be reached or did not answer; the write may be retried.

    :class:`~voicefsm.stores.RetryingSink` retries exactly these.
    """


class StoreClosed(StoreError):
    """The store was used after ``close()``."""


class BacklogFull(StoreError):
    """:class:`~voicefsm.stores.RetryingSink` holds as many unwritten writes as it may."""


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to drive one session, granted to one worker until ``expires_at``.

    ``token`` is the fencing token: pass it with every write (or write through
    ``store.fenced(lease)``) so the store can refuse writes from a worker that lost the lease.
    """

    session_id: str
    worker_id: str
    token: int
    expires_at: float
    ttl_s: float

    def remaining(self, now: float) -> float:
        """Seconds left until the lease expires (negative once it has)."""
        return self.expires_at - now


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A record as loaded from a store, with the version to pass to a compare-and-set save."""

    record: SessionRecord
    version: int


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One line of :meth:`SessionStore.list_sessions`: a record's headline and its lease.

    ``owner`` is the user the session belongs to; ``worker`` the worker whose lease is (or was
    last) on the session and ``lease_expires_at`` when that lease runs out (once released: when
    it was released; 0 if no lease was ever granted). ``worker`` is ``None`` once the lease was
    released.
    """

    session_id: str
    version: int
    state: State
    end_reason: EndReason | None
    started_at: float
    deadline: float
    ended_at: float | None
    transcript_lines: int
    owner: str | None = None
    end_detail: str | None = None
    worker: str | None = None
    lease_expires_at: float = 0.0
    usage: SessionUsage | None = None
    """The record's usage sums (for a cost column)."""

    @classmethod
    def of(
        cls, record: SessionRecord, version: int, lease: LeaseRow | None = None
    ) -> SessionSummary:
        """The summary of ``record`` stored at ``version`` (with its lease row, if known)."""
        row = lease if lease is not None else LeaseRow()
        return cls(
            session_id=record.session_id,
            version=version,
            state=record.state,
            end_reason=record.end_reason,
            started_at=record.started_at,
            deadline=record.deadline,
            ended_at=record.ended_at,
            transcript_lines=record.transcript_count,
            owner=record.owner,
            end_detail=record.end_detail,
            worker=row.owner,
            lease_expires_at=row.expires_at,
            usage=record.usage,
        )

    def lease_live(self, now: float) -> bool:
        """Whether a worker holds a lease on the session at ``now``."""
        return self.worker is not None and self.lease_expires_at > now


StateFilter = State | Collection[State] | None
"""``list_sessions(state=...)``: one state, several, or ``None`` for all."""


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """What :meth:`SessionStore.list_sessions` selects; every store applies it the same way."""

    states: frozenset[State] | None = None
    owner: str | None = None
    worker: str | None = None
    limit: int | None = None
    newest_first: bool = False

    @classmethod
    def of(
        cls,
        state: StateFilter = None,
        owner: str | None = None,
        worker: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> SessionQuery:
        """Check and normalise ``list_sessions``' arguments."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be 0 or more, not {limit}")
        states: frozenset[State] | None
        if state is None:
            states = None
        elif isinstance(state, State | str):
            states = frozenset({State(state)})
        else:
            states = frozenset(State(s) for s in state)
        return cls(states, owner, worker, limit, newest_first)

    @property
    def open_only(self) -> bool:
        """Whether only running (not ended) sessions can match."""
        return self.states is not None and State.ENDED not in self.states

    def matches(self, summary: SessionSummary) -> bool:
        """Whether ``summary`` is selected (the order and ``limit`` aside)."""
        return (
            (self.states is None or summary.state in self.states)
            and (self.owner is None or summary.owner == self.owner)
            and (self.worker is None or summary.worker == self.worker)
        )

    def apply(self, summaries: Iterable[SessionSummary]) -> list[SessionSummary]:
        """The selected summaries, in order (by start time, then id), at most ``limit``."""
        ordered = sorted(
            (s for s in summaries if self.matches(s)),
            key=lambda s: (s.started_at, s.session_id),
            reverse=self.newest_first,
        )
        return ordered if self.limit is None else ordered[: self.limit]


# ---------------------------------------------------------------------------------------- protocol


@runtime_checkable
class SessionStore(Protocol):
    """Durable session state: records with compare-and-set, transcripts, leases with fencing.

    A superset of :class:`voicefsm.ports.SessionSink`: a store (unfenced) or ``store.fenced(lease)``
    (fenced) can be passed as a host's ``sink``.
    """

    async def load(self, session_id: str) -> StoredSession | None:
        """The session's latest record and its version; ``None`` if it was never saved."""
        ...

    async def save(
        self,
        record: SessionRecord,
        *,
        expected_version: int | None = None,
        fencing_token: int | None = None,
    ) -> int:
        """Store ``record`` as its session's latest; return the new version.

        ``expected_version``: compare-and-set (:class:`VersionConflict` if the stored version
        differs; 0 = the record must not exist yet). ``fencing_token``: the writer's lease token
        (:class:`StaleFencingToken` if it is not the current one).
        """
        ...

    async def append_transcript(
        self, session_id: str, line: TranscriptLine, *, fencing_token: int | None = None
    ) -> None:
        """Store one transcript line; a line whose ``seq`` is already stored is kept as it was."""
        ...

    async def read_transcript(self, session_id: str) -> list[TranscriptLine]:
        """The session's transcript, sorted by ``seq`` (empty if there is none)."""
        ...

    async def acquire_lease(self, session_id: str, worker_id: str, ttl_s: float) -> Lease | None:
        """Lease the session to ``worker_id`` for ``ttl_s`` seconds, with a new fencing token.

        ``None`` while another worker holds a live lease. A worker that asks again while it
        holds the lease (a restarted process with the same worker id) gets a new token, and
        writes with its old token are refused from then on.
        """
        ...

    async def renew_lease(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        """Extend ``lease`` to ``now + ttl_s`` (default: its own ttl), keeping its token.

        A lease that expired but was not taken by anyone renews fine. :class:`LeaseLost` if it
        was released or another worker has been granted the session since.
        """
        ...

    async def release_lease(self, lease: Lease) -> None:
        """Give the session up so another worker can take it at once (no-op if already lost)."""
        ...

    async def list_sessions(
        self,
        *,
        state: StateFilter = None,
        owner: str | None = None,
        worker: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[SessionSummary]:
        """The sessions that have a record, by start time (oldest first unless
        ``newest_first``), each with its lease.

        ``state`` keeps sessions in that state (or any of several), ``owner`` those of one user,
        ``worker`` those whose lease that worker holds; ``limit`` caps the number returned.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads; the store cannot be used afterwards."""
        ...

    def fenced(self, lease: Lease) -> FencedSink:
        """This store seen through ``lease``: a sink whose writes carry its fencing token."""
        ...


class StoreBase:
    """What the bundled stores share: :meth:`fenced` and ``async with`` (closes the store)."""

    def fenced(self: SessionStore, lease: Lease) -> FencedSink:
        """This store seen through ``lease``: a sink whose writes carry its fencing token."""
        return FencedSink(self, lease)

    async def close(self) -> None:
        """Release what the store holds (nothing here)."""

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class FencedSink:
    """A session store seen through one lease: every write carries the lease's fencing token.

    Made by ``store.fenced(lease)``; pass it as the host's ``sink``. Plain
    ``save(record)`` and ``append_transcript(session_id, line)`` are then fenced: once another
    worker has taken the session, they raise :class:`StaleFencingToken`. Renewing the lease keeps
    its token, so the view stays valid for the whole time the worker owns the session.
    """

    __slots__ = ("lease", "store")

    def __init__(self, store: SessionStore, lease: Lease) -> None:
        self.store = store
        self.lease = lease

    def __repr__(self) -> str:
        return (
            f"FencedSink({self.store!r}, session {self.lease.session_id!r}, "
            f"token {self.lease.token})"
        )

    def _check(self, session_id: str) -> None:
        if session_id != self.lease.session_id:
            raise ValueError(
                f"this sink writes session {self.lease.session_id} (its lease), not {session_id}; "
                "take a lease on that session and write through its own fenced sink"
            )

    async def save(self, record: SessionRecord, *, expected_version: int | None = None) -> int:
        """Save ``record`` with this lease's fencing token; return the new version."""
        self._check(record.session_id)
        return await self.store.save(
            record, expected_version=expected_version, fencing_token=self.lease.token
        )

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        """Append ``line`` with this lease's fencing token."""
        self._check(session_id)
        await self.store.append_transcript(session_id, line, fencing_token=self.lease.token)


# ---------------------------------------------------------------------------------------- leases


class LeaseKeeper:
    """Renews a lease in the background while a worker drives the session.

    Use as ``async with LeaseKeeper(store, lease) as keeper:``. It renews every
    ``renew_every_s`` (default: a third of the ttl). When the store says the lease is lost (it was
    released, or it expired and another worker was granted the session), ``keeper.lost`` is set,
    ``on_lost`` is called once with the :class:`LeaseLost`, and renewing stops: the worker must
    stop driving the session (its writes are refused anyway).

    While the store is unreachable it keeps trying, and logs a WARNING when the outage starts and
    when the lease runs out meanwhile. Once the store answers again, the renewal succeeds if
    nobody took the session in between (a lease that expired unclaimed renews fine) or reports
    the loss. So a store outage alone never stops a session; a takeover always does.

    Leaving the block stops renewing but does not release the lease; call
    ``store.release_lease(keeper.lease)`` after the last write has landed.
    """

    def __init__(
        self,
        store: SessionStore,
        lease: Lease,
        *,
        renew_every_s: float | None = None,
        on_lost: Callable[[LeaseLost], None] | None = None,
        clock: Clock = time.time,
    ) -> None:
        if renew_every_s is not None and renew_every_s <= 0:
            raise ValueError(f"renew_every_s must be positive, not {renew_every_s}")
        self.store = store
        self.lease = lease
        """The latest renewal of the lease."""
        self.renew_every_s = renew_every_s if renew_every_s is not None else lease.ttl_s / 3
        self.lost = asyncio.Event()
        """Set once the lease is lost."""
        self.lost_reason: LeaseLost | None = None
        self._on_lost = on_lost
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.create_task(
            self._run(), name=f"voicefsm-lease-{self.lease.session_id[:12]}"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        lease = self.lease
        failing_since: float | None = None
        expiry_reported = False
        while True:
            await asyncio.sleep(self.renew_every_s)
            try:
                self.lease = await self.store.renew_lease(self.lease)
            except LeaseLost as error:
                self.lost_reason = error
                self.lost.set()
                logger.warning("%s", error)
                if self._on_lost is not None:
                    self._on_lost(error)
                return
            except (StoreUnavailable, OSError) as error:
                now = self._clock()
                if failing_since is None:
                    failing_since = now
                    logger.warning(
                        "session %s: cannot renew lease %d (%s); %.1f s of it left; retrying "
                        "every %.1f s",
                        lease.session_id,
                        lease.token,
                        type(error).__name__,
                        self.lease.remaining(now),
                        self.renew_every_s,
                    )
                if not expiry_reported and self.lease.remaining(now) <= 0:
                    expiry_reported = True
                    logger.warning(
                        "session %s: lease %d expired while the store was unreachable; another "
                        "worker may take the session once the store is back (this worker's "
                        "writes would then be refused); still trying to renew",
                        lease.session_id,
                        lease.token,
                    )
                continue
            if failing_since is not None:
                logger.info(
                    "session %s: lease %d renewed again after %.1f s of store errors",
                    lease.session_id,
                    lease.token,
                    self._clock() - failing_since,
                )
                failing_since = None
                expiry_reported = False


# ---------------------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """The lease columns a backend keeps per session (``owner`` is ``None`` once released)."""

    token: int = 0
    owner: str | None = None
    expires_at: float = 0.0

    def live(self, now: float) -> bool:
        """Whether someone holds the lease at ``now``."""
        return self.owner is not None and self.expires_at > now


def check_write(session_id: str, fencing_token: int | None, row: LeaseRow, now: float) -> None:
    """Raise :class:`StaleFencingToken` unless a write with ``fencing_token`` may land."""
    if fencing_token is None:
        if row.live(now):
            raise StaleFencingToken(session_id, None, row.token, row.owner)
    elif fencing_token != row.token:
        raise StaleFencingToken(session_id, fencing_token, row.token, row.owner)


def grant(
    session_id: str, worker_id: str, ttl_s: float, row: LeaseRow, now: float
) -> tuple[LeaseRow, Lease] | None:
    """The new lease row and lease if ``worker_id`` may take the session at ``now``."""
    if row.live(now) and row.owner != worker_id:
        return None
    token = row.token + 1
    lease = Lease(session_id, worker_id, token, now + ttl_s, ttl_s)
    return LeaseRow(token, worker_id, lease.expires_at), lease


def renewed(lease: Lease, ttl_s: float, row: LeaseRow, now: float) -> tuple[LeaseRow, Lease]:
    """The lease row and lease after renewing ``lease``; :class:`LeaseLost` if it cannot be."""
    if row.token != lease.token:
        by = f" by worker {row.owner!r}" if row.owner else ""
        raise LeaseLost(lease, f"lease {row.token} was granted since{by}")
    if row.owner != lease.worker_id:
        raise LeaseLost(lease, "it was released")
    new = replace(lease, expires_at=now + ttl_s, ttl_s=ttl_s)
    return LeaseRow(row.token, row.owner, new.expires_at), new


def released(lease: Lease, row: LeaseRow, now: float) -> LeaseRow | None:
    """The lease row after releasing ``lease`` at ``now``; ``None`` if it is not the current
    lease. The row keeps ``now`` as its expiry: when the session was last driven."""
    if row.token != lease.token or row.owner != lease.worker_id:
        return None
    return LeaseRow(row.token, None, now)


def check_ttl(ttl_s: float) -> None:
    """Refuse a lease duration that is not a positive number of seconds."""
    if not ttl_s > 0:
        raise ValueError(f"a lease ttl must be a positive number of seconds, not {ttl_s!r}")


def check_worker_id(worker_id: str) -> None:
    """Refuse an empty worker id (it would look like a released lease)."""
    if not worker_id:
        raise ValueError("worker_id must not be empty: use something unique per process")


def version_after_save(
    session_id: str, expected_version: int | None, version: int, data: str, current: str | None
) -> int:
    """The version a save of ``data`` leaves, where ``current`` is stored at ``version``.

    :class:`VersionConflict` unless ``expected_version`` is ``None`` or ``version``. Then
    ``version`` itself when ``data`` is what is stored (the save writes nothing), else
    ``version + 1``.
    """
    if expected_version is not None and expected_version != version:
        raise VersionConflict(session_id, expected_version, version)
    return version if data == current else version + 1


def check_expected_version(expected_version: int | None) -> None:
    """Refuse a negative expected version."""
    if expected_version is not None and expected_version < 0:
        raise ValueError(f"expected_version must be 0 or more, not {expected_version}")
