"""Every stored session reaches exactly one end: finalising the ones nobody drives any more.

A session is an **orphan** when it is not ended, no worker holds a live lease on it (its worker
died, or handed it over on shutdown and nobody took it), and its client has not come back: the
client's grace window (``client_grace_s``, counted from when the lease ran out or was released)
is over, or the deadline has passed. Nobody would ever end it: it would say ``live`` forever.

:class:`OrphanSweeper` finds them (``store.list_sessions`` of the running states) and finalises
each **exactly once**, even with every worker sweeping at the same time:

1. it takes the session's lease (the store grants it to one worker at a time; the new fencing
   token also fences out any worker that might still wake up);
2. it loads the newest record again and checks that it is still an orphan, unchanged since it
   was listed (a record written meanwhile is judged afresh on the next pass);
3. it saves the final record — ``time_limit`` if the deadline passed, else ``disconnected`` —
   with a compare-and-set on the version it loaded and the lease's fencing token, with the
   transcript count taken from the stored transcript (lines said after the record's last save
   are counted), and the buffered client input counted as unsent;
4. it releases the lease.

A sweeper that loses a race at any step skips the session; one that dies half-way leaves the
lease to expire, and the next sweep finishes the job. :class:`~voicefsm.service.InterviewService`
runs one per worker on a durable store (``orphan_sweep_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from voicefsm.model import EndReason, SessionRecord, State
from voicefsm.stores.base import (
    Clock,
    SessionStore,
    SessionSummary,
    StaleFencingToken,
    StoreError,
    VersionConflict,
)
from voicefsm.tasks import cancel_and_wait

logger = logging.getLogger("voicefsm.orphans")

RUNNING_STATES = (State.CONNECTING, State.LIVE, State.WARNING, State.RESUMING)
"""Every state but ``ended``."""


def orphaned_since(summary: SessionSummary) -> float:
    """When the session was last driven: its lease's expiry or release (else its start)."""
    return max(summary.lease_expires_at, summary.started_at)


def due_end(record: SessionRecord, summary: SessionSummary, now: float) -> EndReason | None:
    """How an orphan ends at ``now`` — ``None`` while it is not one (or not yet)."""
    if record.state is State.ENDED or summary.lease_live(now):
        return None
    if now >= record.deadline:
        return EndReason.TIME_LIMIT
    if now >= orphaned_since(summary) + record.config.client_grace_s:
        return EndReason.DISCONNECTED
    return None


def final_record(
    record: SessionRecord, reason: EndReason, now: float, transcript_count: int, worker_id: str
) -> SessionRecord:
    """The end record of an orphan, as the engine would have written it."""
    if reason is EndReason.TIME_LIMIT:
        detail = (
            f"the {record.config.time_limit_s:g} s limit passed while no worker drove the "
            f"session (finalised by {worker_id})"
        )
    else:
        detail = (
            f"its worker stopped and the client did not come back within "
            f"{record.config.client_grace_s:g} s (finalised by {worker_id})"
        )
    unsent = sum(1 for item in record.pending if item.audio is not None)
    stats = record.stats.model_copy(
        update={"chunks_unsent_at_end": record.stats.chunks_unsent_at_end + unsent}
    )
    return record.model_copy(
        update={
            "state": State.ENDED,
            "end_reason": reason,
            "end_detail": detail,
            "ended_at": now,
            "client_connected": False,
            "pending": [],
            "transcript_count": max(record.transcript_count, transcript_count),
            "stats": stats,
        }
    )


class OrphanSweeper:
    """Finds and finalises orphaned sessions in ``store`` on behalf of ``worker_id``.

    :meth:`sweep` does one pass and returns the records it finalised; :meth:`start` runs a pass
    every ``every_s`` seconds (each delay jittered by ±20 %, so workers do not sweep in lock
    step) until :meth:`stop`. ``on_finalised`` is called with each final record (metrics, say).
    ``lease_ttl_s`` bounds how long a sweeper that dies mid-way blocks the next one.
    """

    def __init__(
        self,
        store: SessionStore,
        worker_id: str,
        *,
        every_s: float = 30.0,
        lease_ttl_s: float = 15.0,
        clock: Clock = time.time,
        on_finalised: Callable[[SessionRecord], None] | None = None,
    ) -> None:
        if not every_s > 0:
            raise ValueError(f"every_s must be positive, not {every_s!r}")
        self.store = store
        self.worker_id = worker_id
        self.every_s = every_s
        self.lease_ttl_s = lease_ttl_s
        self.finalised = 0
        """Sessions this sweeper finalised."""
        self._clock = clock
        self._on_finalised = on_finalised
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    async def sweep(self) -> list[SessionRecord]:
        """One pass: finalise every orphan this sweeper wins; their final records."""
        done: list[SessionRecord] = []
        for summary in await self.store.list_sessions(state=RUNNING_STATES):
            record = await self._finalise(summary)
            if record is not None:
                done.append(record)
        return done

    def start(self) -> None:
        """Sweep in the background until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="voicefsm-orphan-sweeper")

    async def stop(self) -> None:
        """Stop sweeping (a pass under way is cancelled; its lease, if any, just expires)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s * (0.8 + 0.4 * self._rng.random()))
            try:
                await self.sweep()
            except (StoreError, OSError) as error:
                logger.warning(
                    "orphan sweep failed (%s: %s); next pass later", type(error).__name__, error
                )
            except Exception:
                logger.exception("orphan sweep failed")

    async def _finalise(self, summary: SessionSummary) -> SessionRecord | None:
        store = self.store
        stored = await store.load(summary.session_id)
        if stored is None or due_end(stored.record, summary, self._clock()) is None:
            return None
        lease = await store.acquire_lease(summary.session_id, self.worker_id, self.lease_ttl_s)
        if lease is None:
            return None  # a worker (or another sweeper) holds it now
        try:
            stored = await store.load(summary.session_id)  # the newest, now that it is ours
            now = self._clock()
            if stored is None or stored.version != summary.version:
                return None  # written since it was listed: judge it afresh next pass
            reason = due_end(stored.record, summary, now)
            if reason is None:
                return None
            lines = await store.read_transcript(summary.session_id)
            count = lines[-1].seq + 1 if lines else 0
            final = final_record(stored.record, reason, now, count, self.worker_id)
            try:
                await store.fenced(lease).save(final, expected_version=stored.version)
            except (StaleFencingToken, VersionConflict):
                return None  # taken, or written, in between: not ours to end
        finally:
            with contextlib.suppress(StoreError, OSError):
                await store.release_lease(lease)
        self.finalised += 1
        logger.info(
            "finalised orphaned session %s: %s (%s)", final.session_id, reason, final.end_detail
        )
        if self._on_finalised is not None:
            self._on_finalised(final)
        return final
