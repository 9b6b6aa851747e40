"""SessionConfig: sensible defaults and clear errors on bad values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from voicefsm import SessionConfig


def test_defaults_suit_a_45_minute_interview() -> None:
    config = SessionConfig()
    assert config.time_limit_s == 45 * 60
    assert config.warning_before_s == 5 * 60
    assert config.handle_ttl_s == 2 * 60 * 60
    assert config.forward_transcripts is False
    assert config.compression_target_tokens < config.compression_trigger_tokens


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"warning_before_s": 3000}, "warning_before_s (3000.0) must be shorter than time_limit_s"),
        (
            {"heartbeat_interval_s": 30, "heartbeat_timeout_s": 20},
            "heartbeat_timeout_s (20.0) must be longer than heartbeat_interval_s (30.0)",
        ),
        (
            {"resume_backoff_base_s": 5, "resume_backoff_cap_s": 1},
            "resume_backoff_cap_s (1.0) must be at least resume_backoff_base_s (5.0)",
        ),
        (
            {"compression_trigger_tokens": 1000, "compression_target_tokens": 2000},
            "compression_target_tokens (2000) must be below compression_trigger_tokens (1000)",
        ),
        ({"time_limit_s": -1}, "time_limit_s\n  Input should be greater than or equal to 1"),
        ({"resume_backoff_jitter": 2}, "resume_backoff_jitter\n  Input should be less than"),
        ({"resume_max_attempts": 0}, "resume_max_attempts\n  Input should be greater than"),
        ({"time_limt_s": 60}, "time_limt_s\n  Extra inputs are not permitted"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_fields(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        SessionConfig(**fields)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_config_is_immutable() -> None:
    config = SessionConfig()
    with pytest.raises(ValidationError):
        config.time_limit_s = 10  # type: ignore[misc]
