"""The ADK upstream: runs a session's model connections through Google ADK's ``Runner.run_live``.

ADK 2.13's live flow hides GoAway (it reconnects at once, up to five times, with no backoff) and
overwrites a good resumption handle with an empty one. voicefsm must be the one that decides, so
each upstream connection is one ``run_live`` call whose model is a :class:`VoiceFsmGemini`: a
``Gemini`` subclass whose live connection sits below ADK's flow and

* reports ``UpstreamReady`` when setup completes, injecting the handle the session chose and the
  session's context-window compression into the connect config;
* classifies every response the server sends (audio, transcripts, turn boundaries, resumption
  updates, usage, tool calls) and reports it before ADK sees it, in wire order;
* reports every GoAway to the session and hides it from ADK (so ADK never rotates by itself);
* reports every close — a close code on receive, a failed send, a failed connect — as one
  ``UpstreamClosed`` and then parks instead of raising, so ADK's reconnect loop never runs;
* refuses any second connect within the same ``run_live`` (belt and braces: no zombie reconnects).

ADK still runs the conversation: it builds the setup from the agent, executes tools and sends
their responses, and records the session's events; the host just drains ``run_live``. Reporting
below ADK rather than from ``run_live``'s events keeps one ordered stream: ADK 2.13 hands its
events over through an internal queue, so a GoAway seen below would otherwise overtake the
resumption update that preceded it on the wire. This module imports ADK; ``import voicefsm``
does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from google.adk.agents import LiveRequestQueue, LlmAgent, RunConfig
from google.adk.models.base_llm_connection import BaseLlmConnection
from google.adk.models.google_llm import Gemini
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.genai import errors, types
from websockets.exceptions import ConnectionClosed

from voicefsm import events as ev
from voicefsm.classify import classify_adk_event
from voicefsm.host import Report
from voicefsm.model import SessionConfig

logger = logging.getLogger("voicefsm.adk")

INPUT_AUDIO_MIME = "audio/pcm;rate=16000"


class _Link:
    """What one connection's model hook needs: who to report to, which handle to use."""

    def __init__(
        self, connection_id: int, handle: str | None, config: SessionConfig, report: Report
    ) -> None:
        self.connection_id = connection_id
        self.handle = handle
        self.config = config
        self._report = report
        self.connected = False
        self.closed_reported = False
        self.closing = False
        self.unsent: deque[bytes] = deque()

    def report(self, event: ev.Event) -> None:
        if not self.closing:
            self._report(event)

    def report_closed(self, code: int | None, reason: str) -> None:
        if self.closed_reported:
            return
        self.closed_reported = True
        logger.info("upstream #%d closed: %s %s", self.connection_id, code, reason)
        self.report(ev.UpstreamClosed(code, reason, connection_id=self.connection_id))


_LINK: contextvars.ContextVar[_Link] = contextvars.ContextVar("voicefsm_link")


class _AbortConnect(RuntimeError):
    """ADK tried to connect again within one ``run_live``; only the session may do that."""


def _close_code(error: BaseException) -> tuple[int | None, str]:
    if isinstance(error, errors.APIError):
        return error.code, str(error.details or error.message or "")
    if isinstance(error, ConnectionClosed):
        frame = error.rcvd
        return (frame.code, frame.reason) if frame is not None else (1006, "no close frame")
    return None, f"{type(error).__name__}: {error}"


async def _park() -> None:
    """Wait until the host cancels this connection (it will: the session was told)."""
    await asyncio.Event().wait()


