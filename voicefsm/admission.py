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

Lag is a *lagging* indicator: it shows only once the loop is already saturated, and the
sessions admitted meanwhile all start (connect, TLS, setup: a burst of CPU each) and then add
their steady load. Two leading rules stop an arrival ramp before the lag shows:

* **busy**: the share of wall time the loop's thread was on a CPU or waiting for one
  (:func:`thread_cpu_demand_s` deltas at each sample) over the last ``busy_window_s``. A loop
  busy up to ~80 % of the time runs its timers on time; near 100 % it does not, and in between
  a few starts at once are enough to push timers past 50 ms. Refused while it is at least
  ``max_busy``.
* **starting**: sessions admitted but not yet ``live`` (still opening their model connection).
  Refused while ``max_starting`` are, so a ramp cannot start a crowd at once.

Where the run-queue wait cannot be read (not Linux), busy is the thread's CPU time alone: a
neighbour taking the core then shows as lag, not as busy. The lag rule stays for that, and for
whatever else delays timers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable

from voicefsm.tasks import cancel_and_wait

DEFAULT_MAX_LAG_S = 0.025
"""Default threshold: half the 50 ms within which warnings and ends must reach the client."""
DEFAULT_LATE_FRACTION = 0.2
"""Default share of a window's samples that must be late for the lag to count as sustained."""
DEFAULT_MAX_BUSY = 0.7
"""Default share of wall time the loop's thread may spend on the CPU before new sessions wait."""
DEFAULT_BUSY_WINDOW_S = 1.0
"""Default span over which that share is measured."""
DEFAULT_MAX_STARTING = 8
"""Default number of sessions that may be opening their model connection at once."""


_SCHEDSTAT = "/proc/thread-self/schedstat"
_HAS_SCHEDSTAT = os.path.exists(_SCHEDSTAT)


def thread_cpu_demand_s() -> float:
    """Seconds the calling thread has spent on a CPU *or waiting for one*.

    On Linux, from ``/proc/thread-self/schedstat`` (time run plus time runnable on a run
    queue, ~16 µs a read): a thread kept off a core it wants by a neighbour counts as busy,
    so a stolen core shows as demand, not as idle time. Elsewhere ``time.thread_time()``.
    """
    if _HAS_SCHEDSTAT:
        with open(_SCHEDSTAT, "rb") as stat:
            ran_ns, waited_ns, _ = stat.read().split()
        return (int(ran_ns) + int(waited_ns)) / 1e9
    return time.thread_time()


class LoopLagMonitor:
    """How late a periodic timer fires on the running event loop, and how busy its thread is.

    :meth:`start` runs a task that sleeps ``interval_s`` and records by how much it overslept,
    with the loop thread's CPU demand (``cpu_clock``, :func:`thread_cpu_demand_s`) then;
    :meth:`record` takes a sample from elsewhere (tests inject lag and CPU time through it).
    :attr:`recent_max_s` is the worst sample of the last ``window_s``; :meth:`busy_share` the
    share of a recent span the thread spent on the CPU.
    """

    def __init__(
        self,
        *,
        interval_s: float = 0.05,
        window_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = thread_cpu_demand_s,
    ) -> None:
        if interval_s <= 0 or window_s <= 0:
            raise ValueError("interval_s and window_s must be positive")
        if window_s < interval_s:
            raise ValueError("window_s must cover at least one interval_s")
        self.interval_s = interval_s
        self.window_s = window_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._samples: deque[tuple[float, float, float]] = deque()
        """(taken at, lag, the loop thread's CPU demand then), oldest first."""
        self._task: asyncio.Task[None] | None = None

    def record(self, lag_s: float, cpu_s: float | None = None) -> None:
        """Add one lag sample, taken now, with the loop thread's CPU demand (read from
        ``cpu_clock`` unless given; it must be read on the loop's thread)."""
        now = self._clock()
        cpu = self._cpu_clock() if cpu_s is None else cpu_s
        self._samples.append((now, max(0.0, lag_s), cpu))
        self._expire(now)

    def busy_share(self, span_s: float) -> float | None:
        """The share of the last ``span_s`` (at most ``window_s``) that the loop's thread was on
        a CPU or waiting for one, between the oldest and the newest sample in it; ``None``
        without two samples. It can exceed 1 when other threads of the process queue too."""
        now = self._clock()
        self._expire(now)
        samples = self._samples
        if len(samples) < 2:
            return None
        newest_at, _, newest_cpu = samples[-1]
        since = now - span_s
        # The oldest sample in the span (the deque is oldest first and bounded by the window).
        oldest_at, _, oldest_cpu = next(
            (sample for sample in samples if sample[0] >= since), samples[-1]
        )
        if newest_at - oldest_at < self.interval_s / 2:
            return None
        return max(0.0, newest_cpu - oldest_cpu) / (newest_at - oldest_at)

    def late_share(self, threshold_s: float) -> tuple[float, float]:
        """Of the last ``window_s``: the share of samples later than ``threshold_s``, and the
        worst lag (both 0 when there is no sample)."""
        self._expire(self._clock())
        if not self._samples:
            return 0.0, 0.0
        lags = [lag for _, lag, _ in self._samples]
        late = sum(1 for lag in lags if lag > threshold_s)
        return late / len(lags), max(lags)

    @property
    def recent_max_s(self) -> float:
        """The largest lag sampled in the last ``window_s`` (0 when there is none)."""
        self._expire(self._clock())
        return max((lag for _, lag, _ in self._samples), default=0.0)

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
        await cancel_and_wait(task)

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(loop.time() - due)


