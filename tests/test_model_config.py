"""SessionConfig lower bounds: every configuration the engine accepts works (issue 8.5)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from voicefsm import Session, SessionConfig, State
from voicefsm import events as ev

T0 = 1_800_000_000.0

SMALLEST = {
    "time_limit_s": 1.0,
    "warning_before_s": 0.0,
    "heartbeat_interval_s": 0.05,
    "heartbeat_timeout_s": 0.1,
    "client_grace_s": 0.0,
    "connect_timeout_s": 0.05,
    "resume_backoff_base_s": 0.001,
    "resume_backoff_cap_s": 0.001,
    "min_remaining_to_resume_s": 0.0,
    "goaway_margin_s": 0.0,
    "handle_ttl_s": 1.0,
}
"""Every duration at its lower bound."""


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("time_limit_s", 0.5, "1"),
        ("heartbeat_interval_s", 1e-7, "0.05"),
        ("heartbeat_timeout_s", 1e-9, "0.1"),
        ("connect_timeout_s", 1e-9, "0.05"),
        ("resume_backoff_base_s", 1e-9, "0.001"),
        ("resume_backoff_cap_s", 1e-9, "0.001"),
        ("handle_ttl_s", 1e-9, "1"),
    ],
)
def test_durations_below_their_bound_are_refused_with_the_bound(
    field: str, value: float, bound: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        SessionConfig(**{field: value})  # type: ignore[arg-type]
    assert f"{field}\n  Input should be greater than or equal to {bound}" in str(raised.value)


def test_every_timeout_1e_9_is_refused_rather_than_failing_at_start() -> None:
    tiny = {
        "heartbeat_interval_s": 1e-9,
        "heartbeat_timeout_s": 2e-9,
        "client_grace_s": 1e-9,
        "connect_timeout_s": 1e-9,
        "resume_backoff_base_s": 1e-9,
        "resume_backoff_cap_s": 1e-9,
    }
    with pytest.raises(ValidationError) as raised:
        SessionConfig(**tiny)  # type: ignore[arg-type]
    for field in ("heartbeat_interval_s", "connect_timeout_s", "resume_backoff_base_s"):
        assert field in str(raised.value)


def test_the_smallest_accepted_config_runs_a_session_to_its_end() -> None:
    config = SessionConfig(**SMALLEST)  # type: ignore[arg-type]
    session = Session(config, seed=3)
    now = T0
    session.start(now)
    calls = 0
    while (due := session.next_timer()) is not None:
        now = max(now, due)
        session.handle(ev.Tick(), now)
        calls += 1
        assert calls < 1000
    assert session.state is State.ENDED
    # the upstream never answered: the attempts were used up, or the client was gone at once
    assert session.end_reason is not None


def test_a_late_call_skips_the_missed_pings_and_stays_on_the_ping_grid() -> None:
    session = Session(SessionConfig(heartbeat_interval_s=0.05, heartbeat_timeout_s=1e6), seed=1)
    session.start(T0)
    session.handle(ev.UpstreamReady(connection_id=1), T0 + 0.01)
    # half an hour later: one ping, and the next one on the 50 ms grid
    session.handle(ev.HeartbeatAck(), T0 + 1800.01)
    assert session.state is State.LIVE
    due = session.next_timer()
    assert due is not None and T0 + 1800.01 < due <= T0 + 1800.01 + 0.05 + 1e-6
    assert round((due - T0) / 0.05, 3) % 1 == 0
