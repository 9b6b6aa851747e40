"""Prometheus metrics for a process hosting sessions (served at ``/metrics`` by ``voicefsm serve``).

Each :class:`Metrics` has its own registry, so several services (or tests) in one process do not
collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from voicefsm import effects as fx
from voicefsm.model import State

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`Metrics.render`'s output."""


class Metrics:
    """Counters and gauges fed by state changes and client protocol errors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge(
            "voicefsm_sessions", "Sessions by state", ["state"], registry=self.registry
        )
        for state in State:
            if state is not State.ENDED:
                self.sessions.labels(state=state.value).set(0)
        self.ended = Counter(
            "voicefsm_sessions_ended",
            "Ended sessions by reason",
            ["reason"],
            registry=self.registry,
        )
        self.resumes = Counter(
            "voicefsm_resumes",
            "Upstream resumes that reached a ready upstream",
            registry=self.registry,
        )
        self.resume_seconds = Histogram(
            "voicefsm_resume_seconds",
            "Time from losing (or rotating) the upstream to the new one being ready",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.client_errors = Counter(
            "voicefsm_client_errors",
            "Client protocol errors by code",
            ["code"],
            registry=self.registry,
        )

    def observer(self) -> SessionObserver:
        """A per-session observer to pass to :class:`voicefsm.host.SessionHost`."""
        return SessionObserver(self)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class SessionObserver:
    """Follows one session's state changes into the shared metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._resuming_since: float | None = None
        self._started = False

    def detached(self, state: State) -> None:
        """The session left this worker un-ended (another worker drives it now)."""
        if self._started:
            self._metrics.sessions.labels(state=state.value).dec()
            self._started = False

    def __call__(self, change: fx.StateChanged, end_reason: str | None) -> None:
        """Record one state change (``end_reason`` is set when the change is into ``ended``)."""
        metrics = self._metrics
        if not self._started:
            self._started = True
            metrics.sessions.labels(state=change.previous.value).inc()
        metrics.sessions.labels(state=change.previous.value).dec()
        if change.state is State.ENDED:
            metrics.ended.labels(reason=end_reason or "unknown").inc()
            return
        metrics.sessions.labels(state=change.state.value).inc()
        if change.state is State.RESUMING:
            self._resuming_since = change.at
        elif change.previous is State.RESUMING and self._resuming_since is not None:
            metrics.resumes.inc()
            metrics.resume_seconds.observe(max(0.0, change.at - self._resuming_since))
            self._resuming_since = None