class OverloadGuard:
    """Decides whether this worker takes a new session.

    Refuses, checked in this order, while ``max_sessions`` (if set) are running; while
    ``max_starting`` (if set) sessions are still opening their model connection; while the
    loop's thread was on the CPU for at least ``max_busy`` (if set) of the last
    ``busy_window_s``; or while at least ``late_fraction`` of the lag samples of the last
    ``monitor.window_s`` exceeded ``max_lag_s``. ``None`` turns a rule off. The monitor must be
    started on the serving loop (:meth:`start`; :class:`~voicefsm.service.InterviewService`
    does it lazily).
    """

    def __init__(
        self,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        *,
        max_sessions: int | None = None,
        monitor: LoopLagMonitor | None = None,
        late_fraction: float = DEFAULT_LATE_FRACTION,
        max_busy: float | None = DEFAULT_MAX_BUSY,
        busy_window_s: float = DEFAULT_BUSY_WINDOW_S,
        max_starting: int | None = DEFAULT_MAX_STARTING,
    ) -> None:
        if max_lag_s <= 0:
            raise ValueError("max_lag_s must be positive")
        if not 0 < late_fraction <= 1:
            raise ValueError("late_fraction must be in (0, 1]")
        if max_sessions is not None and max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if max_busy is not None and not 0 < max_busy <= 1:
            raise ValueError("max_busy must be in (0, 1]")
        if max_starting is not None and max_starting < 1:
            raise ValueError("max_starting must be at least 1")
        self.max_lag_s = max_lag_s
        self.max_sessions = max_sessions
        self.late_fraction = late_fraction
        self.max_busy = max_busy
        self.max_starting = max_starting
        self.monitor = monitor if monitor is not None else LoopLagMonitor()
        if not 0 < busy_window_s <= self.monitor.window_s:
            raise ValueError("busy_window_s must be positive and at most the monitor's window_s")
        self.busy_window_s = busy_window_s
        self.refused = 0
        """How many sessions this admission refused."""

    def start(self) -> None:
        """Start the lag monitor on the running loop (idempotent)."""
        self.monitor.start()

    def refusal(self, running_sessions: int, starting_sessions: int = 0) -> str | None:
        """Why a new session must be refused now, or ``None`` to admit it.

        ``starting_sessions`` are those of the ``running_sessions`` not yet live."""
        why: str | None = None
        busy = None if self.max_busy is None else self.monitor.busy_share(self.busy_window_s)
        if self.max_sessions is not None and running_sessions >= self.max_sessions:
            why = f"{running_sessions} sessions running (limit {self.max_sessions})"
        elif self.max_starting is not None and starting_sessions >= self.max_starting:
            why = f"{starting_sessions} session(s) still starting (limit {self.max_starting})"
        elif busy is not None and self.max_busy is not None and busy >= self.max_busy:
            why = (
                f"event loop busy {busy:.0%} of the last {self.busy_window_s:g} s "
                f"(limit {self.max_busy:.0%})"
            )
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
