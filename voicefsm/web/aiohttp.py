"""aiohttp adapter: serve interviews from an ``aiohttp.web`` application.

app.router.add_get("/interview", interview_handler(service))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import WSMsgType, web

from voicefsm.service import SUBPROTOCOL, InterviewService


class AiohttpTransport:
    """An ``aiohttp`` websocket request as a :class:`voicefsm.service.Transport`."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._ws: web.WebSocketResponse | None = None
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        self.subprotocols: Sequence[str] = [p.strip() for p in offered.split(",") if p.strip()]
        self.query: Mapping[str, str] = dict(request.query)
        self.origin: str | None = request.headers.get("Origin")

    @property
    def response(self) -> web.WebSocketResponse:
        """The websocket response (after :meth:`accept`)."""
        if self._ws is None:
            raise RuntimeError("the websocket was not accepted yet")
        return self._ws

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the handshake, selecting ``subprotocol`` if given."""
        ws = web.WebSocketResponse(protocols=(subprotocol,) if subprotocol else (), heartbeat=None)
        await ws.prepare(self._request)
        self._ws = ws

    async def receive(self) -> str | bytes | None:
        """The next frame, or ``None`` once the client left."""
        ws = self.response
        if ws.closed:
            return None
        message = await ws.receive()
        if message.type is WSMsgType.TEXT:
            return str(message.data)
        if message.type is WSMsgType.BINARY:
            return bytes(message.data)
        return None  # CLOSE, CLOSING, CLOSED, ERROR

    async def send_text(self, text: str) -> None:
        """Send a text frame."""
        await self.response.send_str(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame."""
        await self.response.send_bytes(data)

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket unless it is already closed."""
        ws = self.response
        if not ws.closed:
            await ws.close(code=code, message=reason.encode())


def interview_handler(
    service: InterviewService,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler that serves interviews through ``service``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = AiohttpTransport(request)
        await service.handle(transport)
        return transport.response

    return handler


__all__ = ["SUBPROTOCOL", "AiohttpTransport", "interview_handler"]
