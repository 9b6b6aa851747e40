"""`voicefsm simulate`: whole interviews in virtual time through the real engine."""

from __future__ import annotations

import pytest

from voicefsm import EndReason
from voicefsm.cli import main
from voicefsm.simulate import SCENARIOS, simulate


def test_the_default_interview_survives_every_fault_and_ends_at_the_time_limit() -> None:
    result = simulate("interview", seed=7)
    assert result.end_reason is EndReason.TIME_LIMIT
    assert result.ended_at_s == 45 * 60
    assert result.stats.goaways == 4
    assert result.stats.resumes == 5  # four rotations and the 1011 drop
    assert result.stats.ignored_resumption_updates == 1
    assert result.stats.connect_attempts == result.connections == 7  # one refusal on the way
    assert result.client_chunks_lost == 0
    assert result.client_chunks_reordered == 0
    assert result.stats.chunks_buffered == result.stats.chunks_flushed > 0
    assert result.session_ended_messages == 1
    assert result.client_chunks_sent > 45 * 60 * 50 * 0.99
    timeline = "\n".join(result.timeline)
    assert "client refreshes the page" in timeline
    assert "live -> warning" in timeline
    assert "45:00.000  ended      warning -> ended: time_limit" in timeline


@pytest.mark.parametrize("seed", range(8))
def test_no_client_audio_is_lost_whatever_the_seed(seed: int) -> None:
    result = simulate("interview", seed=seed)
    assert result.end_reason is EndReason.TIME_LIMIT
    assert result.client_chunks_lost == 0
    assert result.client_chunks_reordered == 0


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("clean", EndReason.TIME_LIMIT),
        ("outage", EndReason.UPSTREAM_LOST),
        ("context-exhausted", EndReason.ERROR),
        ("user-ends", EndReason.USER_ENDED),
        ("client-leaves", EndReason.DISCONNECTED),
    ],
)
def test_each_scenario_ends_for_its_reason(scenario: str, reason: EndReason) -> None:
    result = simulate(scenario, seed=3)
    assert result.end_reason is reason
    assert result.session_ended_messages == 1
    assert result.client_chunks_lost == 0


def test_same_seed_same_timeline() -> None:
    assert simulate("interview", seed=11).timeline == simulate("interview", seed=11).timeline
    assert simulate("interview", seed=11).timeline != simulate("interview", seed=12).timeline


def test_every_scenario_is_listed() -> None:
    assert set(SCENARIOS) == {
        "interview",
        "clean",
        "outage",
        "context-exhausted",
        "user-ends",
        "client-leaves",
    }


def test_cli_prints_timeline_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--scenario", "user-ends", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "client asks to end the interview" in out
    assert "ended        user_ended" in out


def test_cli_rejects_an_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["simulate", "--scenario", "nope"])
    assert raised.value.code == 2
    assert "unknown scenario 'nope'; choose one of:" in capsys.readouterr().err


def test_the_simulated_record_tells_the_story_and_the_usage() -> None:
    result = simulate("interview", seed=7)
    record = result.record
    assert record is not None and record.state.value == "ended"
    kinds = [e.kind.value for e in record.log]
    assert kinds.count("goaway") == result.stats.goaways == 4
    assert kinds.count("rotation") == 4
    assert kinds.count("warning") == 1
    assert kinds[-1] == "end" and record.log[-1].reason is EndReason.TIME_LIMIT
    assert "client_left" in kinds and "client_back" in kinds
    ready = [e for e in record.log if e.kind.value == "upstream_ready"]
    assert len(ready) == 6 and all(e.gap_s is not None and e.gap_s < 5 for e in ready)
    assert record.log_dropped == 0
    usage = record.usage
    assert usage.reports > 0 and usage.response_tokens > 0
    assert sum(usage.response_tokens_by_modality.values()) == usage.response_tokens
    assert (
        usage.prompt_tokens_by_modality["AUDIO"] + usage.prompt_tokens_by_modality["TEXT"]
        == usage.prompt_tokens
    )
    assert 44 * 60 < usage.client_audio_s <= 45 * 60
    assert usage.model_audio_s > 0
    assert [line.seq for line in result.transcript] == list(range(record.transcript_count))