class _ReportingConnection(BaseLlmConnection):
    """Wraps ADK's Gemini live connection: the session hears lifecycle events first."""

    def __init__(self, inner: BaseLlmConnection, link: _Link) -> None:
        self._inner = inner
        self._link = link

    async def send_history(self, history: list[types.Content]) -> None:
        await self._guard(self._inner.send_history(history))

    async def send_content(self, content: types.Content) -> None:
        await self._guard(self._inner.send_content(content))

    async def send_realtime(self, blob: types.Blob) -> None:
        await self._guard(self._inner.send_realtime(blob))
        if isinstance(blob, types.Blob) and blob.mime_type == INPUT_AUDIO_MIME:
            unsent = self._link.unsent
            if unsent:
                unsent.popleft()

    async def _guard(self, sending: Any) -> None:
        try:
            await sending
        except (errors.APIError, ConnectionClosed, OSError) as error:
            self._link.report_closed(*_close_code(error))
            await _park()

    async def receive(self) -> AsyncGenerator[LlmResponse, None]:
        link = self._link
        try:
            async for response in self._inner.receive():
                # Everything the session needs is reported here, in wire order; ADK's own
                # events come out of run_live later, through its internal queue.
                for event in classify_adk_event(response):
                    link.report(event)
                if response.go_away is None:
                    yield response
                # A GoAway is not passed on: ADK would reconnect at once; the session
                # picks the moment.
        except (errors.APIError, ConnectionClosed, OSError) as error:
            link.report_closed(*_close_code(error))
            await _park()

    async def close(self) -> None:
        await self._inner.close()


class VoiceFsmGemini(Gemini):
    """A ``Gemini`` model whose live connections answer to a voicefsm session.

    Outside a voicefsm connection (no session link in context) it behaves exactly like
    ``Gemini``. Build one with :func:`live_model` or let :class:`AdkUpstream` swap it in.
    """

    @contextlib.asynccontextmanager
    async def connect(self, llm_request: LlmRequest) -> AsyncIterator[BaseLlmConnection]:
        """A live connection that reports to the session in context (plain ``Gemini`` without)."""
        link = _LINK.get(None)
        if link is None:
            async with super().connect(llm_request) as connection:
                yield connection
            return
        if link.connected:
            raise _AbortConnect(f"upstream #{link.connection_id}: ADK tried to reconnect")
        link.connected = True
        connect_config = llm_request.live_connect_config
        connect_config.session_resumption = types.SessionResumptionConfig(handle=link.handle)
        connect_config.context_window_compression = types.ContextWindowCompressionConfig(
            trigger_tokens=link.config.compression_trigger_tokens,
            sliding_window=types.SlidingWindow(target_tokens=link.config.compression_target_tokens),
        )
        stack = contextlib.AsyncExitStack()
        try:
            connection = await stack.enter_async_context(super().connect(llm_request))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # refused, handshake rejected, closed before setupComplete
            link.report_closed(*_close_code(error))
            await _park()
        async with stack:
            link.report(ev.UpstreamReady(connection_id=link.connection_id))
            yield _ReportingConnection(connection, link)


def live_model(model: str, client: Any = None) -> VoiceFsmGemini:
    """A :class:`VoiceFsmGemini` for ``model`` (optionally on a given ``genai.Client``)."""
    return VoiceFsmGemini(model=model, client=client)


class AdkConnection:
    """One upstream connection: a ``run_live`` task with its own ``LiveRequestQueue``."""

    def __init__(
        self, runner: Runner, user_id: str, session_id: str, run_config: RunConfig, link: _Link
    ) -> None:
        self._link = link
        self._queue = LiveRequestQueue()
        self._task = asyncio.create_task(
            self._run(runner, user_id, session_id, run_config),
            name=f"voicefsm-upstream-{session_id[:12]}-{link.connection_id}",
        )

    def send_audio(self, data: bytes) -> None:
        """Queue candidate audio; it counts as unsent until the websocket took it."""
        self._link.unsent.append(data)
        self._queue.send_realtime(types.Blob(data=data, mime_type=INPUT_AUDIO_MIME))

    def send_text(self, text: str) -> None:
        """Queue a text turn (the candidate's, or the wrap-up prompt)."""
        self._queue.send_content(types.Content(role="user", parts=[types.Part(text=text)]))

    async def close(self) -> list[bytes]:
        """Close the queue, cancel and await the ``run_live`` task, return unsent audio."""
        self._link.closing = True
        self._queue.close()
        if not self._task.done():
            self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=5)
        if not done:
            logger.warning("upstream #%d did not stop within 5 s", self._link.connection_id)
        return list(self._link.unsent)

    async def _run(
        self, runner: Runner, user_id: str, session_id: str, run_config: RunConfig
    ) -> None:
        link = self._link
        _LINK.set(link)
        try:
            stream = runner.run_live(
                user_id=user_id,
                session_id=session_id,
                live_request_queue=self._queue,
                run_config=run_config,
            )
            async with contextlib.aclosing(stream) as events:
                async for _ in events:
                    pass  # already reported below ADK, in wire order (see _ReportingConnection)
            link.report_closed(1000, "the live stream ended")
        except asyncio.CancelledError:
            raise
        except _AbortConnect as error:
            logger.warning("%s", error)
            link.report_closed(None, str(error))
        except Exception as error:
            logger.warning("upstream #%d failed: %s", link.connection_id, type(error).__name__)
            link.report_closed(*_close_code(error))


