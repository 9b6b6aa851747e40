"""The ports a session host composes, in one place.

:class:`~voicefsm.host.SessionHost` runs one :class:`~voicefsm.Session` between

* a :class:`ClientChannel` (the candidate's websocket, or
  :class:`~voicefsm.memory.MemoryChannel` in tests),
* an :class:`Upstream` that opens :class:`UpstreamConnection` s to the model
  (:class:`voicefsm.adk.AdkUpstream`, or a direct google-genai one),
* a :class:`SessionSink` that persists records and transcript lines (a store), and
* optionally a :class:`HostObserver` that receives structured :data:`HostNote` s (state
  changes, upstream opens, closes and tear-downs, the end, and every engine log entry) for
  metrics, benchmarks and examples.

A new upstream, web framework or store plugs in by implementing these; nothing here imports
ADK, genai or a web framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from voicefsm import events as ev
from voicefsm.model import (
    EndReason,
    LogEntry,
    SessionConfig,
    SessionRecord,
    State,
    TranscriptLine,
)
from voicefsm.protocol import ServerMessage

ClientInput = ev.ClientAudio | ev.ClientText | ev.ClientEnd | ev.HeartbeatAck | ev.Fatal
"""What a client channel delivers."""

Report = Callable[[ev.Event], None]
"""How an upstream connection hands events to the session's inbox (never blocks)."""


class ClientChannel(Protocol):
    """The client side, as the host sees it."""

    async def receive(self) -> ClientInput | None:
        """The next message from the client; ``None`` once the client has gone."""
        ...

    async def send_audio(self, data: bytes) -> None:
        """Send interviewer audio."""
        ...

    async def send_message(self, message: ServerMessage) -> None:
        """Send a JSON message."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the connection to the client."""
        ...


ClientDelivery = Callable[[ClientInput | None], None]
"""Hands one client message to the host (``None``: the client has gone). Never blocks."""


@runtime_checkable
class PushClientChannel(ClientChannel, Protocol):
    """A client channel that hands messages over as they arrive, instead of being read.

    The host then runs no reader task for it: one hop less per client chunk (the channel's own
    receive callback puts the message straight into the session's inbox). ``receive`` is not
    called. Nothing waits for the session to take a message, so the host holds a fast client
    back itself: :meth:`pause_pushing` once its inbox holds
    :data:`~voicefsm.host.CLIENT_BACKLOG_HIGH` events, :meth:`resume_pushing` once the
    consumer caught up.
    """

    def start_pushing(self, deliver: ClientDelivery) -> None:
        """From now on call ``deliver`` with each message as it arrives (messages that arrived
        earlier first), and ``deliver(None)`` once when the client has gone."""
        ...

    def pause_pushing(self) -> None:
        """Deliver nothing more until :meth:`resume_pushing` (hold messages back, in order, and
        stop reading the client if the channel can)."""
        ...

    def resume_pushing(self) -> None:
        """Deliver the messages held back, then go on as before."""
        ...


class UpstreamConnection(Protocol):
    """One upstream connection, opened by :meth:`Upstream.open`.

    The host calls :meth:`close` exactly once, then :meth:`wait_closed` once, in a task beside
    its consumer and a little later (:data:`voicefsm.host.TEARDOWN_DEFER_S`, or at once when the
    session ended), so that tearing down an old connection does not compete with opening the new
    one.
    """

    def send_audio(self, data: bytes) -> None:
        """Queue candidate audio for sending, in order. Never blocks."""
        ...

    def send_text(self, text: str) -> None:
        """Queue a text turn for sending. Never blocks."""
        ...

    def close(self) -> list[bytes]:
        """Stop sending and reporting at once; leave the socket work to :meth:`wait_closed`.

        Returns the audio the next connection must send instead, in order: chunks accepted but
        never written to the socket, plus, when the connection proved dead (its liveness check
        failed), the chunks written since the peer last confirmed it had read everything. Must
        not block and must not report any event after it returned.
        """
        ...

    async def wait_closed(self) -> int:
        """Tear the connection down (bounded by the upstream's close timeout) and wait for it.

        Returns how many audio chunks were written to the socket without the peer confirming
        them (a closing handshake or a pong) and that :meth:`close` did not hand back: audio
        that may never have reached the model. 0 when everything was confirmed.
        """
        ...


