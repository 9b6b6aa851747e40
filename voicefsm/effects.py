"""Output effects: what a :class:`voicefsm.Session` asks its host to do.

The host carries them out in the order given. Small immutable classes, cheap to create.
"""

from __future__ import annotations

from dataclasses import dataclass

from voicefsm.model import LogEntry, SessionRecord, State, TranscriptLine
from voicefsm.protocol import ServerMessage


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Open upstream connection ``connection_id``, resuming ``handle`` (``None``: a fresh one).

    Report its events with this ``connection_id``; a connection that does not become ready in
    ``SessionConfig.connect_timeout_s`` is abandoned by the session (a :class:`CloseUpstream`).
    """

    connection_id: int
    handle: str | None
    attempt: int


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close upstream connection ``connection_id`` (a rotation, an abandoned attempt, the end)."""

    connection_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class SendAudioUpstream:
    """Send a chunk of candidate audio to the current upstream connection."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendTextUpstream:
    """Send a text turn to the current upstream connection (candidate text, wrap-up prompt)."""

    text: str


@dataclass(frozen=True, slots=True)
class SendAudioToClient:
    """Play a chunk of interviewer audio on the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send a JSON message to the client (dropped by the host when no client is attached)."""

    message: ServerMessage


@dataclass(frozen=True, slots=True)
class RecordTranscript:
    """Append a finished transcript line to the session's stored transcript."""

    line: TranscriptLine


@dataclass(frozen=True, slots=True)
class PersistRecord:
    """Save the session record (state, deadline, best handle, counters)."""

    record: SessionRecord


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close the client connection with a websocket close code and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The session moved from ``previous`` to ``state`` at ``at``, because ``why``. For logs."""

    previous: State
    state: State
    why: str
    at: float


@dataclass(frozen=True, slots=True)
class Logged:
    """An entry was added to the session's event log (the record keeps it, within its bound).

    Every entry is emitted, including ones the bound later drops from the record, so a host can
    feed a structured observer (metrics, traces, an operator view) without parsing log text.
    Nothing to carry out.
    """

    entry: LogEntry


Effect = (
    OpenUpstream
    | CloseUpstream
    | SendAudioUpstream
    | SendTextUpstream
    | SendAudioToClient
    | SendToClient
    | RecordTranscript
    | PersistRecord
    | CloseClient
    | StateChanged
    | Logged
)
"""Any output effect."""

__all__ = [
    "CloseClient",
    "CloseUpstream",
    "Effect",
    "Logged",
    "OpenUpstream",
    "PersistRecord",
    "RecordTranscript",
    "SendAudioToClient",
    "SendAudioUpstream",
    "SendTextUpstream",
    "SendToClient",
    "StateChanged",
]
