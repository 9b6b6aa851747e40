"""Embed voicefsm in a FastAPI app: the interview service with its lifespan, the browser page,
metrics and tokens. Run it with uvicorn (the tests run exactly this file; it needs
``voicefsm[adk]``):

    export VOICEFSM_JWT_SECRET=...  GOOGLE_API_KEY=...
    uvicorn examples.fastapi_app:app --port 8000 --ws-max-size 262144 --ws-per-message-deflate false

``--ws-max-size`` keeps uvicorn's frame limit at the protocol's 256 KiB (its default, 16 MiB,
lets a client without a token make it buffer that much; the service warns), and PCM audio is
not worth deflating (``voicefsm.web.starlette.uvicorn_options`` has both, for ``uvicorn.Config``).
Then open http://127.0.0.1:8000/.

Also read: ``VOICEFSM_STORE`` (default ``sqlite://voicefsm-sessions.db``; ``redis://...`` for
several machines) and ``VOICEFSM_WORKER_ID`` (stable per process slot). google-genai's own
``GOOGLE_GEMINI_BASE_URL`` and ``SSL_CERT_FILE`` point it at another Live endpoint, such as the
fake Live server of ``voicefsm.testing`` (as the tests do).
"""

from __future__ import annotations

import os
import uuid

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from google.adk.agents import LlmAgent

from voicefsm import SessionConfig
from voicefsm.adk import AdkUpstream
from voicefsm.auth import JWTAuthenticator
from voicefsm.metrics import CONTENT_TYPE, Metrics
from voicefsm.service import InterviewService
from voicefsm.stores import open_store
from voicefsm.web.lifespan import interview_router
from voicefsm.web.page import index_file, page_config, static_dir

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"


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

app = FastAPI()
# The websocket at /interview, and a lifespan that starts the service and, on SIGTERM, hands
# every running interview over (4410, "reconnect") before uvicorn closes the connections.
app.include_router(interview_router(service, close_store=True))
app.mount("/static", StaticFiles(directory=static_dir()), name="static")


@app.get("/")
async def page() -> FileResponse:
    return FileResponse(index_file())


@app.get("/config.json")
async def page_settings() -> JSONResponse:
    return JSONResponse(page_config(config, label=f"Gemini Live ({MODEL})", demo_tokens=True))


@app.get("/demo/token")
async def token() -> JSONResponse:
    # A real app issues the token for its signed-in user (the token's `sub` owns the session).
    user_id = f"demo-{uuid.uuid4().hex[:8]}"
    return JSONResponse({"token": auth.issue(user_id, ttl_s=3600), "user_id": user_id})


@app.get("/metrics")
async def prometheus() -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)


@app.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"ok": not service.draining, "sessions": len(service.sessions)})
