"""Server → client messages of the recommended wire protocol (JSON, one object per frame).

Interviewer audio goes to the client as binary frames (see
:class:`voicefsm.effects.SendAudioToClient`); everything else is one of these models, serialised
with ``model_dump_json()``. Transcripts appear only when ``SessionConfig.forward_transcripts`` is
set.
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


ServerMessage = (
    SessionStateMessage
    | SessionWarning
    | SessionEnded
    | TurnStatus
    | ErrorMessage
    | Ping
    | TranscriptMessage
)
"""Any JSON message the server sends to the client."""
