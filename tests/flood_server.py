"""A server process for the memory-flood test: ``python flood_server.py MODE PORT``.

``serve`` runs ``voicefsm serve`` (demo mode, memory store) as the command line would; ``aiohttp``
runs the aiohttp adapter the way ``docs/deployment.md`` tells an embedder to. Both print
``ready`` once they listen. No client in the flood ever authenticates, so no upstream is opened.
"""

from __future__ import annotations

import asyncio
import sys

from voicefsm.auth import JWTAuthenticator
from voicefsm.model import SessionConfig

SECRET = "flood-test-secret-that-is-long-enough"


def serve(port: int) -> None:
    from voicefsm.serve import ServeSettings, run

    run(
        ServeSettings(config=SessionConfig(), fake=True, store_url="memory://", jwt_secret=SECRET),
        host="127.0.0.1",
        port=port,
    )


async def aiohttp_main(port: int) -> None:
    from aiohttp import web
    from google.adk.agents import LlmAgent

    from voicefsm.adk import AdkUpstream
    from voicefsm.service import InterviewService
    from voicefsm.web.aiohttp import interview_handler, runner_options

    agent = LlmAgent(name="interviewer", model="gemini-2.5-flash", instruction="Interview.")
    service = InterviewService(AdkUpstream(agent), JWTAuthenticator(SECRET))
    app = web.Application()
    app.router.add_get("/interview", interview_handler(service))
    runner = web.AppRunner(app, **runner_options())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    mode, port_text = sys.argv[1], sys.argv[2]
    if mode == "serve":
        serve(int(port_text))
    else:
        asyncio.run(aiohttp_main(int(port_text)))
