"""Plain data: states, end reasons, the session configuration and the persisted session record.

Everything here is data a store can persist or a host can validate; nothing here does I/O or
keeps time. Times are seconds since the Unix epoch as floats (virtual in tests), so a deadline
written by one worker means the same instant on another.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    time_limit_s: float = Field(45 * 60, gt=0, description="Length of the interview.")
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
    heartbeat_interval_s: float = Field(15, gt=0, description="How often the client is pinged.")
    heartbeat_timeout_s: float = Field(
        45, gt=0, description="Client silence (no message at all) after which it counts as gone."
    )
    client_grace_s: float = Field(
        60, ge=0, description="How long a gone client may take to come back to the same session."
    )
    connect_timeout_s: float = Field(
        10, gt=0, description="How long an upstream connection may take to become ready."
    )
    upstream_ping_interval_s: float | None = Field(
        2.0,
        gt=0,
        description="How often the host pings the upstream websocket (None: no liveness check).",
    )
    upstream_pong_timeout_s: float = Field(
        5.0,
        gt=0,
        description="A ping unanswered this long makes the upstream a resumable close (1006).",
    )
    resume_backoff_base_s: float = Field(0.25, gt=0, description="First retry delay.")
    resume_backoff_cap_s: float = Field(8, gt=0, description="Largest retry delay.")
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
        2 * 60 * 60, gt=0, description="A resumption handle older than this is not used."
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
    transcript_lines: int = 0
    ignored_resumption_updates: int = 0
    """Updates with resumable=false or an empty handle (they never replace a good handle)."""
    unknown_events: int = 0
    tool_calls: int = 0
    last_prompt_tokens: int | None = None
    """The most recent usage report's prompt size: how full the context window is."""


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
