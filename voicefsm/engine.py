"""The session engine: one interview's policy as pure code, with no I/O, clock or asyncio.

A host feeds :meth:`Session.handle` one event at a time together with the current time and
carries out the effects it returns, in order. Timers are absolute times computed from the session
record; the host asks :meth:`Session.next_timer` when to call ``handle(Tick(), now)``. Any event
also fires timers that are due, so a late tick cannot stretch a deadline.

Times are epoch seconds (``time.time()`` in production, anything monotonic in tests).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.buffer import ResumeBuffer
from voicefsm.machine import FATAL_CLOSE_CODES, MACHINE, UPSTREAM_UP, close_is_resumable
from voicefsm.model import (
    EndReason,
    LogEntry,
    LogKind,
    SessionConfig,
    SessionRecord,
    SessionStats,
    SessionUsage,
    State,
    TranscriptLine,
)
from voicefsm.protocol import (
    ErrorMessage,
    Ping,
    SessionEnded,
    SessionStateMessage,
    SessionWarning,
    TranscriptMessage,
    TurnStatus,
)

_LIVE = State.LIVE
_WARNING = State.WARNING
_ENDED = State.ENDED
_CONNECTION_EVENTS = (ev.UpstreamReady, ev.UpstreamClosed, ev.GoAway)
USAGE_LOG_INTERVAL_S = 60.0
"""Usage reports arrive about once per turn; the event log keeps one ``usage`` entry at most this
often (the sums in the record are always complete)."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*s\s*$")


def parse_duration(text: str | None) -> float | None:
    """Seconds in a protobuf-JSON duration such as ``"50s"`` or ``"1.5s"``; else ``None``."""
    if text is None:
        return None
    match = _DURATION.match(text)
    return float(match.group(1)) if match else None


class SessionError(RuntimeError):
    """The host used a :class:`Session` the wrong way (the message says how)."""


class _NotAnEvent(TypeError):
    """``handle()`` was given something that is not an event: refused, the session unchanged."""


_logger = logging.getLogger(__name__)


class SessionCounters:
    """The counters a running session keeps: the fields of :class:`voicefsm.SessionStats`.

    A ``__slots__`` object (a pydantic model costs several hundred bytes per session);
    :meth:`Session.snapshot` copies it into the record's ``SessionStats``.
    """

    __slots__ = (
        "bytes_overflowed",
        "chunks_buffered",
        "chunks_flushed",
        "chunks_overflowed",
        "chunks_unsent_at_end",
        "connect_attempts",
        "goaways",
        "ignored_resumption_updates",
        "last_prompt_tokens",
        "resumes",
        "tool_calls",
        "transcript_lines",
        "unknown_events",
        "upstream_audio_unsent",
    )

    def __init__(self) -> None:
        self.resumes = 0
        self.connect_attempts = 0
        self.goaways = 0
        self.chunks_buffered = 0
        self.chunks_flushed = 0
        self.chunks_overflowed = 0
        self.bytes_overflowed = 0
        self.chunks_unsent_at_end = 0
        self.upstream_audio_unsent = 0
        self.transcript_lines = 0
        self.ignored_resumption_updates = 0
        self.unknown_events = 0
        self.tool_calls = 0
        self.last_prompt_tokens: int | None = None

    def to_model(self) -> SessionStats:
        """The counters as the record stores them."""
        # (validating a dict is several times faster than pydantic's model_construct here)
        return SessionStats.model_validate(
            {name: getattr(self, name) for name in SessionCounters.__slots__}
        )

    @classmethod
    def from_model(cls, stats: SessionStats) -> SessionCounters:
        """Counters that continue from a stored ``SessionStats``."""
        counters = cls()
        for name in SessionCounters.__slots__:
            setattr(counters, name, getattr(stats, name))
        return counters

    def __repr__(self) -> str:
        return f"SessionCounters({self.to_model()!r})"


