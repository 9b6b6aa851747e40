"""uvicorn protocols for the interview server.

:class:`HeaderDeadlineH11Protocol` is uvicorn's h11 protocol with a deadline for each request's
headers. uvicorn closes idle keep-alive connections only *after* a response, so a TCP
connection that never sends a request, or trickles its headers (slow loris), stays open
forever. This protocol closes a connection that has not sent a complete request head within
``header_timeout_s`` of connecting (or of its previous response). A websocket upgrade ends the
deadline: from then on the interview service's own authentication deadline applies.

:class:`QueueingWebSocketProtocol` is uvicorn's ``websockets-sansio`` websocket protocol
pausing the socket only once a few messages wait for the application, instead of after each,
and offering the application to *push* a connection's messages: once the application has read
what it needs (the authentication), it switches the connection over and the protocol calls it
back with each message straight from ``data_received`` — no ASGI queue, no task woken per
message. :class:`MessagePush` is that switch, found in the websocket scope as
``scope["extensions"]["voicefsm.push"]``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from voicefsm.service import PUSH_EXTENSION

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


MessageTarget = Callable[[bytes | str | None], None]
"""Called with each whole message of a pushing connection (``bytes``: binary, ``str``: text),
and once with ``None`` when the connection is gone (closed by either side, or lost)."""


class MessagePush:
    """Switches one websocket connection from ``receive()`` to callbacks.

    The application calls :meth:`start` once, after ``websocket.accept`` and once it has read
    by ``receive()`` what it needed; it must not call ``receive()`` again (it raises). The
    target is called synchronously from the protocol's ``data_received``: it must not block
    and must not raise. :meth:`pause` and :meth:`resume` are the application's backpressure:
    while paused the socket is not read (TCP holds the client back) and messages of the
    last read that were not yet delivered are held, in order, until :meth:`resume`.
    """

    __slots__ = ("_protocol", "handed_over")

    def __init__(self, protocol: QueueingWebSocketProtocol) -> None:
        self._protocol = protocol
        self.handed_over = 0
        """Messages that had been queued for ``receive()`` and :meth:`start` delivered first."""

    def start(self, target: MessageTarget) -> None:
        """Call ``target`` with every message from now on, starting with the queued ones."""
        self._protocol._start_pushing(self, target)

    def pause(self) -> None:
        """Stop delivering messages (and reading the socket) until :meth:`resume`."""
        self._protocol._pause_pushing()

    def resume(self) -> None:
        """Deliver the held messages, then read the socket again (unless paused meanwhile)."""
        self._protocol._resume_pushing()


class _HandOverQueue(asyncio.Queue[Any]):
    """uvicorn's per-connection ASGI queue; once the connection pushes, what uvicorn puts in
    it (its disconnect messages, from every place that makes one) goes to the target instead."""

    def __init__(self, protocol: QueueingWebSocketProtocol) -> None:
        super().__init__()
        self._protocol = protocol

    def put_nowait(self, item: Any) -> None:
        if self._protocol._push_target is None:
            super().put_nowait(item)
        else:
            self._protocol._hand_over(item)


class QueueingWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol with a queue of a few messages per connection,
    and the option to push messages to the application (:class:`MessagePush`).

    uvicorn pauses reading the socket after *every* message and resumes once the application
    took it: two changes of the event loop's selector per client chunk (50 a second per
    interview). This protocol pauses only once ``max_queued_messages`` wait unread, so a
    client that outpaces the application is still held back by TCP, with at most that many
    frames (each within ``ws_max_size``) buffered for it.

    A pushing connection has no queue: each message goes to the application's target as it is
    parsed, and the application's :meth:`MessagePush.pause` is what holds a fast client back.
    """

    max_queued_messages: int = MAX_QUEUED_MESSAGES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _HandOverQueue(self)
        self._push_target: MessageTarget | None = None
        self._push_paused = False
        self._push_gone = False
        self._held: deque[bytes | str | None] = deque()

    def handle_connect(self, event: Any) -> None:
        """Offer :class:`MessagePush` in the scope of an accepted upgrade."""
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][PUSH_EXTENSION] = MessagePush(self)

    async def receive(self) -> Any:
        """The next ASGI message (not once the connection pushes)."""
        if self._push_target is not None:
            raise RuntimeError("this websocket pushes its messages; receive() is not available")
        return await super().receive()

    def send_receive_event_to_app(self) -> None:
        """Push the message, or queue it, pausing reading only when the queue is full."""
        if self._push_target is not None:
            self._push_message()
            return
        if self.read_paused or self.queue.qsize() + 1 >= self.max_queued_messages:
            super().send_receive_event_to_app()
            return
        # uvicorn pauses unless it believes it already has: let it believe so for this one.
        self.read_paused = True
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = False

    # ---------------------------------------------------------------------- pushing

    def _push_message(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past the application's close: discarded, as uvicorn does
        message: bytes | str
        if self.curr_msg_data_type == "text":
            try:
                message = data.decode()
            except UnicodeDecodeError:
                self.logger.info("a websocket text message is not UTF-8; closing it with 1007")
                self.conn.send_close(1007)
                self.handle_parser_exception()  # its disconnect reaches the target
                return
        else:
            message = data
        self._deliver(message)

    def _deliver(self, message: bytes | str | None) -> None:
        if self._push_gone:
            return
        if message is None:
            self._push_gone = True
        if self._push_paused or self._held:
            self._held.append(message)
            return
        target = self._push_target
        assert target is not None
        target(message)

    def _hand_over(self, item: Any) -> None:
        """An ASGI message uvicorn queued, for a pushing connection."""
        kind = item.get("type")
        if kind == "websocket.disconnect":
            self._deliver(None)
        elif kind == "websocket.receive":
            text = item.get("text")
            self._deliver(text if text is not None else item.get("bytes") or b"")

    def _start_pushing(self, push: MessagePush, target: MessageTarget) -> None:
        if self._push_target is not None:
            raise RuntimeError("this websocket pushes its messages already")
        if not self.handshake_complete:
            raise RuntimeError("accept the websocket before switching it to push")
        self._push_target = target
        queued: asyncio.Queue[Any] = self.queue
        while not queued.empty():
            item = queued.get_nowait()
            if item.get("type") == "websocket.receive":
                push.handed_over += 1
            self._hand_over(item)
        if self.read_paused and not self._push_paused:  # the queue had filled up
            self.read_paused = False
            self.transport.resume_reading()

    def _pause_pushing(self) -> None:
        self._push_paused = True
        if not self.read_paused and not self.close_sent:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_pushing(self) -> None:
        if not self._push_paused:
            return
        self._push_paused = False
        target = cast(MessageTarget, self._push_target)
        held = self._held
        while held and not self._push_paused:  # the target may pause again
            target(held.popleft())
        if not self._push_paused and self.read_paused and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()


__all__ = [
    "HEADER_TIMEOUT_S",
    "MAX_QUEUED_MESSAGES",
    "PUSH_EXTENSION",
    "HeaderDeadlineH11Protocol",
    "MessagePush",
    "MessageTarget",
    "QueueingWebSocketProtocol",
]
