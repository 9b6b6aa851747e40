"""The client wire protocol: JSON messages both ways, plus binary frames of raw PCM.

Server → client: interviewer audio as binary frames (16-bit PCM, 24 kHz) and the JSON messages
below, serialised with ``model_dump_json()``. Transcripts appear only when
``SessionConfig.forward_transcripts`` is set.

Client → server: binary frames of raw 16-bit 16 kHz PCM, or JSON:
``{"mime_type": "audio/pcm", "data": <base64>}``, ``{"mime_type": "text/plain", "data": "..."}``,
``{"end_session": true}``, ``{"type": "pong"}`` and, to authenticate in-band,
``{"type": "auth", "token": "..."}`` as the first message. :class:`ClientDecoder` turns frames into
:mod:`voicefsm.events` and every bad frame into a :class:`ProtocolViolation` with a
machine-readable code. See ``docs/protocol.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voicefsm import events as ev
from voicefsm.model import EndReason, State


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SessionStateMessage(_Message):
    """The session's state and the interview time left; sent on every change and on re-attach."""

    type: Literal["session_state"] = "session_state"
    state: State
    remaining_s: float


class SessionWarning(_Message):
    """The interview ends in ``remaining_s`` seconds."""

    type: Literal["session_warning"] = "session_warning"
    remaining_s: float


class SessionEnded(_Message):
    """The session ended; sent exactly once per session."""

    type: Literal["session_ended"] = "session_ended"
    reason: EndReason
    detail: str
    timestamp: float


class TurnStatus(_Message):
    """The interviewer finished its turn, or was interrupted (drop queued playback)."""

    type: Literal["turn_status"] = "turn_status"
    status: Literal["turn_complete", "interrupted"]


class ErrorMessage(_Message):
    """Something the client should know went wrong; ``code`` is machine-readable."""

    type: Literal["error"] = "error"
    code: str
    message: str


class Ping(_Message):
    """Heartbeat; the client answers with any message (a ``pong`` is enough)."""

    type: Literal["ping"] = "ping"
    seq: int


class TranscriptMessage(_Message):
    """A finished transcript line (only with ``forward_transcripts``)."""

    type: Literal["transcript"] = "transcript"
    role: Literal["user", "interviewer"]
    text: str


class SessionCreated(_Message):
    """First message on a new session: the id a client reconnects with, and its length."""

    type: Literal["session_created"] = "session_created"
    session_id: str
    time_limit_s: float


ServerMessage = (
    SessionCreated
    | SessionStateMessage
    | SessionWarning
    | SessionEnded
    | TurnStatus
    | ErrorMessage
    | Ping
    | TranscriptMessage
)
"""Any JSON message the server sends to the client."""


# ----------------------------------------------------------------------------- client → server


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
    """Answer to a :class:`Ping`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["pong"]
    seq: int | None = None


class AuthMessage(BaseModel):
    """In-band authentication, accepted only as the first message."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["auth"]
    token: str = Field(min_length=1)


class ProtocolLimits(BaseModel):
    """What a client may send. Bad frames are answered with an ``error`` message and counted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_frame_bytes: int = Field(
        256 * 1024, gt=0, description="Largest frame accepted (text or binary)."
    )
    messages_per_second: float = Field(
        200, gt=0, description="Sustained message rate (20 ms audio is 50/s)."
    )
    burst: int = Field(400, gt=0, description="Messages allowed at once above the rate.")
    max_errors: int = Field(
        50,
        ge=0,
        description="Protocol errors after which the session ends with `error` (0: never).",
    )


class ProtocolViolation(BaseModel):
    """A frame the server could not accept: ``code`` for programs, ``message`` for people."""

    model_config = ConfigDict(frozen=True)

    code: Literal[
        "invalid_json",
        "bad_base64",
        "unknown_mime_type",
        "oversize_frame",
        "rate_limited",
        "unknown_message",
        "invalid_message",
        "empty_audio",
    ]
    message: str

    def to_message(self) -> ErrorMessage:
        """The ``error`` message that tells the client."""
        return ErrorMessage(code=self.code, message=self.message)


ClientFrame = ev.ClientAudio | ev.ClientText | ev.ClientEnd | ev.HeartbeatAck
"""What a well-formed client frame decodes to."""


class ClientDecoder:
    """Turns client frames into events, enforcing :class:`ProtocolLimits`; counts violations.

    ``decode(frame, now)`` returns an event, an :class:`AuthMessage`, or a
    :class:`ProtocolViolation`. ``too_many_errors`` tells the caller to end the session.
    """

    def __init__(self, limits: ProtocolLimits | None = None) -> None:
        self.limits = limits or ProtocolLimits()
        self.errors = 0
        self.errors_by_code: dict[str, int] = {}
        self._tokens = float(self.limits.burst)
        self._refilled_at: float | None = None

    @property
    def too_many_errors(self) -> bool:
        """Whether the client has broken the protocol more often than allowed."""
        return 0 < self.limits.max_errors <= self.errors

    def decode(
        self, frame: str | bytes, now: float
    ) -> ClientFrame | AuthMessage | ProtocolViolation:
        """Decode one websocket frame received at ``now`` (seconds, any monotonic clock)."""
        if not self._take_token(now):
            return self._violation(
                "rate_limited",
                f"more than {self.limits.messages_per_second:g} messages per second; "
                "this message was dropped",
            )
        if len(frame) > self.limits.max_frame_bytes:
            return self._violation(
                "oversize_frame",
                f"a frame of {len(frame)} bytes is over the {self.limits.max_frame_bytes}-byte "
                "limit; send audio in chunks of 20-100 ms",
            )
        if isinstance(frame, bytes):
            if not frame:
                return self._violation("empty_audio", "an empty binary frame carries no audio")
            return ev.ClientAudio(frame)
        try:
            payload = json.loads(frame)
        except ValueError:
            return self._violation("invalid_json", "a text frame must be one JSON object")
        if not isinstance(payload, dict):
            return self._violation("invalid_json", "a text frame must be one JSON object")
        return self._decode_object(payload)

    def _decode_object(
        self, payload: dict[str, Any]
    ) -> ClientFrame | AuthMessage | ProtocolViolation:
        try:
            if "mime_type" in payload:
                mime = payload["mime_type"]
                if mime == "text/plain":
                    return ev.ClientText(ClientTextMessage.model_validate(payload).data)
                if isinstance(mime, str) and mime.startswith("audio/pcm"):
                    audio = ClientAudioMessage.model_validate(payload)
                    return self._audio(audio.data)
                return self._violation(
                    "unknown_mime_type",
                    f"mime_type {mime!r} is not supported; use 'audio/pcm' (16 kHz 16-bit mono) "
                    "or 'text/plain'",
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
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "message"
            return self._violation("invalid_message", f"{where}: {problem['msg']}")
        return self._violation(
            "unknown_message",
            "expected audio ({'mime_type': 'audio/pcm', 'data': ...}), text, "
            "{'end_session': true} or {'type': 'pong'}",
        )

    def _audio(self, data: str) -> ev.ClientAudio | ProtocolViolation:
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return self._violation("bad_base64", "audio data is not valid base64")
        if not pcm:
            return self._violation("empty_audio", "the audio message carries no samples")
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

    def _violation(self, code: Any, message: str) -> ProtocolViolation:
        self.errors += 1
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        return ProtocolViolation(code=code, message=message)
