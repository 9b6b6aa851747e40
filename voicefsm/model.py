"""Plain data: states, end reasons, the session configuration and the persisted session record.

Everything here is data a store can persist or a host can validate; nothing here does I/O or
keeps time. Times are seconds since the Unix epoch as floats (virtual in tests), so a deadline
written by one worker means the same instant on another.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    computed_field,
    model_serializer,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass


class State(enum.StrEnum):
    """The five states of an interview session."""

    CONNECTING = "connecting"
    """The first upstream connection is being opened."""
    LIVE = "live"
    """Audio flows both ways."""
    WARNING = "warning"
    """As ``live``, after the end-of-interview warning was given."""
    RESUMING = "resuming"
    """The upstream was lost or is rotating; reconnecting with the best resumption handle."""
    ENDED = "ended"
    """Absorbing; carries exactly one :class:`EndReason`."""


class EndReason(enum.StrEnum):
    """Why a session ended; exactly one per ended session."""

    USER_ENDED = "user_ended"
    """The client asked to end."""
    TIME_LIMIT = "time_limit"
    """The wall-clock deadline was reached."""
    DISCONNECTED = "disconnected"
    """The client left (or stopped answering heartbeats) and did not return within the grace."""
    UPSTREAM_LOST = "upstream_lost"
    """The upstream could not be resumed: no usable handle, attempts or time exhausted."""
    ERROR = "error"
    """Unrecoverable: context exhausted (1007), policy (1008), protocol or internal error."""


class SessionConfig(BaseModel):
    """How one interview session behaves. All durations are in seconds.

    The defaults suit a 45-minute spoken interview on the Gemini Live API. Invalid combinations
    (a warning longer than the interview, a heartbeat timeout shorter than its interval, ...)
    fail at construction with a message naming the fields involved.

    Durations that drive timers have lower bounds (1 s for the interview and the handle TTL,
    50 ms for the heartbeat interval and the connect timeout, 1 ms for the retry delays): far
    above the resolution of an epoch-seconds float (about 0.2 µs today), so every timer moves
    time forward, and low enough for tests on a real clock. Shorter values are refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    time_limit_s: float = Field(45 * 60, ge=1, description="Length of the interview (>= 1 s).")
    warning_before_s: float = Field(
        5 * 60,
        ge=0,
        description="Warn the client and prompt the interviewer this long before the end.",
    )
    wrap_up_prompt: str = Field(
        "The interview has about {minutes} minutes left. Finish the current question, then "
        "wrap up politely and invite the candidate's final questions.",
        min_length=1,
        description="Text sent to the interviewer model at the warning; {minutes} is filled in.",
    )
    heartbeat_interval_s: float = Field(
        15, ge=0.05, description="How often the client is pinged (>= 50 ms)."
    )
    heartbeat_timeout_s: float = Field(
        45,
        ge=0.1,
        description="Client silence (no message at all) after which it counts as gone (>= 0.1 s).",
    )
    client_grace_s: float = Field(
        60, ge=0, description="How long a gone client may take to come back to the same session."
    )
    connect_timeout_s: float = Field(
        10,
        ge=0.05,
        description="How long an upstream connection may take to become ready (>= 50 ms).",
    )
    resume_backoff_base_s: float = Field(0.25, ge=0.001, description="First retry delay (>= 1 ms).")
    resume_backoff_cap_s: float = Field(8, ge=0.001, description="Largest retry delay (>= 1 ms).")
    resume_backoff_jitter: float = Field(
        0.5, ge=0, le=1, description="Each delay is scaled by a random factor in [1 - j, 1 + j]."
    )
    resume_max_attempts: int = Field(
        6, ge=1, description="Connection attempts per outage before giving up."
    )
    min_remaining_to_resume_s: float = Field(
        10, ge=0, description="Below this much interview time left, an outage ends the session."
    )
    goaway_margin_s: float = Field(
        1.0, ge=0, description="Rotate this long before a GoAway's time_left runs out."
    )
    handle_ttl_s: float = Field(
        2 * 60 * 60, ge=1, description="A resumption handle older than this is not used (>= 1 s)."
    )
    compression_trigger_tokens: int = Field(
        64_000, gt=0, description="Context-window compression starts at this many tokens."
    )
    compression_target_tokens: int = Field(
        32_000, gt=0, description="Compression cuts the context down to this many tokens."
    )
    resume_buffer_max_bytes: int = Field(
        16_000 * 2 * 20,
        ge=0,
        description="Client audio kept while resuming (default: 20 s of 16 kHz 16-bit PCM).",
    )
    forward_transcripts: bool = Field(
        False,
        description="Send finished transcript lines to the client (off: they stay server-side).",
    )
    upstream_ping_interval_s: float = Field(
        5.0,
        ge=0.1,
        description=(
            "How often the host pings the upstream connection (a websocket ping) to notice a "
            "silent one; the check is the host's, the engine only carries the setting."
        ),
    )
    upstream_pong_timeout_s: float = Field(
        4.0,
        ge=0.1,
        description=(
            "A ping not answered within this long makes the host treat the upstream as dead and "
            "report it closed (resumable). Together with the interval this bounds how long a "
            "silent upstream goes unnoticed (about interval + timeout); too short a timeout "
            "raises false alarms on a slow network or a busy event loop."
        ),
    )
    max_log_entries: int = Field(
        500,
        ge=10,
        description=(
            "Bound of the record's event log. When full, the log keeps its first half (how the "
            "interview began) and the newest entries; the oldest of the newer half is dropped "
            "and counted in SessionRecord.log_dropped."
        ),
    )

    @model_validator(mode="after")
    def _check_relations(self) -> SessionConfig:
        problems: list[str] = []
        if self.warning_before_s >= self.time_limit_s:
            problems.append(
                f"warning_before_s ({self.warning_before_s}) must be shorter than "
                f"time_limit_s ({self.time_limit_s})"
            )
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            problems.append(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be longer than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}), or every client times out"
            )
        if self.resume_backoff_cap_s < self.resume_backoff_base_s:
            problems.append(
                f"resume_backoff_cap_s ({self.resume_backoff_cap_s}) must be at least "
                f"resume_backoff_base_s ({self.resume_backoff_base_s})"
            )
        if self.compression_target_tokens >= self.compression_trigger_tokens:
            problems.append(
                f"compression_target_tokens ({self.compression_target_tokens}) must be below "
                f"compression_trigger_tokens ({self.compression_trigger_tokens})"
            )
        if self.min_remaining_to_resume_s >= self.time_limit_s:
            problems.append(
                f"min_remaining_to_resume_s ({self.min_remaining_to_resume_s}) must be shorter "
                f"than time_limit_s ({self.time_limit_s})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TranscriptLine(BaseModel):
    """One finished utterance, numbered in the order the session recorded it."""

    model_config = ConfigDict(frozen=True)

    seq: int = Field(ge=0, description="Position in the session's transcript, from 0.")
    role: Literal["user", "interviewer"]
    text: str
    at: float = Field(description="When it was recorded (epoch seconds).")


class SessionStats(BaseModel):
    """Counters a session keeps; persisted with the record and shown in summaries."""

    resumes: int = 0
    """Outages or rotations that ended with a ready upstream."""
    connect_attempts: int = 0
    """Upstream connections asked for, first one included."""
    goaways: int = 0
    chunks_buffered: int = 0
    """Client audio chunks held while the upstream was not ready."""
    chunks_flushed: int = 0
    """Buffered chunks sent upstream once it was ready again."""
    chunks_overflowed: int = 0
    """Client audio chunks refused because the resume buffer was full (reported to the client)."""
    bytes_overflowed: int = 0
    chunks_unsent_at_end: int = 0
    """Buffered chunks still waiting when the session ended."""
    upstream_audio_unsent: int = 0
    """Chunks the host reported as never reaching a model (in flight at the end, written into a
    dead connection): :class:`voicefsm.events.UpstreamAudioUnsent`."""
    transcript_lines: int = 0
    ignored_resumption_updates: int = 0
    """Updates with resumable=false or an empty handle (they never replace a good handle)."""
    unknown_events: int = 0
    tool_calls: int = 0
    last_prompt_tokens: int | None = None
    """The most recent usage report's prompt size: how full the context window is."""


class LogKind(enum.StrEnum):
    """What a :class:`LogEntry` records; which optional fields each kind fills is listed here."""

    STATE = "state"
    """A state change: ``state_from``, ``state_to``, ``why``."""
    UPSTREAM_OPENED = "upstream_opened"
    """A connection was asked for: ``connection_id``, ``count`` (the attempt in this outage,
    from 1), ``handle_age_s`` (age of the resumption handle it resumes; absent: a fresh one)."""
    UPSTREAM_READY = "upstream_ready"
    """A connection answered setup: ``connection_id``, ``gap_s`` (since the session stopped
    sending upstream: the loss, the rotation, or the start for the first connection),
    ``handle_age_s`` (of the handle it resumed)."""
    GOAWAY = "goaway"
    """The server announced the end of a connection: ``connection_id``, ``time_left_s``
    (absent when the GoAway had no parsable ``time_left``); ``why`` says when the connection is
    kept because it outlives the deadline."""
    UPSTREAM_CLOSED = "upstream_closed"
    """The current connection closed, failed, or was abandoned (connect timeout):
    ``connection_id``, ``close_code`` (absent: no close frame), ``why``."""
    ROTATION = "rotation"
    """The session closed a working connection to move to a new one (after a GoAway):
    ``connection_id`` (the one closed), ``why``, ``handle_age_s`` (of the handle to resume)."""
    ROTATION_SKIPPED = "rotation_skipped"
    """A rotation was due but no connection could follow it (too little interview left, no
    usable handle): the working connection is kept as long as it lasts. ``connection_id``,
    ``why``."""
    WARNING = "warning"
    """The end-of-interview warning was given: ``time_left_s`` (interview time left)."""
    CLIENT_LEFT = "client_left"
    """The client went away (closed, or stopped answering heartbeats): ``why``."""
    CLIENT_BACK = "client_back"
    """A client (re)attached: ``gap_s`` (how long it was away; absent when not known)."""
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    """The client sent nothing for ``gap_s`` seconds (a ``client_left`` entry follows)."""
    AUDIO_OVERFLOW = "audio_overflow"
    """The resume buffer was full: the first refused chunk of an outage (``count``: bytes the
    buffer holds). Totals are in the stats."""
    AUDIO_UNSENT = "audio_unsent"
    """Audio at risk: ``count`` candidate chunks never reached a model, ``why`` says where (left
    in the buffer at the end, or reported by the host as lost at the upstream)."""
    USAGE = "usage"
    """Token usage so far: ``count`` (total tokens summed over the session). Logged for the first
    report, then at most once per ``USAGE_LOG_INTERVAL_S`` of :mod:`voicefsm.engine`; the full
    sums are in :attr:`SessionRecord.usage`."""
    RESTORED = "restored"
    """The session was rebuilt from its record (a take-over or restart) and started again:
    ``state_from`` (the state it was stored in), ``state_to`` (``resuming``), ``why``."""
    END = "end"
    """The session ended: ``state_from``, ``reason``, ``why`` (the end detail)."""


@pydantic_dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of a session's event log: a time, a kind and the few fields that kind uses.

    Unused fields are ``None`` and left out of the JSON, so a stored entry is a handful of keys.
    A frozen dataclass (about 130 bytes), because a session keeps up to
    ``SessionConfig.max_log_entries`` of them.
    """

    at: float
    """When it happened (epoch seconds)."""
    kind: LogKind
    why: str | None = None
    state_from: State | None = None
    state_to: State | None = None
    reason: EndReason | None = None
    connection_id: int | None = None
    close_code: int | None = None
    time_left_s: float | None = None
    gap_s: float | None = None
    handle_age_s: float | None = None
    count: int | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


def _no_modalities() -> dict[str, int]:
    return {}


class SessionUsage(BaseModel):
    """What the session consumed: the upstream's usage reports summed, and audio each way.

    Token counts are the sums of every ``usageMetadata`` report (the Live API reports usage per
    turn); ``*_by_modality`` sums its ``prompt_tokens_details`` / ``response_tokens_details``
    (keys as the server names them: ``"AUDIO"``, ``"TEXT"``, ...), present only when the server
    gives them. Audio is counted in bytes and shown in seconds: candidate audio handed to the
    upstream (16 kHz 16-bit mono) and interviewer audio received from it (24 kHz 16-bit mono).
    No prices here: a cost is computed from these sums by whoever knows the prices.
    """

    reports: int = 0
    """Usage reports received."""
    prompt_tokens: int = 0
    response_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    thoughts_tokens: int = 0
    prompt_tokens_by_modality: dict[str, int] = Field(default_factory=_no_modalities)
    response_tokens_by_modality: dict[str, int] = Field(default_factory=_no_modalities)
    client_audio_bytes: int = 0
    """Candidate audio sent upstream (forwarded live or flushed after a resume)."""
    model_audio_bytes: int = 0
    """Interviewer audio received from the upstream."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def client_audio_s(self) -> float:
        """Seconds of candidate audio sent upstream (16 kHz 16-bit mono)."""
        return self.client_audio_bytes / CLIENT_AUDIO_BYTES_PER_S

    @computed_field  # type: ignore[prop-decorator]
    @property
    def model_audio_s(self) -> float:
        """Seconds of interviewer audio received (24 kHz 16-bit mono)."""
        return self.model_audio_bytes / MODEL_AUDIO_BYTES_PER_S


CLIENT_AUDIO_BYTES_PER_S = 16_000 * 2
"""Candidate audio: 16 kHz, 16-bit, mono PCM."""
MODEL_AUDIO_BYTES_PER_S = 24_000 * 2
"""Interviewer audio: 24 kHz, 16-bit, mono PCM."""


class PendingItem(BaseModel):
    """Client input held while the upstream is not ready: audio bytes or a text turn."""

    # Audio is arbitrary bytes: JSON carries it as base64 (pydantic's default is UTF-8).
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    audio: bytes | None = None
    text: str | None = None


class SessionRecord(BaseModel):
    """Everything a store persists about a session; :meth:`voicefsm.Session.restore` reads it back.

    The deadline is absolute: it was fixed when the session started and holds across
    reconnects, restarts and workers.
    """

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    session_id: str
    owner: str | None = None
    """Who the session belongs to (a user id); only they may re-attach to it."""
    config: SessionConfig
    state: State
    started_at: float
    deadline: float
    end_reason: EndReason | None = None
    end_detail: str | None = None
    ended_at: float | None = None
    warning_given: bool = False
    resumption_handle: str | None = None
    handle_received_at: float | None = None
    conversation_started: bool = False
    """Something was said: from here on only a resumption handle may reconnect."""
    client_connected: bool = False
    transcript_count: int = 0
    pending: list[PendingItem] = Field(default_factory=list)
    stats: SessionStats = Field(default_factory=SessionStats)
    usage: SessionUsage = Field(default_factory=SessionUsage)
    log: list[LogEntry] = Field(default_factory=list)
    """The bounded event log, oldest first (see :class:`LogKind` and
    ``SessionConfig.max_log_entries``). Records written before the log existed load with none."""
    log_dropped: int = 0
    """Entries dropped at the bound, from between the first half and the newest entries."""
