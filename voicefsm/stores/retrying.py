"""Riding out a store outage: a write-behind sink that queues, retries and keeps order.

The session host awaits ``sink.save`` and ``sink.append_transcript`` inline, between audio
chunks. :class:`RetryingSink` returns from both at once: the write joins a bounded in-memory queue
and one background task writes the queue to the wrapped sink in order. When the backend fails
with a retryable error (:class:`~voicefsm.stores.StoreUnavailable`, ``OSError``) the task retries
the same write with exponential backoff and jitter, the queue keeps growing behind it, and the
session keeps running; once the backend answers again, the queue drains in order and nothing is
lost. Saves are whole snapshots and transcript lines are idempotent on ``seq``, so a write that
landed just before the connection broke and is retried does not count twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from voicefsm.model import SessionRecord, TranscriptLine
from voicefsm.ports import SessionSink
from voicefsm.stores.base import BacklogFull, StoreUnavailable
from voicefsm.tasks import cancel_and_wait

logger = logging.getLogger("voicefsm.stores.retrying")


@dataclass(slots=True)
class _Write:
    session_id: str
    record: SessionRecord | None = None
    line: TranscriptLine | None = None


class RetryingSink:
    """Wraps a sink (a store, or ``store.fenced(lease)``) so writes survive a backend outage.

    * ``max_pending`` bounds the queue. When it is full, a queued save that a later save of the
      same session supersedes is dropped to make room (a record is a full snapshot); if none can
      be, the write raises :class:`~voicefsm.stores.BacklogFull`.
    * Retries back off from ``backoff_initial_s`` doubling up to ``backoff_max_s``, each delay
      scaled by a random factor in [0.5, 1].
    * Errors in ``retry_on`` are retried; any other error (for example
      :class:`~voicefsm.stores.StaleFencingToken`: this worker lost the session) drops that
      session's queued writes, is logged at ERROR and is kept in :attr:`errors`. Without
      ``on_refused`` the session's next write raises it. With ``on_refused``, it is called once
      with the session id and the error, and the session's later writes are discarded (counted
      in :attr:`discarded`) instead: a worker that was fenced out stops writing and detaches
      (what :class:`~voicefsm.service.InterviewService` does) rather than failing the session.
    * Logs on ``voicefsm.stores.retrying``: WARNING when writes start failing and every
      ``log_every_s`` while they still fail, INFO when they recover — with counts and error
      types, never transcript text.

    Call :meth:`flush` (bounded by ``asyncio.timeout``) before releasing a lease or exiting, and
    :meth:`aclose` when done.
    """

    def __init__(
        self,
        sink: SessionSink,
        *,
        max_pending: int = 10_000,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_on: tuple[type[BaseException], ...] = (StoreUnavailable, OSError),
        log_every_s: float = 30.0,
        name: str | None = None,
        on_refused: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                f"need 0 < backoff_initial_s ({backoff_initial_s}) <= "
                f"backoff_max_s ({backoff_max_s})"
            )
        self.sink = sink
        self.max_pending = max_pending
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_on = retry_on
        self.log_every_s = log_every_s
        self.name = name if name is not None else repr(sink)
        self.errors: dict[str, BaseException] = {}
        """Per session, the error that made its writes fail for good."""
        self.written = 0
        """Writes that landed."""
        self.retries = 0
        """Failed attempts that were retried."""
        self.dropped = 0
        """Queued saves dropped because a later save of the same session superseded them."""
        self.discarded = 0
        """Writes not even queued because their session's writes were refused for good (only
        with ``on_refused``)."""
        self._on_refused = on_refused
        self._queue: deque[_Write] = deque()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._failing_since: float | None = None
        self._closed = False
        self._rng = random.Random()

    # ------------------------------------------------------------------ the sink

    async def save(self, record: SessionRecord) -> None:
        """Queue ``record`` to be saved; returns at once."""
        self._enqueue(_Write(record.session_id, record=record))

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        """Queue ``line`` to be appended; returns at once."""
        self._enqueue(_Write(session_id, line=line))

    @property
    def pending(self) -> int:
        """Writes queued and not yet landed (the one being attempted included)."""
        return len(self._queue)

    @property
    def failing(self) -> bool:
        """Whether the backend is failing right now (writes are being retried)."""
        return self._failing_since is not None

    async def flush(self) -> None:
        """Wait until every queued write has landed (or was dropped for good)."""
        await self._idle.wait()

    async def aclose(self, grace_s: float | None = 5.0) -> None:
        """Flush for up to ``grace_s`` seconds, then stop; writes still queued are lost (logged)."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.flush()
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._queue:
            logger.error(
                "%s: closing with %d writes never written (the store stayed unreachable)",
                self.name,
                len(self._queue),
            )
            self._queue.clear()
            self._idle.set()

    # ------------------------------------------------------------------ queueing

    def _enqueue(self, write: _Write) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: RetryingSink was closed")
        error = self.errors.get(write.session_id)
        if error is not None:
            if self._on_refused is not None:
                self.discarded += 1
                return
            raise error
        if len(self._queue) >= self.max_pending and not self._make_room(write):
            raise BacklogFull(
                f"{self.name}: {len(self._queue)} writes are waiting for the store (the most "
                f"this sink keeps), which has been failing for {self._failing_for():.1f} s; "
                "restore the store, or raise max_pending"
            )
        self._queue.append(write)
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=f"voicefsm-writer-{self.name}")

    def _make_room(self, incoming: _Write) -> bool:
        """Drop the oldest queued save that a later save of its session supersedes."""
        later_saves = {incoming.session_id} if incoming.record is not None else set()
        superseded: int | None = None
        for index in range(len(self._queue) - 1, 0, -1):  # never the write being attempted
            write = self._queue[index]
            if write.record is None:
                continue
            if write.session_id in later_saves:
                superseded = index
            else:
                later_saves.add(write.session_id)
        if superseded is None:
            return False
        del self._queue[superseded]
        self.dropped += 1
        return True

    def _failing_for(self) -> float:
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    # ------------------------------------------------------------------ the writer

    async def _write(self, write: _Write) -> None:
        if write.record is not None:
            await self.sink.save(write.record)
        else:
            assert write.line is not None
            await self.sink.append_transcript(write.session_id, write.line)

    async def _drain(self) -> None:
        failures = 0
        last_log = 0.0
        try:
            while self._queue:
                write = self._queue[0]
                try:
                    await self._write(write)
                except self.retry_on as error:
                    failures += 1
                    self.retries += 1
                    now = time.monotonic()
                    if self._failing_since is None:
                        self._failing_since = last_log = now
                        logger.warning(
                            "%s: store writes are failing (%s: %s); retrying with backoff, "
                            "%d writes queued",
                            self.name,
                            type(error).__name__,
                            error,
                            len(self._queue),
                        )
                    elif now - last_log >= self.log_every_s:
                        last_log = now
                        logger.warning(
                            "%s: store writes still failing after %.1f s (%d attempts, last "
                            "%s); %d writes queued",
                            self.name,
                            now - self._failing_since,
                            failures,
                            type(error).__name__,
                            len(self._queue),
                        )
                    delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))
                    await asyncio.sleep(delay * (0.5 + 0.5 * self._rng.random()))
                    continue
                except Exception as error:
                    self._give_up(write, error)
                    continue
                if self._queue and self._queue[0] is write:
                    self._queue.popleft()
                self.written += 1
                if self._failing_since is not None:
                    logger.info(
                        "%s: store writes recovered after %.1f s and %d failed attempts; "
                        "%d queued writes follow",
                        self.name,
                        time.monotonic() - self._failing_since,
                        failures,
                        len(self._queue),
                    )
                    self._failing_since = None
                    failures = 0
        finally:
            if asyncio.current_task() is self._task:
                self._task = None
            if not self._queue:
                self._idle.set()

    def _give_up(self, write: _Write, error: Exception) -> None:
        session_id = write.session_id
        self.errors[session_id] = error
        before = len(self._queue)
        self._queue = deque(w for w in self._queue if w.session_id != session_id)
        logger.error(
            "%s: session %s: a write was refused for good (%s: %s); dropped its %d queued writes",
            self.name,
            session_id,
            type(error).__name__,
            error,
            before - len(self._queue),
        )
        if self._on_refused is not None:
            try:
                self._on_refused(session_id, error)
            except Exception:
                logger.exception("%s: on_refused failed for session %s", self.name, session_id)
