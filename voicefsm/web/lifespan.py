"""Tie an :class:`~voicefsm.service.InterviewService` to the lifetime of the web server.

A deploy stops the old process. Its running interviews must be handed over *before* the server
closes their websockets: each session's record is saved, its lease released and its client
closed with 4410 ("reconnect"), so the client's reconnect to the next process (or another
worker) continues the same interview. What runs when differs by server:

* **uvicorn** closes every websocket (code 1012) as soon as it starts shutting down, and runs the
  ASGI lifespan shutdown only afterwards — too late to say 4410. So on start-up the lifespan
  wraps the process's SIGTERM and SIGINT handlers (uvicorn's own, or whatever is installed):
  a signal first drains the service (bounded by ``drain_timeout_s``), then passes the signal on
  to the previous handler, which starts the server's normal shutdown. A second signal while
  draining is passed on at once. The lifespan shutdown drains again, for stops that come without
  a signal (an embedding program setting ``server.should_exit``).
* **aiohttp** runs ``on_shutdown`` while websockets are still open, before it cancels handlers,
  so :func:`setup_aiohttp` drains there, and closes the store in ``on_cleanup``.

Use one of::

    app = FastAPI(lifespan=interview_lifespan(service))   # FastAPI or Starlette
    app.include_router(interview_router(service))          # FastAPI: route + lifespan in one
    setup_aiohttp(app, service)                            # aiohttp

Signal handlers can only be set from the main thread; a server running in another thread gets
the lifespan-shutdown drain only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from voicefsm.service import InterviewService

if TYPE_CHECKING:
    from aiohttp import web
    from fastapi import APIRouter

logger = logging.getLogger("voicefsm.lifespan")

DRAIN_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals that drain the service before the server sees them."""

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class ServiceLifecycle:
    """Starts an :class:`~voicefsm.service.InterviewService` and drains it on the way out.

    ``async with ServiceLifecycle(service):`` (or :meth:`start` / :meth:`stop`) starts the
    service, wraps the ``signals`` handlers so a signal drains the service before the server
    hears of it, and on exit drains the service, restores the handlers and, with ``close_store``,
    closes the service's store.
    """

    def __init__(
        self,
        service: InterviewService,
        *,
        signals: Sequence[signal.Signals] = DRAIN_SIGNALS,
        close_store: bool = False,
    ) -> None:
        self.service = service
        self.signals = tuple(signals)
        self.close_store = close_store
        self._previous: dict[signal.Signals, _Handler] = {}
        self._drain: asyncio.Task[None] | None = None
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the service and wrap the signal handlers (from the main thread only)."""
        await self.service.start()
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            logger.info(
                "not in the main thread: signals cannot drain the service first; it drains when "
                "the server's shutdown reaches the lifespan"
            )
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    async def stop(self) -> None:
        """Restore the signal handlers, drain the service (if no signal did) and wait for it."""
        self._restore()
        if self._drain is not None:
            await asyncio.wait({self._drain})
        await self.service.shutdown()
        if self.close_store:
            await self.service.store.close()

    async def __aenter__(self) -> ServiceLifecycle:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ signals

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._on_signal:  # nobody replaced ours meanwhile
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        loop = self._loop
        sig = signal.Signals(signum)
        if self._signalled or loop is None or loop.is_closed():
            self._pass_on(sig, frame)  # a second signal: the server's own handling, now
            return
        self._signalled = True
        # Python runs signal handlers between bytecodes of the main thread: the loop may be
        # asleep in select(), so schedule through its self-pipe, which wakes it.
        loop.call_soon_threadsafe(self._begin_drain, sig)

    def _begin_drain(self, sig: signal.Signals) -> None:
        logger.info("%s: handing running sessions over before the server shuts down", sig.name)
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_pass_on(sig))

    async def _drain_then_pass_on(self, sig: signal.Signals) -> None:
        try:
            await self.service.shutdown()
        except Exception:
            logger.exception("draining the interview service failed")
        finally:
            self._pass_on(sig, None)

    def _pass_on(self, sig: signal.Signals, frame: FrameType | None) -> None:
        handler = self._previous.get(sig, signal.getsignal(sig))
        if callable(handler) and handler != self._on_signal:
            handler(sig, frame)
        elif handler in (signal.SIG_DFL, None):
            self._restore()
            signal.raise_signal(sig)


def interview_lifespan(
    service: InterviewService, *, close_store: bool = False
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A Starlette / FastAPI ``lifespan=`` that starts ``service`` and drains it on the way out.

    See the module documentation for what it does on SIGTERM. ``close_store`` also closes the
    service's store at the end.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with ServiceLifecycle(service, close_store=close_store):
            yield

    return lifespan


def interview_router(
    service: InterviewService, path: str = "/interview", *, close_store: bool = False
) -> APIRouter:
    """A FastAPI router with the interview websocket at ``path`` and the service's lifespan.

    ``app.include_router(interview_router(service))``: FastAPI merges the router's lifespan into
    the app's, so the service starts and drains with the app.
    """
    from fastapi import APIRouter

    from voicefsm.web.starlette import interview_endpoint

    router = APIRouter(lifespan=interview_lifespan(service, close_store=close_store))
    router.add_api_websocket_route(path, interview_endpoint(service))
    return router


def setup_aiohttp(
    app: web.Application,
    service: InterviewService,
    path: str | None = "/interview",
    *,
    close_store: bool = False,
) -> None:
    """Serve interviews from an aiohttp ``app``, started and drained with it.

    Adds the websocket route at ``path`` (``None``: add it yourself), starts the service on
    start-up, drains it in ``on_shutdown`` (websockets are still open then: clients get 4410)
    and, with ``close_store``, closes the store in ``on_cleanup``.
    """
    from voicefsm.web.aiohttp import interview_handler

    if path is not None:
        app.router.add_get(path, interview_handler(service))

    async def on_startup(_: web.Application) -> None:
        await service.start()

    async def on_shutdown(_: web.Application) -> None:
        await service.shutdown()

    async def on_cleanup(_: web.Application) -> None:
        if close_store:
            await service.store.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)


__all__ = [
    "DRAIN_SIGNALS",
    "ServiceLifecycle",
    "interview_lifespan",
    "interview_router",
    "setup_aiohttp",
]
