"""Starlette / FastAPI adapter: mount an interview websocket in one line.

app.router.routes.append(interview_route(service))          # Starlette or FastAPI
# or: app.add_api_websocket_route("/interview", interview_endpoint(service))  (FastAPI)
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voicefsm.service import InterviewService


class StarletteTransport:
    """A Starlette ``WebSocket`` as a :class:`voicefsm.service.Transport`."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self.subprotocols: Sequence[str] = list(websocket.scope.get("subprotocols", []))
        self.query: Mapping[str, str] = dict(websocket.query_params)
        self.origin: str | None = websocket.headers.get("origin")

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the handshake."""
        await self._ws.accept(subprotocol=subprotocol)

    async def receive(self) -> str | bytes | None:
        """The next frame, or ``None`` once the client left."""
        if self._ws.application_state is not WebSocketState.CONNECTED:
            return None
        try:
            message = await self._ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        return data if data is not None else message.get("text") or ""

    async def send_text(self, text: str) -> None:
        """Send a text frame."""
        await self._ws.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame."""
        await self._ws.send_bytes(data)

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket unless it is already closed."""
        if self._ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError):  # the client went away at the same moment
                await self._ws.close(code=code, reason=reason)


def interview_endpoint(service: InterviewService) -> Callable[[WebSocket], Awaitable[None]]:
    """A websocket endpoint function that serves interviews through ``service``."""

    async def endpoint(websocket: WebSocket) -> None:
        await service.handle(StarletteTransport(websocket))

    return endpoint


def interview_route(service: InterviewService, path: str = "/interview") -> WebSocketRoute:
    """A Starlette route serving interviews at ``path``."""
    return WebSocketRoute(path, interview_endpoint(service))
