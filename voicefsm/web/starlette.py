"""Starlette / FastAPI adapter: mount an interview websocket in one line.

app.router.routes.append(interview_route(service))          # Starlette or FastAPI
# or: app.add_api_websocket_route("/interview", interview_endpoint(service))  (FastAPI)

Serve it with ``uvicorn.Config(app, **uvicorn_options(service.limits))``: uvicorn's own frame
limit (``ws_max_size``, 16 MiB by default) must follow :class:`~voicefsm.web.decoder.ProtocolLimits`
or a client without a token can make the server buffer 16 MiB per connection. The adapter warns
once when it finds uvicorn configured above the limit. Creating a route installs the token
redaction filter on the server loggers (:mod:`voicefsm.web.logs`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voicefsm.service import PUSH_EXTENSION, FramePush, InterviewService
from voicefsm.web.decoder import ProtocolLimits
from voicefsm.web.logs import install_token_redaction

logger = logging.getLogger("voicefsm.web.starlette")


class StarletteTransport:
    """A Starlette ``WebSocket`` as a :class:`voicefsm.service.PushingTransport`.

    ``push`` is the server's :class:`~voicefsm.service.FramePush` when it offers one in the
    websocket scope (``voicefsm.push``: uvicorn under :func:`uvicorn_options`), else ``None``
    and the service reads frames with :meth:`receive`.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self.subprotocols: Sequence[str] = list(websocket.scope.get("subprotocols", []))
        self.query: Mapping[str, str] = dict(websocket.query_params)
        self.origin: str | None = websocket.headers.get("origin")
        extensions = websocket.scope.get("extensions") or {}
        self.push: FramePush | None = extensions.get(PUSH_EXTENSION)

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
        """Close the websocket unless it is already closed (never raises for a gone client)."""
        if self._ws.application_state is WebSocketState.CONNECTED:
            # The client may have gone at the same moment: the close then fails with a
            # RuntimeError or (on a dead socket) WebSocketDisconnect / OSError.
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                await self._ws.close(code=code, reason=reason)


def interview_endpoint(service: InterviewService) -> Callable[[WebSocket], Awaitable[None]]:
    """A websocket endpoint function that serves interviews through ``service``."""
    install_token_redaction()
    checked = False

    async def endpoint(websocket: WebSocket) -> None:
        nonlocal checked
        if not checked:
            checked = True
            _warn_if_server_allows_more(websocket, service.limits)
        await service.handle(StarletteTransport(websocket))

    return endpoint


def uvicorn_options(limits: ProtocolLimits | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` that fit the interview websocket.

    The websocket server refuses frames over ``limits.max_frame_bytes`` itself (close 1009),
    pauses a socket only once a few of its messages wait unread, and once a session runs
    pushes each client frame straight into it
    (:class:`voicefsm.web.uvicorn_server.QueueingWebSocketProtocol`, uvicorn's
    ``websockets-sansio``), permessage-deflate is refused (browsers offer it; compressing PCM
    audio costs CPU on every frame and saves almost nothing, see ``docs/serve.md``), the access
    log is off, and (h11) a connection that sends no complete
    request within 10 s is closed (:class:`voicefsm.web.uvicorn_server.HeaderDeadlineH11Protocol`).
    """
    from voicefsm.web.uvicorn_server import HeaderDeadlineH11Protocol, QueueingWebSocketProtocol

    limits = limits or ProtocolLimits()
    options: dict[str, Any] = {
        "ws": QueueingWebSocketProtocol,
        "ws_max_size": limits.max_frame_bytes,
        "ws_per_message_deflate": False,
        "http": HeaderDeadlineH11Protocol,
        "access_log": False,
    }
    options.update(overrides)
    return options


def _warn_if_server_allows_more(websocket: WebSocket, limits: ProtocolLimits) -> None:
    """Warn (once per endpoint) when uvicorn buffers frames larger than the protocol allows."""
    server = getattr(websocket._receive, "__self__", None)  # uvicorn's websocket protocol
    config = getattr(server, "config", None)
    allowed = getattr(config, "ws_max_size", None)
    if isinstance(allowed, int) and allowed > limits.max_frame_bytes:
        logger.warning(
            "the websocket server accepts frames of up to %d bytes, over the protocol's %d: a "
            "client without a token can make it buffer that much per connection; configure "
            "uvicorn with ws_max_size=%d (the command line's --ws-max-size, or "
            "uvicorn.Config(app, **voicefsm.web.starlette.uvicorn_options()))",
            allowed,
            limits.max_frame_bytes,
            limits.max_frame_bytes,
        )


def interview_route(service: InterviewService, path: str = "/interview") -> WebSocketRoute:
    """A Starlette route serving interviews at ``path``."""
    return WebSocketRoute(path, interview_endpoint(service))
