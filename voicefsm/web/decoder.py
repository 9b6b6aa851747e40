"""The web boundary's decoder: client websocket frames in, events or coded violations out.

Pure and synchronous: :meth:`ClientDecoder.decode` takes one frame (``bytes`` or ``str``) and the
time, and returns a :mod:`voicefsm.events` event, an :class:`AuthMessage`, or a
:class:`ProtocolViolation` with a machine-readable code. It never raises, whatever the frame
holds (deep nesting, huge numbers, odd encodings), so one bad frame cannot kill a client link.
The wire format is described in ``docs/protocol.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voicefsm import events as ev
from voicefsm.protocol import ErrorMessage


class ClientAudioMessage(BaseModel):
    """Candidate audio as base64 JSON (binary frames are the cheaper way)."""

    model_config = ConfigDict(extra="forbid")

    mime_type: Literal["audio/pcm", "audio/pcm;rate=16000"]
    data: str


class ClientTextMessage(BaseModel):
    """A text turn typed by the candidate."""

    model_config = ConfigDict(extra="forbid")

    mime_type: Literal["text/plain"]
    data: str = Field(min_length=1, max_length=4000)


class EndSessionMessage(BaseModel):
    """The candidate ends the interview."""

    model_config = ConfigDict(extra="forbid")

    end_session: Literal[True]


class PongMessage(BaseModel):
    """Answer to a :class:`~voicefsm.protocol.Ping`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["pong"]
    seq: int | None = None


class AuthMessage(BaseModel):
    """In-band authentication, accepted only as the first message."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=8192)


class ProtocolLimits(BaseModel):
    """What a client may send. Bad frames are answered with an ``error`` message and counted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_frame_bytes: int = Field(
        256 * 1024,
        gt=0,
        description="Largest frame accepted, in bytes (text frames: UTF-8 bytes). The adapters "
        "and `voicefsm serve` make the websocket server itself refuse larger frames (close 1009).",
    )
    messages_per_second: float = Field(
        200, gt=0, description="Sustained message rate (20 ms audio is 50/s)."
    )
    burst: int = Field(400, gt=0, description="Messages allowed at once above the rate.")
    max_errors: int = Field(
        50,
        ge=0,
        description="Protocol errors after which the session ends with `error` (0: never). "
        "Throttled messages (`rate_limited`) do not count.",
    )
    max_throttled_s: float = Field(
        10.0,
        gt=0,
        description="A client kept over the rate this long without a one-second break ends the "
        "session with `error`; a shorter burst is only throttled.",
    )


ViolationCode = Literal[
    "invalid_json",
    "bad_base64",
    "unknown_mime_type",
    "oversize_frame",
    "rate_limited",
    "unknown_message",
    "invalid_message",
    "empty_audio",
    "invalid_audio",
]
"""Every code a :class:`ProtocolViolation` may carry."""

VIOLATION_CODES: tuple[str, ...] = get_args(ViolationCode)
"""The codes of :data:`ViolationCode`, in declaration order."""

_THROTTLE_GAP_S = 1.0
"""Drops less than this far apart belong to one throttling episode."""


class ProtocolViolation(BaseModel):
    """A frame the server could not accept: ``code`` for programs, ``message`` for people.

    ``tell_client`` is false for the repeats of a throttling episode: the client is told once
    that it is over the rate, not once per dropped frame.
    """

    model_config = ConfigDict(frozen=True)

    code: ViolationCode
    message: str
    tell_client: bool = True

    def to_message(self) -> ErrorMessage:
        """The ``error`` message that tells the client."""
        return ErrorMessage(code=self.code, message=self.message)


ClientFrame = ev.ClientAudio | ev.ClientText | ev.ClientEnd | ev.HeartbeatAck
"""What a well-formed client frame decodes to."""

Decoded = ClientFrame | AuthMessage | ProtocolViolation
"""What :meth:`ClientDecoder.decode` returns."""


