"""Embed voicefsm in an aiohttp app: the interview service with its start-up and shutdown hooks,
the browser page, metrics and tokens. Run it with aiohttp's runner (the tests run exactly this;
it needs ``voicefsm[adk,aiohttp]``):

    export VOICEFSM_JWT_SECRET=...  GOOGLE_API_KEY=...
    PORT=8080 python examples/aiohttp_app.py        # then open http://127.0.0.1:8080/

Also read: ``VOICEFSM_STORE`` (default ``sqlite://voicefsm-sessions.db``; ``redis://...`` for
several machines) and ``VOICEFSM_WORKER_ID`` (stable per process slot). google-genai's own
``GOOGLE_GEMINI_BASE_URL`` and ``SSL_CERT_FILE`` point it at another Live endpoint, such as the
fake Live server of ``voicefsm.testing`` (as the tests do).
"""

from __future__ import annotations

import logging
import os
import uuid

from aiohttp import web
from google.adk.agents import LlmAgent

from voicefsm import SessionConfig
from voicefsm.adk import AdkUpstream
from voicefsm.auth import JWTAuthenticator
from voicefsm.metrics import CONTENT_TYPE, Metrics
from voicefsm.service import InterviewService
from voicefsm.stores import open_store
from voicefsm.web.aiohttp import runner_options
from voicefsm.web.lifespan import setup_aiohttp
from voicefsm.web.page import index_file, page_config, static_dir

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"


def init_app() -> web.Application:
    """The app: ``/`` (the page), ``/interview`` (websocket), ``/metrics``, ``/healthz``."""
    agent = LlmAgent(name="interviewer", model=MODEL, instruction="You run a behavioral interview.")
    config = SessionConfig(time_limit_s=45 * 60)
    auth = JWTAuthenticator(os.environ["VOICEFSM_JWT_SECRET"])  # your backend issues the tokens
    metrics = Metrics()
    service = InterviewService(
        AdkUpstream(agent),  # Gemini Live through ADK (google-genai reads GOOGLE_API_KEY)
        auth,
        config=config,
        store=open_store(os.environ.get("VOICEFSM_STORE", "sqlite://voicefsm-sessions.db")),
        worker_id=os.environ.get("VOICEFSM_WORKER_ID"),
        metrics=metrics,
    )
    app = web.Application()
    # The websocket at /interview; on shutdown (SIGTERM, Ctrl+C) every running interview is
    # handed over (4410, "reconnect") while its websocket is still open; then the store closes.
    setup_aiohttp(app, service, "/interview", close_store=True)

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index_file())

    async def page_settings(request: web.Request) -> web.Response:
        label = f"Gemini Live ({MODEL})"
        return web.json_response(page_config(config, label=label, demo_tokens=True))

    async def token(request: web.Request) -> web.Response:
        # A real app issues the token for its signed-in user (the token's `sub` owns the session).
        user_id = f"demo-{uuid.uuid4().hex[:8]}"
        return web.json_response({"token": auth.issue(user_id, ttl_s=3600), "user_id": user_id})

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": not service.draining, "sessions": len(service.sessions)})

    app.router.add_get("/", page)
    app.router.add_get("/config.json", page_settings)
    app.router.add_get("/demo/token", token)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static", static_dir())
    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("google_adk").setLevel(logging.WARNING)  # it logs resumption handles
    port = int(os.environ.get("PORT", "8080"))
    # No access log (tokens in URLs); idle connections closed after 10 s, not aiohttp's hour.
    web.run_app(init_app(), host="127.0.0.1", port=port, access_log=None, **runner_options())
