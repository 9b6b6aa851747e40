"""Prometheus metrics for a process hosting sessions (served at ``/metrics`` by ``voicefsm serve``).

Each :class:`Metrics` has its own registry, so several services (or tests) in one process do not
collide. A per-session :class:`SessionObserver` feeds them from three sources: state changes
(session gauges, resume time), the session's structured event log (:class:`voicefsm.effects.Logged`
entries: rotation and reconnect gaps, ends by reason) and its usage sums (tokens by direction and
modality, audio seconds each way), which only grow, so the observer adds what is new each time.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from voicefsm import effects as fx
from voicefsm.model import LogEntry, LogKind, SessionRecord, SessionUsage, State, TranscriptLine
from voicefsm.pricing import usage_tokens

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
        self.upstream_gap_seconds = Histogram(
            "voicefsm_upstream_gap_seconds",
            "Time without a working upstream, until the next connection was ready, by cause "
            "(rotation: a planned move after GoAway; drop: the connection closed or failed; "
            "restore: a take-over or restart)",
            ["cause"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "voicefsm_tokens",
            "Tokens the upstream reported (usageMetadata summed), by direction and modality",
            ["direction", "modality"],
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "voicefsm_audio_seconds",
            "Audio seconds: in = candidate audio sent to the model, out = model audio received",
            ["direction"],
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
    """Follows one session's state changes, log entries and usage into the shared metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._resuming_since: float | None = None
        self._started = False
        self._gap_cause: str | None = None
        self._seen: dict[tuple[str, str], float] = {}  # high-water marks of the usage sums
        self._log_seen = 0  # log entries ever appended to the records followed so far

    def baseline(self, record: SessionRecord) -> None:
        """Take what ``record`` holds as already counted: a session restored from its record
        (another worker, or this one before a restart, counted it)."""
        self._log_seen = len(record.log) + record.log_dropped
        self.usage_baseline(record.usage)

    def record(self, record: SessionRecord) -> None:
        """Follow a persisted record: count the log entries it added and its usage growth."""
        appended = len(record.log) + record.log_dropped
        fresh = min(appended - self._log_seen, len(record.log))
        if fresh > 0:
            for entry in record.log[-fresh:]:
                self.logged(entry)
        self._log_seen = max(self._log_seen, appended)
        self.usage(record.usage)

    def following(self, sink: _Sink) -> ObservedSink:
        """``sink`` with every record it saved also shown to :meth:`record`.

        Wrap the store's (fenced) sink, below any retrying layer: a record is counted once it
        is stored, a retried or repeated save counts nothing twice, and a save the store
        refused (another worker owns the session) counts nothing.
        """
        return ObservedSink(sink, self)

    def logged(self, entry: LogEntry) -> None:
        """Record one event-log entry (a :class:`voicefsm.effects.Logged` effect's)."""
        kind = entry.kind
        if kind is LogKind.ROTATION:
            self._gap_cause = "rotation"
        elif kind is LogKind.RESTORED:
            self._gap_cause = "restore"
        elif kind is LogKind.UPSTREAM_CLOSED and self._gap_cause is None:
            self._gap_cause = "drop"
        elif kind is LogKind.UPSTREAM_READY:
            if self._gap_cause is not None and entry.gap_s is not None:
                gap = self._metrics.upstream_gap_seconds.labels(cause=self._gap_cause)
                gap.observe(max(0.0, entry.gap_s))
            self._gap_cause = None

    def usage(self, usage: SessionUsage) -> None:
        """Count what ``usage`` (a session's running sums) adds to what this observer saw.

        Call it with the record's usage as often as convenient (each persisted record, the final
        one): only growth beyond the highest value seen is counted. For a session restored from
        its record, call :meth:`usage_baseline` first, so what another worker already counted
        is not counted again.
        """
        metrics = self._metrics
        seen = self._seen
        for (direction, modality), count in usage_tokens(usage).items():
            grown = count - seen.get((direction, modality), 0)
            if grown > 0:
                metrics.tokens.labels(direction=direction, modality=modality).inc(grown)
                seen[(direction, modality)] = count
        for way, seconds in (("in", usage.client_audio_s), ("out", usage.model_audio_s)):
            grown_s = seconds - seen.get(("audio", way), 0.0)
            if grown_s > 0:
                metrics.audio_seconds.labels(direction=way).inc(grown_s)
                seen[("audio", way)] = seconds

    def usage_baseline(self, usage: SessionUsage) -> None:
        """Take ``usage`` as already counted (a restored session's sums from its record)."""
        seen: dict[tuple[str, str], float] = {
            (direction, modality): count
            for (direction, modality), count in usage_tokens(usage).items()
        }
        seen[("audio", "in")] = usage.client_audio_s
        seen[("audio", "out")] = usage.model_audio_s
        self._seen = seen

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
            self._started = False  # counted out: a later detached() has nothing to take back
            return
        metrics.sessions.labels(state=change.state.value).inc()
        if change.state is State.RESUMING:
            self._resuming_since = change.at
        elif change.previous is State.RESUMING and self._resuming_since is not None:
            metrics.resumes.inc()
            metrics.resume_seconds.observe(max(0.0, change.at - self._resuming_since))
            self._resuming_since = None


class _Sink(Protocol):
    async def save(self, record: SessionRecord) -> object: ...

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> object: ...


class ObservedSink:
    """A sink that saves each record, then shows it to a :class:`SessionObserver`."""

    def __init__(self, sink: _Sink, observer: SessionObserver) -> None:
        self._sink = sink
        self._observer = observer

    @property
    def inner(self) -> _Sink:
        """The sink records are saved to."""
        return self._sink

    async def save(self, record: SessionRecord) -> object:
        """Save the record, then count what it adds."""
        result = await self._sink.save(record)
        self._observer.record(record)
        return result

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> object:
        """Append one transcript line."""
        return await self._sink.append_transcript(session_id, line)
