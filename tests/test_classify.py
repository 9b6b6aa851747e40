"""Classification of real ADK events (built as ADK yields them, and replayed from a recording)."""

from __future__ import annotations

import sys
from pathlib import Path

from google.adk.events import Event
from google.adk.models.llm_response import LlmResponse
from google.genai import types

from voicefsm import classify_adk_event
from voicefsm import events as ev

# Every Event a real ADK 2.13 run_live yielded on loopback (see tests/fixtures/README.md).
RECORDING = Path(__file__).parent / "fixtures" / "adk-2.13-gemini-2.5.jsonl"


def adk_event(**fields: object) -> Event:
    return Event(invocation_id="e-1", author="interviewer", **fields)  # type: ignore[arg-type]


def test_partial_and_finished_transcripts() -> None:
    partial = adk_event(
        partial=True, input_transcription=types.Transcription(text="I am ", finished=False)
    )
    finished = adk_event(
        partial=False,
        input_transcription=types.Transcription(text="I am ready", finished=True),
    )
    output = adk_event(output_transcription=types.Transcription(text="Welcome", finished=True))
    assert classify_adk_event(partial) == [ev.InputTranscript("I am ", False)]
    assert classify_adk_event(finished) == [ev.InputTranscript("I am ready", True)]
    assert classify_adk_event(output) == [ev.OutputTranscript("Welcome", True)]


def test_inline_audio() -> None:
    event = adk_event(
        content=types.Content(
            role="model",
            parts=[
                types.Part(
                    inline_data=types.Blob(data=b"\x01\x02", mime_type="audio/pcm;rate=24000")
                )
            ],
        ),
        live_session_id="sess-1",
    )
    assert classify_adk_event(event) == [ev.ModelAudio(b"\x01\x02", "audio/pcm;rate=24000")]


def test_turn_complete_interrupted_usage_and_resumption() -> None:
    assert classify_adk_event(adk_event(turn_complete=True)) == [ev.TurnComplete()]
    assert classify_adk_event(adk_event(interrupted=True)) == [ev.Interrupted()]
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=100, candidates_token_count=20, total_token_count=120
    )
    assert classify_adk_event(adk_event(usage_metadata=usage)) == [ev.Usage(100, 20, 120)]
    update = types.LiveServerSessionResumptionUpdate(new_handle="h-1", resumable=True)
    assert classify_adk_event(adk_event(live_session_resumption_update=update)) == [
        ev.ResumptionUpdate("h-1", True)
    ]
    empty = types.LiveServerSessionResumptionUpdate(new_handle="", resumable=False)
    assert classify_adk_event(adk_event(live_session_resumption_update=empty)) == [
        ev.ResumptionUpdate(None, False)
    ]


def test_goaway_on_an_llm_response_below_adk() -> None:
    response = LlmResponse(go_away=types.LiveServerGoAway(time_left="50s"))
    assert classify_adk_event(response) == [ev.GoAway("50s")]


def test_error_fields_become_an_upstream_error() -> None:
    event = adk_event(error_code="SAFETY", error_message="blocked", turn_complete=True)
    assert classify_adk_event(event) == [ev.UpstreamError("SAFETY", "blocked")]


def test_tool_call_and_response() -> None:
    call = adk_event(
        content=types.Content(
            role="model",
            parts=[types.Part(function_call=types.FunctionCall(id="fc-1", name="record", args={}))],
        )
    )
    response = adk_event(
        content=types.Content(
            role="user",
            parts=[
                types.Part(
                    function_response=types.FunctionResponse(id="fc-1", name="record", response={})
                )
            ],
        )
    )
    assert classify_adk_event(call) == [ev.ToolActivity("record", "call")]
    assert classify_adk_event(response) == [ev.ToolActivity("record", "response")]


