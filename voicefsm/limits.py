"""Admission limits of one worker: connections, sessions, sessions per user.

:class:`ServiceLimits` says how much one worker takes on; :class:`Admission` keeps the counts and
answers each new connection or session with a :class:`Refusal` (close code, error code, reason)
when it is over a limit. Nothing is queued: a refused client is told at once, with a code that
says whether to retry. See ``docs/protocol.md`` (Limits).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

CLOSE_TRY_AGAIN_LATER = 1013
"""Standard close code: the worker is at capacity (or the session is busy elsewhere); retry."""
CLOSE_TOO_MANY_SESSIONS = 4429
"""This user already runs as many sessions as allowed; end one first."""


class ServiceLimits(BaseModel):
    """How much one worker takes on. Every limit is per worker process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: int = Field(
        500,
        gt=0,
        description="Open websockets (authenticated or not); more are closed with 1013.",
    )
    max_sessions: int = Field(
        100,
        gt=0,
        description="Running sessions, each with its own model connection; a new session or a "
        "take-over beyond it is closed with 1013.",
    )
    max_sessions_per_user: int = Field(
        3,
        gt=0,
        description="Running sessions of one user (token `sub`) on this worker; a new session "
        "beyond it is closed with 4429. Re-attaching to a running session is always allowed.",
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection or session was refused, and how to tell the client."""

    close_code: int
    error_code: str
    reason: str


class Reservation:
    """A place for one session, held until :meth:`release` (idempotent)."""

    def __init__(self, admission: Admission, user_id: str) -> None:
        self._admission = admission
        self.user_id = user_id
        self._released = False

    def release(self) -> None:
        """Give the place back."""
        if self._released:
            return
        self._released = True
        self._admission._release(self)


class Admission:
    """Counts what one worker holds against :class:`ServiceLimits`."""

    def __init__(self, limits: ServiceLimits | None = None) -> None:
        self.limits = limits or ServiceLimits()
        self.connections = 0
        self.sessions = 0
        self._by_user: dict[str, int] = {}

    def connect(self) -> Refusal | None:
        """Count a new connection, or say why it is refused (then it is not counted)."""
        if self.connections >= self.limits.max_connections:
            return Refusal(
                CLOSE_TRY_AGAIN_LATER,
                "server_busy",
                f"this server has {self.limits.max_connections} connections open; retry later",
            )
        self.connections += 1
        return None

    def disconnect(self) -> None:
        """A counted connection closed."""
        self.connections = max(0, self.connections - 1)

    def reserve(self, user_id: str, *, new: bool = True) -> Reservation | Refusal:
        """A place for a session of ``user_id``: a new one, or (``new=False``) one taken over
        from another worker, which counts for the user but is not refused for the user's cap."""
        limits = self.limits
        if self.sessions >= limits.max_sessions:
            return Refusal(
                CLOSE_TRY_AGAIN_LATER,
                "server_busy",
                f"this server runs {limits.max_sessions} sessions, its limit; retry later",
            )
        if new and self._by_user.get(user_id, 0) >= limits.max_sessions_per_user:
            return Refusal(
                CLOSE_TOO_MANY_SESSIONS,
                "too_many_sessions",
                f"this user already runs {limits.max_sessions_per_user} session(s); "
                "end one, or re-attach to it with ?session=",
            )
        self.sessions += 1
        self._by_user[user_id] = self._by_user.get(user_id, 0) + 1
        return Reservation(self, user_id)

    def sessions_of(self, user_id: str) -> int:
        """Sessions of ``user_id`` currently counted."""
        return self._by_user.get(user_id, 0)

    def _release(self, reservation: Reservation) -> None:
        self.sessions = max(0, self.sessions - 1)
        user = reservation.user_id
        left = self._by_user.get(user, 0) - 1
        if left > 0:
            self._by_user[user] = left
        else:
            self._by_user.pop(user, None)


__all__ = [
    "CLOSE_TOO_MANY_SESSIONS",
    "CLOSE_TRY_AGAIN_LATER",
    "Admission",
    "Refusal",
    "Reservation",
    "ServiceLimits",
]
