"""The server → client wire protocol: JSON messages, plus binary frames of raw PCM.

Server → client: interviewer audio as binary frames (16-bit PCM, 24 kHz) and the JSON messages
below, serialised with ``model_dump_json()``. Transcripts appear only when
``SessionConfig.forward_transcripts`` is set.

These are plain data the engine builds. What the client sends is decoded at the web boundary,
by :class:`voicefsm.web.decoder.ClientDecoder`. See ``docs/protocol.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

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