def _preview(value: object, limit: int = 32) -> str:
    """A short, printable form of a client-supplied value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ClientDecoder:
    """Turns client frames into events, enforcing :class:`ProtocolLimits`; counts violations.

    ``decode(frame, now)`` returns an event, an :class:`AuthMessage`, or a
    :class:`ProtocolViolation`. ``too_many_errors`` tells the caller to end the session: after
    ``max_errors`` protocol errors, or a client kept over the rate for ``max_throttled_s``.
    """

    def __init__(self, limits: ProtocolLimits | None = None) -> None:
        self.limits = limits or ProtocolLimits()
        self.errors = 0
        """Protocol errors so far (throttled messages excluded)."""
        self.errors_by_code: dict[str, int] = {}
        """Every violation so far by code, throttled messages included."""
        self.throttled = 0
        """Messages dropped for the rate limit."""
        self._tokens = float(self.limits.burst)
        self._refilled_at: float | None = None
        self._episode_started: float | None = None
        self._last_drop = -math.inf
        self._sustained = False

    @property
    def too_many_errors(self) -> bool:
        """Whether the client broke the protocol often enough, or long enough, to be dropped."""
        return self._sustained or 0 < self.limits.max_errors <= self.errors

    def decode(self, frame: str | bytes, now: float) -> Decoded:
        """Decode one websocket frame received at ``now`` (seconds, any monotonic clock)."""
        try:
            return self._decode(frame, now)
        except Exception as error:  # a bug here must cost one frame, never the client link
            return self._violation(
                "invalid_message", f"the frame could not be decoded ({type(error).__name__})"
            )

    def _decode(self, frame: str | bytes, now: float) -> Decoded:
        if not self._take_token(now):
            return self._throttle(now)
        size = self._size(frame)
        if size > self.limits.max_frame_bytes:
            return self._violation(
                "oversize_frame",
                f"a frame of {size} bytes is over the {self.limits.max_frame_bytes}-byte "
                "limit; send audio in chunks of 20-100 ms",
            )
        if isinstance(frame, bytes | bytearray | memoryview):
            return self._pcm(bytes(frame), "an empty binary frame carries no audio")
        try:
            payload = json.loads(frame)
        except (ValueError, RecursionError):
            return self._violation("invalid_json", "a text frame must be one JSON object")
        if not isinstance(payload, dict):
            return self._violation("invalid_json", "a text frame must be one JSON object")
        return self._decode_object(payload)

    def _size(self, frame: str | bytes) -> int:
        if not isinstance(frame, str):
            return len(frame)
        if len(frame) > self.limits.max_frame_bytes:
            return len(frame)  # over the limit already; no need to encode it
        return len(frame.encode("utf-8", "surrogatepass"))

    def _decode_object(self, payload: dict[str, Any]) -> Decoded:
        try:
            if "mime_type" in payload:
                mime = payload["mime_type"]
                if mime == "text/plain":
                    return ev.ClientText(ClientTextMessage.model_validate(payload).data)
                if isinstance(mime, str) and mime.startswith("audio/pcm"):
                    audio = ClientAudioMessage.model_validate(payload)
                    return self._base64_audio(audio.data)
                return self._violation(
                    "unknown_mime_type",
                    f"mime_type {_preview(mime)} is not supported; use 'audio/pcm' "
                    "(16 kHz 16-bit mono) or 'text/plain'",
                )
            if "end_session" in payload:
                EndSessionMessage.model_validate(payload)
                return ev.ClientEnd()
            kind = payload.get("type")
            if kind == "pong":
                PongMessage.model_validate(payload)
                return ev.HeartbeatAck()
            if kind == "auth":
                return AuthMessage.model_validate(payload)
        except ValidationError as error:
            problem = error.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in problem["loc"])[:64] or "message"
            return self._violation("invalid_message", f"{where}: {problem['msg'][:200]}")
        return self._violation(
            "unknown_message",
            "expected audio ({'mime_type': 'audio/pcm', 'data': ...}), text, "
            "{'end_session': true} or {'type': 'pong'}",
        )

    def _base64_audio(self, data: str) -> ev.ClientAudio | ProtocolViolation:
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return self._violation("bad_base64", "audio data is not valid base64")
        return self._pcm(pcm, "the audio message carries no samples")

    def _pcm(self, pcm: bytes, empty: str) -> ev.ClientAudio | ProtocolViolation:
        if not pcm:
            return self._violation("empty_audio", empty)
        if len(pcm) % 2:
            return self._violation(
                "invalid_audio",
                f"16-bit PCM has an even number of bytes; this audio has {len(pcm)}",
            )
        return ev.ClientAudio(pcm)

    def _take_token(self, now: float) -> bool:
        limits = self.limits
        if self._refilled_at is not None:
            elapsed = max(0.0, now - self._refilled_at)
            self._tokens = min(
                float(limits.burst), self._tokens + elapsed * limits.messages_per_second
            )
        self._refilled_at = now
        if self._tokens >= 1.0 or math.isclose(self._tokens, 1.0):
            self._tokens -= 1.0
            return True
        return False

    def _throttle(self, now: float) -> ProtocolViolation:
        """Drop a message over the rate; tell the client once per episode of drops."""
        self.throttled += 1
        self.errors_by_code["rate_limited"] = self.errors_by_code.get("rate_limited", 0) + 1
        new_episode = self._episode_started is None or now - self._last_drop > _THROTTLE_GAP_S
        if new_episode:
            self._episode_started = now
        self._last_drop = now
        assert self._episode_started is not None
        if now - self._episode_started >= self.limits.max_throttled_s:
            self._sustained = True
        return ProtocolViolation(
            code="rate_limited",
            message=f"more than {self.limits.messages_per_second:g} messages per second; "
            "messages over the rate are dropped",
            tell_client=new_episode,
        )

    def _violation(self, code: ViolationCode, message: str) -> ProtocolViolation:
        self.errors += 1
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        return ProtocolViolation(code=code, message=message)


__all__ = [
    "VIOLATION_CODES",
    "AuthMessage",
    "ClientAudioMessage",
    "ClientDecoder",
    "ClientFrame",
    "ClientTextMessage",
    "Decoded",
    "EndSessionMessage",
    "PongMessage",
    "ProtocolLimits",
    "ProtocolViolation",
    "ViolationCode",
]
