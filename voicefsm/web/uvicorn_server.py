"""uvicorn protocols for the interview server.

:class:`HeaderDeadlineH11Protocol` is uvicorn's h11 protocol with a deadline for each request's
headers. uvicorn closes idle keep-alive connections only *after* a response, so a TCP
connection that never sends a request, or trickles its headers (slow loris), stays open
forever. This protocol closes a connection that has not sent a complete request head within
``header_timeout_s`` of connecting (or of its previous response). A websocket upgrade ends the
deadline: from then on the interview service's own authentication deadline applies.

:class:`QueueingWebSocketProtocol` is uvicorn's ``websockets-sansio`` websocket protocol
pausing the socket only once a few messages wait for the application, instead of after each.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

HEADER_TIMEOUT_S = 10.0
"""Seconds a connection has to send a complete request head."""


class HeaderDeadlineH11Protocol(H11Protocol):
    """:class:`uvicorn.protocols.http.h11_impl.H11Protocol` plus a request-head deadline."""

    header_timeout_s: float = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the deadline for the first request."""
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """Start the deadline for the next request on this keep-alive connection."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_expired)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_expired(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed already, or upgraded to a websocket
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being handled; its response re-arms the deadline
        self.transport.close()


MAX_QUEUED_MESSAGES = 8
"""Messages a websocket connection may hold for the application before its socket pauses."""


class QueueingWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol with a queue of a few messages per connection.

    uvicorn pauses reading the socket after *every* message and resumes once the application
    took it: two changes of the event loop's selector per client chunk (50 a second per
    interview). This protocol pauses only once ``max_queued_messages`` wait unread, so a
    client that outpaces the application is still held back by TCP, with at most that many
    frames (each within ``ws_max_size``) buffered for it.
    """

    max_queued_messages: int = MAX_QUEUED_MESSAGES

    def send_receive_event_to_app(self) -> None:
        """Queue the message; pause reading only when the queue is full."""
        if self.read_paused or self.queue.qsize() + 1 >= self.max_queued_messages:
            super().send_receive_event_to_app()
            return
        # uvicorn pauses unless it believes it already has: let it believe so for this one.
        self.read_paused = True
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = False


__all__ = [
    "HEADER_TIMEOUT_S",
    "MAX_QUEUED_MESSAGES",
    "HeaderDeadlineH11Protocol",
    "QueueingWebSocketProtocol",
]
