"""The client frame decoder on its own: every code it can produce, and a hypothesis fuzz test
that no input (bytes, text, JSON of any shape and depth) makes it raise."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voicefsm import events as ev
from voicefsm.web.decoder import (
    VIOLATION_CODES,
    AuthMessage,
    ClientDecoder,
    Decoded,
    ProtocolLimits,
    ProtocolViolation,
)

LIMITS = ProtocolLimits(max_frame_bytes=4096, messages_per_second=50, burst=10, max_errors=0)


def decode(frame: str | bytes, limits: ProtocolLimits = LIMITS) -> Decoded:
    return ClientDecoder(limits).decode(frame, 0.0)


def code_of(result: Decoded) -> str:
    assert isinstance(result, ProtocolViolation), result
    return result.code


# ----------------------------------------------------------------------------- one per code

b64 = base64.b64encode

EXAMPLES: dict[str, str | bytes] = {
    "invalid_json": "{not json",
    "bad_base64": json.dumps({"mime_type": "audio/pcm", "data": "***"}),
    "unknown_mime_type": json.dumps({"mime_type": "video/mp4", "data": "AAAA"}),
    "oversize_frame": b"\x00" * 4098,
    "unknown_message": json.dumps({"hello": "world"}),
    "invalid_message": json.dumps({"mime_type": "text/plain", "data": ""}),
    "empty_audio": b"",
    "invalid_audio": b"\x00" * 641,
}


@pytest.mark.parametrize("code", sorted(EXAMPLES))
def test_each_code_has_a_frame_that_produces_it(code: str) -> None:
    assert code_of(decode(EXAMPLES[code])) == code


def test_every_code_is_covered_by_an_example() -> None:
    assert set(EXAMPLES) | {"rate_limited"} == set(VIOLATION_CODES)


def test_well_formed_frames_decode_to_events() -> None:
    pcm = b"\x01\x02" * 320
    assert decode(pcm) == ev.ClientAudio(pcm)
    assert decode(json.dumps({"mime_type": "audio/pcm", "data": b64(pcm).decode()})) == (
        ev.ClientAudio(pcm)
    )
    assert decode(json.dumps({"mime_type": "text/plain", "data": "Hi"})) == ev.ClientText("Hi")
    assert decode(json.dumps({"end_session": True})) == ev.ClientEnd()
    assert decode(json.dumps({"type": "pong", "seq": 3})) == ev.HeartbeatAck()
    assert decode(json.dumps({"type": "auth", "token": "t"})) == AuthMessage(type="auth", token="t")


def test_deep_nesting_is_invalid_json_not_a_recursion_error() -> None:
    roomy = ProtocolLimits(max_frame_bytes=64 * 1024)
    assert code_of(decode("[" * 5000, roomy)) == "invalid_json"
    assert code_of(decode('{"a":' * 3000 + "1" + "}" * 3000, roomy)) == "invalid_json"
    nested = '{"mime_type": "audio/pcm", "data": ' + "[" * 900 + "]" * 900 + "}"
    assert code_of(decode(nested, roomy)) == "invalid_message"


def test_the_frame_limit_counts_utf8_bytes_not_characters() -> None:
    text = json.dumps({"mime_type": "text/plain", "data": "é" * 1500}, ensure_ascii=False)
    limits = ProtocolLimits(max_frame_bytes=2048)
    assert len(text) < 2048 < len(text.encode())
    assert code_of(decode(text, limits)) == "oversize_frame"


def test_an_unknown_mime_type_is_not_echoed_back_whole() -> None:
    mime = "x" * 3000
    result = decode(json.dumps({"mime_type": mime, "data": ""}))
    assert code_of(result) == "unknown_mime_type"
    assert isinstance(result, ProtocolViolation)
    assert len(result.message) < 200
    assert mime not in result.message


def test_odd_length_pcm_is_refused_both_ways() -> None:
    result = decode(b"\x00" * 641)
    assert code_of(result) == "invalid_audio"
    assert isinstance(result, ProtocolViolation)
    assert "641" in result.message
    encoded = json.dumps({"mime_type": "audio/pcm", "data": b64(b"\x00" * 3).decode()})
    assert code_of(decode(encoded)) == "invalid_audio"


# ----------------------------------------------------------------------------- rate limit


def test_a_burst_is_throttled_told_once_and_does_not_count_as_errors() -> None:
    decoder = ClientDecoder(ProtocolLimits(messages_per_second=50, burst=10, max_errors=3))
    results = [decoder.decode(b"\x00\x00", 0.0) for _ in range(450)]
    dropped = [r for r in results if isinstance(r, ProtocolViolation)]
    assert len(dropped) == 440
    assert {r.code for r in dropped} == {"rate_limited"}
    assert [r.tell_client for r in dropped].count(True) == 1
    assert decoder.errors == 0
    assert decoder.throttled == 440
    assert not decoder.too_many_errors
    assert decoder.decode(b"\x00\x00", 1.0) == ev.ClientAudio(b"\x00\x00")


def test_a_new_burst_after_a_calm_second_is_told_again() -> None:
    decoder = ClientDecoder(ProtocolLimits(messages_per_second=10, burst=2))
    first = [decoder.decode(b"\x00\x00", 0.0) for _ in range(5)]
    second = [decoder.decode(b"\x00\x00", 5.0) for _ in range(5)]
    told = [r for r in first + second if isinstance(r, ProtocolViolation) and r.tell_client]
    assert len(told) == 2


def test_sustained_flooding_ends_the_session() -> None:
    limits = ProtocolLimits(messages_per_second=50, burst=10, max_throttled_s=10)
    decoder = ClientDecoder(limits)
    now = 0.0
    while now < 9.9:  # 200 messages a second, four times the rate, for just under 10 s
        decoder.decode(b"\x00\x00", now)
        now += 0.005
    assert not decoder.too_many_errors
    while now < 10.5:
        decoder.decode(b"\x00\x00", now)
        now += 0.005
    assert decoder.too_many_errors
    assert decoder.errors == 0  # ended for throttling, not for protocol errors


# ----------------------------------------------------------------------------- fuzz

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["audio/pcm", "text/plain", "pong", "auth", "audio/pcm;rate=16000"])
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["mime_type", "data", "type", "token", "seq", "end_session", "x"])
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=30,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "mime_type": st.sampled_from(["audio/pcm", "text/plain", "audio/pcm;rate=9", "x"])
        | json_leaves,
        "data": st.binary(max_size=64).map(lambda b: b64(b).decode()) | json_values,
        "type": st.sampled_from(["pong", "auth", "ping"]) | json_leaves,
        "token": json_leaves,
        "seq": json_leaves,
        "end_session": json_leaves,
    },
)


def deep(depth: int, opener: str) -> str:
    """Well-formed JSON nested ``depth`` levels (objects or arrays)."""
    if opener == "{":
        return '{"a":' * depth + "1" + "}" * depth
    return "[" * depth + "]" * depth


frames: st.SearchStrategy[Any] = st.one_of(
    st.binary(max_size=5000),
    st.text(max_size=2000),
    json_values.map(json.dumps),
    message_like.map(json.dumps),
    st.builds(deep, st.integers(0, 20_000), st.sampled_from(["[", "{"])),
    st.builds(lambda n, tail: "[" * n + tail, st.integers(0, 6000), st.text(max_size=10)),
    st.text(alphabet=st.characters(categories=["Cs"]), max_size=8),  # lone surrogates
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(frames, st.floats(0, 0.05)), min_size=1, max_size=12))
def test_no_frame_makes_the_decoder_raise(sequence: list[tuple[Any, float]]) -> None:
    decoder = ClientDecoder(
        ProtocolLimits(max_frame_bytes=16_384, messages_per_second=100, burst=5, max_errors=0)
    )
    now = 0.0
    for frame, step in sequence:
        now += step
        result = decoder.decode(frame, now)
        assert isinstance(
            result,
            ev.ClientAudio | ev.ClientText | ev.ClientEnd | ev.HeartbeatAck | AuthMessage,
        ) or (isinstance(result, ProtocolViolation) and result.code in VIOLATION_CODES)
        if isinstance(result, ProtocolViolation):
            result.to_message().model_dump_json()  # always sendable
            assert len(result.message) < 400