class Upstream(Protocol):
    """Opens connections to the model. Each one reports its events through ``report``.

    A connection reports :class:`~voicefsm.events.UpstreamReady` once it can take audio and
    exactly one :class:`~voicefsm.events.UpstreamClosed` if it ends by itself (a close code, a
    failed connect, a failed liveness check), both tagged with ``connection_id``. It must never
    reconnect on its own: the session decides.
    """

    def open(
        self,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> UpstreamConnection:
        """Start opening connection ``connection_id`` (resuming ``handle``); never blocks."""
        ...

    async def forget(self, session_id: str) -> None:
        """Drop whatever the upstream keeps for ``session_id`` (the session ended or moved)."""
        ...


class SessionSink(Protocol):
    """Where the host persists records and transcript lines (a store, or ``store.fenced(...)``).

    Results (a store returns the new version from ``save``) are ignored.
    """

    async def save(self, record: SessionRecord) -> object:
        """Save the latest record of a session."""
        ...

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> object:
        """Append one finished transcript line."""
        ...


# ---------------------------------------------------------------------------------- observing


@dataclass(frozen=True, slots=True)
class StateNote:
    """The session changed state (``at``: the host's clock, epoch seconds)."""

    session_id: str
    previous: State
    state: State
    why: str
    at: float
    end_reason: EndReason | None
    """Set on the change into ``ended``."""


@dataclass(frozen=True, slots=True)
class UpstreamOpenNote:
    """The host asked the upstream for connection ``connection_id``."""

    session_id: str
    connection_id: int
    resuming: bool
    """Whether it resumes a handle (``False``: a fresh connection)."""
    attempt: int
    resent_chunks: int
    """Audio chunks a previous connection handed back, sent first on this one."""


@dataclass(frozen=True, slots=True)
class UpstreamCloseNote:
    """The host closed connection ``connection_id`` (its tear-down now runs beside the session)."""

    session_id: str
    connection_id: int
    reason: str
    handed_back_chunks: int
    """Chunks :meth:`UpstreamConnection.close` returned (re-sent on the next connection)."""


@dataclass(frozen=True, slots=True)
class UpstreamTornDownNote:
    """The tear-down of connection ``connection_id`` finished."""

    session_id: str
    connection_id: int
    seconds: float
    """From :meth:`UpstreamConnection.close` to the end of the tear-down."""
    unconfirmed_chunks: int
    """Chunks written but never confirmed by the peer (reported to the session as unsent)."""


@dataclass(frozen=True, slots=True)
class EndNote:
    """The session ended (once per session)."""

    session_id: str
    reason: EndReason
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class LogNote:
    """An entry the engine added to the session's event log (``fx.Logged``), passed on as is."""

    session_id: str
    entry: LogEntry


HostNote = (
    StateNote | UpstreamOpenNote | UpstreamCloseNote | UpstreamTornDownNote | EndNote | LogNote
)
"""Anything a :class:`HostObserver` receives."""

HostObserver = Callable[[HostNote], None]
"""Called synchronously, on the session's consumer, with each :data:`HostNote`; must not block."""

__all__ = [
    "ClientChannel",
    "ClientDelivery",
    "ClientInput",
    "EndNote",
    "HostNote",
    "HostObserver",
    "LogNote",
    "PushClientChannel",
    "Report",
    "SessionSink",
    "StateNote",
    "Upstream",
    "UpstreamCloseNote",
    "UpstreamConnection",
    "UpstreamOpenNote",
    "UpstreamTornDownNote",
]
