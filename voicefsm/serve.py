"""``voicefsm serve``: a FastAPI app with a browser interview page, served by uvicorn.

With ``GOOGLE_API_KEY`` set, sessions talk to the Gemini Live API (through ADK when it is
installed, else directly through google-genai: ``ServeSettings.upstream``). Without it, the
app starts the loopback fake Live server with its scripted interviewer and says so, in the logs
and on the page, so the whole stack runs on a fresh machine with no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from voicefsm.admission import DEFAULT_MAX_BUSY, DEFAULT_MAX_STARTING, OverloadGuard
from voicefsm.auth import JWTAuthenticator
from voicefsm.limits import ServiceLimits
from voicefsm.metrics import CONTENT_TYPE, Metrics
from voicefsm.model import SessionConfig
from voicefsm.service import InterviewService
from voicefsm.stores import SessionStore, check_store_url, open_store
from voicefsm.web.headers import SecurityHeadersMiddleware
from voicefsm.web.lifespan import ServiceLifecycle
from voicefsm.web.logs import install_token_redaction
from voicefsm.web.operator import operator_router
from voicefsm.web.starlette import interview_endpoint, uvicorn_options

logger = logging.getLogger("voicefsm.serve")

DEFAULT_MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
INTERVIEWER_INSTRUCTION = (
    "You are a friendly, professional interviewer running a spoken behavioral interview. Ask one "
    "question at a time about the candidate's past experience, listen, ask short follow-ups, and "
    "keep your turns brief. When told that time is nearly up, finish the current question, then "
    "thank the candidate and invite their questions."
)


@dataclass(frozen=True)
class ServeSettings:
    """How ``voicefsm serve`` runs (the command line fills it in)."""

    config: SessionConfig = field(default_factory=SessionConfig)
    """The sessions' configuration (default: 45-minute interviews)."""
    model: str = DEFAULT_MODEL
    fake: bool | None = None
    """Use the fake interviewer; ``None``: only when ``GOOGLE_API_KEY`` is not set."""
    fake_time_scale: float = 1.0
    jwt_secret: str | None = None
    """HS256 secret for client tokens; ``None``: a random one (demo tokens are then offered)."""
    demo_tokens: bool | None = None
    """Serve ``/demo/token``; ``None``: only with a generated secret."""
    origins: tuple[str, ...] = ()
    store_url: str = "sqlite://voicefsm-sessions.db"
    """Where sessions are kept (:func:`voicefsm.stores.open_store`); SQLite survives restarts."""
    worker_id: str | None = None
    """This worker's name in leases; keep it stable across restarts (default ``host:port``)."""
    lease_ttl_s: float = 15.0
    orphan_sweep_s: float | None = 30.0
    """How often this worker finalises sessions nobody drives any more; ``None``: never."""
    live_base_url: str | None = None
    """Talk to this Live endpoint instead (e.g. a shared fake server: ``https://127.0.0.1:PORT``)."""
    live_ca_file: str | None = None
    """CA certificate (PEM) that signed ``live_base_url``'s certificate."""
    demo_hosts: tuple[str, ...] = ()
    """Host names, besides the loopback ones, for which ``/demo/token`` hands out tokens."""
    service_limits: ServiceLimits = field(default_factory=ServiceLimits)
    """Connections and sessions one worker takes on (``docs/protocol.md``, Limits)."""
    upstream: str = "auto"
    """``adk``, ``genai`` (direct google-genai, no ADK) or ``auto``: ADK when installed."""
    model_deflate: bool = False
    """Offer permessage-deflate on the websockets to the model (the upstream's
    ``model_deflate``); off: the base64 audio hardly compresses and deflating it costs CPU."""
    max_loop_lag_ms: float = 25.0
    """Refuse new sessions (1013) while the event loop lags more than this; 0: no guard at all."""
    max_busy: float = DEFAULT_MAX_BUSY
    """Refuse new sessions while the loop was busy this share of the last second; 0: off."""
    max_starting: int = DEFAULT_MAX_STARTING
    """Refuse new sessions while this many are still opening their model connection; 0: off."""
    freeze_gc: bool = True
    """Once the app's lifespan has started the service, collect garbage once and ``gc.freeze()``
    what is left (the libraries' modules, types and caches), so the collector's full passes
    skip it while interviews run (unfrozen when the lifespan ends; a mounted app never
    freezes). See ``docs/serve.md``."""

    def __post_init__(self) -> None:
        if not self.max_loop_lag_ms >= 0:
            raise ValueError(
                "max_loop_lag_ms (--max-loop-lag-ms) must be 0 (off) or positive, "
                f"not {self.max_loop_lag_ms}"
            )
        if not 0 <= self.max_busy <= 1:
            raise ValueError(
                "max_busy (--max-busy) is a share of the loop's time: 0 (off) to 1, "
                f"not {self.max_busy}"
            )
        if self.max_starting < 0:
            raise ValueError(
                "max_starting (--max-starting) must be 0 (off) or positive, "
                f"not {self.max_starting}"
            )
        if not self.fake_time_scale > 0:
            raise ValueError(
                f"fake_time_scale (--fake-time-scale) must be positive, not {self.fake_time_scale}"
            )
        if not self.lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s (--lease-ttl) must be positive, not {self.lease_ttl_s}")
        if self.live_ca_file is not None and not os.path.isfile(self.live_ca_file):
            raise ValueError(f"live_ca_file (--live-ca-file): no such file: {self.live_ca_file}")
        check_store_url(self.store_url)
        upstream_kind(self.upstream)

    def overload_guard(self) -> OverloadGuard | None:
        """The admission guard these settings ask for (``None`` when ``max_loop_lag_ms`` is 0)."""
        if self.max_loop_lag_ms == 0:
            return None
        return OverloadGuard(
            self.max_loop_lag_ms / 1000,
            max_busy=self.max_busy or None,
            max_starting=self.max_starting or None,
        )


