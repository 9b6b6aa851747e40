"""Property tests for the session engine: random interleavings of every event, checked by a host.

:class:`EngineMachine` (a :class:`hypothesis.stateful.RuleBasedStateMachine`) drives a
:class:`voicefsm.Session` with a monotonic virtual clock and every event type in
:mod:`voicefsm.events` plus ``Tick``, and plays the host: it tracks which upstream connection is
open and ready (from ``OpenUpstream`` / ``CloseUpstream`` effects and the closes it reports
itself), whether a client is attached and when it was last heard, which resumption handle is the
latest, where every client audio chunk (numbered in its first four bytes) and text turn went. A
rule snapshots the session, round-trips the record through JSON and carries on with
``Session.restore``; once a session has ended, the machine pokes it with more events, restores
it, and then starts a new one. Every call is checked against the invariants in
:meth:`EngineMachine._absorb` (each effect, in order) and :meth:`EngineMachine._after_call`.

``VOICEFSM_PROPERTY_EXAMPLES`` / ``VOICEFSM_PROPERTY_STEPS`` set the examples and the steps per
example (default 300 and 50; CI can run more). ``--hypothesis-show-statistics`` shows what the
runs reached (end reasons, resumes, GoAways, overflows, restores, ...).

The example tests at the end pin down, in their shortest form, the engine defects these
properties found.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from voicefsm import (
    EndReason,
    LogEntry,
    LogKind,
    Session,
    SessionConfig,
    SessionError,
    SessionRecord,
    State,
)
from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.machine import TRANSITIONS, close_is_resumable
from voicefsm.protocol import (
    ErrorMessage,
    Ping,
    SessionEnded,
    SessionStateMessage,
    SessionWarning,
    TranscriptMessage,
    TurnStatus,
)

EXAMPLES = int(os.environ.get("VOICEFSM_PROPERTY_EXAMPLES", "300"))
STEPS = int(os.environ.get("VOICEFSM_PROPERTY_STEPS", "50"))

T0 = 1_800_000_000.0
CHUNK = 640
SEQ = struct.Struct(">I")
TEXT_PREFIX = "client-text-"

CONFIG = SessionConfig(
    time_limit_s=600,
    warning_before_s=60,
    heartbeat_interval_s=5,
    heartbeat_timeout_s=15,
    client_grace_s=10,
    connect_timeout_s=3,
    resume_backoff_base_s=0.5,
    resume_backoff_cap_s=2,
    resume_backoff_jitter=0.5,
    resume_max_attempts=3,
    min_remaining_to_resume_s=10,
    goaway_margin_s=1,
    handle_ttl_s=120,
    resume_buffer_max_bytes=10 * CHUNK,
    max_log_entries=12,
)
"""Small enough that every timer, the buffer bound and the handle TTL are reached in 50 steps."""

RESUMABLE_CODES = [None, 1000, 1001, 1006, 1011, 1012, 1013, 1014]
FATAL_CODES = [1007, 1008, 1002, 4000]
UP = (State.LIVE, State.WARNING)
PENDING = (State.CONNECTING, State.RESUMING)


def _declared_transitions() -> frozenset[tuple[State, State]]:
    pairs: set[tuple[State, State]] = set()
    for transition in TRANSITIONS:
        sources = transition["source"]
        if not isinstance(sources, list | tuple):
            sources = [sources]
        for source in sources:
            pairs.add((State(source), State(transition["dest"])))
    return frozenset(pairs)


DECLARED = _declared_transitions()
AFTER_END = (fx.CloseUpstream, fx.CloseClient, fx.PersistRecord)
"""The only effects allowed after ``session_ended`` in the same batch."""


def chunk(seq: int, size: int = CHUNK) -> bytes:
    """Client audio numbered ``seq``; the payload is not valid UTF-8, like real PCM."""
    body = bytes((0xFF + seq + i * 37) % 256 for i in range(max(0, size - SEQ.size)))
    return SEQ.pack(seq) + body


def seq_of(data: bytes) -> int:
    return int(SEQ.unpack_from(data)[0])


def json_round_trip(record: SessionRecord) -> SessionRecord:
    """What a store does with a record."""
    return SessionRecord.model_validate_json(record.model_dump_json())


# ------------------------------------------------------------------------------------ the machine


class EngineMachine(RuleBasedStateMachine):
    """One session at a time, one host, random events and time; every call is checked."""

    config: SessionConfig = CONFIG

    def __init__(self) -> None:
        super().__init__()
        self.session: Session | None = None
        self.sessions = 0

    # -------------------------------------------------------------------------- set-up

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        offset=st.sampled_from([0.0, 0.125, 0.3]),
        chatty=st.booleans(),
        eager_handles=st.booleans(),
        ready=st.booleans(),
    )
    def begin(
        self, seed: int, offset: float, chatty: bool, eager_handles: bool, ready: bool
    ) -> None:
        self._new_session(T0 + offset, seed, chatty, eager_handles, ready)

    def _running(self) -> bool:
        return self.session is not None and not self.session.ended

    def _over(self) -> bool:
        return self.session is not None and self.session.ended

    @precondition(_over)
    @rule(
        seed=st.integers(0, 2**32 - 1),
        chatty=st.booleans(),
        eager_handles=st.booleans(),
        ready=st.booleans(),
    )
    def next_interview(self, seed: int, chatty: bool, eager_handles: bool, ready: bool) -> None:
        """The session is over: the host starts another one (so no step is wasted)."""
        self._report()
        self._new_session(self.now, seed, chatty, eager_handles, ready)

    def _new_session(
        self, now: float, seed: int, chatty: bool, eager_handles: bool, ready: bool
    ) -> None:
        """A new interview at ``now``; ``ready``: its upstream answers at once."""
        self.sessions += 1
        self.seed = seed
        self.now = now
        self.chatty = chatty  # the client answers every ping and is never silent for long
        self.eager_handles = eager_handles  # the upstream sends a handle as soon as it is ready
        self.session = Session(self.config, session_id=f"prop-{seed}", seed=seed)
        self.deadline = now + self.config.time_limit_s
        # the end (across restores)
        self.ended_messages = 0
        self.first_call_at_deadline: float | None = None
        self.model_state = State.CONNECTING
        self.incarnation = 0
        # upstream, as the host sees it (per incarnation: ids start again after a restore)
        self.open_conns: dict[int, float] = {}  # id -> when it was opened
        self.ready_conns: set[int] = set()
        self.known_conns: list[int] = []
        self.current: int | None = None
        self.closing: int | None = None  # reported closed by the event being handled
        self.goaway_conn: int | None = None  # named by the GoAway being handled
        self.readying: int | None = None  # named by the UpstreamReady being handled
        self.rotate_by: dict[int, float] = {}  # GoAway limits
        self.last_attempt = 0
        self.failures = 0  # failed attempts in this outage
        self.open_upstream_count = 0
        self.resumed_with_handle = False
        # handles
        self.handle: str | None = None
        self.handle_at: float | None = None
        self.handle_counter = 0
        # conversation
        self.said = False  # what the engine documents as "something was said"
        self.reached = False  # ... and it actually reached or came from an upstream
        self.transcripts = 0
        self.forwarded = 0  # lines sent to the client (forward_transcripts)
        # client
        self.attached = True
        self.last_seen = now
        self.grace_until: float | None = None
        self.ping_seq = 0
        self.ping_by = now + self.config.heartbeat_interval_s  # the next ping is due by then
        # counters the engine keeps, as the host counts them
        self.flushed = 0
        self.resumes = 0
        self.bytes_overflowed = 0
        self.overflow_told = False  # the client was told about an overflow in this outage
        self.unknowns = 0
        self.tool_calls = 0
        self.ignored_updates = 0
        self.prompt_tokens: int | None = None
        # warning
        self.warnings = 0
        self.prompts_upstream = 0
        # client input
        self.next_seq = 0
        self.chunks_handed = 0
        self.delivered = 0
        self.last_delivered = -1
        self.next_text = 0
        self.last_text_upstream = -1
        # the store
        self.persisted: SessionRecord | None = None
        self.logged: list[LogEntry] = []  # every Logged effect, across restores
        self.injected_failure = False  # a handler made to fail for one call
        self.held_bytes = 0  # client audio the session holds, as of the last check
        self.calls = 0
        self._start(self.session)
        if ready:
            self.now += 0.05
            self._ready(self.current)

    # -------------------------------------------------------------------------- plumbing

    @property
    def s(self) -> Session:
        assert self.session is not None
        return self.session

    def _note_deadline_call(self) -> None:
        if self.now >= self.deadline and self.first_call_at_deadline is None:
            self.first_call_at_deadline = self.now

    def _start(self, session: Session) -> None:
        self._note_deadline_call()
        effects = session.start(self.now)
        self._absorb(effects, None)
        self._after_call(None)

    def _call(
        self, event: ev.Event, on_accept: Callable[[], None] | None = None
    ) -> list[fx.Effect]:
        """Hand ``event`` to the session at ``now``, check the effects in order, then the state.

        ``on_accept`` updates the host's model when the event reached a running session; it runs
        after the effects were checked against the model as it was before the event (due timers
        fire before the event is applied).
        """
        session = self.s
        state_before = session.state
        reason_before = session.end_reason
        self._note_deadline_call()
        self.calls += 1
        effects = session.handle(event, self.now)
        if state_before is State.ENDED and isinstance(event, ev.UpstreamAudioUnsent):
            # 12. ... but bookkeeping about lost audio: a log entry and the record, nothing else
            assert [type(e) for e in effects] == [fx.Logged, fx.PersistRecord], effects
        elif state_before is State.ENDED:
            # 2. ended absorbs everything
            assert effects == [], f"an ended session answered {event!r} with {effects!r}"
            assert session.state is State.ENDED
            assert session.end_reason == reason_before
        self._absorb(effects, event)
        if on_accept is not None and not session.ended:
            on_accept()
        self._after_call(event)
        if (
            self.chatty
            and self.attached
            and any(isinstance(e, fx.SendToClient) and isinstance(e.message, Ping) for e in effects)
        ):
            self._call(ev.HeartbeatAck(), self._client_seen)
        return effects

    def _conversation(self) -> None:
        """Something was said by or to the interviewer."""
        self.said = self.reached = True

    def _client_seen(self) -> None:
        self.last_seen = self.now

    # -------------------------------------------------------------------------- effects

    def _absorb(self, effects: list[fx.Effect], event: ev.Event | None) -> None:
        """Carry out ``effects`` in order as a host would, checking each against the model."""
        session = self.s
        config = self.config
        end_at: int | None = None
        open_at_end: set[int] = set()
        for index, effect in enumerate(effects):
            if end_at is not None:
                assert isinstance(effect, AFTER_END), (
                    f"{effect!r} after session_ended in the same batch: {effects!r}"
                )
            if isinstance(effect, fx.StateChanged):
                self._on_state_changed(effects, index, effect)
            elif isinstance(effect, fx.Logged):
                self._on_logged(effects, index, effect.entry)
            elif isinstance(effect, fx.OpenUpstream):
                self._on_open(effect)
            elif isinstance(effect, fx.CloseUpstream):
                cid = effect.connection_id
                assert cid in self.open_conns or cid == self.closing, (
                    f"CloseUpstream({cid}) of a connection that is not open: {self.open_conns}"
                )
                if cid in self.ready_conns and cid != self.readying and end_at is None:
                    # a healthy connection is only rotated away after its GoAway
                    assert cid in self.rotate_by or cid == self.goaway_conn, (
                        f"CloseUpstream({cid}) of a ready connection without a GoAway"
                    )
                elif end_at is None:  # an attempt abandoned (connect timeout): a failure
                    self.failures += 1
                    if cid == self.closing:
                        self.closing = None  # (its close, being handled, is now stale)
                self.open_conns.pop(cid, None)
                self.rotate_by.pop(cid, None)
            elif isinstance(effect, fx.SendAudioUpstream):
                # 5. in order, no duplicates, to a ready connection
                self._upstream_usable(effect)
                seq = seq_of(effect.data)
                assert seq > self.last_delivered, (
                    f"chunk {seq} sent upstream after chunk {self.last_delivered}"
                )
                assert seq < self.next_seq, f"chunk {seq} was never sent by the client"
                self.last_delivered = seq
                self.delivered += 1
                if isinstance(event, ev.UpstreamReady):
                    self.flushed += 1
            elif isinstance(effect, fx.SendTextUpstream):
                self._upstream_usable(effect)
                if effect.text.startswith(TEXT_PREFIX):
                    number = int(effect.text.removeprefix(TEXT_PREFIX))
                    assert number > self.last_text_upstream, "client text reordered or repeated"
                    assert number < self.next_text
                    self.last_text_upstream = number
                    self.said = self.reached = True  # typed text counts once it is sent
                else:
                    self.reached = True
                    assert "minutes left" in effect.text, effect.text
                    assert self.warnings == 1, "wrap-up prompt without a warning"
                    self.prompts_upstream += 1
                    assert self.prompts_upstream == 1, "wrap-up prompt sent upstream twice"
            elif isinstance(effect, fx.SendAudioToClient):
                assert self.attached, "interviewer audio sent to a client that is not attached"
            elif isinstance(effect, fx.SendToClient):
                message = effect.message
                if isinstance(message, SessionEnded):
                    end_at = index
                    open_at_end = set(self.open_conns)
                    self._on_end(effects, index, message, event)
                elif isinstance(message, SessionWarning):
                    self._on_warning(effects, index, message, event)
                elif isinstance(message, TranscriptMessage):
                    # 4. transcripts stay server-side unless asked for, and only finished lines
                    assert config.forward_transcripts, f"transcript reached the client: {message!r}"
                    assert self.attached
                    recorded = [e for e in effects[:index] if isinstance(e, fx.RecordTranscript)]
                    assert recorded, "transcript sent but never recorded"
                    line = recorded[-1].line
                    assert (line.role, line.text) == (message.role, message.text)
                    assert self.forwarded < self.transcripts, "a line forwarded twice"
                    self.forwarded = self.transcripts
                elif isinstance(message, Ping):
                    assert self.attached, "ping to a client that is not attached"
                    assert message.seq == self.ping_seq + 1
                    self.ping_seq = message.seq
                    self.ping_by = self.now + config.heartbeat_interval_s
                elif isinstance(message, SessionStateMessage | TurnStatus):
                    attached = self.attached or (
                        isinstance(event, ev.ClientBack) and not session.ended
                    )
                    assert attached, f"{message!r} to a detached client"
                    if isinstance(message, SessionStateMessage):
                        assert message.remaining_s == max(0.0, self.deadline - self.now)
                else:
                    # the client hears about an overflow once per outage
                    assert isinstance(message, ErrorMessage), message
                    assert message.code == "audio_overflow"
                    assert isinstance(event, ev.ClientAudio)
                    assert not self.overflow_told, "overflow reported twice in one outage"
                    self.overflow_told = True
            elif isinstance(effect, fx.RecordTranscript):
                assert effect.line.seq == self.transcripts, "transcript numbering broke"
                assert effect.line.at == self.now
                assert effect.line.text.strip()
                self.transcripts += 1
            elif isinstance(effect, fx.PersistRecord):
                record = effect.record
                assert record.session_id == session.session_id
                assert record.deadline == self.deadline
                assert json_round_trip(record) == record, "the store cannot keep this record"
                self.persisted = record
            elif isinstance(effect, fx.CloseClient):
                if effect.code == 4408:  # heartbeat timeout
                    assert self.attached
                    silent = self.now - self.last_seen
                    assert silent >= config.heartbeat_timeout_s, f"declared gone after {silent} s"
                if self.attached:
                    self.attached = False
                    self.grace_until = self.now + config.client_grace_s
            else:  # pragma: no cover - a new effect type must be modelled here
                raise AssertionError(f"unexpected effect {effect!r}")
        if not session.ended:
            self._count_reported_failure()
        if self.failures >= config.resume_max_attempts:
            assert session.ended, f"{self.failures} failed attempts and still trying"
        if end_at is not None:
            # 1. the end comes with CloseClient, CloseUpstream of what is open, a final record
            rest = effects[end_at + 1 :]
            assert any(isinstance(e, fx.CloseClient) for e in rest), "end without CloseClient"
            persisted = [e.record for e in rest if isinstance(e, fx.PersistRecord)]
            assert persisted, "end without PersistRecord"
            assert persisted[-1].state is State.ENDED
            assert persisted[-1].end_reason == session.end_reason
            closed = {e.connection_id for e in rest if isinstance(e, fx.CloseUpstream)}
            assert open_at_end <= closed, f"end left upstream {open_at_end - closed} open"

    def _on_state_changed(
        self, effects: list[fx.Effect], index: int, effect: fx.StateChanged
    ) -> None:
        # 7. only declared transitions, chained
        pair = (effect.previous, effect.state)
        assert pair in DECLARED, f"undeclared transition {pair}: {effect!r}"
        assert effect.previous is self.model_state, (
            f"StateChanged from {effect.previous} but the session was {self.model_state}"
        )
        assert effect.at == self.now
        if effect.previous in PENDING and effect.state in UP:
            # 9. after the warning, ready lands in warning
            expected = State.WARNING if self.warnings else State.LIVE
            assert effect.state is expected, (
                f"ready landed in {effect.state} with {self.warnings} warning(s) given"
            )
            assert self.current is not None and self.current in self.ready_conns
        if pair == (State.LIVE, State.WARNING):
            assert self.warnings == 1
        if effect.state is not State.ENDED:
            # an attached client hears about every change, at once
            told = [
                e.message
                for e in effects[index + 1 : index + 2]
                if isinstance(e, fx.SendToClient) and isinstance(e.message, SessionStateMessage)
            ]
            assert bool(told) == self.attached, (effect, told)
            assert not told or told[0].state is effect.state
        if pair in ((State.LIVE, State.RESUMING), (State.WARNING, State.RESUMING)):
            self.overflow_told = False  # a new outage
            self.failures = 0
        if effect.previous in PENDING and effect.state in UP:
            self.failures = 0
        if effect.previous is State.RESUMING and effect.state in UP:
            self.resumes += 1
        self.model_state = effect.state

    def _on_logged(self, effects: list[fx.Effect], index: int, entry: LogEntry) -> None:
        # 10. the log tells the story as it happens: each state change, one end
        assert entry.at == self.now
        self.logged.append(entry)
        if entry.kind is LogKind.STATE:
            later = [e for e in effects[index + 1 :] if isinstance(e, fx.StateChanged)]
            assert later, f"{entry!r} without its state change"
            assert (later[0].previous, later[0].state) == (entry.state_from, entry.state_to)
        elif entry.kind is LogKind.ROTATION_SKIPPED:
            # 11. a working connection is only kept past its GoAway when nothing can follow it
            config = self.config
            handle_usable = (
                self.handle is not None
                and self.handle_at is not None
                and self.now - self.handle_at <= config.handle_ttl_s
            )
            no_time = self.deadline - self.now < config.min_remaining_to_resume_s
            assert no_time or (self.reached and not handle_usable), (
                f"rotation skipped with {self.deadline - self.now:.1f} s left and handle "
                f"{self.handle!r}: {entry.why}"
            )
            assert entry.connection_id == self.current
            self.rotate_by.pop(entry.connection_id, None)
        elif entry.kind is LogKind.END:
            assert sum(e.kind is LogKind.END for e in self.logged) == 1, "a second end logged"
            assert entry.reason is not None and entry.reason == self.s.end_reason
            assert entry.why == self.s.end_detail

    def _on_end(
        self,
        effects: list[fx.Effect],
        index: int,
        message: SessionEnded,
        event: ev.Event | None,
    ) -> None:
        # 1. exactly one end, with a cause that fits its reason
        session = self.s
        self.ended_messages += 1
        assert self.ended_messages == 1, "a second session_ended"
        before = effects[index - 1] if index > 0 else None
        assert isinstance(before, fx.StateChanged) and before.state is State.ENDED
        assert message.reason == session.end_reason
        assert message.timestamp == self.now
        assert session.snapshot().ended_at == self.now
        reason = message.reason
        if reason is EndReason.USER_ENDED:
            assert isinstance(event, ev.ClientEnd)
        elif reason is EndReason.ERROR:
            assert (
                isinstance(event, ev.UpstreamError)
                or (isinstance(event, ev.UpstreamClosed) and not close_is_resumable(event.code))
                or self.injected_failure
            ), f"error end caused by {event!r}"
        elif reason is EndReason.TIME_LIMIT:
            assert self.now >= self.deadline, "time_limit before the deadline"
        elif reason is EndReason.DISCONNECTED:
            if isinstance(event, ev.ClientGone) and self.attached:
                # the handler let the client go, and a zero grace window ran out at once
                assert self.config.client_grace_s == 0, "disconnected with grace left"
            else:
                assert not self.attached, "disconnected while the client is attached"
                assert self.grace_until is not None and self.now >= self.grace_until
        else:
            self._check_upstream_lost_is_justified()

    def _check_upstream_lost_is_justified(self) -> None:
        """``upstream_lost`` needs a cause: no time, no attempts left, or no way to resume."""
        config = self.config
        no_time = self.deadline - self.now < config.min_remaining_to_resume_s
        no_attempts = self.last_attempt >= config.resume_max_attempts
        handle_usable = (
            self.handle is not None
            and self.handle_at is not None
            and self.now - self.handle_at <= config.handle_ttl_s
        )
        no_way = self.reached and not handle_usable
        assert no_time or no_attempts or no_way, (
            f"upstream_lost ({self.s.end_detail}) with {self.deadline - self.now:.1f} s left, "
            f"attempt {self.last_attempt} of {config.resume_max_attempts}, and nothing said to "
            f"or by an upstream yet (handle {self.handle!r})"
        )

    def _on_warning(
        self,
        effects: list[fx.Effect],
        index: int,
        message: SessionWarning,
        event: ev.Event | None,
    ) -> None:
        # 9. one warning; a re-attached client is told again, right after the state
        resend = (
            isinstance(event, ev.ClientBack)
            and index > 0
            and isinstance(effects[index - 1], fx.SendToClient)
            and isinstance(effects[index - 1].message, SessionStateMessage)  # type: ignore[union-attr]
        )
        if not resend:
            self.warnings += 1
            assert self.warnings == 1, "the warning was given twice"
            assert self.now >= self.deadline - self.config.warning_before_s, "warning too early"
        else:
            assert self.warnings == 1, "a re-sent warning that was never given"
        assert message.remaining_s == max(0.0, self.deadline - self.now)

    def _count_reported_failure(self) -> None:
        """The event being handled reports a pending attempt closed: the handler counts a
        failure (before any retry it opens in the same call)."""
        closing = self.closing
        if closing is not None and (closing not in self.ready_conns or closing == self.readying):
            self.failures += 1
            self.closing = None

    def _upstream_usable(self, effect: fx.Effect) -> None:
        cid = self.current
        assert cid is None or cid != self.closing, (
            f"{effect!r} to connection {cid}, which the event being handled reports closed"
        )
        assert cid is not None and cid in self.open_conns, (
            f"{type(effect).__name__} with no open upstream connection (current {cid})"
        )
        assert cid in self.ready_conns, (
            f"{type(effect).__name__} to connection {cid} before it was ready"
        )

    def _on_open(self, effect: fx.OpenUpstream) -> None:
        config = self.config
        self._count_reported_failure()  # only the handler can open while it is still open
        assert not self.open_conns, (
            f"OpenUpstream({effect.connection_id}) while {sorted(self.open_conns)} still open"
        )
        assert effect.connection_id not in self.known_conns, "connection id reused"
        assert not self.known_conns or effect.connection_id > self.known_conns[-1]
        assert effect.attempt == self.failures + 1, (effect, self.failures)
        assert effect.attempt <= config.resume_max_attempts
        assert self.deadline - self.now >= config.min_remaining_to_resume_s, (
            "reconnecting with less than min_remaining_to_resume_s left"
        )
        # 8. the latest resumable handle, if it is usable; fresh only before anything was said
        handle = effect.handle
        usable = (
            self.handle is not None
            and self.handle_at is not None
            and self.now - self.handle_at <= config.handle_ttl_s
        )
        if handle is not None:
            assert handle == self.handle, f"resumed with {handle!r}, latest is {self.handle!r}"
            assert usable, f"resumed with an expired handle ({self.handle_at=}, {self.now=})"
        else:
            assert not usable, f"fresh connection although {self.handle!r} was usable"
            assert not self.said, "fresh connection after the conversation started"
        self.open_conns[effect.connection_id] = self.now
        self.known_conns.append(effect.connection_id)
        self.current = effect.connection_id
        self.last_attempt = effect.attempt
        self.open_upstream_count += 1
        self.resumed_with_handle |= handle is not None

    # -------------------------------------------------------------------------- invariants

    def _after_call(self, event: ev.Event | None) -> None:
        """Invariants that hold after every ``handle`` (``event``) or ``start`` (``None``)."""
        session = self.s
        config = self.config
        now = self.now
        self.closing = self.goaway_conn = self.readying = None
        # 7. the state is a State, and the one the StateChanged effects led to
        assert isinstance(session.state, State)
        assert session.state is self.model_state, (session.state, self.model_state)
        # 1. end_reason iff ended; exactly one session_ended once ended
        assert (session.end_reason is not None) == (session.state is State.ENDED)
        assert session.ended == (session.state is State.ENDED)
        snap = session.snapshot()
        if session.ended:
            assert self.ended_messages == 1, "ended without exactly one session_ended"
            # 2. nothing left to do
            assert session.next_timer() is None
            assert not self.open_conns, f"ended with upstream {sorted(self.open_conns)} open"
            assert snap.pending == []
            assert snap.ended_at is not None
        else:
            assert self.ended_messages == 0
            # 6. never a timer in the past, nor at now (a host would spin on it)
            timer = session.next_timer()
            assert timer is not None and timer <= self.deadline
            assert timer > now, f"next_timer() = {timer!r} at now = {now!r} after {event!r}"
        # 3. the deadline holds, and time_limit means it
        assert session.deadline == self.deadline == snap.deadline
        if now >= self.deadline:
            assert session.ended, f"still {session.state} at deadline {now - self.deadline:+.3f} s"
        if session.end_reason is EndReason.TIME_LIMIT:
            assert snap.ended_at is not None and snap.ended_at >= self.deadline
            assert self.first_call_at_deadline is not None
            assert snap.ended_at <= max(self.deadline, self.first_call_at_deadline)
        if not session.ended:
            # the warning is given on time
            if now >= self.deadline - config.warning_before_s:
                assert self.warnings == 1 and session.warning_given, "warning overdue"
            # an attached client is pinged, and a silent one is declared gone, on time ...
            if self.attached:
                assert now < self.ping_by, "ping overdue"
                assert now < self.last_seen + config.heartbeat_timeout_s, "silent client kept"
            # ... and a gone client has exactly the grace window
            if self.grace_until is not None:
                assert now < self.grace_until, "the grace window ran out, still running"
            # an attempt that is not ready in time is abandoned
            for cid, opened in self.open_conns.items():
                if cid not in self.ready_conns:
                    assert now < opened + config.connect_timeout_s, f"attempt {cid} not timed out"
            # a GoAway's time_left is respected
            for cid, limit in self.rotate_by.items():
                assert cid not in self.open_conns or now < limit, f"{cid} outlived its GoAway"
            # an outage always has its next attempt scheduled, and soon
            if session.state in PENDING and not self.open_conns:
                slack = config.resume_backoff_cap_s * (1 + config.resume_backoff_jitter)
                timer = session.next_timer()
                assert timer is not None and timer <= now + slack, "outage without a retry"
            if session.state in UP:
                assert self.current in self.open_conns and self.current in self.ready_conns
        # 5. client audio is sent upstream, overflowed, unsent at the end, or still pending
        pending_audio = [p.audio for p in snap.pending if p.audio is not None]
        stats = snap.stats
        accounted = (
            self.delivered
            + stats.chunks_overflowed
            + stats.chunks_unsent_at_end
            + len(pending_audio)
        )
        assert accounted == self.chunks_handed, (
            f"{self.chunks_handed} chunks handed in, {self.delivered} sent upstream, "
            f"{stats.chunks_overflowed} overflowed, {stats.chunks_unsent_at_end} unsent at end, "
            f"{len(pending_audio)} pending"
        )
        pending_seqs = [seq_of(a) for a in pending_audio]
        assert pending_seqs == sorted(set(pending_seqs))
        assert all(seq > self.last_delivered for seq in pending_seqs)
        self.held_bytes = sum(map(len, pending_audio))
        assert self.held_bytes <= config.resume_buffer_max_bytes
        if session.state in UP:
            assert snap.pending == [], "input left in the buffer while the upstream is up"
        pending_texts = [
            int(p.text.removeprefix(TEXT_PREFIX))
            for p in snap.pending
            if p.text is not None and p.text.startswith(TEXT_PREFIX)
        ]
        assert pending_texts == sorted(set(pending_texts))
        assert all(n > self.last_text_upstream for n in pending_texts)
        assert stats.chunks_buffered == (
            stats.chunks_flushed + stats.chunks_unsent_at_end + len(pending_audio)
        )
        assert stats.chunks_flushed == self.flushed
        assert stats.bytes_overflowed == self.bytes_overflowed
        assert stats.resumes == self.resumes
        assert stats.unknown_events == self.unknowns
        assert stats.tool_calls == self.tool_calls
        assert stats.ignored_resumption_updates == self.ignored_updates
        assert stats.last_prompt_tokens == self.prompt_tokens
        # what the engine reports agrees with what the host saw
        assert session.warning_given == bool(self.warnings)
        assert session.ended or session.client_connected == self.attached
        assert stats.connect_attempts == self.open_upstream_count
        assert stats.transcript_lines == self.transcripts == snap.transcript_count
        # 10. the log is the bounded view of every entry: the first half and the newest
        limit = config.max_log_entries
        logged = self.logged
        expected = (
            logged
            if len(logged) <= limit
            else logged[: limit // 2] + logged[len(logged) - (limit - limit // 2) :]
        )
        assert snap.log == expected
        assert snap.log_dropped == max(0, len(logged) - limit)
        # state entries tell the state changes in order
        states = [e.state_to for e in logged if e.kind in (LogKind.STATE, LogKind.RESTORED)]
        assert not states or states[-1] is session.state
        # the store is never behind on what a restore needs
        persisted = self.persisted
        assert persisted is not None
        if not (logged and logged[-1].kind is LogKind.AUDIO_OVERFLOW):
            assert persisted.log == snap.log, "a log entry was not stored"
        assert persisted.resumption_handle == snap.resumption_handle
        assert persisted.handle_received_at == snap.handle_received_at
        assert persisted.warning_given == snap.warning_given
        assert persisted.conversation_started == snap.conversation_started
        assert persisted.end_reason == snap.end_reason
        assert (persisted.state is State.ENDED) == session.ended

    @invariant()
    def state_is_a_state(self) -> None:
        if self.session is not None:
            assert isinstance(self.s.state, State)
            assert (self.s.end_reason is not None) == self.s.ended

    def _report(self) -> None:
        """Coverage notes for ``--hypothesis-show-statistics``."""
        if self.session is None:
            return
        stats = self.s.stats
        event(f"end: {self.s.end_reason}")
        for name, hit in [
            ("restored", self.incarnation > 0),
            ("warning given", self.warnings > 0),
            ("resumed", stats.resumes > 0),
            ("resumed with a handle", self.resumed_with_handle),
            ("buffer overflowed", stats.chunks_overflowed > 0),
            ("buffer flushed", stats.chunks_flushed > 0),
            ("unsent at the end", stats.chunks_unsent_at_end > 0),
            ("goaway", stats.goaways > 0),
            ("transcripts", self.transcripts > 0),
            ("50+ calls", self.calls >= 50),
        ]:
            if hit:
                event(name)

    def teardown(self) -> None:
        self._report()
        event(f"sessions: {min(self.sessions, 4)}")

    # -------------------------------------------------------------------------- time

    def _pass_time(self, dt: float) -> None:
        """Let ``dt`` pass; a chatty client keeps talking (a chunk every 4 s) meanwhile."""
        end = self.now + dt
        while self.chatty and self.attached and self._running() and self.now + 4.0 < end:
            self.now += 4.0
            self._send_chunk()
        self.now = max(self.now, end)

    @rule(
        dt=st.one_of(
            st.just(0.0),
            st.floats(0, 1, allow_nan=False),
            st.floats(0, 20, allow_nan=False),
            st.floats(0, 200, allow_nan=False),
        )
    )
    def advance(self, dt: float) -> None:
        """Time passes with no tick (a late host): the next event fires what is due."""
        self._pass_time(dt)

    @rule(extra=st.sampled_from([0.0, 0.0, 1e-6, 0.01, 0.5, 3.0, 30.0]))
    def tick_at_timer(self, extra: float) -> None:
        """The host's timer fires at ``next_timer()`` (or late by ``extra``)."""
        timer = self.s.next_timer()
        if timer is not None:
            self._pass_time(max(0.0, timer - self.now))
            self.now = max(self.now, timer + extra)
        self._call(ev.Tick())

    @rule()
    def tick_now(self) -> None:
        self._call(ev.Tick())

    @rule(
        landmark=st.sampled_from(["deadline", "warning", "handle_ttl", "last_resume"]),
        offset=st.sampled_from([-0.5, -1e-6, 0.0, 0.0, 1e-6, 0.5]),
        then=st.sampled_from(["tick", "nothing", "drop", "audio"]),
    )
    def jump_to(self, landmark: str, offset: float, then: str) -> None:
        """Jump to just before, at or after a boundary the engine must get exactly right, and
        let the first thing to arrive there be a tick, an upstream drop or a client chunk."""
        config = self.config
        if landmark == "deadline":
            at = self.deadline
        elif landmark == "warning":
            at = self.deadline - config.warning_before_s
        elif landmark == "last_resume":
            at = self.deadline - config.min_remaining_to_resume_s
        elif self.handle_at is not None:
            at = self.handle_at + config.handle_ttl_s
        else:
            return
        self._pass_time(max(0.0, at + offset - self.now))
        if then == "tick":
            self._call(ev.Tick())
        elif then == "drop" and self.current in self.open_conns:
            self._close(1006, self.current)
        elif then == "audio" and self._running():
            self._send_chunk()

    @precondition(_running)
    @rule(
        duration=st.sampled_from([1.0, 5.0, 30.0, 120.0, 700.0]),
        pongs=st.booleans(),
        ready_after=st.sampled_from([0.05, 0.5, 2.999, 3.0, None]),
    )
    def host_runs(self, duration: float, pongs: bool, ready_after: float | None) -> None:
        """A punctual host for a while: ticks at every timer, an upstream that answers
        ``ready_after`` seconds after each open (``None``: never), a client that acks pings."""
        end = self.now + duration
        last_ack = self.now
        for _ in range(400):
            if self.s.ended:
                break
            due: list[tuple[float, int]] = []
            timer = self.s.next_timer()
            if timer is not None:
                due.append((timer, 2))
            cid = self.current
            if ready_after is not None and cid in self.open_conns and cid not in self.ready_conns:
                due.append((self.open_conns[cid] + ready_after, 0))
            if pongs and self.attached:
                due.append((max(self.now, last_ack + 4.0), 1))
            if not due:
                break
            at, kind = min(due)
            if at > end:
                break
            self.now = max(self.now, at)
            if kind == 0:
                assert cid is not None
                self._ready(cid)
            elif kind == 1:
                last_ack = self.now
                if self.chatty:
                    self._send_chunk()
                else:
                    self._call(ev.HeartbeatAck(), self._client_seen)
            else:
                self._call(ev.Tick())
        self.now = max(self.now, end)

    # -------------------------------------------------------------------------- upstream

    def _conn_id(self, which: str, pick: int) -> int | None:
        """The connection a lifecycle event names: the current one, ``None``, or a stale one."""
        if which == "none":
            return None
        if which == "current" and self.current is not None:
            return self.current
        stale = [c for c in self.known_conns if c != self.current] + [0]
        return stale[pick % len(stale)]

    def _resolve(self, cid: int | None) -> int | None:
        return self.current if cid is None else cid

    def _ready(self, cid: int | None) -> None:
        """The upstream answers setup on ``cid``; an eager upstream then sends a handle."""
        real = self._resolve(cid)
        if real is not None and real in self.open_conns:
            self.ready_conns.add(real)
            self.readying = real  # (a due connect timeout may still abandon it first)
        was = self.s.state
        self._call(ev.UpstreamReady(connection_id=cid, upstream_session_id="up"))
        if self.eager_handles and was in PENDING and self.s.state in UP:
            self._send_handle()

    def _send_handle(self) -> None:
        self.handle_counter += 1
        name = f"handle-{self.handle_counter}"

        def accepted() -> None:
            self.handle = name
            self.handle_at = self.now

        self._call(ev.ResumptionUpdate(name, True), accepted)

    def _attempt_pending(self) -> bool:
        cid = self.current
        return self._running() and cid in self.open_conns and cid not in self.ready_conns

    def _up(self) -> bool:
        return self.session is not None and self.s.state in UP

    @precondition(_running)
    @rule(which=st.sampled_from(["current", "current", "none", "stale"]), pick=st.integers(0, 7))
    def upstream_ready(self, which: str, pick: int) -> None:
        self._ready(self._conn_id(which, pick))

    @precondition(_attempt_pending)
    @rule(latency=st.sampled_from([0.0, 0.05, 1.0]), burst=st.sampled_from([0, 0, 3, 12]))
    def attempt_answers(self, latency: float, burst: int) -> None:
        """The pending attempt becomes ready, after ``burst`` chunks were buffered meanwhile."""
        for _ in range(burst):
            self._send_chunk()
        self.now += latency
        self._ready(self.current)

    @precondition(_running)
    @rule(
        code=st.sampled_from(RESUMABLE_CODES),
        which=st.sampled_from(["current", "current", "none", "stale"]),
        pick=st.integers(0, 7),
    )
    def upstream_closed(self, code: int | None, which: str, pick: int) -> None:
        self._close(code, self._conn_id(which, pick))

    def _close(self, code: int | None, cid: int | None) -> None:
        real = self._resolve(cid)
        if real is not None and real in self.open_conns:
            del self.open_conns[real]
            self.rotate_by.pop(real, None)
            self.closing = real
        self._call(ev.UpstreamClosed(code, "closed", connection_id=cid))

    @precondition(_up)
    @rule(code=st.sampled_from([1000, 1006, 1011, None]))
    def live_drop(self, code: int | None) -> None:
        self._close(code, self.current)

    @precondition(_running)
    @rule(
        time_left=st.sampled_from(["50s", "5s", "1.5s", "1s", "0s", "0.25s", None, "soon"]),
        which=st.sampled_from(["current", "current", "none", "stale"]),
        pick=st.integers(0, 7),
    )
    def go_away(self, time_left: str | None, which: str, pick: int) -> None:
        cid = self._conn_id(which, pick)
        real = self._resolve(cid)
        up = self.s.state in UP and real == self.current
        seconds = float(time_left[:-1]) if time_left and time_left[:1].isdigit() else 0.0
        limit = self.now + max(0.0, seconds - self.config.goaway_margin_s)

        def accepted() -> None:
            if limit >= self.deadline and real not in self.rotate_by:
                return  # 11. the connection outlives the interview: it is kept
            last = self.logged[-1] if self.logged else None
            if last is not None and last.kind is LogKind.ROTATION_SKIPPED and last.at == self.now:
                return  # 11. the rotation this GoAway asked for was skipped (checked above)
            if up and real is not None:  # a later GoAway never postpones an earlier limit
                self.rotate_by[real] = min(self.rotate_by.get(real, limit), limit)

        self.goaway_conn = real if up else None
        self._call(ev.GoAway(time_left, connection_id=cid), accepted)

    @precondition(_up)
    @rule(
        time_left=st.sampled_from(["50s", "5s", "1.5s", "1s", None]),
        which=st.sampled_from(["current", "current", "none", "stale"]),
        turn_open=st.booleans(),
        again=st.sampled_from([None, None, "50s", "3s"]),
        ticks=st.sampled_from([2, 1, 3, 0]),
    )
    def live_go_away(
        self, time_left: str | None, which: str, turn_open: bool, again: str | None, ticks: int
    ) -> None:
        """GoAway while audio flows (mid-turn or not), maybe twice; then a punctual host."""
        if turn_open:
            self._call(ev.ModelAudio(bytes(960)), self._conversation)
        self.go_away(time_left, which, 0)
        if again is not None and self._up():
            self.now += 0.5
            self.go_away(again, which, 0)
        for _ in range(ticks):
            self.tick_at_timer(0.0)

    @precondition(_running)
    @rule(size=st.sampled_from([960, 1, 4800]))
    def model_audio(self, size: int) -> None:
        self._call(ev.ModelAudio(bytes(size)), self._conversation)

    @precondition(_running)
    @rule(
        user=st.booleans(),
        text=st.sampled_from(["", "  ", "Tell me about a time", "I led a team"]),
        finished=st.booleans(),
    )
    def transcript(self, user: bool, text: str, finished: bool) -> None:
        event_: ev.Event = (
            ev.InputTranscript(text, finished) if user else ev.OutputTranscript(text, finished)
        )
        self._call(event_, self._conversation if finished and text.strip() else None)

    @precondition(_running)
    @rule(interrupted=st.booleans())
    def turn_boundary(self, interrupted: bool) -> None:
        self._call(ev.Interrupted() if interrupted else ev.TurnComplete())

    @precondition(_running)
    @rule(kind=st.sampled_from(["new", "new", "new", "not_resumable", "empty", "none"]))
    def resumption_update(self, kind: str) -> None:
        if kind == "new":
            self._send_handle()
        else:

            def ignored() -> None:
                self.ignored_updates += 1

            if kind == "not_resumable":
                self._call(ev.ResumptionUpdate("handle-bogus", False), ignored)
            else:
                self._call(ev.ResumptionUpdate("" if kind == "empty" else None, True), ignored)

    @precondition(_running)
    @rule(handle=st.sampled_from([True, True, False]), spoken=st.integers(0, 3))
    def interviewer_turn(self, handle: bool, spoken: int) -> None:
        """A whole interviewer turn: audio, the finished line, the boundary, maybe a handle."""
        for _ in range(spoken):
            self._call(ev.ModelAudio(bytes(960)), self._conversation)
            self.now += 0.02
        self._call(ev.OutputTranscript("Tell me about a time", True), self._conversation)
        self._call(ev.TurnComplete())
        if handle:
            self._send_handle()

    @precondition(_running)
    @rule(
        kind=st.sampled_from(["usage", "tool_call", "tool_response", "unknown"]),
        tokens=st.one_of(st.none(), st.integers(0, 100_000)),
    )
    def upstream_misc(self, kind: str, tokens: int | None) -> None:
        if kind == "usage":

            def used() -> None:
                if tokens is not None:
                    self.prompt_tokens = tokens

            self._call(ev.Usage(prompt_tokens=tokens, total_tokens=tokens), used)
        elif kind == "unknown":

            def unknown() -> None:
                self.unknowns += 1

            self._call(ev.Unknown("something new"), unknown)
        else:

            def tool() -> None:
                self._conversation()
                self.tool_calls += kind == "tool_call"

            self._call(ev.ToolActivity("lookup", kind.removeprefix("tool_")), tool)

    # -------------------------------------------------------------------------- client

    @precondition(_running)
    @rule(
        count=st.integers(1, 14),
        spacing=st.sampled_from([0.0, 0.02]),
        size=st.sampled_from([CHUNK, CHUNK, 4, 1000]),
    )
    def client_audio(self, count: int, spacing: float, size: int) -> None:
        for _ in range(count):
            self._send_chunk(size)
            self.now += spacing

    def _send_chunk(self, size: int = CHUNK) -> None:
        seq = self.next_seq
        self.next_seq += 1
        data = chunk(seq, size)
        overflowed = self.s.stats.chunks_overflowed
        held = self.held_bytes

        def accepted() -> None:
            # (a chunk handed to an ended session is not part of the interview)
            self.chunks_handed += 1
            self.last_seen = self.now
            if self.s.stats.chunks_overflowed > overflowed:  # only a full buffer refuses
                self.bytes_overflowed += len(data)
                assert self.overflow_told, "audio refused and the client not told"
                assert held + len(data) > self.config.resume_buffer_max_bytes

        self._call(ev.ClientAudio(data), accepted)

    @precondition(_running)
    @rule()
    def client_text(self) -> None:
        number = self.next_text
        self.next_text += 1

        self._call(ev.ClientText(f"{TEXT_PREFIX}{number}"), self._client_seen)

    @precondition(_running)
    @rule()
    def client_gone(self) -> None:
        def accepted() -> None:
            if self.attached:
                self.attached = False
                self.grace_until = self.now + self.config.client_grace_s

        self._call(ev.ClientGone("tab closed"), accepted)

    @precondition(_running)
    @rule()
    def client_back(self) -> None:
        def accepted() -> None:
            self.attached = True
            self.grace_until = None
            self.last_seen = self.now
            self.ping_by = self.now + self.config.heartbeat_interval_s

        effects = self._call(ev.ClientBack(), accepted)
        if not self.s.ended:
            states = [
                e.message
                for e in effects
                if isinstance(e, fx.SendToClient) and isinstance(e.message, SessionStateMessage)
            ]
            assert states and states[-1].state is self.s.state

    @precondition(_running)
    @rule()
    def heartbeat_ack(self) -> None:
        self._call(ev.HeartbeatAck(), self._client_seen)

    @precondition(_running)
    @rule(
        kind=st.sampled_from(["client_end", "upstream_error", "fatal_close", "none", "none"]),
        code=st.sampled_from(FATAL_CODES),
    )
    def terminal(self, kind: str, code: int) -> None:
        """Events that end the session outright (rarer, so runs get somewhere first)."""
        if kind == "client_end":
            self._call(ev.ClientEnd())
            assert self.s.ended
        elif kind == "upstream_error":
            self._call(ev.UpstreamError("INTERNAL", "boom"))
            assert self.s.ended
        elif kind == "fatal_close" and self.current is not None:
            timer = self.s.next_timer()
            live = self.current in self.open_conns and timer is not None and timer > self.now
            self._close(code, self.current)
            if live:  # (with a timer due, a connect timeout may abandon it first)
                assert self.s.ended

    @precondition(_over)
    @rule(
        kind=st.sampled_from(
            ["audio", "model", "ready", "closed", "goaway", "back", "end", "text", "tick"]
        )
    )
    def poke_ended(self, kind: str) -> None:
        """2. An ended session ignores everything (``_call`` checks it answers ``[]``)."""
        cid = self.current
        event_: ev.Event = {
            "audio": ev.ClientAudio(chunk(self.next_seq)),
            "model": ev.ModelAudio(b"\x00" * 960),
            "ready": ev.UpstreamReady(connection_id=cid),
            "closed": ev.UpstreamClosed(1011, connection_id=cid),
            "goaway": ev.GoAway("5s", connection_id=cid),
            "back": ev.ClientBack(),
            "end": ev.ClientEnd(),
            "text": ev.ClientText("late"),
            "tick": ev.Tick(),
        }[kind]
        if kind == "audio":
            self.next_seq += 1
        self._call(event_)

    @precondition(_running)
    @rule(partial=st.booleans())
    def a_handler_fails(self, partial: bool) -> None:
        """13. A bug in a handler: the session ends with error, once, and nothing leaks."""
        original = Session._HANDLERS[ev.Interrupted]

        def broken(session: Session, event: ev.Interrupted, now: float) -> None:
            if partial:
                original(session, event, now)  # some of its work is done, then it fails
            raise RuntimeError("injected failure")

        Session._HANDLERS[ev.Interrupted] = broken
        self.injected_failure = True
        try:
            effects = self._call(ev.Interrupted())
        finally:
            Session._HANDLERS[ev.Interrupted] = original
            self.injected_failure = False
        session = self.s
        assert session.ended
        if session.end_reason is EndReason.ERROR:
            assert "RuntimeError: injected failure" in (session.end_detail or "")
            assert any(isinstance(e, fx.CloseClient) and e.code == 1000 for e in effects)
        # (a timer due in the same call may have ended the session first: the first cause wins)
        assert not self.open_conns, f"connections left open: {self.open_conns}"
        assert self.s.next_timer() is None
        assert self.s.handle(ev.Tick(), self.now) == []  # nothing left over

    @rule(chunks=st.integers(1, 5))
    def audio_lost_upstream(self, chunks: int) -> None:
        """12. The host reports audio that never reached a model, in any state: counted."""
        before = self.s.stats.upstream_audio_unsent
        effects = self._call(ev.UpstreamAudioUnsent(chunks, "written into a dead connection"))
        assert self.s.stats.upstream_audio_unsent == before + chunks
        stored = [e.record for e in effects if isinstance(e, fx.PersistRecord)]
        assert stored and stored[-1].stats.upstream_audio_unsent == before + chunks
        entries = [e.entry for e in effects if isinstance(e, fx.Logged)]
        assert any(e.kind is LogKind.AUDIO_UNSENT and e.count == chunks for e in entries)

    # -------------------------------------------------------------------------- restore

    @rule(later=st.sampled_from([0.0, 0.0, 2.0, 30.0]), client_returns=st.booleans())
    def restore(self, later: float, client_returns: bool) -> None:
        """The worker goes away; another restores the record (through JSON) and starts it."""
        record = self.s.snapshot()
        again = json_round_trip(record)
        assert again == record, "the record does not survive a JSON round trip"
        self.now += later
        session = Session.restore(again, self.now, seed=self.seed + self.incarnation + 1)
        kept = {"state", "client_connected"}
        assert session.snapshot().model_dump(exclude=kept) == record.model_dump(exclude=kept)
        self.session = session
        self.incarnation += 1
        if record.state is State.ENDED:
            # 1./2. an ended session comes back ended and stays silent
            assert session.ended and session.end_reason == record.end_reason
            assert session.next_timer() is None
            with pytest.raises(SessionError):
                session.start(self.now)
            return
        assert session.state is State.RESUMING and not session.client_connected
        self.model_state = State.RESUMING
        # every connection died with the old worker; connection ids start again
        self.open_conns.clear()
        self.ready_conns.clear()
        self.known_conns.clear()
        self.rotate_by.clear()
        self.current = None
        self.last_attempt = 0
        self.failures = 0
        self.ping_seq = 0
        self.overflow_told = False  # a new session object: a new outage
        self.attached = False
        self.grace_until = self.now + self.config.client_grace_s
        self.last_seen = self.now
        self._start(session)
        if client_returns and self._running():
            self.client_back()


EngineMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineProperties = EngineMachine.TestCase


class ForwardingMachine(EngineMachine):
    """The same with ``forward_transcripts``: finished lines (only) reach an attached client."""

    config = CONFIG.model_copy(update={"forward_transcripts": True})


ForwardingMachine.TestCase.settings = settings(
    max_examples=max(1, EXAMPLES // 5),
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestForwardingProperties = ForwardingMachine.TestCase


class EdgeConfigMachine(EngineMachine):
    """The same at the edges of the configuration: zero grace, margin, buffer and warning, one
    attempt per outage, full jitter, a short handle TTL, heartbeats every second."""

    config = SessionConfig(
        time_limit_s=120,
        warning_before_s=0,
        heartbeat_interval_s=1,
        heartbeat_timeout_s=2.5,
        client_grace_s=0,
        connect_timeout_s=0.5,
        resume_backoff_base_s=0.1,
        resume_backoff_cap_s=0.1,
        resume_backoff_jitter=1,
        resume_max_attempts=1,
        min_remaining_to_resume_s=0,
        goaway_margin_s=0,
        handle_ttl_s=5,
        resume_buffer_max_bytes=0,
    )


EdgeConfigMachine.TestCase.settings = settings(
    max_examples=max(1, EXAMPLES // 5),
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEdgeConfigProperties = EdgeConfigMachine.TestCase


# ------------------------------------------------------------------------------------ examples

QUIET = SessionConfig(
    **{**CONFIG.model_dump(), "heartbeat_interval_s": 3600, "heartbeat_timeout_s": 7200}
)
"""``CONFIG`` without heartbeats, so an example shows only what it is about."""


def _live(config: SessionConfig = QUIET, handle: str | None = "h-1") -> Session:
    """A session that is live on connection 1 (with a resumption handle) since ``T0 + 1``."""
    session = Session(config, session_id="example", seed=1)
    session.start(T0)
    session.handle(ev.UpstreamReady(connection_id=1), T0 + 1)
    if handle is not None:
        session.handle(ev.ResumptionUpdate(handle, True), T0 + 1)
    return session


def _of(effects: list[fx.Effect], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, kind)]


def test_exactly_one_end_survives_a_restore() -> None:
    session = _live()
    effects = session.handle(ev.ClientEnd(), T0 + 10)
    ended = [
        e.message for e in _of(effects, fx.SendToClient) if isinstance(e.message, SessionEnded)
    ]
    assert len(ended) == 1 and ended[0].reason is EndReason.USER_ENDED
    assert _of(effects, fx.CloseUpstream) and _of(effects, fx.CloseClient)
    assert _of(effects, fx.PersistRecord)[-1].record.state is State.ENDED
    record = SessionRecord.model_validate_json(session.snapshot().model_dump_json())
    restored = Session.restore(record, T0 + 20)
    with pytest.raises(SessionError):
        restored.start(T0 + 20)
    for event_ in (ev.ClientBack(), ev.UpstreamReady(connection_id=1), ev.Tick(), ev.ClientEnd()):
        assert restored.handle(event_, T0 + 30) == []
    assert restored.end_reason is EndReason.USER_ENDED and restored.next_timer() is None


def test_the_deadline_is_exact_on_time_and_holds_against_late_events() -> None:
    punctual = _live()
    assert punctual.handle(ev.Tick(), punctual.deadline - 60)  # the warning
    assert punctual.next_timer() == punctual.deadline
    punctual.handle(ev.Tick(), punctual.deadline)
    assert punctual.end_reason is EndReason.TIME_LIMIT
    assert punctual.snapshot().ended_at == punctual.deadline
    late = _live()
    effects = late.handle(ev.ClientAudio(chunk(0)), late.deadline + 0.5)
    assert late.end_reason is EndReason.TIME_LIMIT
    assert not _of(effects, fx.SendAudioUpstream)
    assert late.snapshot().ended_at == late.deadline + 0.5


def test_client_audio_is_flushed_in_order_or_counted_across_a_resume() -> None:
    session = _live()
    session.handle(ev.UpstreamClosed(1006, connection_id=1), T0 + 5)
    assert session.state is State.RESUMING
    for seq in range(12):  # the buffer holds 10 chunks
        session.handle(ev.ClientAudio(chunk(seq)), T0 + 5 + seq * 0.02)
    effects = session.handle(ev.UpstreamReady(connection_id=2), T0 + 6)
    sent = [seq_of(e.data) for e in _of(effects, fx.SendAudioUpstream)]
    assert sent == list(range(10))
    assert session.stats.chunks_overflowed == 2
    assert session.state is State.LIVE


def test_transcripts_stay_server_side_by_default() -> None:
    session = _live()
    effects = session.handle(ev.InputTranscript("I led a team", True), T0 + 5)
    effects += session.handle(ev.OutputTranscript("Tell me more", True), T0 + 6)
    assert len(_of(effects, fx.RecordTranscript)) == 2
    messages = [e.message for e in _of(effects, fx.SendToClient)]
    assert not [m for m in messages if isinstance(m, TranscriptMessage)]


# ------------------------------------------------- engine defects these properties found, shortest


def test_a_record_with_buffered_pcm_survives_json() -> None:
    """Raw PCM is not UTF-8: the nested ``PendingItem`` must carry it as base64 in JSON. The
    engine itself persists such records, e.g. on ``connecting -> resuming`` with audio held."""
    session = Session(QUIET, session_id="json", seed=1)
    session.start(T0)
    session.handle(ev.ClientAudio(chunk(0)), T0 + 0.1)  # held while connecting
    effects = session.handle(ev.UpstreamClosed(None, connection_id=1), T0 + 0.2)
    record = _of(effects, fx.PersistRecord)[-1].record
    assert record.pending
    assert SessionRecord.model_validate_json(record.model_dump_json()) == record


def test_text_typed_while_the_first_connection_opens_does_not_make_it_unresumable() -> None:
    """Text still in the buffer was not said to anyone: a refused first connection is retried
    afresh, not ended with ``upstream_lost`` ("no resumable handle was ever received")."""
    session = Session(QUIET, session_id="text", seed=1)
    session.start(T0)
    session.handle(ev.ClientText("hello?"), T0 + 0.5)
    session.handle(ev.UpstreamClosed(None, "refused", connection_id=1), T0 + 1)
    timer = session.next_timer()
    assert timer is not None
    effects = session.handle(ev.Tick(), timer)
    assert session.end_reason is None, session.end_detail
    assert [e.handle for e in _of(effects, fx.OpenUpstream)] == [None]


def test_an_attempt_failing_too_close_to_the_end_ends_at_once() -> None:
    """No retry fits in the last ``min_remaining_to_resume_s``: the session ends in the call
    that saw the failure, instead of leaving ``next_timer() == now`` for the host."""
    session = _live()
    session.handle(ev.Tick(), session.deadline - 60)  # the warning, out of the way
    session.handle(ev.UpstreamClosed(1006, connection_id=1), session.deadline - 10)
    assert session.state is State.RESUMING  # attempt 2 opened with exactly 10 s left
    now = session.deadline - 9
    session.handle(ev.UpstreamClosed(None, connection_id=2), now)
    timer = session.next_timer()
    assert session.ended or (timer is not None and timer > now), f"next_timer() == now ({timer})"


def test_zero_grace_disconnects_at_once() -> None:
    """``client_grace_s=0`` is valid; ``ClientGone`` must not leave a timer at ``now``."""
    config = SessionConfig(**{**QUIET.model_dump(), "client_grace_s": 0})
    session = _live(config)
    session.handle(ev.ClientGone("tab closed"), T0 + 5)
    timer = session.next_timer()
    assert session.ended or (timer is not None and timer > T0 + 5), "next_timer() == now"


def test_start_of_a_restored_session_fires_the_timers_already_due() -> None:
    """Restored after the warning time (the old worker died before it): ``start()`` gives the
    warning, and ``next_timer()`` is not left in the past."""
    session = _live()
    record = session.snapshot()  # the worker dies at T0 + 1
    restored = Session.restore(record, T0 + 545)
    restored.start(T0 + 545)
    timer = restored.next_timer()
    assert restored.warning_given and timer is not None and timer > T0 + 545, timer


def test_connection_id_none_names_the_connection_current_when_the_event_arrived() -> None:
    """A late close of "the current connection" (``None``) in a call where a due retry opens
    connection 2 must not be applied to connection 2: that leaked it (no ``CloseUpstream``)
    and the next retry opened connection 3 beside it."""
    session = Session(QUIET, session_id="none", seed=1)
    session.start(T0)
    session.handle(ev.UpstreamClosed(None, connection_id=1), T0 + 0.1)  # retry due at ~T0+0.4
    effects = session.handle(ev.UpstreamClosed(1006, connection_id=None), T0 + 1.0)
    opened = [e.connection_id for e in _of(effects, fx.OpenUpstream)]
    closed = [e.connection_id for e in _of(effects, fx.CloseUpstream)]
    assert opened == [2]
    timer = session.next_timer()
    assert timer is not None
    later = session.handle(ev.Tick(), timer)
    opened += [e.connection_id for e in _of(later, fx.OpenUpstream)]
    closed += [e.connection_id for e in _of(later, fx.CloseUpstream)]
    assert opened == [2] or 2 in closed, f"opened {opened}, closed {closed}: connection 2 leaked"


def test_a_second_goaway_never_postpones_the_first_limit() -> None:
    """GoAway("5s") mid-turn: rotate by ``now + 4``. A GoAway("50s") 0.5 s later must not move
    the limit to ``now + 49.5``, long after the server cuts the connection."""
    session = _live()
    session.handle(ev.ModelAudio(bytes(960)), T0 + 2)  # the interviewer is speaking
    session.handle(ev.GoAway("5s", connection_id=1), T0 + 2)
    session.handle(ev.GoAway("50s", connection_id=1), T0 + 2.5)
    timer = session.next_timer()
    assert timer is not None and timer <= T0 + 6, f"rotation postponed to T0 + {timer - T0:g}"


def test_the_wrap_up_prompt_is_not_sent_to_a_connection_reported_closed() -> None:
    """The warning is due at ``deadline - 60``; before the host's tick, the upstream drops and
    the host reports it (``UpstreamClosed`` at ``deadline - 59``). Due timers fire first, so the
    engine sends the wrap-up prompt to connection 1, which the host has just reported closed:
    the prompt is lost, and the resumed connection 2 never gets it. The interviewer is never
    asked to wrap up. (Found by the properties: "SendTextUpstream to connection N, which the
    event being handled reports closed".)"""
    session = _live()
    warn_at = session.deadline - 60
    effects = session.handle(ev.UpstreamClosed(1006, connection_id=1), warn_at + 1)
    assert session.warning_given and session.state is State.RESUMING
    opened = effects.index(_of(effects, fx.OpenUpstream)[0])
    to_connection_2 = effects[opened:] + session.handle(
        ev.UpstreamReady(connection_id=2), warn_at + 2
    )
    assert _of(to_connection_2, fx.SendTextUpstream), "the prompt only went to closed connection 1"