def test_several_things_in_one_event_come_out_in_table_order() -> None:
    event = adk_event(
        content=types.Content(
            role="model",
            parts=[types.Part(inline_data=types.Blob(data=b"\x01", mime_type="audio/pcm"))],
        ),
        turn_complete=True,
        interrupted=True,
    )
    assert classify_adk_event(event) == [
        ev.ModelAudio(b"\x01", "audio/pcm"),
        ev.Interrupted(),
        ev.TurnComplete(),
    ]


def test_unknown_content_is_an_explicit_event_never_an_exception() -> None:
    text = adk_event(content=types.Content(role="model", parts=[types.Part(text="thinking")]))
    image = adk_event(
        content=types.Content(
            role="model",
            parts=[types.Part(inline_data=types.Blob(data=b"x", mime_type="image/png"))],
        )
    )
    grounding = adk_event(grounding_metadata=types.GroundingMetadata(web_search_queries=["q"]))
    assert classify_adk_event(text) == [ev.Unknown("text part")]
    assert classify_adk_event(image) == [ev.Unknown("inline data of type image/png")]
    assert classify_adk_event(grounding) == [ev.Unknown("Event with no recognised field")]
    assert classify_adk_event(object()) == [ev.Unknown("object with no recognised field")]


def test_a_bare_bookkeeping_event_yields_nothing() -> None:
    assert classify_adk_event(adk_event(live_session_id="sess-2")) == []


def test_no_adk_import_needed_at_runtime() -> None:
    # classification reads attributes; importing voicefsm must not pull ADK in.
    import subprocess

    code = (
        "import sys, voicefsm; "
        "sys.exit(int('google.adk' in sys.modules or 'google.genai' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_recorded_adk_run_classifies_completely() -> None:
    events = [
        item
        for line in RECORDING.read_text().splitlines()
        if line.strip()
        for item in classify_adk_event(Event.model_validate_json(line))
    ]
    assert not [e for e in events if isinstance(e, ev.Unknown)]
    finished = [
        (type(e).__name__, e.text)
        for e in events
        if isinstance(e, ev.InputTranscript | ev.OutputTranscript) and e.finished
    ]
    assert finished == [
        ("InputTranscript", "I am ready"),
        ("OutputTranscript", "Welcome aboard"),
        ("OutputTranscript", "Resumed."),
        ("OutputTranscript", "Third"),
    ]
    assert [e.handle for e in events if isinstance(e, ev.ResumptionUpdate)] == [
        "handle-1",
        "handle-2",
    ]
    assert sum(isinstance(e, ev.TurnComplete) for e in events) == 3
    assert any(isinstance(e, ev.ModelAudio) for e in events)
    assert [e.phase for e in events if isinstance(e, ev.ToolActivity)] == ["call", "response"]


def test_usage_by_modality_from_adk_and_from_a_raw_genai_message() -> None:
    details = [
        types.ModalityTokenCount(modality=types.MediaModality.AUDIO, token_count=90),
        types.ModalityTokenCount(modality=types.MediaModality.TEXT, token_count=10),
    ]
    out_details = [types.ModalityTokenCount(modality=types.MediaModality.AUDIO, token_count=20)]
    adk_usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=100,
        candidates_token_count=20,
        total_token_count=120,
        cached_content_token_count=4,
        thoughts_token_count=3,
        prompt_tokens_details=details,
        candidates_tokens_details=out_details,
    )
    expected = ev.Usage(100, 20, 120, 4, 3, (("AUDIO", 90), ("TEXT", 10)), (("AUDIO", 20),))
    assert classify_adk_event(adk_event(usage_metadata=adk_usage)) == [expected]
    # genai's own live message keeps the Live API's response_* names
    raw = types.LiveServerMessage(
        usage_metadata=types.UsageMetadata(
            prompt_token_count=100,
            response_token_count=20,
            total_token_count=120,
            cached_content_token_count=4,
            thoughts_token_count=3,
            prompt_tokens_details=details,
            response_tokens_details=out_details,
        )
    )
    assert classify_adk_event(raw) == [expected]