@contextlib.contextmanager
def _frozen_heap(freeze: bool) -> Iterator[None]:
    """Keep what is alive now out of the collector's passes until the block ends.

    A full collection walks every tracked object; with the libraries' objects frozen it walks
    only what the sessions allocated since (measured in ``docs/serve.md``).
    """
    if not freeze:
        yield
        return
    gc.collect()
    gc.freeze()
    logger.info(
        "froze %d objects alive after start-up out of garbage collection", gc.get_freeze_count()
    )
    try:
        yield
    finally:
        gc.unfreeze()


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Host names that always count as the server's own for demo tokens."""


def _host_name(host_header: str) -> str:
    """The host name of a ``Host`` header value (``[::1]:8000`` → ``::1``), lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_own_request(request: Request, own_hosts: frozenset[str]) -> bool:
    """Whether ``request`` is for this server by one of its own names, from its own page.

    A DNS-rebinding page reaches a loopback server under the attacker's host name: its
    ``Host`` (and ``Origin``) name the attacker, so it is refused.
    """
    host = request.headers.get("host", "")
    if _host_name(host) not in own_hosts:
        return False
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() not in {f"http://{host}", f"https://{host}"}:
        return False
    return request.headers.get("sec-fetch-site", "same-origin") in {"same-origin", "none"}


def _static_dir() -> str:
    return str(resources.files("voicefsm.web") / "static")


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app: ``/`` (the page), ``/interview`` (websocket), ``/metrics``, ``/healthz``."""
    use_fake = settings.live_base_url is None and (
        settings.fake if settings.fake is not None else not os.environ.get("GOOGLE_API_KEY")
    )
    secret = settings.jwt_secret or os.environ.get("VOICEFSM_JWT_SECRET")
    generated = secret is None
    authenticator = JWTAuthenticator(secret or secrets.token_urlsafe(32))
    demo_tokens = settings.demo_tokens if settings.demo_tokens is not None else generated
    metrics = Metrics()
    state: dict[str, Any] = {}
    starting = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[InterviewService]:
        async with contextlib.AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(_upstream(settings, use_fake))
            store = open_store(settings.store_url)
            stack.push_async_callback(store.close)
            logger.info("sessions are kept in %r", store)
            service = InterviewService(
                upstream,
                authenticator,
                config=settings.config,
                store=store,
                worker_id=settings.worker_id,
                lease_ttl_s=settings.lease_ttl_s,
                orphan_sweep_s=settings.orphan_sweep_s,
                metrics=metrics,
                origins=settings.origins or None,
                service_limits=settings.service_limits,
                overload=settings.overload_guard(),
            )
            await stack.enter_async_context(ServiceLifecycle(service))
            yield service

    async def service_now() -> InterviewService:
        """The running service; started here when the lifespan did not run (a mounted app)."""
        service: InterviewService | None = state.get("service")
        if service is not None:
            return service
        async with starting:
            if "service" not in state:
                logger.info(
                    "starting on the first request: this app's lifespan did not run (mounted "
                    "as a sub-app?); SIGTERM still hands sessions over. To stop it with the "
                    "parent app, run this app's router.lifespan_context in the parent's lifespan"
                )
                stack = contextlib.AsyncExitStack()
                state["service"] = await stack.enter_async_context(running())
                state["stack"] = stack
        started: InterviewService = state["service"]
        return started

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running() as service:
            state["service"] = service  # kept once stopped: it refuses connections (draining)
            app.state.service = service
            with _frozen_heap(settings.freeze_gc):
                yield

    app = FastAPI(
        title="voicefsm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(SecurityHeadersMiddleware)
    own_hosts = LOOPBACK_HOSTS | {name.lower() for name in settings.demo_hosts}
    label = (
        "Demo mode: a scripted fake interviewer (no GOOGLE_API_KEY set)"
        if use_fake
        else f"Gemini Live ({settings.model})"
    )

    @app.websocket("/interview")
    async def interview(websocket: WebSocket) -> None:
        await interview_endpoint(await service_now())(websocket)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(_static_dir(), "index.html"))

    @app.get("/config.json")
    async def page_config() -> JSONResponse:
        config = settings.config
        return JSONResponse(
            {
                "mode": "fake" if use_fake else "gemini",
                "label": label,
                "time_limit_s": config.time_limit_s,
                "warning_before_s": config.warning_before_s,
                "demo_tokens": demo_tokens,
            }
        )

    if demo_tokens:

        @app.get("/demo/token")
        async def demo_token(request: Request) -> JSONResponse:
            if not is_own_request(request, own_hosts):
                logger.warning("refused a demo token for host %r", request.headers.get("host"))
                return JSONResponse(
                    {"error": "demo tokens are only for this server's own page on its own host"},
                    status_code=403,
                )
            user_id = f"demo-{uuid.uuid4().hex[:12]}"
            return JSONResponse({"token": authenticator.issue(user_id), "user_id": user_id})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        service = await service_now()
        return JSONResponse({"ok": not service.draining, "sessions": len(service.sessions)})

    async def store_now() -> SessionStore:
        return (await service_now()).store

    app.include_router(operator_router(store_now, authenticator))
    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")
    if use_fake:
        logger.warning("no GOOGLE_API_KEY: sessions use the scripted fake interviewer (demo mode)")
    if demo_tokens:
        logger.warning("demo tokens are enabled at /demo/token: anyone can start a session")
    if generated:
        logger.warning(
            "no VOICEFSM_JWT_SECRET: tokens are signed with a random per-process secret, so "
            "sessions cannot be resumed by their clients after a restart"
        )
    return app


