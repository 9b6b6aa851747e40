"""Input events: everything a :class:`voicefsm.Session` reacts to.

Small immutable classes, cheap to create (an audio chunk arrives every 20 ms each way). Upstream
events come from :func:`voicefsm.classify_adk_event` or from a host's own upstream; client events
from a client adapter; :class:`Tick` from the host's timer, at :meth:`voicefsm.Session.next_timer`.

``connection_id`` on the upstream lifecycle events names the connection the host opened for an
:class:`voicefsm.effects.OpenUpstream`; an event about an older connection is ignored, so a late
close of a rotated-away connection cannot disturb the new one. ``None`` means "the current one".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UpstreamReady:
    """The upstream answered setup (``setupComplete``): audio may flow."""

    connection_id: int | None = None
    upstream_session_id: str | None = None


@dataclass(frozen=True, slots=True)
class ModelAudio:
    """A chunk of the interviewer's audio (24 kHz 16-bit PCM by default)."""

    data: bytes
    mime_type: str = "audio/pcm;rate=24000"


@dataclass(frozen=True, slots=True)
class InputTranscript:
    """Transcription of what the candidate said; ``finished`` marks a whole utterance."""

    text: str
    finished: bool


@dataclass(frozen=True, slots=True)
class OutputTranscript:
    """Transcription of what the interviewer said; ``finished`` marks a whole utterance."""

    text: str
    finished: bool


@dataclass(frozen=True, slots=True)
class TurnComplete:
    """The interviewer finished its turn: a turn boundary."""


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The candidate barged in; the client should drop queued interviewer audio."""


@dataclass(frozen=True, slots=True)
class ResumptionUpdate:
    """A session resumption update. Only ``resumable`` updates with a handle are kept."""

    handle: str | None
    resumable: bool


@dataclass(frozen=True, slots=True)
class GoAway:
    """The server will close this connection; ``time_left`` is a duration string like ``"50s"``."""

    time_left: str | None = None
    connection_id: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamClosed:
    """The upstream connection ended or could not be opened.

    ``code`` is the websocket close code (genai reports every close, even 1000, as an
    ``APIError`` with that code); ``None`` for a connection that failed without one (refused,
    reset, handshake rejected).
    """

    code: int | None
    reason: str = ""
    connection_id: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The upstream reported an error in-band (an event with an error code): unrecoverable."""

    code: str | None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """One token-usage report from the upstream (``usageMetadata``); the session sums them.

    ``*_by_modality`` are ``(modality, token_count)`` pairs from ``prompt_tokens_details`` /
    ``response_tokens_details``, with the modality as the server names it (``"AUDIO"``, ...).
    """

    prompt_tokens: int | None = None
    response_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    thoughts_tokens: int | None = None
    prompt_by_modality: tuple[tuple[str, int], ...] = ()
    response_by_modality: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ToolActivity:
    """The interviewer called a tool, or a tool's response went back (ADK runs the tool)."""

    name: str
    phase: str  # "call" or "response"


@dataclass(frozen=True, slots=True)
class Unknown:
    """Upstream content voicefsm does not interpret; counted, never an error."""

    description: str


@dataclass(frozen=True, slots=True)
class ClientAudio:
    """A chunk of the candidate's microphone audio (16 kHz 16-bit PCM)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ClientText:
    """A text turn typed by the candidate."""

    text: str


@dataclass(frozen=True, slots=True)
class ClientEnd:
    """The client asked to end the interview."""


@dataclass(frozen=True, slots=True)
class ClientGone:
    """The client's connection closed; it has the grace window to come back."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class ClientBack:
    """A client (re)attached to this session."""


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """The client answered a ping."""


@dataclass(frozen=True, slots=True)
class Fatal:
    """Something around the engine failed beyond recovery (the host crashed or was cancelled,
    the client broke the protocol too often): ends the session with ``error``."""

    detail: str


@dataclass(frozen=True, slots=True)
class UpstreamAudioUnsent:
    """The host reports ``chunks`` of candidate audio that never reached a model.

    For example chunks still in flight to the upstream at a normal end, or audio written into a
    connection that then proved dead. Pure bookkeeping, accepted in any state, even after the
    end: it adds to ``SessionStats.upstream_audio_unsent``, logs an ``audio_unsent`` entry and
    persists the record. ``reason`` says where it was lost, for the log.
    """

    chunks: int
    reason: str = ""

    def __post_init__(self) -> None:
        if self.chunks < 0:
            raise ValueError(f"UpstreamAudioUnsent.chunks must be >= 0, got {self.chunks}")


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: the host calls ``handle(Tick(), now)`` at ``next_timer()``."""


UpstreamEvent = (
    UpstreamReady
    | ModelAudio
    | InputTranscript
    | OutputTranscript
    | TurnComplete
    | Interrupted
    | ResumptionUpdate
    | GoAway
    | UpstreamClosed
    | UpstreamError
    | Usage
    | ToolActivity
    | Unknown
)
"""Events about the upstream (the Live model)."""

ClientEvent = ClientAudio | ClientText | ClientEnd | ClientGone | ClientBack | HeartbeatAck
"""Events about the client (the candidate's browser or app)."""

Event = UpstreamEvent | ClientEvent | UpstreamAudioUnsent | Fatal | Tick
"""Any input event."""

__all__ = [
    "ClientAudio",
    "ClientBack",
    "ClientEnd",
    "ClientEvent",
    "ClientGone",
    "ClientText",
    "Event",
    "Fatal",
    "GoAway",
    "HeartbeatAck",
    "InputTranscript",
    "Interrupted",
    "ModelAudio",
    "OutputTranscript",
    "ResumptionUpdate",
    "Tick",
    "ToolActivity",
    "TurnComplete",
    "Unknown",
    "UpstreamAudioUnsent",
    "UpstreamClosed",
    "UpstreamError",
    "UpstreamEvent",
    "UpstreamReady",
    "Usage",
]
