"""Admission control: a worker refuses new sessions before its running interviews degrade.

Every interview on a worker shares one event loop. Past some number of interviews per core the
loop falls behind: timers fire late (the warning, the deadline, rotations), and audio queues up.
:class:`LoopLagMonitor` measures that directly — how late a periodic timer fires on this loop —
and :class:`OverloadGuard` turns it into a decision: while the lag is *sustained* — at least
``late_fraction`` of the samples of the last ``window_s`` exceed ``max_lag_s`` — new sessions are
refused (the service closes them with 1013
"server busy, retry", after an ``error`` message with code ``server_busy``), so a load balancer
or the client retries elsewhere or later. Sessions already running are never touched: a
returning client of a running session is always re-attached.

The lag is a sample per ``interval_s``, so a refusal follows overload within a fraction of the
window, and admission resumes once late samples fall under ``late_fraction`` of the window. A
single stall (a garbage collection, a burst of TLS handshakes, a neighbour on the same core) is
one late sample among ~40 and refuses nobody; an overloaded loop is late on most samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

DEFAULT_MAX_LAG_S = 0.025
"""Default threshold: half the 50 ms within which warnings and ends must reach the client."""
DEFAULT_LATE_FRACTION = 0.2
"""Default share of a window's samples that must be late for the lag to count as sustained."""


class LoopLagMonitor:
    """How late a periodic timer fires on the running event loop.

    :meth:`start` runs a task that sleeps ``interval_s`` and records by how much it overslept;
    :meth:`record` takes a sample from elsewhere (tests inject lag through it).
    :attr:`recent_max_s` is the worst sample of the last ``window_s``.
    """

    def __init__(
        self,
        *,
        interval_s: float = 0.05,
        window_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or window_s <= 0:
            raise ValueError("interval_s and window_s must be positive")
        if window_s < interval_s:
            raise ValueError("window_s must cover at least one interval_s")
        self.interval_s = interval_s
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._task: asyncio.Task[None] | None = None

    def record(self, lag_s: float) -> None:
        """Add one lag sample, taken now."""
        now = self._clock()
        self._samples.append((now, max(0.0, lag_s)))
        self._expire(now)

    def late_share(self, threshold_s: float) -> tuple[float, float]:
        """Of the last ``window_s``: the share of samples later than ``threshold_s``, and the
        worst lag (both 0 when there is no sample)."""
        self._expire(self._clock())
        if not self._samples:
            return 0.0, 0.0
        lags = [lag for _, lag in self._samples]
        late = sum(1 for lag in lags if lag > threshold_s)
        return late / len(lags), max(lags)

    @property
    def recent_max_s(self) -> float:
        """The largest lag sampled in the last ``window_s`` (0 when there is none)."""
        self._expire(self._clock())
        return max((lag for _, lag in self._samples), default=0.0)

    def _expire(self, now: float) -> None:
        samples = self._samples
        while samples and samples[0][0] < now - self.window_s:
            samples.popleft()

    def start(self) -> None:
        """Start sampling on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._sample(), name="voicefsm-loop-lag")

    async def stop(self) -> None:
        """Stop sampling."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(loop.time() - due)


class OverloadGuard:
    """Decides whether this worker takes a new session.

    Refuses while at least ``late_fraction`` of the lag samples of the last
    ``monitor.window_s`` exceeded ``max_lag_s``, or while ``max_sessions`` (if set) are
    running. The monitor must be started on the serving loop (:meth:`start`;
    :class:`~voicefsm.service.InterviewService` does it lazily).
    """

    def __init__(
        self,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        *,
        max_sessions: int | None = None,
        monitor: LoopLagMonitor | None = None,
        late_fraction: float = DEFAULT_LATE_FRACTION,
    ) -> None:
        if max_lag_s <= 0:
            raise ValueError("max_lag_s must be positive")
        if not 0 < late_fraction <= 1:
            raise ValueError("late_fraction must be in (0, 1]")
        if max_sessions is not None and max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_lag_s = max_lag_s
        self.max_sessions = max_sessions
        self.late_fraction = late_fraction
        self.monitor = monitor if monitor is not None else LoopLagMonitor()
        self.refused = 0
        """How many sessions this admission refused."""

    def start(self) -> None:
        """Start the lag monitor on the running loop (idempotent)."""
        self.monitor.start()

    def refusal(self, running_sessions: int) -> str | None:
        """Why a new session must be refused now, or ``None`` to admit it."""
        why: str | None = None
        if self.max_sessions is not None and running_sessions >= self.max_sessions:
            why = f"{running_sessions} sessions running (limit {self.max_sessions})"
        else:
            share, worst = self.monitor.late_share(self.max_lag_s)
            if share and share >= self.late_fraction:
                why = (
                    f"event-loop lag over {self.max_lag_s * 1000:.0f} ms in {share:.0%} of the "
                    f"last {self.monitor.window_s:g} s (worst {worst * 1000:.0f} ms)"
                )
        if why is not None:
            self.refused += 1
        return why
