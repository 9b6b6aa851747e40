"""aiohttp adapter: serve interviews from an ``aiohttp.web`` application.

app.router.add_get("/interview", interview_handler(service))
runner = web.AppRunner(app, **runner_options())

The adapter makes aiohttp refuse frames over ``ProtocolLimits.max_frame_bytes`` (close 1009)
and installs the token redaction filter on aiohttp's loggers (:mod:`voicefsm.web.logs`), so the
access log does not carry ``?token=``. :func:`runner_options` bounds idle and slow connections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import WSMsgType, web

from voicefsm.service import SUBPROTOCOL, InterviewService
from voicefsm.web.decoder import ProtocolLimits
from voicefsm.web.logs import install_token_redaction

IDLE_TIMEOUT_S = 10.0
"""Default for :func:`runner_options`: how long a connection may sit without a request."""


class AiohttpTransport:
    """An ``aiohttp`` websocket request as a :class:`voicefsm.service.Transport`."""

    def __init__(self, request: web.Request, limits: ProtocolLimits | None = None) -> None:
        self._request = request
        self._max_frame_bytes = (limits or ProtocolLimits()).max_frame_bytes
        self._ws: web.WebSocketResponse | None = None
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        self.subprotocols: Sequence[str] = [p.strip() for p in offered.split(",") if p.strip()]
        self.query: Mapping[str, str] = dict(request.query)
        self.origin: str | None = request.headers.get("Origin")

    @property
    def accepted(self) -> bool:
        """Whether the websocket handshake completed (:meth:`accept`)."""
        return self._ws is not None

    @property
    def response(self) -> web.WebSocketResponse:
        """The websocket response (after :meth:`accept`)."""
        if self._ws is None:
            raise RuntimeError("the websocket was not accepted yet")
        return self._ws

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the handshake, selecting ``subprotocol`` if given."""
        ws = web.WebSocketResponse(
            protocols=(subprotocol,) if subprotocol else (),
            heartbeat=None,
            max_msg_size=self._max_frame_bytes,
            compress=False,  # PCM barely deflates; see uvicorn_options
        )
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
        """Close the websocket unless it is already closed (or was never accepted)."""
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.close(code=code, message=reason.encode())


def interview_handler(
    service: InterviewService,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler that serves interviews through ``service``."""
    install_token_redaction()

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = AiohttpTransport(request, service.limits)
        # The probe knows the offered subprotocols, or aiohttp warns that they do not overlap
        # its own; the service chooses which to accept.
        probe = web.WebSocketResponse(protocols=transport.subprotocols)
        if not probe.can_prepare(request).ok:  # a plain HTTP request
            return web.Response(
                status=426, headers={"Upgrade": "websocket"}, text="this is a websocket endpoint"
            )
        await service.handle(transport)
        if not transport.accepted:  # the client went during the handshake
            return web.Response(status=400, text="the websocket handshake did not complete")
        return transport.response

    return handler


def runner_options(idle_timeout_s: float = IDLE_TIMEOUT_S, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` (or ``web.run_app``) that fit the interview.

    aiohttp keeps a connection that sends no request (or trickles its headers) open for its
    ``keepalive_timeout``, an hour by default; this closes it after ``idle_timeout_s``. Once a
    websocket is open, the interview service's own deadlines apply.
    """
    options: dict[str, Any] = {"keepalive_timeout": idle_timeout_s}
    options.update(overrides)
    return options


__all__ = [
    "IDLE_TIMEOUT_S",
    "SUBPROTOCOL",
    "AiohttpTransport",
    "interview_handler",
    "runner_options",
]