class AdkUpstream:
    """Opens upstream connections for sessions through an ADK agent (:class:`Upstream`).

    ``agent`` is the user's ``LlmAgent`` (instruction, tools); its model is replaced by a
    :class:`VoiceFsmGemini` of the same name unless it already is one. ``client`` (a
    ``genai.Client``) lets tests point it at the fake Live server. ``run_config`` is the base
    ``RunConfig`` (speech config, transcription settings ...); resumption and compression come
    from the session.
    """

    def __init__(
        self,
        agent: LlmAgent,
        *,
        model: str | None = None,
        client: Any = None,
        app_name: str = "voicefsm",
        user_id: str = "candidate",
        run_config: RunConfig | None = None,
        runner: Runner | None = None,
    ) -> None:
        current = agent.model
        name = model or (current if isinstance(current, str) else getattr(current, "model", None))
        if not name:
            raise ValueError("AdkUpstream needs a model name: pass model=... or give the agent one")
        # ADK imports its workflow machinery (~500 modules) lazily on the first run_live, which
        # blocks the event loop for about a second in the middle of the first interview. Pay it
        # here, when the upstream is built at start-up.
        import google.adk.workflow._workflow  # noqa: F401

        if not isinstance(current, VoiceFsmGemini) or model or client is not None:
            keep_client = client if client is not None else getattr(current, "client", None)
            agent = agent.model_copy(update={"model": live_model(name, keep_client)})
        self.agent = agent
        self.user_id = user_id
        self.app_name = app_name
        # An ADK session per interview lives in this in-memory service; when we own it we also
        # delete it when the interview ends (see `forget`), or a long-running server leaks them.
        self._owns_sessions = runner is None
        self.runner = runner or Runner(
            app_name=app_name,
            agent=agent,
            session_service=InMemorySessionService(),
            auto_create_session=True,
        )
        base = run_config or RunConfig()
        self.run_config = base.model_copy(
            update={
                "response_modalities": base.response_modalities or [types.Modality.AUDIO],
                "input_audio_transcription": base.input_audio_transcription
                or types.AudioTranscriptionConfig(),
                "output_audio_transcription": base.output_audio_transcription
                or types.AudioTranscriptionConfig(),
            }
        )

    async def forget(self, session_id: str) -> None:
        """Drop the ADK session of an ended interview (only from the service this upstream made)."""
        if not self._owns_sessions:
            return
        service = self.runner.session_service
        with contextlib.suppress(Exception):
            await service.delete_session(
                app_name=self.runner.app_name, user_id=self.user_id, session_id=session_id
            )

    def open(
        self,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> AdkConnection:
        """Start connection ``connection_id`` for session ``session_id``."""
        link = _Link(connection_id, handle, config, report)
        run_config = self.run_config.model_copy(
            update={
                "session_resumption": types.SessionResumptionConfig(handle=handle),
                "context_window_compression": types.ContextWindowCompressionConfig(
                    trigger_tokens=config.compression_trigger_tokens,
                    sliding_window=types.SlidingWindow(
                        target_tokens=config.compression_target_tokens
                    ),
                ),
            }
        )
        return AdkConnection(self.runner, self.user_id, session_id, run_config, link)
