"""Behaviour of the session engine, one test (or a few) per rule of the interview policy."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from typing import Any

import pytest

from voicefsm import EndReason, LogEntry, LogKind, Session, SessionConfig, SessionRecord, State
from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.buffer import ResumeBuffer
from voicefsm.engine import TIMERS
from voicefsm.protocol import (
    ErrorMessage,
    Ping,
    SessionEnded,
    SessionStateMessage,
    SessionWarning,
    TranscriptMessage,
    TurnStatus,
)

T0 = 1_800_000_000.0


def of(effects: list[fx.Effect], kind: type[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def client_messages(effects: list[fx.Effect], kind: type[Any] | None = None) -> list[Any]:
    messages = [e.message for e in of(effects, fx.SendToClient)]
    return messages if kind is None else [m for m in messages if isinstance(m, kind)]


class Host:
    """A minimal host: keeps every effect, the open connection, and the clock."""

    def __init__(self, config: SessionConfig | None = None, **overrides: Any) -> None:
        base = config or SessionConfig(
            **{"heartbeat_interval_s": 3600, "heartbeat_timeout_s": 7200, **overrides}
        )
        self.session = Session(base, session_id="s-1", seed=1)
        self.now = T0
        self.log: list[fx.Effect] = []
        self.opened: list[fx.OpenUpstream] = []
        self.effects = self._apply(self.session.start(self.now))

    @property
    def connection(self) -> int:
        return self.opened[-1].connection_id

    def _apply(self, effects: list[fx.Effect]) -> list[fx.Effect]:
        self.log.extend(effects)
        self.opened.extend(of(effects, fx.OpenUpstream))
        return effects

    def at(self, now: float) -> Host:
        assert now >= self.now
        self.now = now
        return self

    def after(self, seconds: float) -> Host:
        return self.at(self.now + seconds)

    def send(self, event: ev.Event) -> list[fx.Effect]:
        self.effects = self._apply(self.session.handle(event, self.now))
        return self.effects

    def tick_until(self, until: float) -> None:
        """Fire every timer up to ``until`` exactly when it is due, as a host would."""
        while (due := self.session.next_timer()) is not None and due <= until:
            self.at(max(due, self.now)).send(ev.Tick())
        self.at(until)

    def ready(self) -> list[fx.Effect]:
        return self.send(ev.UpstreamReady(connection_id=self.connection))

    def handle_update(self, handle: str = "h-1", resumable: bool = True) -> None:
        self.send(ev.ResumptionUpdate(handle=handle, resumable=resumable))

    def close(self, code: int | None, reason: str = "") -> list[fx.Effect]:
        return self.send(ev.UpstreamClosed(code, reason, connection_id=self.connection))


def live_host(**overrides: Any) -> Host:
    host = Host(**overrides)
    host.after(0.1).ready()
    assert host.session.state is State.LIVE
    return host


# ----------------------------------------------------------------------------- 1. first connect


def test_start_asks_for_a_fresh_upstream_and_ready_goes_live() -> None:
    host = Host()
    opens = of(host.effects, fx.OpenUpstream)
    assert opens == [fx.OpenUpstream(connection_id=1, handle=None, attempt=1)]
    assert of(host.effects, fx.PersistRecord)[0].record.state is State.CONNECTING
    assert host.session.state is State.CONNECTING
    effects = host.after(0.2).ready()
    assert host.session.state is State.LIVE
    assert of(effects, fx.StateChanged) == [
        fx.StateChanged(State.CONNECTING, State.LIVE, "upstream ready", T0 + 0.2)
    ]
    assert client_messages(effects, SessionStateMessage)[0].state is State.LIVE


def test_no_ready_within_connect_timeout_is_treated_like_a_lost_upstream() -> None:
    host = Host(connect_timeout_s=5, resume_backoff_jitter=0)
    assert host.session.next_timer() == T0 + 5
    host.at(T0 + 5).send(ev.Tick())
    effects = host.effects
    assert of(effects, fx.CloseUpstream) == [fx.CloseUpstream(1, "upstream not ready within 5 s")]
    assert host.session.state is State.RESUMING
    # Retried after the first backoff step with a fresh connection (nothing said yet).
    assert host.session.next_timer() == pytest.approx(T0 + 5 + 0.25)
    host.tick_until(T0 + 5.25)
    assert host.opened[-1] == fx.OpenUpstream(connection_id=2, handle=None, attempt=2)
    host.after(0.1).ready()
    assert host.session.state is State.LIVE


def test_a_late_ready_for_an_abandoned_connection_is_ignored() -> None:
    host = Host(connect_timeout_s=5)
    host.at(T0 + 5).send(ev.Tick())
    host.send(ev.UpstreamReady(connection_id=1))
    assert host.session.state is State.RESUMING


# ----------------------------------------------------------------------------- 2. warning


def test_warning_exactly_once_at_deadline_minus_warning() -> None:
    host = live_host()
    config = host.session.config
    warn_at = host.session.deadline - config.warning_before_s
    assert host.session.next_timer() == warn_at
    host.tick_until(warn_at - 0.001)
    assert host.session.state is State.LIVE
    host.tick_until(warn_at)
    warnings = client_messages(host.log, SessionWarning)
    assert warnings == [SessionWarning(remaining_s=300)]
    prompts = of(host.effects, fx.SendTextUpstream)
    assert len(prompts) == 1
    assert "5 minutes" in prompts[0].text
    assert host.session.state is State.WARNING
    host.tick_until(host.session.deadline - 1)
    assert len(client_messages(host.log, SessionWarning)) == 1


def test_after_a_resume_the_state_returns_to_warning_not_live() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.tick_until(host.session.deadline - 200)
    assert host.session.state is State.WARNING
    host.close(1011)
    assert host.session.state is State.RESUMING
    host.after(0.1).ready()
    assert host.session.state is State.WARNING


def test_warning_due_while_resuming_waits_for_the_upstream() -> None:
    host = live_host(connect_timeout_s=60)
    host.handle_update("h-1")
    host.tick_until(host.session.deadline - 301)
    host.close(1006)
    host.tick_until(host.session.deadline - 299)
    assert client_messages(host.log, SessionWarning) == [SessionWarning(remaining_s=300)]
    assert not of(host.log, fx.SendTextUpstream)
    assert host.session.state is State.RESUMING
    effects = host.ready()
    assert host.session.state is State.WARNING
    assert len(of(effects, fx.SendTextUpstream)) == 1


# ----------------------------------------------------------------------------- 3. deadline


def test_time_limit_exactly_at_the_deadline_from_ticks_alone() -> None:
    host = live_host()
    deadline = host.session.deadline
    assert deadline == T0 + 45 * 60
    host.tick_until(deadline - 0.001)
    assert host.session.state is State.WARNING
    host.tick_until(deadline)
    assert host.session.state is State.ENDED
    assert host.session.end_reason is EndReason.TIME_LIMIT
    ended = client_messages(host.log, SessionEnded)
    assert len(ended) == 1
    assert ended[0].timestamp == deadline


def test_an_event_arriving_after_the_deadline_cannot_delay_the_end() -> None:
    host = live_host()
    deadline = host.session.deadline
    host.tick_until(deadline - 10)
    # The host's tick is late; the next thing that arrives is an audio chunk.
    effects = host.at(deadline + 0.5).send(ev.ClientAudio(b"\x00" * 640))
    assert host.session.end_reason is EndReason.TIME_LIMIT
    assert not of(effects, fx.SendAudioUpstream)
    assert host.session.snapshot().ended_at == deadline + 0.5


def test_deadline_survives_snapshot_and_restore() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.tick_until(T0 + 600)
    record = SessionRecord.model_validate_json(host.session.snapshot().model_dump_json())
    restored = Session.restore(record, T0 + 620)
    assert restored.deadline == T0 + 45 * 60
    assert restored.state is State.RESUMING
    effects = restored.start(T0 + 620)
    assert of(effects, fx.OpenUpstream)[0].handle == "h-1"


def test_a_session_restored_after_its_deadline_ends_at_once_with_time_limit() -> None:
    host = live_host()
    record = host.session.snapshot()
    restored = Session.restore(record, T0 + 46 * 60)
    effects = restored.start(T0 + 46 * 60)
    assert restored.end_reason is EndReason.TIME_LIMIT
    assert len(client_messages(effects, SessionEnded)) == 1
    assert not of(effects, fx.OpenUpstream)


def test_a_restored_ended_session_stays_ended_and_says_nothing() -> None:
    host = live_host()
    host.send(ev.ClientEnd())
    restored = Session.restore(host.session.snapshot(), T0 + 10)
    assert restored.state is State.ENDED
    assert restored.end_reason is EndReason.USER_ENDED
    assert restored.next_timer() is None


# ----------------------------------------------------------------------------- 4. resuming


def test_goaway_between_turns_rotates_at_once_with_the_latest_handle() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.handle_update("h-2")
    effects = host.send(ev.GoAway("50s", connection_id=host.connection))
    assert of(effects, fx.CloseUpstream) == [
        fx.CloseUpstream(1, "GoAway (time_left=50s) between turns")
    ]
    assert of(effects, fx.OpenUpstream) == [fx.OpenUpstream(2, "h-2", 1)]
    assert host.session.state is State.RESUMING
    host.after(0.05).ready()
    assert host.session.state is State.LIVE
    assert host.session.stats.resumes == 1


def test_goaway_mid_turn_waits_for_the_turn_boundary() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.send(ev.ModelAudio(b"\x01" * 960))
    effects = host.send(ev.GoAway("50s", connection_id=host.connection))
    assert not of(effects, fx.OpenUpstream)
    assert host.session.next_timer() == pytest.approx(host.now + 49)
    host.after(3).send(ev.ModelAudio(b"\x01" * 960))
    host.handle_update("h-2")
    effects = host.after(1).send(ev.TurnComplete())
    assert of(effects, fx.OpenUpstream) == [fx.OpenUpstream(2, "h-2", 1)]


def test_goaway_with_no_turn_boundary_in_time_rotates_before_time_left_runs_out() -> None:
    host = live_host(goaway_margin_s=1.0)
    host.handle_update("h-1")
    host.send(ev.ModelAudio(b"\x01" * 960))
    goaway_at = host.now
    host.send(ev.GoAway("10s", connection_id=host.connection))
    host.tick_until(goaway_at + 8.999)
    assert len(host.opened) == 1
    host.tick_until(goaway_at + 9)
    assert host.opened[-1] == fx.OpenUpstream(2, "h-1", 1)
    assert host.now < goaway_at + 10


@pytest.mark.parametrize("code", [1000, 1006, 1011])
def test_resumable_closes_resume_with_the_handle(code: int) -> None:
    host = live_host()
    host.handle_update("h-1")
    host.close(code)
    assert host.session.state is State.RESUMING
    assert host.opened[-1].handle == "h-1"


def test_a_non_resumable_or_empty_update_never_replaces_a_good_handle() -> None:
    host = live_host()
    host.handle_update("h-good")
    host.handle_update("", resumable=True)
    host.handle_update("h-bad", resumable=False)
    host.send(ev.ResumptionUpdate(handle=None, resumable=False))
    assert host.session.stats.ignored_resumption_updates == 3
    host.close(1011)
    assert host.opened[-1].handle == "h-good"


def test_a_handle_older_than_its_ttl_is_not_used() -> None:
    host = live_host(handle_ttl_s=600)
    host.handle_update("h-1")
    host.send(ev.InputTranscript("hello", True))
    host.tick_until(host.now + 601)
    host.close(1011)
    assert host.session.end_reason is EndReason.UPSTREAM_LOST
    assert "601 s old" in (host.session.end_detail or "")
    assert len(host.opened) == 1


@pytest.mark.parametrize(("code", "words"), [(1007, "context window"), (1008, "policy")])
def test_fatal_closes_end_with_error_and_no_retry(code: int, words: str) -> None:
    host = live_host()
    host.handle_update("h-1")
    host.close(code, "bye")
    assert host.session.end_reason is EndReason.ERROR
    assert words in (host.session.end_detail or "")
    assert len(host.opened) == 1
    host.tick_until(host.now + 60)
    assert len(host.opened) == 1


def test_fresh_connection_is_fine_before_anything_was_said() -> None:
    host = live_host()
    host.send(ev.ClientAudio(b"\x00" * 640))  # silence from the mic is not "said"
    host.close(1011)
    assert host.session.state is State.RESUMING
    assert host.opened[-1].handle is None


def test_without_a_handle_after_the_conversation_started_the_upstream_is_lost() -> None:
    host = live_host()
    host.send(ev.OutputTranscript("Welcome to the interview.", True))
    host.close(1011)
    assert host.session.end_reason is EndReason.UPSTREAM_LOST
    assert "no resumable handle" in (host.session.end_detail or "")


def test_too_little_time_left_is_not_worth_resuming() -> None:
    host = live_host(min_remaining_to_resume_s=30)
    host.handle_update("h-1")
    host.tick_until(host.session.deadline - 20)
    host.close(1006)
    assert host.session.end_reason is EndReason.UPSTREAM_LOST
    assert "20.0 s of interview left" in (host.session.end_detail or "")


def test_a_close_of_a_rotated_away_connection_is_ignored() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.send(ev.GoAway("30s", connection_id=1))
    host.after(0.05).ready()
    effects = host.send(ev.UpstreamClosed(1000, "late close", connection_id=1))
    assert effects == []
    assert host.session.state is State.LIVE


# ----------------------------------------------------------------------------- 5. backoff


def test_resume_attempts_back_off_exponentially_and_are_bounded() -> None:
    host = live_host(resume_backoff_jitter=0, resume_max_attempts=4, resume_backoff_base_s=0.5)
    host.handle_update("h-1")
    host.close(1011)
    attempt_times = [host.now]
    for _ in range(3):
        host.close(None, "refused")
        due = host.session.next_timer()
        assert due is not None
        host.tick_until(due)
        attempt_times.append(host.now)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(attempt_times)]
    assert gaps == [0.5, 1.0, 2.0]
    host.close(None, "refused")
    assert host.session.end_reason is EndReason.UPSTREAM_LOST
    assert "gave up after 4 failed connection attempts" in (host.session.end_detail or "")


def test_backoff_has_jitter_within_bounds() -> None:
    delays = []
    for seed in range(20):
        host = Host(resume_backoff_jitter=0.5, resume_backoff_base_s=1.0)
        host.session = Session(host.session.config, seed=seed)
        host.opened.clear()
        host._apply(host.session.start(T0))
        host.close(None)
        due = host.session.next_timer()
        assert due is not None
        delays.append(due - T0)
    assert all(0.5 <= d <= 1.5 for d in delays)
    assert len({round(d, 6) for d in delays}) > 10


def test_backoff_never_schedules_an_attempt_past_the_useful_time() -> None:
    host = live_host(resume_backoff_jitter=0, resume_backoff_base_s=8, resume_backoff_cap_s=8)
    host.handle_update("h-1")
    host.tick_until(host.session.deadline - 13)
    host.close(1011)
    host.close(None)
    due = host.session.next_timer()
    assert due == host.session.deadline - host.session.config.min_remaining_to_resume_s


# ----------------------------------------------------------------------------- 6. buffering


def test_client_audio_while_resuming_is_buffered_and_flushed_in_order() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.close(1011)
    chunks = [bytes([n]) * 640 for n in range(5)]
    for chunk in chunks:
        assert not of(host.send(ev.ClientAudio(chunk)), fx.SendAudioUpstream)
    host.send(ev.ClientText("typed while reconnecting"))
    effects = host.ready()
    sent = [e for e in effects if isinstance(e, fx.SendAudioUpstream | fx.SendTextUpstream)]
    assert sent == [fx.SendAudioUpstream(c) for c in chunks] + [
        fx.SendTextUpstream("typed while reconnecting")
    ]
    stats = host.session.stats
    assert (stats.chunks_buffered, stats.chunks_flushed, stats.chunks_overflowed) == (5, 5, 0)
    # The flush comes before the client hears the session is live again.
    kinds = [type(e) for e in effects]
    assert kinds.index(fx.SendAudioUpstream) < kinds.index(fx.StateChanged)


def test_audio_over_the_bound_is_counted_and_reported_never_silently_dropped() -> None:
    host = live_host(resume_buffer_max_bytes=640 * 3)
    host.handle_update("h-1")
    host.close(1011)
    reports = []
    for n in range(6):
        reports += client_messages(host.send(ev.ClientAudio(bytes([n]) * 640)), ErrorMessage)
    assert [r.code for r in reports] == ["audio_overflow"]
    stats = host.session.stats
    assert (stats.chunks_buffered, stats.chunks_overflowed, stats.bytes_overflowed) == (3, 3, 1920)
    effects = host.ready()
    assert [e.data[0] for e in of(effects, fx.SendAudioUpstream)] == [0, 1, 2]


def test_buffered_audio_survives_a_restore() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.close(1011)
    host.send(ev.ClientAudio(b"\xff\x07" * 320))  # not valid UTF-8, as PCM often is not
    record = SessionRecord.model_validate_json(host.session.snapshot().model_dump_json())
    restored = Session.restore(record, host.now + 1)
    opened = of(restored.start(host.now + 1), fx.OpenUpstream)[0]
    effects = restored.handle(ev.UpstreamReady(connection_id=opened.connection_id), host.now + 2)
    assert of(effects, fx.SendAudioUpstream) == [fx.SendAudioUpstream(b"\xff\x07" * 320)]


# ----------------------------------------------------------------------------- 7. transcripts


def test_finished_transcripts_become_ordered_records_and_partials_do_not_duplicate() -> None:
    host = live_host()
    host.send(ev.InputTranscript("I am ", False))
    host.send(ev.InputTranscript("ready", False))
    host.send(ev.InputTranscript("I am ready", True))
    host.send(ev.OutputTranscript("Welcome", False))
    host.send(ev.OutputTranscript("Welcome aboard", True))
    lines = [e.line for e in of(host.log, fx.RecordTranscript)]
    assert [(line.seq, line.role, line.text) for line in lines] == [
        (0, "user", "I am ready"),
        (1, "interviewer", "Welcome aboard"),
    ]
    assert not client_messages(host.log, TranscriptMessage)


def test_transcripts_reach_the_client_only_when_asked() -> None:
    host = live_host(forward_transcripts=True)
    host.send(ev.InputTranscript("partial", False))
    host.send(ev.InputTranscript("I am ready", True))
    assert client_messages(host.log, TranscriptMessage) == [
        TranscriptMessage(role="user", text="I am ready")
    ]


def test_transcript_numbering_continues_after_restore() -> None:
    host = live_host()
    host.send(ev.InputTranscript("one", True))
    host.handle_update("h-1")
    restored = Session.restore(host.session.snapshot(), host.now)
    opened = of(restored.start(host.now), fx.OpenUpstream)[0]
    restored.handle(ev.UpstreamReady(connection_id=opened.connection_id), host.now)
    effects = restored.handle(ev.OutputTranscript("two", True), host.now)
    assert of(effects, fx.RecordTranscript)[0].line.seq == 1


# ----------------------------------------------------------------------------- 8. heartbeat


def test_client_is_pinged_every_interval_and_silence_counts_as_gone() -> None:
    config = SessionConfig(heartbeat_interval_s=10, heartbeat_timeout_s=25, client_grace_s=30)
    host = Host(config)
    host.after(0.1).ready()
    host.tick_until(T0 + 20)
    pings = client_messages(host.log, Ping)
    assert [p.seq for p in pings] == [1, 2]
    host.send(ev.HeartbeatAck())  # at T0+20: alive until T0+45
    host.tick_until(T0 + 44.9)
    assert host.session.client_connected
    host.tick_until(T0 + 45)
    assert not host.session.client_connected
    assert of(host.effects, fx.CloseClient) == [
        fx.CloseClient(4408, "heartbeat timeout: no message from the client for 25 s")
    ]
    assert host.session.state is State.LIVE  # the interview waits for the client
    host.tick_until(T0 + 75)
    assert host.session.end_reason is EndReason.DISCONNECTED


def test_any_client_message_keeps_the_heartbeat_alive() -> None:
    config = SessionConfig(heartbeat_interval_s=10, heartbeat_timeout_s=25)
    host = Host(config)
    host.after(0.1).ready()
    while host.now < T0 + 120:
        host.after(0.02).send(ev.ClientAudio(b"\x00" * 640))
        host.tick_until(host.now)
    assert host.session.client_connected


def test_a_client_that_comes_back_in_the_grace_window_keeps_the_session() -> None:
    config = SessionConfig(heartbeat_interval_s=10, heartbeat_timeout_s=25, client_grace_s=30)
    host = Host(config)
    host.after(0.1).ready()
    host.send(ev.ClientGone("tab closed"))
    host.tick_until(T0 + 29)
    effects = host.send(ev.ClientBack())
    assert client_messages(effects, SessionStateMessage) == [
        SessionStateMessage(state=State.LIVE, remaining_s=45 * 60 - 29)
    ]
    host.tick_until(T0 + 50)  # past the first grace window's end (T0 + 30.1)
    assert host.session.state is State.LIVE
    assert host.session.deadline == T0 + 45 * 60


def test_model_audio_is_not_sent_to_a_gone_client() -> None:
    host = live_host()
    assert of(host.send(ev.ModelAudio(b"\x01" * 960)), fx.SendAudioToClient)
    host.send(ev.ClientGone())
    assert host.send(ev.ModelAudio(b"\x01" * 960)) == []


# ----------------------------------------------------------------------------- 9. the end


def test_client_end_is_user_ended_with_the_full_set_of_end_effects() -> None:
    host = live_host()
    effects = host.after(5).send(ev.ClientEnd())
    assert host.session.end_reason is EndReason.USER_ENDED
    assert client_messages(effects, SessionEnded) == [
        SessionEnded(
            reason=EndReason.USER_ENDED,
            detail="the client ended the interview",
            timestamp=T0 + 5.1,
        )
    ]
    assert of(effects, fx.CloseUpstream) == [fx.CloseUpstream(1, "session ended: user_ended")]
    assert of(effects, fx.CloseClient) == [fx.CloseClient(1000, "session ended: user_ended")]
    persisted = of(effects, fx.PersistRecord)
    assert persisted[-1].record.state is State.ENDED
    assert persisted[-1].record.end_reason is EndReason.USER_ENDED


ALL_EVENTS: list[ev.Event] = [
    ev.UpstreamReady(),
    ev.ModelAudio(b"\x01"),
    ev.InputTranscript("x", True),
    ev.OutputTranscript("y", True),
    ev.TurnComplete(),
    ev.Interrupted(),
    ev.ResumptionUpdate("h", True),
    ev.GoAway("1s"),
    ev.UpstreamClosed(1011),
    ev.UpstreamClosed(1007),
    ev.UpstreamError("E", "boom"),
    ev.Usage(1, 2, 3),
    ev.ToolActivity("t", "call"),
    ev.Unknown("?"),
    ev.ClientAudio(b"\x00"),
    ev.ClientText("t"),
    ev.ClientEnd(),
    ev.ClientGone(),
    ev.ClientBack(),
    ev.HeartbeatAck(),
    ev.Fatal("crash"),
    ev.Tick(),
]


def test_ended_absorbs_every_event() -> None:
    host = live_host()
    host.send(ev.UpstreamClosed(1008, "policy"))
    assert host.session.state is State.ENDED
    for event in ALL_EVENTS:
        assert host.after(1).send(event) == []
    host.tick_until(host.session.deadline + 100)
    assert host.session.end_reason is EndReason.ERROR
    assert host.session.next_timer() is None


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        ([ev.ClientEnd(), ev.UpstreamClosed(1007)], EndReason.USER_ENDED),
        ([ev.UpstreamClosed(1007), ev.ClientEnd()], EndReason.ERROR),
        ([ev.UpstreamError("X"), ev.ClientGone(), ev.ClientEnd()], EndReason.ERROR),
        ([ev.ClientGone(), ev.UpstreamClosed(1011), ev.ClientEnd()], EndReason.USER_ENDED),
    ],
)
def test_exactly_one_end_whatever_order_the_faults_come_in(
    faults: list[ev.Event], reason: EndReason
) -> None:
    host = live_host()
    host.handle_update("h-1")
    for fault in faults:
        host.after(0.5).send(fault)
    host.tick_until(host.session.deadline + 10)
    assert host.session.end_reason is reason
    assert len(client_messages(host.log, SessionEnded)) == 1
    assert len(of(host.log, fx.CloseClient)) >= 1
    ended_records = [e for e in of(host.log, fx.PersistRecord) if e.record.state is State.ENDED]
    assert len(ended_records) == 1


def test_fatal_ends_with_error() -> None:
    host = live_host()
    host.send(ev.Fatal("host failure: effect handler crashed: KeyError"))
    assert host.session.end_reason is EndReason.ERROR
    assert host.session.end_detail == "host failure: effect handler crashed: KeyError"


def test_upstream_error_event_ends_with_error() -> None:
    host = live_host()
    host.send(ev.UpstreamError("SAFETY", "blocked"))
    assert host.session.end_reason is EndReason.ERROR
    assert host.session.end_detail == "upstream error SAFETY: blocked"


def test_turn_status_and_interruptions_reach_the_client() -> None:
    host = live_host()
    assert client_messages(host.send(ev.Interrupted()), TurnStatus) == [
        TurnStatus(status="interrupted")
    ]
    assert client_messages(host.send(ev.TurnComplete()), TurnStatus) == [
        TurnStatus(status="turn_complete")
    ]


def test_unknown_events_are_counted_not_raised() -> None:
    host = live_host()
    host.send(ev.Unknown("grounding metadata"))
    host.send(ev.Unknown("text part"))
    assert host.session.stats.unknown_events == 2


# ----------------------------------------------------------------------------- misuse


def test_handle_before_start_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"call start\(now\) before handle\(\)"):
        Session().handle(ev.Tick(), T0)


def test_a_non_event_is_refused_with_a_clear_message() -> None:
    host = live_host()
    with pytest.raises(TypeError, match="str is not a voicefsm event"):
        host.send("audio")  # type: ignore[arg-type]


def test_start_twice_is_refused() -> None:
    host = Host()
    with pytest.raises(RuntimeError, match="already started"):
        host.session.start(T0)


def test_audio_hot_path_forwards_without_a_state_change() -> None:
    host = live_host()
    chunk = b"\x02" * 640
    assert host.send(ev.ClientAudio(chunk)) == [fx.SendAudioUpstream(chunk)]
    # the first interviewer audio starts the conversation, which the record must say at once
    first = host.send(ev.ModelAudio(chunk))
    assert first[0] == fx.SendAudioToClient(chunk)
    assert [type(e) for e in first[1:]] == [fx.PersistRecord]
    assert host.send(ev.ModelAudio(chunk)) == [fx.SendAudioToClient(chunk)]


# ----------------------------------------------------------------------------- found by the
# property tests (tests/test_engine_properties.py keeps the long forms)


def test_text_typed_before_any_upstream_does_not_make_the_session_unresumable() -> None:
    host = Host(resume_backoff_jitter=0)
    host.after(0.5).send(ev.ClientText("hello?"))
    host.close(None, "refused")
    host.tick_until(host.now + 1)
    assert host.session.end_reason is None
    assert host.opened[-1].handle is None  # a fresh connection: nothing was said yet
    effects = host.after(0.1).ready()
    assert of(effects, fx.SendTextUpstream) == [fx.SendTextUpstream("hello?")]


def test_no_timer_is_ever_left_at_now() -> None:
    host = live_host(client_grace_s=0)
    host.send(ev.ClientGone("tab closed"))
    assert host.session.end_reason is EndReason.DISCONNECTED  # no grace: at once

    host = live_host(min_remaining_to_resume_s=10)
    host.handle_update("h-1")
    host.tick_until(host.session.deadline - 10)
    host.close(1006)  # attempt 2 opens with exactly 10 s left
    host.after(1).close(None)  # fails with 9 s left: no retry is worth it
    assert host.session.end_reason is EndReason.UPSTREAM_LOST


def test_a_restored_session_fires_the_timers_already_due_at_start() -> None:
    host = live_host()
    record = host.session.snapshot()
    late = host.session.deadline - 200  # past the warning time
    restored = Session.restore(record, late)
    effects = restored.start(late)
    assert client_messages(effects, SessionWarning) == [SessionWarning(remaining_s=200)]
    timer = restored.next_timer()
    assert timer is not None
    assert timer > late


def test_connection_id_none_means_the_connection_current_when_the_event_arrived() -> None:
    host = Host(resume_backoff_jitter=0)
    host.close(None)  # retry due at +0.25 s
    effects = host.at(T0 + 1).send(ev.UpstreamClosed(1006, connection_id=None))
    assert [e.connection_id for e in of(effects, fx.OpenUpstream)] == [2]
    assert host.session.state is State.RESUMING
    assert host.session.next_timer() == T0 + 1 + host.session.config.connect_timeout_s


def test_a_second_goaway_never_postpones_the_first_ones_limit() -> None:
    host = live_host(goaway_margin_s=1)
    host.handle_update("h-1")
    host.send(ev.ModelAudio(b"\x01" * 960))
    first = host.now
    host.send(ev.GoAway("5s", connection_id=1))
    host.after(0.5).send(ev.GoAway("50s", connection_id=1))
    assert host.session.next_timer() == first + 4


def test_a_timer_due_with_a_close_sends_its_output_to_the_next_connection() -> None:
    host = live_host()
    host.handle_update("h-1")
    warn_at = host.session.deadline - host.session.config.warning_before_s
    effects = host.at(warn_at + 1).close(1006)  # the host's tick for the warning is late
    opened = effects.index(of(effects, fx.OpenUpstream)[0])
    assert not of(effects[:opened], fx.SendTextUpstream)  # nothing to the dead connection
    effects = host.after(0.1).ready()
    assert len(of(effects, fx.SendTextUpstream)) == 1  # the wrap-up prompt, on connection 2
    assert host.session.state is State.WARNING


def test_a_restored_session_must_be_started_before_it_handles_events() -> None:
    host = live_host()
    restored = Session.restore(host.session.snapshot(), T0 + 10)
    with pytest.raises(RuntimeError, match=r"call start\(now\) before handle\(\)"):
        restored.handle(ev.ClientAudio(b"\x00" * 640), T0 + 10)
    restored.start(T0 + 10)
    assert restored.handle(ev.ClientAudio(b"\x00" * 640), T0 + 10) == []  # buffered


def test_a_restored_ended_session_absorbs_events_without_start() -> None:
    host = live_host()
    host.send(ev.ClientEnd())
    restored = Session.restore(host.session.snapshot(), T0 + 10)
    assert restored.handle(ev.ClientAudio(b"\x00"), T0 + 11) == []


# ----------------------------------------------------------------------------- the event log


def logged(effects: list[fx.Effect]) -> list[LogEntry]:
    return [e.entry for e in of(effects, fx.Logged)]


def kinds(entries: list[LogEntry]) -> list[LogKind]:
    return [e.kind for e in entries]


def test_the_log_tells_a_rotation_with_its_gap_and_handle_age() -> None:
    host = live_host()
    host.after(1).handle_update("h-1")
    host.after(9).send(ev.GoAway("50s", connection_id=1))
    host.after(0.25).ready()
    entries = logged(host.log)
    assert kinds(entries) == [
        LogKind.UPSTREAM_OPENED,
        LogKind.UPSTREAM_READY,
        LogKind.STATE,
        LogKind.GOAWAY,
        LogKind.ROTATION,
        LogKind.STATE,
        LogKind.UPSTREAM_OPENED,
        LogKind.UPSTREAM_READY,
        LogKind.STATE,
    ]
    first_ready, goaway, rotation, lost, opened, ready = (entries[i] for i in (1, 3, 4, 5, 6, 7))
    assert first_ready.gap_s == pytest.approx(0.1) and first_ready.handle_age_s is None
    assert (goaway.connection_id, goaway.time_left_s) == (1, 50.0)
    assert rotation.connection_id == 1 and rotation.handle_age_s == pytest.approx(9)
    assert (lost.state_from, lost.state_to) == (State.LIVE, State.RESUMING)
    assert (opened.connection_id, opened.count, opened.handle_age_s) == (2, 1, pytest.approx(9))
    assert (ready.connection_id, ready.gap_s) == (2, pytest.approx(0.25))
    assert ready.handle_age_s == pytest.approx(9.25)
    assert entries[-1].state_to is State.LIVE
    # the stored record holds the same story, and the last call stored it
    assert of(host.effects, fx.PersistRecord)[-1].record.log == entries
    assert host.session.snapshot().log == entries


def test_the_log_tells_closes_client_absence_warning_and_the_end() -> None:
    host = live_host(
        heartbeat_interval_s=5, heartbeat_timeout_s=20, client_grace_s=30, time_limit_s=600
    )
    host.after(1).handle_update("h-1")
    host.after(1).close(1011, "internal")
    host.after(0.5).ready()
    host.after(1).send(ev.ClientGone("tab closed"))
    host.after(12).send(ev.ClientBack())
    host.tick_until(T0 + 600)
    entries = logged(host.log)
    closed = next(e for e in entries if e.kind is LogKind.UPSTREAM_CLOSED)
    assert (closed.connection_id, closed.close_code, closed.why) == (1, 1011, "internal")
    ready = [e for e in entries if e.kind is LogKind.UPSTREAM_READY][-1]
    assert ready.gap_s == pytest.approx(0.5)
    left = [e for e in entries if e.kind is LogKind.CLIENT_LEFT]
    assert left[0].why == "tab closed"
    back = next(e for e in entries if e.kind is LogKind.CLIENT_BACK)
    assert back.gap_s == pytest.approx(12)
    # the client stops answering pings: a heartbeat timeout, then it is gone
    timeout = next(e for e in entries if e.kind is LogKind.HEARTBEAT_TIMEOUT)
    assert timeout.gap_s == pytest.approx(20)
    assert entries[entries.index(timeout) + 1].kind is LogKind.CLIENT_LEFT
    end = entries[-1]
    assert end.kind is LogKind.END and end.reason is EndReason.DISCONNECTED
    assert end.why == host.session.end_detail and end.state_from is State.LIVE
    assert entries[-2].kind is LogKind.STATE and entries[-2].state_to is State.ENDED


def test_the_warning_is_logged_with_the_time_left() -> None:
    host = live_host(time_limit_s=600, warning_before_s=60)
    host.tick_until(T0 + 540)
    warning = [e for e in logged(host.log) if e.kind is LogKind.WARNING]
    assert len(warning) == 1 and warning[0].time_left_s == pytest.approx(60)
    assert warning[0].at == T0 + 540


def test_the_log_is_bounded_keeping_its_start_and_its_newest_entries() -> None:
    host = live_host(max_log_entries=10, client_grace_s=1000)
    for _ in range(20):
        host.after(1).send(ev.ClientGone())
        host.after(1).send(ev.ClientBack())
    every = logged(host.log)
    assert len(every) == 2 + 1 + 40  # opened, ready, state, 20 times left and back
    record = host.session.snapshot()
    assert record.log == every[:5] + every[-5:]
    assert record.log_dropped == len(every) - 10
    # the end is always kept
    host.after(1).send(ev.ClientEnd())
    record = host.session.snapshot()
    assert record.log[-1].kind is LogKind.END and len(record.log) == 10
    assert record.log[:5] == every[:5]


def test_unused_log_fields_stay_out_of_the_stored_json() -> None:
    host = live_host()
    raw = json.loads(host.session.snapshot().model_dump_json())
    assert raw["log"][0] == {"at": T0, "kind": "upstream_opened", "connection_id": 1, "count": 1}


def test_usage_is_summed_per_session_by_modality_with_audio_seconds() -> None:
    host = live_host()
    host.send(ev.ModelAudio(bytes(48_000)))  # 1 s of 24 kHz 16-bit
    host.send(ev.ClientAudio(bytes(16_000)))  # 0.5 s of 16 kHz 16-bit
    host.send(ev.Usage(100, 20, 120, 5, 2, (("AUDIO", 90), ("TEXT", 10)), (("AUDIO", 20),)))
    host.after(10).send(ev.Usage(200, 30, 230, None, None, (("AUDIO", 190),), (("AUDIO", 30),)))
    host.after(60).send(ev.Usage(300, 40, 340))
    usage = host.session.snapshot().usage
    assert (usage.reports, usage.prompt_tokens, usage.response_tokens) == (3, 600, 90)
    assert (usage.total_tokens, usage.cached_tokens, usage.thoughts_tokens) == (690, 5, 2)
    assert usage.prompt_tokens_by_modality == {"AUDIO": 280, "TEXT": 10}
    assert usage.response_tokens_by_modality == {"AUDIO": 50}
    assert usage.model_audio_s == 1.0 and usage.client_audio_s == 0.5
    assert host.session.stats.last_prompt_tokens == 300
    # a usage entry for the first report, then at most one a minute
    entries = [e for e in logged(host.log) if e.kind is LogKind.USAGE]
    assert [(e.at - T0, e.count) for e in entries] == [
        (pytest.approx(0.1), 120),
        (pytest.approx(70.1), 690),
    ]
    raw = json.loads(host.session.snapshot().model_dump_json())["usage"]
    assert raw["client_audio_s"] == 0.5 and raw["model_audio_s"] == 1.0


def test_buffered_audio_counts_as_sent_once_it_is_flushed_not_before() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.close(1011)
    host.send(ev.ClientAudio(bytes(3200)))
    assert host.session.snapshot().usage.client_audio_bytes == 0
    host.after(0.2).ready()
    assert host.session.snapshot().usage.client_audio_bytes == 3200


def test_restore_keeps_the_log_and_the_usage_and_continues_the_same_log() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.send(ev.Usage(100, 20, 120))
    host.send(ev.ModelAudio(bytes(960)))
    record = SessionRecord.model_validate_json(host.session.snapshot().model_dump_json())
    restored = Session.restore(record, T0 + 5)
    effects = restored.start(T0 + 5)
    snap = restored.snapshot()
    assert snap.log[: len(record.log)] == record.log
    new = logged(effects)
    assert snap.log[len(record.log) :] == new
    assert new[0].kind is LogKind.RESTORED
    assert (new[0].state_from, new[0].state_to) == (State.LIVE, State.RESUMING)
    assert new[1].kind is LogKind.UPSTREAM_OPENED and new[1].handle_age_s == pytest.approx(4.9)
    assert snap.usage.total_tokens == 120 and snap.usage.model_audio_bytes == 960
    restored.handle(ev.ModelAudio(bytes(960)), T0 + 6)
    assert restored.snapshot().usage.model_audio_bytes == 1920


def test_a_record_stored_before_the_log_existed_still_loads() -> None:
    raw = json.loads(live_host().session.snapshot().model_dump_json())
    for key in ("log", "log_dropped", "usage"):
        del raw[key]
    del raw["stats"]["upstream_audio_unsent"]
    record = SessionRecord.model_validate(raw)
    assert record.log == [] and record.log_dropped == 0 and record.usage.total_tokens == 0
    session = Session.restore(record, T0 + 1)
    assert logged(session.start(T0 + 1))[0].kind is LogKind.RESTORED


# ----------------------------------------------------------------------------- audio lost upstream


def test_audio_lost_at_the_upstream_is_counted_logged_and_stored_in_any_state() -> None:
    host = live_host()
    effects = host.send(ev.UpstreamAudioUnsent(3, "written into a dead connection"))
    assert host.session.stats.upstream_audio_unsent == 3
    (entry,) = logged(effects)
    assert (entry.kind, entry.count, entry.why) == (
        LogKind.AUDIO_UNSENT,
        3,
        "written into a dead connection",
    )
    assert of(effects, fx.PersistRecord)[-1].record.stats.upstream_audio_unsent == 3
    host.send(ev.ClientEnd())
    # after the end: still counted, and only bookkeeping comes out
    effects = host.send(ev.UpstreamAudioUnsent(2, "in flight at the end"))
    assert {type(e) for e in effects} == {fx.Logged, fx.PersistRecord}
    record = of(effects, fx.PersistRecord)[0].record
    assert record.stats.upstream_audio_unsent == 5 and record.state is State.ENDED
    assert record.log[-1].kind is LogKind.AUDIO_UNSENT
    assert host.session.end_reason is EndReason.USER_ENDED
    # a restored session, before start(), and a restored ended one
    running = Session.restore(live_host().session.snapshot(), T0 + 1)
    assert of(running.handle(ev.UpstreamAudioUnsent(1), T0 + 1), fx.PersistRecord)
    assert running.snapshot().stats.upstream_audio_unsent == 1
    ended = Session.restore(record, T0 + 9)
    ended.handle(ev.UpstreamAudioUnsent(1), T0 + 9)
    assert ended.snapshot().stats.upstream_audio_unsent == 6
    assert host.send(ev.UpstreamAudioUnsent(0)) == []
    with pytest.raises(ValueError, match="chunks must be >= 0"):
        host.send(ev.UpstreamAudioUnsent(-1))


def test_upstream_liveness_settings_are_declared_with_lower_bounds() -> None:
    config = SessionConfig()
    assert (config.upstream_ping_interval_s, config.upstream_pong_timeout_s) == (5.0, 4.0)
    with pytest.raises(ValueError, match="upstream_ping_interval_s"):
        SessionConfig(upstream_ping_interval_s=0.01)
    with pytest.raises(ValueError, match="upstream_pong_timeout_s"):
        SessionConfig(upstream_pong_timeout_s=0.01)


# ----------------------------------------------------------------------------- the deadline wins


def deadline_host() -> Host:
    """Live, with a handle and a conversation under way: the default 45 minutes and resume
    policy (the client answers heartbeats, so they are left out)."""
    host = Host(SessionConfig(heartbeat_interval_s=3600, heartbeat_timeout_s=7200))
    host.after(0.01).ready()
    host.after(0.04).handle_update("h-1")
    host.send(ev.ModelAudio(b"\x00" * 960))
    host.send(ev.TurnComplete())
    return host


def test_a_goaway_whose_connection_outlives_the_deadline_keeps_it_and_ends_with_time_limit() -> (
    None
):
    host = deadline_host()
    deadline = host.session.deadline
    effects = host.at(deadline - 8.0).send(ev.GoAway("50s"))
    assert host.session.state is State.WARNING
    assert of(effects, fx.CloseUpstream) == []
    (goaway,) = [e for e in logged(effects) if e.kind is LogKind.GOAWAY]
    assert goaway.why == "kept: the connection outlives the deadline"
    assert host.after(1).send(ev.ClientAudio(b"\x01" * 640)) == [
        fx.SendAudioUpstream(b"\x01" * 640)
    ]
    host.tick_until(deadline)
    assert host.session.end_reason is EndReason.TIME_LIMIT
    assert host.session.snapshot().ended_at == deadline
    assert host.session.stats.connect_attempts == 1


def test_no_rotation_for_a_goaway_earlier_in_the_last_minutes_if_the_connection_lasts() -> None:
    host = deadline_host()
    deadline = host.session.deadline
    host.at(deadline - 30.0).send(ev.GoAway("50s"))
    host.after(1).send(ev.TurnComplete())
    host.tick_until(deadline)
    assert host.session.end_reason is EndReason.TIME_LIMIT
    assert host.session.stats.connect_attempts == 1


def test_a_turn_boundary_rotation_not_worth_resuming_keeps_the_working_connection() -> None:
    host = deadline_host()
    deadline = host.session.deadline
    host.at(deadline - 20.0).send(ev.ModelAudio(b"\x00" * 960))  # mid-turn
    host.send(ev.GoAway("15s"))  # must rotate by deadline - 6
    effects = host.at(deadline - 9.0).send(ev.TurnComplete())
    assert host.session.state is State.WARNING, host.session.end_detail
    assert of(effects, fx.CloseUpstream) == []
    (skipped,) = [e for e in logged(effects) if e.kind is LogKind.ROTATION_SKIPPED]
    assert "under the 10 s worth resuming for" in (skipped.why or "")
    # the connection still works until the server really closes it
    host.tick_until(deadline - 5.0)
    assert host.session.state is State.WARNING
    host.close(1000)
    assert host.session.end_reason is EndReason.UPSTREAM_LOST
    assert host.session.snapshot().ended_at == deadline - 5.0


def test_a_rotate_by_timer_not_worth_resuming_keeps_the_working_connection() -> None:
    host = deadline_host()
    deadline = host.session.deadline
    host.at(deadline - 20.0).send(ev.ModelAudio(b"\x00" * 960))  # mid-turn, no boundary comes
    host.send(ev.GoAway("12s"))  # rotate by deadline - 9
    host.tick_until(deadline - 8.5)
    assert host.session.state is State.WARNING, host.session.end_detail
    assert [e for e in host.log if isinstance(e, fx.CloseUpstream)] == []
    assert host.session.next_timer() == deadline  # no rotation timer is left behind
    host.tick_until(deadline)
    assert host.session.end_reason is EndReason.TIME_LIMIT


def test_a_rotation_without_a_usable_handle_keeps_the_connection_until_it_closes() -> None:
    host = live_host()
    host.send(ev.ModelAudio(b"\x00" * 960))  # the conversation started, no handle yet
    host.send(ev.TurnComplete())
    effects = host.after(5).send(ev.GoAway("20s"))
    assert host.session.state is State.LIVE
    assert of(effects, fx.CloseUpstream) == []
    # a handle arrives before the server closes: the close resumes with it
    host.after(1).handle_update("h-9")
    host.after(18).close(1000)
    assert host.session.state is State.RESUMING
    assert host.opened[-1].handle == "h-9"


# ----------------------------------------------------------------------------- exception safety


def boom_after(effect_maker: Any) -> Any:
    """A handler that does part of its work, then fails."""

    def handler(session: Session, event: Any, now: float) -> None:
        effect_maker(session, now)
        raise RuntimeError("bug in a handler")

    return handler


def ends_once_with_error(effects: list[fx.Effect]) -> None:
    ended = client_messages(effects, SessionEnded)
    assert len(ended) == 1 and ended[0].reason is EndReason.ERROR
    assert "RuntimeError: bug in a handler" in ended[0].detail
    assert fx.CloseClient(1000, "session ended: error") in effects
    final = of(effects, fx.PersistRecord)[-1].record
    assert final.state is State.ENDED and final.end_reason is EndReason.ERROR
    assert final.log[-1].kind is LogKind.END


def test_a_handler_that_raises_ends_the_session_with_error_and_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = live_host()
    host.handle_update("h-1")

    def half_a_rotation(session: Session, now: float) -> None:
        session._rotate(now, "half done")  # closes 1 and opens 2, then the handler fails

    monkeypatch.setitem(Session._HANDLERS, ev.TurnComplete, boom_after(half_a_rotation))
    effects = host.send(ev.TurnComplete())
    ends_once_with_error(effects)
    assert host.session.ended and host.session.end_reason is EndReason.ERROR
    # what the failed call did reaches the host with it, and every connection it opened is closed
    assert of(effects, fx.OpenUpstream)[0].connection_id == 2
    assert [c.connection_id for c in of(effects, fx.CloseUpstream)] == [1, 2]
    assert host.session.next_timer() is None
    # nothing left over for the next call
    assert host.send(ev.ClientAudio(b"\x00" * 640)) == []
    assert host.after(1).send(ev.Tick()) == []


def test_a_failure_while_ending_still_delivers_the_end_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = live_host()

    def broken_end(session: Session, now: float) -> None:
        raise RuntimeError("bug in a handler")

    monkeypatch.setattr(Session, "_on_enter_ended", broken_end)
    effects = host.send(ev.ClientEnd())
    assert host.session.ended
    ended = client_messages(effects, SessionEnded)
    assert len(ended) == 1 and ended[0].reason is EndReason.USER_ENDED  # the first cause wins
    assert fx.CloseClient(1000, "session ended: user_ended") in effects
    assert of(effects, fx.CloseUpstream) == [fx.CloseUpstream(1, "session ended: user_ended")]
    assert of(effects, fx.PersistRecord)[-1].record.state is State.ENDED
    assert len([e for e in of(effects, fx.StateChanged) if e.state is State.ENDED]) == 1


def test_start_that_raises_ends_the_session_with_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_open(session: Session, now: float, handle: str | None = None) -> None:
        raise RuntimeError("bug in a handler")

    monkeypatch.setattr(Session, "_open_upstream", broken_open)
    session = Session(SessionConfig(), session_id="s-2")
    effects = session.start(T0)
    ends_once_with_error(effects)
    assert session.end_reason is EndReason.ERROR and session.next_timer() is None


def test_misuse_still_raises_and_leaves_the_session_as_it_was() -> None:
    host = live_host()
    with pytest.raises(TypeError, match="is not a voicefsm event"):
        host.send("not an event")  # type: ignore[arg-type]
    assert host.session.state is State.LIVE
    assert host.send(ev.ClientAudio(b"\x00" * 640)) == [fx.SendAudioUpstream(b"\x00" * 640)]


def test_a_restored_session_has_no_timer_until_it_is_started() -> None:
    host = live_host()
    restored = Session.restore(host.session.snapshot(), T0 + 100)
    assert restored.next_timer() is None
    restored.start(T0 + 100)
    timer = restored.next_timer()
    assert timer is not None and timer > T0 + 100


@pytest.mark.parametrize(
    "event",
    [ev.ModelAudio(b"\x00" * 960), ev.ToolActivity("lookup", "call"), ev.ClientText("hello")],
    ids=["model audio", "tool call", "typed text"],
)
def test_the_record_says_the_conversation_started_as_soon_as_it_did(event: ev.Event) -> None:
    host = live_host()
    effects = host.send(event)
    stored = of(effects, fx.PersistRecord)
    assert stored and stored[-1].record.conversation_started
    # a take-over from that record cannot open a fresh connection any more
    restored = Session.restore(stored[-1].record, T0 + 1)
    restored.start(T0 + 1)
    assert restored.ended and restored.end_reason is EndReason.UPSTREAM_LOST
    # ... and later chunks are not persisted one by one
    assert of(host.send(event), fx.PersistRecord) == []


# ----------------------------------------------------------------------------- timers, one table


def test_timers_are_one_table_in_priority_order_and_next_timer_is_its_earliest() -> None:
    assert [t.name for t in TIMERS] == [
        "deadline",
        "warning",
        "heartbeat_timeout",
        "ping",
        "client_grace",
        "connect_timeout",
        "retry",
        "rotate_by",
    ]
    host = Host(SessionConfig(time_limit_s=600, warning_before_s=60, connect_timeout_s=5))

    def earliest() -> float:
        return min(d for t in TIMERS if (d := t.due(host.session)) is not None)

    assert host.session.next_timer() == earliest()  # connecting
    host.after(0.1).ready()
    host.send(ev.GoAway("50s"))
    assert host.session.next_timer() == earliest()  # rotating
    host.after(2).send(ev.ClientGone())
    assert host.session.next_timer() == earliest()  # client away


def test_timers_due_together_fire_in_table_order() -> None:
    # a late call finds the warning and the heartbeat timeout both due: the warning comes first
    host = live_host(
        time_limit_s=600, warning_before_s=60, heartbeat_interval_s=10, heartbeat_timeout_s=30
    )
    effects = host.at(T0 + 545).send(ev.Tick())
    warning = next(
        i
        for i, e in enumerate(effects)
        if isinstance(e, fx.SendToClient) and isinstance(e.message, SessionWarning)
    )
    gone = effects.index(next(e for e in effects if isinstance(e, fx.CloseClient)))
    assert warning < gone


def test_the_resume_buffer_keeps_order_bounds_audio_and_round_trips_through_the_record() -> None:
    buffer = ResumeBuffer(max_audio_bytes=10)
    assert buffer.hold_audio(b"12345") and buffer.hold_audio(b"6789")
    buffer.hold_text("typed")
    assert not buffer.hold_audio(b"ab")  # 9 + 2 > 10: refused, not kept
    assert (buffer.audio_bytes, buffer.audio_chunks, len(buffer)) == (9, 2, 3)
    again = ResumeBuffer.from_pending(buffer.to_pending(), 10)
    assert list(again) == [b"12345", b"6789", "typed"] and again.audio_bytes == 9
    assert buffer.release() == [b"12345", b"6789", "typed"]
    assert (len(buffer), buffer.audio_bytes) == (0, 0)


def test_a_session_holds_a_resume_buffer_only_while_it_holds_input() -> None:
    host = live_host()
    assert host.session._buffer is None
    host.handle_update("h-1")
    host.close(1011)
    host.send(ev.ClientAudio(b"\x00" * 640))
    assert host.session._buffer is not None and len(host.session._buffer) == 1
    host.after(0.1).ready()
    assert host.session._buffer is None


def test_log_entries_the_engine_builds_equal_validated_ones() -> None:
    host = live_host()
    host.handle_update("h-1")
    host.after(1).send(ev.GoAway("20s"))
    for entry in host.session.snapshot().log:
        fields = {k: v for k, v in dataclasses.asdict(entry).items() if v is not None}
        assert LogEntry(**fields) == entry
        assert LogEntry(**json.loads(json.dumps(fields))) == entry


def test_a_started_session_keeps_under_one_kib() -> None:
    """Issue 11.4: engine memory per started session (measured as bench_engine.py does)."""
    import gc
    import tracemalloc

    config = SessionConfig()
    keep: list[Session] = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(500):
            session = Session(config)
            session.start(T0)  # the effects are dropped, as a host does once it carried them out
            keep.append(session)
        gc.collect()
        per_session = (tracemalloc.get_traced_memory()[0] - before - sys.getsizeof(keep)) / 500
    finally:
        tracemalloc.stop()
    assert per_session <= 1024, f"{per_session:.0f} B per started session"