def upstream_kind(requested: str) -> str:
    """The upstream ``voicefsm serve`` uses: ``adk`` or ``genai`` (``auto``: ADK if installed).

    ``adk`` without ``google-adk`` installed raises :class:`ValueError` saying how to install
    it, before anything is started.
    """
    if requested not in ("auto", "adk", "genai"):
        raise ValueError(f"unknown upstream {requested!r}: use adk, genai or auto")
    if requested == "genai":
        return requested
    import importlib.util

    installed = importlib.util.find_spec("google.adk") is not None
    if requested == "adk" and not installed:
        raise ValueError(
            "the ADK upstream (--upstream adk) needs google-adk, which is not installed: "
            "pip install 'voicefsm[adk]', or use the direct google-genai upstream "
            "(--upstream genai)"
        )
    return "adk" if installed else "genai"


def _make_upstream(settings: ServeSettings, client: Any) -> Any:
    if upstream_kind(settings.upstream) == "genai":
        from voicefsm.genai_live import GenaiUpstream

        logger.info("upstream: direct google-genai (%s)", settings.model)
        return GenaiUpstream(
            settings.model,
            client=client,
            instruction=INTERVIEWER_INSTRUCTION,
            model_deflate=settings.model_deflate,
        )
    from google.adk.agents import LlmAgent

    from voicefsm.adk import AdkUpstream

    logger.info("upstream: ADK (%s)", settings.model)
    agent = LlmAgent(name="interviewer", model=settings.model, instruction=INTERVIEWER_INSTRUCTION)
    return AdkUpstream(agent, client=client, model_deflate=settings.model_deflate)


@contextlib.asynccontextmanager
async def _upstream(settings: ServeSettings, use_fake: bool) -> AsyncIterator[Any]:
    if settings.live_base_url is not None:
        yield _make_upstream(settings, _external_client(settings))
        return
    if not use_fake:
        yield _make_upstream(settings, None)
        return
    from voicefsm.testing import FakeLiveServer, Interviewer

    interviewer = Interviewer(
        time_scale=settings.fake_time_scale, answer_audio_chunks=250, answer_timeout=20.0
    )
    # Handles are not enforced so a session restored after a restart (which starts a new fake
    # server) resumes instead of failing; the interviewer then starts over.
    async with FakeLiveServer(
        script=interviewer, record_payloads=False, enforce_resumption_handles=False
    ) as server:
        logger.info("fake Live server for demo mode at %s", server.base_url)
        yield _make_upstream(settings, server.genai_client())


def _external_client(settings: ServeSettings) -> Any:
    import ssl

    from google import genai
    from google.genai import types

    context = ssl.create_default_context(cafile=settings.live_ca_file)
    return genai.Client(
        api_key=os.environ.get("GOOGLE_API_KEY", "fake-key"),
        http_options=types.HttpOptions(
            base_url=settings.live_base_url,
            api_version="v1alpha",
            async_client_args={"ssl": context},
        ),
    )


def run(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the app with uvicorn until interrupted."""
    import uvicorn

    if settings.worker_id is None:
        settings = replace(settings, worker_id=f"{socket.gethostname()}:{port}")
    app = create_app(settings)
    # uvicorn's frame limit follows the protocol's; no access log; tokens redacted from the
    # rest (uvicorn logs every websocket URL, ?token= included, at INFO).
    install_token_redaction()
    config = uvicorn.Config(app, host=host, port=port, log_level="info", **uvicorn_options())

    # The app's lifespan hands sessions over (4410) on SIGTERM/SIGINT before uvicorn closes the
    # websockets. uvicorn re-raises the signal once it has stopped; caught here, so a clean stop
    # exits 0 instead of dying of SIGTERM or printing a KeyboardInterrupt traceback.
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        logger.info("stopped by %s", signal.Signals(caught[-1]).name)