class Session:
    """One interview: a state machine over classified events and time.

    Create it, call :meth:`start` once, then :meth:`handle` for every event. ``state`` and
    ``end_reason`` tell where it stands; :meth:`snapshot` gives the record a store persists and
    :meth:`restore` rebuilds a session from one (on another worker, after a restart).
    """

    __slots__ = (
        "_awaiting_start",
        "_buffer",
        "_client_audio_bytes",
        "_client_connected",
        "_connect_deadline",
        "_connection_id",
        "_conversation_started",
        "_end_detail",
        "_ended_at",
        "_failures",
        "_gap_since",
        "_grace_until",
        "_handle",
        "_handle_at",
        "_last_client_seen",
        "_log",
        "_log_dropped",
        "_model_audio_bytes",
        "_model_turn_open",
        "_next_attempt_at",
        "_next_ping_at",
        "_opened_handle_at",
        "_out",
        "_overflow_reported",
        "_ping_seq",
        "_rng",
        "_rotate_by",
        "_seed",
        "_timer_due",
        "_transcript_count",
        "_unsaved",
        "_upstream_open",
        "_usage",
        "_usage_logged_at",
        "config",
        "deadline",
        "end_reason",
        "owner",
        "session_id",
        "started_at",
        "state",
        "stats",
        "warning_given",
    )

    _HANDLERS: ClassVar[dict[type, Callable[[Session, Any, float], None]]]

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        session_id: str | None = None,
        owner: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config if config is not None else _DEFAULT_CONFIG
        self.session_id = session_id if session_id is not None else uuid.uuid4().hex
        self.owner = owner
        self.state = State.CONNECTING
        self.end_reason: EndReason | None = None
        self.started_at: float | None = None
        self._awaiting_start = True
        self.deadline = 0.0
        self.warning_given = False
        self.stats = SessionCounters()
        """The session's counters, live (``snapshot().stats`` is a stored copy)."""
        self._seed = seed
        self._rng: random.Random | None = None
        self._end_detail: str | None = None
        self._ended_at: float | None = None
        self._out: list[fx.Effect] = []
        self._timer_due = float("inf")
        # upstream
        self._connection_id = 0
        self._upstream_open = False
        self._connect_deadline: float | None = None
        self._next_attempt_at: float | None = None
        self._failures = 0
        self._rotate_by: float | None = None
        self._handle: str | None = None
        self._handle_at: float | None = None
        self._conversation_started = False
        self._model_turn_open = False
        self._buffer: ResumeBuffer | None = None  # created when an outage first holds input
        self._overflow_reported = False
        self._transcript_count = 0
        # client
        self._client_connected = True
        self._last_client_seen = 0.0
        self._next_ping_at = 0.0
        self._ping_seq = 0
        self._grace_until: float | None = None
        # the record's story and usage
        self._log: list[LogEntry] = []
        self._log_dropped = 0
        self._unsaved = False
        self._gap_since: float | None = None
        self._opened_handle_at: float | None = None
        self._usage: SessionUsage | None = None
        self._usage_logged_at: float | None = None
        self._client_audio_bytes = 0
        self._model_audio_bytes = 0

    # ------------------------------------------------------------------ public API

    @property
    def ended(self) -> bool:
        """Whether the session has ended (``state is State.ENDED``)."""
        return self.state is _ENDED

    @property
    def end_detail(self) -> str | None:
        """Why the session ended, in words (``None`` while running)."""
        return self._end_detail

    @property
    def resumption_handle(self) -> str | None:
        """The latest resumable handle the upstream gave, whatever its age."""
        return self._handle

    @property
    def client_connected(self) -> bool:
        """Whether a client is attached (not within a grace window)."""
        return self._client_connected

    def start(self, now: float) -> list[fx.Effect]:
        """Begin: open the first upstream (or, for a restored session, resume it)."""
        if self.state is _ENDED:
            raise SessionError(f"session {self.session_id} has ended; start() cannot revive it")
        if self.started_at is not None and (
            self._upstream_open or self._next_attempt_at is not None
        ):
            raise SessionError(f"session {self.session_id} was already started")
        try:
            return self._start(now)
        except Exception as exc:
            return self._fail(now, "start()", exc, ended_before=False)

    def _start(self, now: float) -> list[fx.Effect]:
        self._awaiting_start = False
        if self.started_at is None:
            self.started_at = now
            self.deadline = now + self.config.time_limit_s
            self._last_client_seen = now
            self._next_ping_at = now + self.config.heartbeat_interval_s
            self._gap_since = now
            self._open_upstream(now)
            self._persist()
        elif now >= self.deadline:
            self._end(now, EndReason.TIME_LIMIT, "the deadline passed while the session was stored")
        else:
            stored = next((e.state_to for e in reversed(self._log) if e.state_to), None)
            self._log_entry(
                now,
                LogKind.RESTORED,
                state_from=stored,
                state_to=State.RESUMING,
                why="restored from its record",
            )
            self._gap_since = now
            self._begin_resume(now, "restored from its record")
        return self._flush(now)

    def handle(self, event: ev.Event, now: float) -> list[fx.Effect]:
        """Apply one event at time ``now``; return the effects to carry out, in order.

        Exception-safe: if anything fails while the event is applied, the session ends with
        ``error`` (exactly once), and this call returns what it had produced followed by the end
        effects; nothing of it is left for a later call. Only misuse raises and leaves the
        session as it was: :class:`SessionError` (before ``start``), ``TypeError`` (not an
        event).
        """
        event_type = type(event)
        if self._awaiting_start:
            if event_type is ev.UpstreamAudioUnsent and self.started_at is not None:
                self._on_upstream_audio_unsent(event, now)  # type: ignore[arg-type]
                if self._unsaved:
                    self._save_now()
                return self._take()
            raise SessionError(f"session {self.session_id}: call start(now) before handle()")
        state = self.state
        try:
            return self._apply_event(event, event_type, state, now)
        except _NotAnEvent:
            raise
        except Exception as exc:
            return self._fail(now, f"handle({event_type.__name__})", exc, state is _ENDED)

    def _apply_event(
        self, event: ev.Event, event_type: type, state: State, now: float
    ) -> list[fx.Effect]:
        # The two per-chunk events take a short path: no trigger, no timer recomputation.
        if now < self._timer_due:
            if event_type is ev.ClientAudio:
                self._last_client_seen = now
                if state is _LIVE or state is _WARNING:
                    data = event.data  # type: ignore[union-attr]
                    self._client_audio_bytes += len(data)
                    return [fx.SendAudioUpstream(data)]
                if state is not _ENDED:
                    self._hold(event.data, now)  # type: ignore[union-attr]
                return self._take()
            if event_type is ev.ModelAudio and self._conversation_started:
                if state is _ENDED:
                    return []
                data = event.data  # type: ignore[union-attr]
                self._model_audio_bytes += len(data)
                self._model_turn_open = True
                if self._client_connected:
                    return [fx.SendAudioToClient(data)]
                return []
        handler = self._HANDLERS.get(event_type)
        if handler is None:
            raise _NotAnEvent(
                f"{event_type.__name__} is not a voicefsm event; "
                "pass one of the classes in voicefsm.events"
            )
        if isinstance(event, _CONNECTION_EVENTS) and event.connection_id is None:
            # "The current connection" means the one current when the event arrived, not one
            # a timer due in this same call is about to open.
            event = dataclasses.replace(event, connection_id=self._connection_id)
        if event_type is ev.UpstreamAudioUnsent:
            # Bookkeeping about the past, in any state: before the timers, so an end they cause
            # in this call stores it with the final record.
            handler(self, event, now)
            return self._flush(now)
        if now >= self._timer_due and (event_type is not ev.UpstreamClosed or now >= self.deadline):
            self._fire_timers(now)  # (the cached earliest timer is never later than the true one)
        # else: a close is applied before the timers due with it, so a timer's output (the
        # wrap-up prompt, say) goes to the next connection, not to the one reported dead.
        if self.state is not _ENDED:
            handler(self, event, now)
        return self._flush(now)

    def next_timer(self) -> float | None:
        """When the host must next call ``handle(Tick(), now)``; ``None`` before ``start()``
        (also for a restored session) and once ended.

        Computed at the end of the last call that was not audio. Audio only ever moves a timer
        later (client audio, the heartbeat limit), so this is never later than the earliest
        timer; at worst a tick comes early and finds nothing due.
        """
        if self.state is _ENDED or self._awaiting_start:
            return None
        return self._timer_due

    def snapshot(self) -> SessionRecord:
        """The record a store persists: enough to :meth:`restore` the session elsewhere."""
        if self.started_at is None:
            raise SessionError(f"session {self.session_id}: nothing to snapshot before start()")
        # Every field is given, from the session's own valid state: no validation pass, which
        # would check each of up to max_log_entries log entries on every save.
        return SessionRecord.model_construct(
            session_id=self.session_id,
            owner=self.owner,
            config=self.config,
            state=self.state,
            started_at=self.started_at,
            deadline=self.deadline,
            end_reason=self.end_reason,
            end_detail=self._end_detail,
            ended_at=self._ended_at,
            warning_given=self.warning_given,
            resumption_handle=self._handle,
            handle_received_at=self._handle_at,
            conversation_started=self._conversation_started,
            client_connected=self._client_connected,
            transcript_count=self._transcript_count,
            pending=self._buffer.to_pending() if self._buffer is not None else [],
            stats=self.stats.to_model(),
            usage=self._usage_snapshot(),
            log=list(self._log),
            log_dropped=self._log_dropped,
        )

    def _usage_snapshot(self) -> SessionUsage:
        if self._usage is None:
            return SessionUsage(
                client_audio_bytes=self._client_audio_bytes,
                model_audio_bytes=self._model_audio_bytes,
            )
        # `_usage` is replaced, never changed in place, so sharing its dicts is safe.
        return self._usage.model_copy(
            update={
                "client_audio_bytes": self._client_audio_bytes,
                "model_audio_bytes": self._model_audio_bytes,
            }
        )

    @classmethod
    def restore(cls, record: SessionRecord, now: float, *, seed: int | None = None) -> Session:
        """Rebuild a session from its record at time ``now``.

        The upstream connection did not survive, so a running session comes back ``resuming``
        with no client attached (the client's grace window starts at ``now``); call
        :meth:`start` to reconnect with the stored handle, and ``handle(ClientBack(), now)``
        when the client attaches. The original deadline holds: if it has passed, ``start``
        ends the session with ``time_limit``. An ended session comes back ended.
        """
        session = cls(record.config, session_id=record.session_id, owner=record.owner, seed=seed)
        session.started_at = record.started_at
        session.deadline = record.deadline
        session.warning_given = record.warning_given
        session.stats = SessionCounters.from_model(record.stats)
        session._handle = record.resumption_handle
        session._handle_at = record.handle_received_at
        session._conversation_started = record.conversation_started
        session._transcript_count = record.transcript_count
        session._log = list(record.log)
        session._log_dropped = record.log_dropped
        session._usage = record.usage
        session._client_audio_bytes = record.usage.client_audio_bytes
        session._model_audio_bytes = record.usage.model_audio_bytes
        if record.pending:
            session._buffer = ResumeBuffer.from_pending(
                record.pending, record.config.resume_buffer_max_bytes
            )
        if record.state is _ENDED:
            session._awaiting_start = False  # nothing to start: it absorbs every event
            session.state = _ENDED
            session.end_reason = record.end_reason
            session._end_detail = record.end_detail
            session._ended_at = record.ended_at
            return session
        session.state = State.RESUMING
        session._client_connected = False
        session._grace_until = now + session.config.client_grace_s
        session._last_client_seen = now
        session._next_ping_at = now + session.config.heartbeat_interval_s
        return session

    # ------------------------------------------------------------------ effects plumbing

    def _take(self) -> list[fx.Effect]:
        out = self._out
        self._out = []
        return out

    def _fail(self, now: float, where: str, exc: Exception, ended_before: bool) -> list[fx.Effect]:
        """A call failed part-way: end the session with ``error`` and hand back this call's
        effects with the end effects, so none is left over for a later call."""
        _logger.error(
            "session %s: %s failed; the session ends with error",
            self.session_id,
            where,
            exc_info=exc,
        )
        if not ended_before:
            detail = f"internal error in {where}: {type(exc).__name__}: {exc}"
            if self.state is not _ENDED:
                try:
                    self._end(now, EndReason.ERROR, detail)
                except Exception:
                    _logger.exception("session %s: ending it failed too", self.session_id)
            self._complete_end(now, detail)
        self._timer_due = float("inf")
        self._awaiting_start = False
        return self._take()

    def _complete_end(self, now: float, detail: str) -> None:
        """Make sure the session is ended and this call's output holds every end effect once,
        whatever point the failed call (or its end) reached."""
        out = self._out
        if self.state is not _ENDED:
            previous = self.state
            self.state = _ENDED
            if self.end_reason is None:
                self.end_reason = EndReason.ERROR
                self._end_detail = detail
            self._ended_at = now
            out.append(fx.StateChanged(previous, _ENDED, detail, now))
        reason = self.end_reason
        assert reason is not None
        self._connect_deadline = self._next_attempt_at = self._rotate_by = None
        self._grace_until = None
        messages = [e.message for e in out if isinstance(e, fx.SendToClient)]
        if not any(isinstance(m, SessionEnded) for m in messages):
            out.append(
                fx.SendToClient(
                    SessionEnded(reason=reason, detail=self._end_detail or detail, timestamp=now)
                )
            )
        if not any(isinstance(e, fx.CloseClient) and e.code == 1000 for e in out):
            out.append(fx.CloseClient(1000, f"session ended: {reason}"))
        try:
            if not any(isinstance(e, fx.PersistRecord) and e.record.state is _ENDED for e in out):
                if not any(isinstance(e, fx.Logged) and e.entry.kind is LogKind.END for e in out):
                    self._log_entry(now, LogKind.END, reason=reason, why=self._end_detail)
                self._save_now()
        except Exception:
            _logger.exception("session %s: its final record could not be built", self.session_id)
        if self._upstream_open:
            self._upstream_open = False
            out.append(fx.CloseUpstream(self._connection_id, f"session ended: {reason}"))

    def _flush(self, now: float) -> list[fx.Effect]:
        # A handler (or start/restore) may have made a timer due right now: fire it here, so
        # next_timer() is never at or before `now` when the host gets the effects.
        self._timer_due = self._fire_timers(now)
        if self._unsaved:
            self._save_now()
        return self._take()

    def _persist(self) -> None:
        """Something a restore depends on changed: the record is saved at the end of this call
        (one ``PersistRecord`` per call, holding everything the call changed)."""
        self._unsaved = True

    def _save_now(self) -> None:
        self._unsaved = False
        self._out.append(fx.PersistRecord(self.snapshot()))

    def _log_entry(self, now: float, kind: LogKind, **fields: Any) -> None:
        entry = _new_log_entry(now, kind, fields)
        log = self._log
        limit = self.config.max_log_entries
        if len(log) >= limit:
            # Keep how the interview began and what happened last; drop from between.
            del log[limit // 2]
            self._log_dropped += 1
        log.append(entry)
        self._unsaved = True
        self._out.append(fx.Logged(entry))

    def _tell_client(self, message: Any) -> None:
        self._out.append(fx.SendToClient(message))

    def _remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    # ------------------------------------------------------------------ timers

    def _compute_timer(self) -> float:
        due = self.deadline
        for timer in _TIMERS:
            at = timer.due(self)
            if at is not None and at < due:
                due = at
        return due

    def _fire_timers(self, now: float) -> float:
        """Fire every timer due at ``now``; return the earliest one left (``inf`` once ended)."""
        # Each pass clears at least the timer that fired; the bound is a guard, not a budget.
        for _ in range(2 * len(_TIMERS)):
            if self.state is _ENDED:
                return float("inf")
            due = self._compute_timer()
            if now < due:
                return due
            for timer in _TIMERS:
                at = timer.due(self)
                if at is not None and now >= at:
                    timer.fire(self, now)
                    break
        raise RuntimeError(f"session {self.session_id}: timers did not settle at {now}")

    # Each timer: when it is due (``None``: not armed) and what firing it does. Firing must
    # disarm it or move it past ``now``. The order is the priority of :data:`_TIMERS`.

    def _deadline_due(self) -> float | None:
        return self.deadline

    def _fire_deadline(self, now: float) -> None:
        self._end(
            now, EndReason.TIME_LIMIT, f"the {self.config.time_limit_s:g} s limit was reached"
        )

    def _warning_due(self) -> float | None:
        return None if self.warning_given else self.deadline - self.config.warning_before_s

    def _heartbeat_timeout_due(self) -> float | None:
        if not self._client_connected:
            return None
        return self._last_client_seen + self.config.heartbeat_timeout_s

    def _fire_heartbeat_timeout(self, now: float) -> None:
        silence = f"no message from the client for {self.config.heartbeat_timeout_s:g} s"
        self._log_entry(
            now, LogKind.HEARTBEAT_TIMEOUT, gap_s=round(now - self._last_client_seen, 3)
        )
        self._client_lost(now, f"heartbeat timeout: {silence}")
        self._out.append(fx.CloseClient(4408, f"heartbeat timeout: {silence}"))

    def _ping_due(self) -> float | None:
        return self._next_ping_at if self._client_connected else None

    def _fire_ping(self, now: float) -> None:
        self._ping_seq += 1
        self._tell_client(Ping(seq=self._ping_seq))
        # Stay on the ping grid, skipping the pings a late call missed.
        interval = self.config.heartbeat_interval_s
        missed = math.floor((now - self._next_ping_at) / interval) + 1
        self._next_ping_at += missed * interval
        if self._next_ping_at <= now:  # float rounding
            self._next_ping_at = now + interval

    def _client_grace_due(self) -> float | None:
        return None if self._client_connected else self._grace_until

    def _fire_client_grace(self, now: float) -> None:
        self._end(
            now,
            EndReason.DISCONNECTED,
            f"the client did not come back within {self.config.client_grace_s:g} s",
        )

    def _connect_timeout_due(self) -> float | None:
        return self._connect_deadline

    def _fire_connect_timeout(self, now: float) -> None:
        self._connect_deadline = None
        why = f"upstream not ready within {self.config.connect_timeout_s:g} s"
        self._log_entry(now, LogKind.UPSTREAM_CLOSED, connection_id=self._connection_id, why=why)
        self._out.append(fx.CloseUpstream(self._connection_id, why))
        self._upstream_open = False
        self._attempt_failed(now, why, code=None)

    def _retry_due(self) -> float | None:
        return self._next_attempt_at

    def _fire_retry(self, now: float) -> None:
        self._next_attempt_at = None
        self._retry(now)

    def _rotate_by_due(self) -> float | None:
        return self._rotate_by

    def _fire_rotate_by(self, now: float) -> None:
        self._rotate(now, "GoAway time is running out and no turn boundary came")

    # ------------------------------------------------------------------ transitions

    def _trigger(self, trigger: str, now: float, why: str) -> None:
        MACHINE.events[trigger].trigger(self, now=now, why=why, previous=self.state)

    def _after_state_change(self, event_data: Any) -> None:
        now: float = event_data.kwargs["now"]
        previous: State = event_data.kwargs["previous"]
        why: str = event_data.kwargs["why"]
        # Log entries come first, so the effects a state change is known by stay adjacent.
        self._log_entry(now, LogKind.STATE, state_from=previous, state_to=self.state, why=why)
        if self.state is _ENDED:
            self._log_end(now, previous)
        elif previous in UPSTREAM_UP and self.state is State.RESUMING:
            self._gap_since = now
        self._out.append(fx.StateChanged(previous, self.state, why, now))
        if self.state is _ENDED:
            self._on_enter_ended(now)
            return
        if self._client_connected:
            self._tell_client(
                SessionStateMessage(state=self.state, remaining_s=self._remaining(now))
            )
        self._persist()

    def _log_end(self, now: float, previous: State) -> None:
        unsent = self._buffer.audio_chunks if self._buffer is not None else 0
        if unsent:
            why = "buffered when the session ended"
            self._log_entry(now, LogKind.AUDIO_UNSENT, count=unsent, why=why)
        self._log_entry(
            now, LogKind.END, state_from=previous, reason=self.end_reason, why=self._end_detail
        )

    def _on_enter_ended(self, now: float) -> None:
        assert self.end_reason is not None
        assert self._end_detail is not None
        self._connect_deadline = self._next_attempt_at = self._rotate_by = None
        self._grace_until = None
        if self._buffer is not None:
            self.stats.chunks_unsent_at_end += self._buffer.audio_chunks
            self._buffer = None
        # The client hears first and the record is saved before the upstream's (slower)
        # teardown.
        self._tell_client(
            SessionEnded(reason=self.end_reason, detail=self._end_detail, timestamp=now)
        )
        self._out.append(fx.CloseClient(1000, f"session ended: {self.end_reason}"))
        upstream_open = self._upstream_open
        self._upstream_open = False
        self._save_now()
        if upstream_open:
            self._out.append(
                fx.CloseUpstream(self._connection_id, f"session ended: {self.end_reason}")
            )

    def _end(self, now: float, reason: EndReason, detail: str) -> None:
        if self.state is _ENDED:
            return
        self.end_reason = reason
        self._end_detail = detail
        self._ended_at = now
        self._trigger("end", now, f"{reason}: {detail}")

    # ------------------------------------------------------------------ upstream policy

    def _open_upstream(self, now: float, handle: str | None = None) -> None:
        self._connection_id += 1
        self._upstream_open = True
        self._connect_deadline = now + self.config.connect_timeout_s
        self.stats.connect_attempts += 1
        attempt = self._failures + 1
        self._opened_handle_at = self._handle_at if handle is not None else None
        self._log_entry(
            now,
            LogKind.UPSTREAM_OPENED,
            connection_id=self._connection_id,
            count=attempt,
            handle_age_s=self._handle_age(now) if handle is not None else None,
        )
        self._out.append(fx.OpenUpstream(self._connection_id, handle, attempt))

    def _handle_age(self, now: float) -> float | None:
        return None if self._handle_at is None else round(now - self._handle_at, 3)

    def _usable_handle(self, now: float) -> tuple[str | None, str]:
        """The handle to resume with, or ``None`` and why there is none."""
        if self._handle is None or self._handle_at is None:
            return None, "no resumable handle was ever received"
        age = now - self._handle_at
        if age > self.config.handle_ttl_s:
            ttl = self.config.handle_ttl_s
            return None, f"the resumption handle is {age:.0f} s old (ttl {ttl:g} s)"
        return self._handle, ""

    def _reconnect_refusal(self, now: float) -> tuple[str | None, str | None]:
        """``(handle, None)`` if connecting again now is possible and worth it, else
        ``(None, why not)``."""
        remaining = self.deadline - now
        if remaining < self.config.min_remaining_to_resume_s:
            return None, (
                f"only {remaining:.1f} s of interview left, under the "
                f"{self.config.min_remaining_to_resume_s:g} s worth resuming for"
            )
        handle, why_not = self._usable_handle(now)
        if handle is None and self._conversation_started:
            return None, f"cannot resume the conversation: {why_not}"
        return handle, None

    def _can_reconnect(self, now: float) -> tuple[bool, str | None]:
        """Decide whether (and with which handle) to connect again; ends the session if not."""
        handle, refusal = self._reconnect_refusal(now)
        if refusal is not None:
            self._end(now, EndReason.UPSTREAM_LOST, refusal)
            return False, None
        return True, handle

    def _begin_resume(self, now: float, why: str) -> None:
        """The upstream is gone (or going): move to ``resuming`` and connect again at once."""
        self._rotate_by = None
        self._model_turn_open = False
        self._overflow_reported = False
        self._failures = 0
        ok, handle = self._can_reconnect(now)
        if not ok:
            return
        if self.state is not State.RESUMING:
            self._trigger("lose_upstream", now, why)
        self._open_upstream(now, handle)

    def _attempt_failed(self, now: float, why: str, code: int | None) -> None:
        if code is not None and not close_is_resumable(code):
            detail = FATAL_CLOSE_CODES.get(code, f"the upstream closed with code {code}")
            self._end(now, EndReason.ERROR, f"{detail}: {why}" if why else detail)
            return
        self._failures += 1
        config = self.config
        if self._failures >= config.resume_max_attempts:
            self._end(
                now,
                EndReason.UPSTREAM_LOST,
                f"gave up after {self._failures} failed connection attempts (last: {why})",
            )
            return
        if self.state is State.CONNECTING:
            self._trigger("lose_upstream", now, f"first connection failed: {why}")
        delay = min(
            config.resume_backoff_cap_s, config.resume_backoff_base_s * 2 ** (self._failures - 1)
        )
        if config.resume_backoff_jitter:
            if self._rng is None:
                self._rng = random.Random(self._seed if self._seed is not None else self.session_id)
            delay *= 1 + config.resume_backoff_jitter * (2 * self._rng.random() - 1)
        latest = self.deadline - config.min_remaining_to_resume_s
        attempt_at = min(now + delay, latest)
        if attempt_at <= now:
            self._retry(now)  # no time to wait: try now, or end for lack of time
        else:
            self._next_attempt_at = attempt_at

    def _retry(self, now: float) -> None:
        ok, handle = self._can_reconnect(now)
        if ok:
            self._open_upstream(now, handle)

    def _rotate(self, now: float, why: str) -> None:
        """Move from a working connection to a new one, unless no new one can follow: then the
        working one is kept for as long as it lasts (the session never ends early for want of a
        resume while its connection still works)."""
        _, refusal = self._reconnect_refusal(now)
        if refusal is not None:
            self._rotate_by = None
            self._log_entry(
                now,
                LogKind.ROTATION_SKIPPED,
                connection_id=self._connection_id,
                why=f"keeping the connection: {refusal}",
            )
            return
        self._log_entry(
            now,
            LogKind.ROTATION,
            connection_id=self._connection_id,
            why=why,
            handle_age_s=self._handle_age(now),
        )
        self._out.append(fx.CloseUpstream(self._connection_id, why))
        self._upstream_open = False
        self._begin_resume(now, why)

    def _is_stale(self, connection_id: int | None) -> bool:
        return connection_id is not None and connection_id != self._connection_id

    # ------------------------------------------------------------------ client input buffering

    def _resume_buffer(self) -> ResumeBuffer:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = ResumeBuffer(self.config.resume_buffer_max_bytes)
        return buffer

    def _hold(self, item: bytes | str, now: float) -> None:
        buffer = self._resume_buffer()
        if isinstance(item, str):
            buffer.hold_text(item)
            return
        if not buffer.hold_audio(item):
            size = len(item)
            self.stats.chunks_overflowed += 1
            self.stats.bytes_overflowed += size
            if not self._overflow_reported:
                self._overflow_reported = True
                self._log_entry(
                    now, LogKind.AUDIO_OVERFLOW, count=self.config.resume_buffer_max_bytes
                )
                self._tell_client(
                    ErrorMessage(
                        code="audio_overflow",
                        message=(
                            "The interviewer connection is being restored and the audio buffer "
                            f"({self.config.resume_buffer_max_bytes} bytes) is full; audio from "
                            "now until it is restored is not heard. It is counted in the "
                            "session's stats."
                        ),
                    )
                )
            return
        self.stats.chunks_buffered += 1

    def _release_buffer(self) -> None:
        if self._buffer is None:
            return
        items = self._buffer.release()
        self._buffer = None
        flushed = 0
        out = self._out
        for item in items:
            if isinstance(item, bytes):
                out.append(fx.SendAudioUpstream(item))
                flushed += 1
                self._client_audio_bytes += len(item)
            else:
                out.append(fx.SendTextUpstream(item))
                self._start_conversation()
        self.stats.chunks_flushed += flushed

    # ------------------------------------------------------------------ warning, client presence

    def _give_warning(self, now: float) -> None:
        self.warning_given = True
        remaining = self._remaining(now)
        self._log_entry(now, LogKind.WARNING, time_left_s=round(remaining, 3))
        self._tell_client(SessionWarning(remaining_s=remaining))
        minutes = max(1, round(remaining / 60))
        prompt = self.config.wrap_up_prompt.replace("{minutes}", str(minutes))
        if self.state is _LIVE:
            self._out.append(fx.SendTextUpstream(prompt))
            self._trigger("warn", now, f"{remaining:.0f} s left")
        else:
            # Not connected right now: the prompt waits with the buffered input, and `ready`
            # lands in `warning` because `warning_given` is set.
            self._resume_buffer().hold_text(prompt)
            self._persist()

    def _client_lost(self, now: float, why: str) -> None:
        self._client_connected = False
        self._grace_until = now + self.config.client_grace_s
        self._log_entry(now, LogKind.CLIENT_LEFT, why=why)

    # ------------------------------------------------------------------ event handlers

    def _on_upstream_ready(self, event: ev.UpstreamReady, now: float) -> None:
        if self._is_stale(event.connection_id) or self.state not in (
            State.CONNECTING,
            State.RESUMING,
        ):
            return
        if not self._upstream_open:
            return  # the attempt it answers was already abandoned
        was_resuming = self.state is State.RESUMING
        self._connect_deadline = None
        self._failures = 0
        self._log_entry(
            now,
            LogKind.UPSTREAM_READY,
            connection_id=self._connection_id,
            gap_s=None if self._gap_since is None else round(now - self._gap_since, 3),
            handle_age_s=(
                None if self._opened_handle_at is None else round(now - self._opened_handle_at, 3)
            ),
        )
        self._gap_since = None
        if was_resuming:
            self.stats.resumes += 1
        self._release_buffer()
        self._trigger("ready", now, "upstream ready" + (" (resumed)" if was_resuming else ""))

    def _on_client_audio(self, event: ev.ClientAudio, now: float) -> None:
        self._last_client_seen = now
        if self.state in UPSTREAM_UP:
            self._client_audio_bytes += len(event.data)
            self._out.append(fx.SendAudioUpstream(event.data))
        else:
            self._hold(event.data, now)

    def _on_model_audio(self, event: ev.ModelAudio, now: float) -> None:
        self._model_audio_bytes += len(event.data)
        self._model_turn_open = True
        self._start_conversation()
        if self._client_connected:
            self._out.append(fx.SendAudioToClient(event.data))

    def _start_conversation(self) -> None:
        """Something was said: from now on only a resumption handle may reconnect, so the record
        must say so before a take-over could read it (stored by the end of this call)."""
        if not self._conversation_started:
            self._conversation_started = True
            self._unsaved = True

    def _record(self, role: Any, text: str, now: float) -> None:
        self._conversation_started = True
        line = TranscriptLine(seq=self._transcript_count, role=role, text=text, at=now)
        self._transcript_count += 1
        self.stats.transcript_lines += 1
        self._out.append(fx.RecordTranscript(line))
        self._persist()  # keep the stored count in step with the stored lines
        if self.config.forward_transcripts and self._client_connected:
            self._tell_client(TranscriptMessage(role=role, text=text))

    def _on_input_transcript(self, event: ev.InputTranscript, now: float) -> None:
        if event.finished and event.text.strip():
            self._record("user", event.text, now)

    def _on_output_transcript(self, event: ev.OutputTranscript, now: float) -> None:
        self._model_turn_open = True
        if event.finished and event.text.strip():
            self._record("interviewer", event.text, now)

    def _on_turn_complete(self, event: ev.TurnComplete, now: float) -> None:
        self._model_turn_open = False
        if self._client_connected:
            self._tell_client(TurnStatus(status="turn_complete"))
        if self._rotate_by is not None and self.state in UPSTREAM_UP:
            self._rotate(now, "rotating at a turn boundary after GoAway")

    def _on_interrupted(self, event: ev.Interrupted, now: float) -> None:
        self._model_turn_open = False
        if self._client_connected:
            self._tell_client(TurnStatus(status="interrupted"))

    def _on_resumption_update(self, event: ev.ResumptionUpdate, now: float) -> None:
        if event.resumable and event.handle:
            self._handle = event.handle
            self._handle_at = now
            self._persist()
        else:
            self.stats.ignored_resumption_updates += 1

    def _on_go_away(self, event: ev.GoAway, now: float) -> None:
        if self._is_stale(event.connection_id) or self.state not in UPSTREAM_UP:
            return
        self.stats.goaways += 1
        time_left = parse_duration(event.time_left)
        budget = max(0.0, (time_left or 0.0) - self.config.goaway_margin_s)
        limit = now + budget
        if limit >= self.deadline and self._rotate_by is None:
            # The connection outlives the interview: nothing to rotate for.
            self._log_entry(
                now,
                LogKind.GOAWAY,
                connection_id=self._connection_id,
                time_left_s=time_left,
                why="kept: the connection outlives the deadline",
            )
            return
        self._log_entry(
            now, LogKind.GOAWAY, connection_id=self._connection_id, time_left_s=time_left
        )
        self._rotate_by = limit if self._rotate_by is None else min(self._rotate_by, limit)
        if not self._model_turn_open or budget == 0.0:
            self._rotate(now, f"GoAway (time_left={event.time_left}) between turns")

    def _on_upstream_closed(self, event: ev.UpstreamClosed, now: float) -> None:
        if self._is_stale(event.connection_id) or not self._upstream_open:
            return
        self._upstream_open = False
        why = f"upstream closed ({event.code if event.code is not None else 'no close code'}"
        why += f": {event.reason})" if event.reason else ")"
        self._log_entry(
            now,
            LogKind.UPSTREAM_CLOSED,
            connection_id=self._connection_id,
            close_code=event.code,
            why=event.reason or None,
        )
        if self.state in UPSTREAM_UP:
            if close_is_resumable(event.code):
                self._begin_resume(now, why)
            else:
                self._attempt_failed(now, why, event.code)
            return
        self._connect_deadline = None
        self._attempt_failed(now, why, event.code)

    def _on_upstream_error(self, event: ev.UpstreamError, now: float) -> None:
        detail = f"upstream error {event.code}" + (f": {event.message}" if event.message else "")
        self._end(now, EndReason.ERROR, detail)

    def _on_usage(self, event: ev.Usage, now: float) -> None:
        if event.prompt_tokens is not None:
            self.stats.last_prompt_tokens = event.prompt_tokens
        usage = self._usage if self._usage is not None else SessionUsage()
        self._usage = usage = usage.model_copy(
            update={
                "reports": usage.reports + 1,
                "prompt_tokens": usage.prompt_tokens + (event.prompt_tokens or 0),
                "response_tokens": usage.response_tokens + (event.response_tokens or 0),
                "total_tokens": usage.total_tokens + (event.total_tokens or 0),
                "cached_tokens": usage.cached_tokens + (event.cached_tokens or 0),
                "thoughts_tokens": usage.thoughts_tokens + (event.thoughts_tokens or 0),
                "prompt_tokens_by_modality": _add_counts(
                    usage.prompt_tokens_by_modality, event.prompt_by_modality
                ),
                "response_tokens_by_modality": _add_counts(
                    usage.response_tokens_by_modality, event.response_by_modality
                ),
            }
        )
        logged = self._usage_logged_at
        if logged is None or now - logged >= USAGE_LOG_INTERVAL_S:
            self._usage_logged_at = now
            self._log_entry(now, LogKind.USAGE, count=usage.total_tokens)

    def _on_upstream_audio_unsent(self, event: ev.UpstreamAudioUnsent, now: float) -> None:
        if event.chunks == 0:
            return
        self.stats.upstream_audio_unsent += event.chunks
        self._log_entry(now, LogKind.AUDIO_UNSENT, count=event.chunks, why=event.reason or None)
        self._persist()

    def _on_tool_activity(self, event: ev.ToolActivity, now: float) -> None:
        self._start_conversation()
        if event.phase == "call":
            self.stats.tool_calls += 1

    def _on_unknown(self, event: ev.Unknown, now: float) -> None:
        self.stats.unknown_events += 1

    def _on_client_text(self, event: ev.ClientText, now: float) -> None:
        self._last_client_seen = now
        if self.state in UPSTREAM_UP:
            self._start_conversation()
            self._out.append(fx.SendTextUpstream(event.text))
        else:
            self._hold(event.text, now)  # said once it reaches an upstream

    def _on_client_end(self, event: ev.ClientEnd, now: float) -> None:
        self._end(now, EndReason.USER_ENDED, "the client ended the interview")

    def _on_client_gone(self, event: ev.ClientGone, now: float) -> None:
        if self._client_connected:
            self._client_lost(now, event.reason or "the client's connection closed")

    def _on_client_back(self, event: ev.ClientBack, now: float) -> None:
        away = None
        if not self._client_connected and self._grace_until is not None:
            away = round(now - (self._grace_until - self.config.client_grace_s), 3)
        self._log_entry(now, LogKind.CLIENT_BACK, gap_s=away)
        self._client_connected = True
        self._grace_until = None
        self._last_client_seen = now
        self._next_ping_at = now + self.config.heartbeat_interval_s
        self._tell_client(SessionStateMessage(state=self.state, remaining_s=self._remaining(now)))
        if self.warning_given:
            self._tell_client(SessionWarning(remaining_s=self._remaining(now)))

    def _on_heartbeat_ack(self, event: ev.HeartbeatAck, now: float) -> None:
        self._last_client_seen = now

    def _on_fatal(self, event: ev.Fatal, now: float) -> None:
        self._end(now, EndReason.ERROR, event.detail)

    def _on_tick(self, event: ev.Tick, now: float) -> None:
        pass  # timers already fired in handle()


Session._HANDLERS = {
    ev.UpstreamReady: Session._on_upstream_ready,
    ev.ModelAudio: Session._on_model_audio,
    ev.InputTranscript: Session._on_input_transcript,
    ev.OutputTranscript: Session._on_output_transcript,
    ev.TurnComplete: Session._on_turn_complete,
    ev.Interrupted: Session._on_interrupted,
    ev.ResumptionUpdate: Session._on_resumption_update,
    ev.GoAway: Session._on_go_away,
    ev.UpstreamClosed: Session._on_upstream_closed,
    ev.UpstreamError: Session._on_upstream_error,
    ev.Usage: Session._on_usage,
    ev.ToolActivity: Session._on_tool_activity,
    ev.Unknown: Session._on_unknown,
    ev.ClientAudio: Session._on_client_audio,
    ev.ClientText: Session._on_client_text,
    ev.ClientEnd: Session._on_client_end,
    ev.ClientGone: Session._on_client_gone,
    ev.ClientBack: Session._on_client_back,
    ev.HeartbeatAck: Session._on_heartbeat_ack,
    ev.UpstreamAudioUnsent: Session._on_upstream_audio_unsent,
    ev.Fatal: Session._on_fatal,
    ev.Tick: Session._on_tick,
}


def _add_counts(totals: dict[str, int], counts: tuple[tuple[str, int], ...]) -> dict[str, int]:
    if not counts:
        return totals
    merged = dict(totals)
    for modality, tokens in counts:
        merged[modality] = merged.get(modality, 0) + tokens
    return merged


_LOG_OPTIONAL = tuple(f.name for f in dataclasses.fields(LogEntry) if f.name not in ("at", "kind"))
_LOG_OPTIONAL_SET = frozenset(_LOG_OPTIONAL)
_set_slot = object.__setattr__


def _new_log_entry(at: float, kind: LogKind, fields: dict[str, Any]) -> LogEntry:
    """A :class:`LogEntry` from the engine's own, already typed, values, without the
    validation pass its constructor runs (about half its cost)."""
    if not fields.keys() <= _LOG_OPTIONAL_SET:
        raise TypeError(f"not LogEntry fields: {sorted(fields.keys() - _LOG_OPTIONAL_SET)}")
    entry: LogEntry = object.__new__(LogEntry)
    _set_slot(entry, "at", at)
    _set_slot(entry, "kind", kind)
    get = fields.get
    for name in _LOG_OPTIONAL:
        _set_slot(entry, name, get(name))
    return entry


@dataclasses.dataclass(frozen=True, slots=True)
class Timer:
    """One of the session's timers: when it is due and what firing it does."""

    name: str
    due: Callable[[Session], float | None]
    """When it is due (absolute epoch seconds), ``None`` while it is not armed."""
    fire: Callable[[Session, float], None]
    """Fire it at ``now``; this disarms it or moves it past ``now``."""


TIMERS: tuple[Timer, ...] = (
    Timer("deadline", Session._deadline_due, Session._fire_deadline),
    Timer("warning", Session._warning_due, Session._give_warning),
    Timer("heartbeat_timeout", Session._heartbeat_timeout_due, Session._fire_heartbeat_timeout),
    Timer("ping", Session._ping_due, Session._fire_ping),
    Timer("client_grace", Session._client_grace_due, Session._fire_client_grace),
    Timer("connect_timeout", Session._connect_timeout_due, Session._fire_connect_timeout),
    Timer("retry", Session._retry_due, Session._fire_retry),
    Timer("rotate_by", Session._rotate_by_due, Session._fire_rotate_by),
)
"""Every timer of a session, declared once, in priority order: when several are due in one
call, they fire one at a time from the top of this table (the deadline first, so nothing else can
happen at or after it; then the warning, so it reaches the client before any end but the
deadline; then client presence, then the upstream). ``next_timer()`` is the earliest due."""
_TIMERS = TIMERS

_DEFAULT_CONFIG = SessionConfig()
