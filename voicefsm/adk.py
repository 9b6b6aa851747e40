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
import inspect
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, Literal

from google.adk.agents import LiveRequestQueue, LlmAgent, RunConfig
from google.adk.events import Event
from google.adk.models.base_llm_connection import BaseLlmConnection
from google.adk.models.google_llm import Gemini
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.adk.sessions import Session as AdkSession
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import errors, types
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from voicefsm import events as ev
from voicefsm.classify import classify_adk_event
from voicefsm.genai_live import offer_model_deflate
from voicefsm.host import SessionLog
from voicefsm.liveness import UNCONFIRMED_MAX_CHUNKS as UNCONFIRMED_MAX_CHUNKS
from voicefsm.liveness import AudioLedger, check_liveness, wait_or_abort
from voicefsm.model import SessionConfig
from voicefsm.ports import Report
from voicefsm.sending import INPUT_AUDIO_MIME, Resume, realtime_audio_frame, takes_a_frame_now

logger = logging.getLogger("voicefsm.adk")


class _Link:
    """What one connection's hooks share: who to report to, which handle, the audio ledger.

    The ledger: ``unsent`` holds chunks queued for ADK but not yet written to the websocket;
    ``ledger`` (an :class:`~voicefsm.liveness.AudioLedger`) the chunks written since the peer
    last proved it had read everything (a pong to a ping sent after them, or a completed closing
    handshake).

    On the direct wire (see :class:`AdkUpstream`), a chunk is written to the websocket in the
    host's turn when nothing voicefsm queued for ADK is still ahead of it (``queued``), the
    connection is open (``wire_open``) and the socket takes a frame without waiting; otherwise
    it goes through ADK's ``LiveRequestQueue`` as on the ``"adk"`` wire.
    """

    def __init__(
        self,
        connection_id: int,
        handle: str | None,
        config: SessionConfig,
        report: Report,
        log: SessionLog,
        close_timeout_s: float,
    ) -> None:
        self.connection_id = connection_id
        self.handle = handle
        self.config = config
        self._report = report
        self.log = log
        self.close_timeout_s = close_timeout_s
        self.connected = False
        self.closed_reported = False
        self.closing = False
        self.websocket: ClientConnection | None = None
        self.armed: asyncio.Event | None = None
        """Set for a standby connection: its ``run_live`` waits here, just before connecting."""
        self.adk_session: AdkSession | None = None
        """The copy of the ADK session this connection's ``run_live`` works on."""
        self.state_version = 0
        """The session service's state version when that copy was taken."""
        self.on_ready: Callable[[], None] | None = None
        self.session_service: BoundedSessionService | None = None
        self.unsent: deque[bytes] = deque()
        self.ledger = AudioLedger()
        self.direct = False
        """This connection writes client audio frames itself (the direct wire, decided on
        connect)."""
        self.model_deflate = False
        """Whether this connection's websocket offers permessage-deflate to the model."""
        self.wire_open = False
        """ADK has sent its history and receives: a frame written now follows everything ADK
        sent."""
        self.queued = 0
        """Chunks and text turns voicefsm put into the ``LiveRequestQueue`` that have not
        reached the connection yet; a direct write would overtake them."""
        self.queued_texts: deque[types.Content] = deque()
        self.finishing: set[asyncio.Task[None]] = set()
        """Direct writes that had to wait for the socket's buffer to drain."""

    def report(self, event: ev.Event) -> None:
        if not self.closing:
            self._report(event)

    def report_closed(self, code: int | None, reason: str) -> None:
        if self.closed_reported:
            return
        self.closed_reported = True
        self.log.info("upstream #%d closed: %s %s", self.connection_id, code, reason)
        self.report(ev.UpstreamClosed(code, reason, connection_id=self.connection_id))

    def wrote(self, data: bytes) -> None:
        """``data`` (the oldest unsent chunk) is being written to the websocket now."""
        self.unsent.popleft()
        self.ledger.wrote(data)

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` to the websocket in the caller's turn, if nothing queued is ahead.

        Returns False (nothing written) when the chunk must go through ADK's queue instead. A
        frame to an open socket with room in its buffer is written without suspending; a send
        that does suspend (waiting for the buffer to drain) already wrote its frame and is
        finished by a task of its own.
        """
        websocket = self.websocket
        if (
            self.queued
            or not self.wire_open
            or websocket is None
            or not takes_a_frame_now(websocket)
        ):
            return False
        self.ledger.wrote(data)
        sending = websocket.send(realtime_audio_frame(data))
        try:
            waiting_on = sending.send(None)
        except StopIteration:
            return True
        except Exception as error:  # this connection's end: the chunk is unsent again
            self.unwrote(data)
            self.report_closed(*_close_code(error))
            self.abort()
            return True
        task = asyncio.ensure_future(self._finish_send(sending, waiting_on))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        return True

    async def _finish_send(self, sending: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        try:
            await Resume(sending, waiting_on)
        except (ConnectionClosed, OSError) as error:
            self.report_closed(*_close_code(error))

    def unwrote(self, data: bytes) -> None:
        """Writing ``data`` failed before it reached the socket: it is unsent again."""
        self.ledger.unwrote(data)
        self.unsent.appendleft(data)

    def abort(self) -> None:
        """Drop the TCP connection at once (no closing handshake)."""
        websocket = self.websocket
        if websocket is not None:
            websocket.transport.abort()


class _TrackedConnection(ClientConnection):
    """genai's websocket, registered with the voicefsm connection that opened it (if any).

    Created through the genai client's websocket options (see :meth:`VoiceFsmGemini.connect`);
    outside a voicefsm connection it is a plain ``ClientConnection``. It lets voicefsm ping the
    peer, bound the closing handshake and abort the socket, even before ``setupComplete``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        link = _LINK.get(None)
        if link is not None:
            link.websocket = self
            self.close_timeout = link.close_timeout_s


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
        link = self._link
        ours = bool(link.queued_texts) and link.queued_texts[0] is content
        await self._guard(self._inner.send_content(content))
        if ours:
            # Sent: audio behind this turn may be written directly again.
            link.queued_texts.popleft()
            link.queued -= 1

    async def send_realtime(self, blob: types.Blob) -> None:
        link = self._link
        if link.closing:
            return  # the host took this chunk back when it closed the connection
        data = blob.data if isinstance(blob, types.Blob) else None
        if data is None or blob.mime_type != INPUT_AUDIO_MIME or not link.unsent:
            await self._guard(self._inner.send_realtime(blob))
            return
        # genai writes the frame to the socket before its first await (websockets' send
        # writes, then drains), so from here on the chunk is "written", not "unsent".
        link.queued -= 1
        link.wrote(data)
        websocket = link.websocket
        try:
            if link.direct and websocket is not None:
                await websocket.send(realtime_audio_frame(data))
            else:
                await self._inner.send_realtime(blob)
        except (errors.APIError, ConnectionClosed, OSError) as error:
            if not link.closing:
                link.unwrote(data)
            link.report_closed(*_close_code(error))
            await _park()

    async def _guard(self, sending: Any) -> None:
        try:
            await sending
        except (errors.APIError, ConnectionClosed, OSError) as error:
            self._link.report_closed(*_close_code(error))
            await _park()

    async def receive(self) -> AsyncGenerator[LlmResponse, None]:
        link = self._link
        # ADK sends the history before it starts receiving: from now on a frame voicefsm writes
        # itself follows everything ADK sent on this connection.
        link.wire_open = True
        # Let the consumer take the UpstreamReady first: the buffered audio goes out and the
        # client is told before this task reads (and reports) the frames already waiting.
        await asyncio.sleep(0)
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
        config = link.config
        connect_config.context_window_compression = _compression(config)
        if link.armed is not None:
            # A standby: ADK's run_live start-up is done; connect once the session asks for it.
            # What does not depend on the handle was prepared above, before the GoAway.
            await link.armed.wait()
            if link.config is not config:
                connect_config.context_window_compression = _compression(link.config)
        connect_config.session_resumption = types.SessionResumptionConfig(handle=link.handle)
        # genai passes these options to websockets' connect: the socket registers itself with
        # the link (for pings, a bounded close and aborting it), even before setupComplete.
        client = self._live_api_client
        options = client._api_client._websocket_ssl_ctx
        options["create_connection"] = _TrackedConnection
        try:
            offer_model_deflate(client, link.model_deflate)
        except ValueError as error:  # another upstream on this client chose otherwise
            link.report_closed(None, str(error))
            await _park()
        if self._live_api_client.vertexai:
            link.direct = False  # the frames written directly are the Gemini API's
        stack = contextlib.AsyncExitStack()
        try:
            connection = await stack.enter_async_context(super().connect(llm_request))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # refused, handshake rejected, closed before setupComplete
            link.report_closed(*_close_code(error))
            await _park()
        async with stack:
            if link.armed is not None:
                # After the connect rather than before: nothing reads the state until the
                # connection yields, and a rotation's GoAway-to-setup gap stays the connect's own.
                await _refresh_state(link)
            link.report(ev.UpstreamReady(connection_id=link.connection_id))
            if link.on_ready is not None:
                link.on_ready()
            watcher = _start_liveness_check(link)
            try:
                yield _ReportingConnection(connection, link)
            finally:
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.wait({watcher})


def _compression(config: SessionConfig) -> types.ContextWindowCompressionConfig:
    return types.ContextWindowCompressionConfig(
        trigger_tokens=config.compression_trigger_tokens,
        sliding_window=types.SlidingWindow(target_tokens=config.compression_target_tokens),
    )


async def _refresh_state(link: _Link) -> None:
    """Bring a standby's copy of the ADK session's state up to date (it was taken earlier)."""
    stale = link.adk_session
    service = link.session_service
    if stale is None or service is None:
        return
    version = service.state_version(stale.app_name, stale.user_id, stale.id)
    if version == link.state_version:
        return  # no event changed the state since the copy was taken: nothing to copy again
    link.state_version = version
    fresh = await service.get_session(
        app_name=stale.app_name,
        user_id=stale.user_id,
        session_id=stale.id,
        config=GetSessionConfig(num_recent_events=0),
    )
    if fresh is not None:
        stale.state.clear()
        stale.state.update(fresh.state)


def _start_liveness_check(link: _Link) -> asyncio.Task[None] | None:
    websocket = link.websocket
    if websocket is None:
        return None
    name = f"voicefsm-upstream-{link.log.session_id[:12]}-{link.connection_id}-ping"
    checking = check_liveness(
        websocket, link.config, link.ledger, lambda: link.closing, link.report_closed
    )
    return asyncio.create_task(checking, name=name)


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
        which = "standby" if link.armed is not None else link.connection_id
        self._task = asyncio.create_task(
            self._run(runner, user_id, session_id, run_config),
            name=f"voicefsm-upstream-{session_id[:12]}-{which}",
        )

    async def discard(self) -> None:
        """Stop a standby that was never armed."""
        self._link.closing = True
        self._queue.close()
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=self._link.close_timeout_s + 1.0)

    @property
    def usable_as_standby(self) -> bool:
        """A standby whose ``run_live`` is still waiting to connect."""
        link = self._link
        return link.armed is not None and not link.armed.is_set() and not self._task.done()

    def arm(
        self, connection_id: int, handle: str | None, config: SessionConfig, report: Report
    ) -> None:
        """Turn this standby into connection ``connection_id``: it connects now."""
        link = self._link
        assert link.armed is not None
        link.connection_id = connection_id
        link.handle = handle
        link.config = config
        link._report = report
        self._task.set_name(f"voicefsm-upstream-{link.log.session_id[:12]}-{connection_id}")
        link.armed.set()

    def send_audio(self, data: bytes) -> None:
        """Send candidate audio, in order; it counts as unsent until written to the websocket.

        On the direct wire it is written now when it can be (see :meth:`_Link.write_now`);
        otherwise it is queued for ADK.
        """
        link = self._link
        if link.closing:
            raise RuntimeError(f"upstream #{link.connection_id} is closed")
        if link.direct and link.write_now(data):
            return
        link.unsent.append(data)
        link.queued += 1
        self._queue.send_realtime(types.Blob(data=data, mime_type=INPUT_AUDIO_MIME))

    def send_text(self, text: str) -> None:
        """Queue a text turn (the candidate's, or the wrap-up prompt) for ADK, in order."""
        link = self._link
        content = types.Content(role="user", parts=[types.Part(text=text)])
        if link.direct:
            # Audio after it waits in the queue behind it until ADK has sent it. (A turn that
            # ADK's before-model callback blocks never arrives: the rest of this connection's
            # audio then stays on ADK's queue, in order.)
            link.queued_texts.append(content)
            link.queued += 1
        self._queue.send_content(content)

    def close(self) -> list[bytes]:
        """Stop at once: nothing more is sent or reported. The socket work is :meth:`wait_closed`.

        Returns the chunks never written, preceded, if the liveness check found the connection
        dead, by those written since its last pong (the peer may never have read them); a dead
        connection's socket is aborted now rather than waiting for a closing handshake.
        """
        link = self._link
        if link.closing:
            return []
        link.closing = True
        handed_back = list(link.unsent)
        link.unsent.clear()
        if link.ledger.dead:
            handed_back[:0] = link.ledger.hand_back()
            link.abort()
        return handed_back

    async def wait_closed(self) -> int:
        """Stop ``run_live``: the closing handshake gets ``close_timeout_s``, then the socket is
        aborted. Returns the chunks written but never confirmed by the peer."""
        link = self._link
        task = self._task
        self._queue.close()
        websocket = link.websocket
        if websocket is not None and not link.ledger.dead and not task.done():
            # The closing handshake first, then the cancel: cancelling run_live in the middle of
            # genai's close would abort it, and a completed handshake confirms the audio.
            try:
                async with asyncio.timeout(link.close_timeout_s + 0.5):
                    await websocket.close()
            except Exception as error:  # TimeoutError, or a socket already broken
                link.log.info("closing upstream #%d: %r", link.connection_id, error)
        task.cancel()
        for finishing in list(link.finishing):
            finishing.cancel()  # its frame is written; only the wait for the drain is left
        await wait_or_abort(
            task, link.close_timeout_s + 0.5, link.abort, link.log, link.connection_id
        )
        return link.ledger.settle(link.websocket)

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
            link.log.warning("%s", error)
            link.report_closed(None, str(error))
        except Exception as error:
            link.log.warning("upstream #%d failed: %s", link.connection_id, type(error).__name__)
            link.report_closed(*_close_code(error))


ADK_EVENTS_KEPT = 64
"""Events an ADK session keeps under :class:`AdkUpstream`'s own session service (see there)."""


STANDBY_DELAY_S = 0.1
"""How long after a connection is ready the next one's standby ``run_live`` is started."""


class BoundedSessionService(InMemorySessionService):
    """ADK's in-memory session service, keeping only each session's last ``keep`` events.

    ADK appends every finished transcript, turn and tool event of a live conversation to its
    session, deep-copies the whole session at the start of every ``run_live`` (every upstream
    connection) and scans it on every append. Over a 45-minute interview that is memory growing
    with the transcript and rotations that get slower as the interview goes on. voicefsm needs
    none of that history: the transcript is in voicefsm's store and a resumed connection gets
    its context from the server, not from replayed history. So both the stored session and the
    running ``run_live``'s copy are cut back to the newest ``keep`` events (enough for ADK to pair
    a tool call with its response); the session's ``state`` is untouched.
    """

    def __init__(self, keep: int = ADK_EVENTS_KEPT) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        super().__init__()
        self.keep = keep
        self._state_versions: dict[tuple[str, str, str], int] = {}

    def state_version(self, app_name: str, user_id: str, session_id: str) -> int:
        """How many appended events of the session carried a state change (app, user or
        session state): a copy taken at one version has the state as it still is."""
        return self._state_versions.get((app_name, user_id, session_id), 0)

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> AdkSession | None:
        """As ADK's; a voicefsm connection also remembers the copy its ``run_live`` gets."""
        session = await super().get_session(
            app_name=app_name, user_id=user_id, session_id=session_id, config=config
        )
        link = _LINK.get(None)
        if link is not None and link.adk_session is None and session is not None:
            link.adk_session = session
            link.state_version = self.state_version(app_name, user_id, session_id)
        return session

    async def append_event(self, session: AdkSession, event: Event) -> Event:
        """Append as ADK does, then cut both copies of the session back to ``keep`` events."""
        result = await super().append_event(session=session, event=event)
        if event.actions is not None and event.actions.state_delta:
            key = (session.app_name, session.user_id, session.id)
            self._state_versions[key] = self._state_versions.get(key, 0) + 1
        self._trim(session)
        stored = self.sessions.get(session.app_name, {}).get(session.user_id, {}).get(session.id)
        if stored is not None and stored is not session:
            self._trim(stored)
        return result

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Delete as ADK does, with the session's state version."""
        self._state_versions.pop((app_name, user_id, session_id), None)
        await super().delete_session(app_name=app_name, user_id=user_id, session_id=session_id)

    def _trim(self, session: AdkSession) -> None:
        # Cut in batches (down to `keep` once there are twice as many): amortised O(1).
        events = session.events
        if len(events) >= 2 * self.keep:
            del events[: len(events) - self.keep]


class AdkUpstream:
    """Opens upstream connections for sessions through an ADK agent (:class:`Upstream`).

    ``agent`` is the user's ``LlmAgent`` (instruction, tools); its model is replaced by a
    :class:`VoiceFsmGemini` of the same name unless it already is one. ``client`` (a
    ``genai.Client``) lets tests point it at the fake Live server. ``run_config`` is the base
    ``RunConfig`` (speech config, transcription settings ...); resumption and compression come
    from the session. ``close_timeout_s`` bounds a connection's closing handshake before its
    socket is aborted (websockets' default is 10 s).

    ``warm_standby`` (with a :class:`BoundedSessionService`, the default): once a connection is
    ready, the next connection's ``run_live`` is started and waits just before connecting, so a
    rotation only pays for the connection itself, not for ADK's ``run_live`` start-up. One idle
    ``run_live`` per session; its copy of the ADK session's state is refreshed when it connects.

    ``wire`` is how client audio reaches the model. ``"direct"`` (the default): the connection
    writes each chunk as a Live API ``realtimeInput`` frame to its websocket, in the host's turn,
    instead of ADK's ``LiveRequestQueue``, send task and genai's per-frame conversions; text
    turns, tool responses and everything the model sends still go through ADK. ``"adk"``: audio
    goes through ADK's ``LiveRequestQueue`` too. ``"direct"`` falls back to ``"adk"`` where ADK
    itself needs the audio: a ``run_config`` with ``save_live_blob``, or an agent with a
    streaming tool (an ``input_stream`` parameter), and on Vertex AI clients.

    ``model_deflate``: whether the websocket to the model offers permessage-deflate (off by
    default, as for :class:`~voicefsm.genai_live.GenaiUpstream`: the base64 audio hardly
    compresses, and compressing it costs CPU). The choice is written into the genai client's
    websocket options, where the ``create_connection`` hook goes too: ``client``'s when the
    upstream is built, and the live model's at each connect. Upstreams sharing a client must
    agree: a ``client`` already set the other way raises ``ValueError`` here; a model's own client
    set the other way by another upstream fails that connection with the reason.
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
        close_timeout_s: float = 1.0,
        warm_standby: bool = True,
        wire: Literal["direct", "adk"] = "direct",
        model_deflate: bool = False,
    ) -> None:
        if close_timeout_s <= 0:
            raise ValueError(f"close_timeout_s must be > 0, got {close_timeout_s}")
        if wire not in ("direct", "adk"):
            raise ValueError(f"wire must be 'direct' or 'adk', got {wire!r}")
        self.close_timeout_s = close_timeout_s
        self._sessions: set[str] = set()
        self._standby: dict[str, AdkConnection] = {}
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
        # An ADK session per interview lives in this in-memory service, holding only its newest
        # events (see BoundedSessionService); when we own it we also delete it when the
        # interview ends (see `forget`), or a long-running server leaks them.
        self._owns_sessions = runner is None
        self.runner = runner or Runner(
            app_name=app_name,
            agent=agent,
            session_service=BoundedSessionService(),
            auto_create_session=True,
        )
        # A standby refreshes the state of its copy of the ADK session when it connects, which
        # needs the copy: BoundedSessionService remembers it.
        self.warm_standby = warm_standby and isinstance(
            self.runner.session_service, BoundedSessionService
        )
        base = run_config or RunConfig()
        if base.get_session_config is None:
            # Each connection resumes the server's context: it needs none of ADK's history, and
            # copying it at every run_live is what made rotations slower over an interview.
            base = base.model_copy(
                update={"get_session_config": GetSessionConfig(num_recent_events=0)}
            )
        self.run_config = base.model_copy(
            update={
                "response_modalities": base.response_modalities or [types.Modality.AUDIO],
                "input_audio_transcription": base.input_audio_transcription
                or types.AudioTranscriptionConfig(),
                "output_audio_transcription": base.output_audio_transcription
                or types.AudioTranscriptionConfig(),
            }
        )
        direct = wire == "direct" and not base.save_live_blob and not _has_streaming_tool(agent)
        self.wire: Literal["direct", "adk"] = "direct" if direct else "adk"
        """The wire in use: ``"adk"`` where ``"direct"`` was asked for but ADK needs the audio."""
        if client is not None:
            offer_model_deflate(client, model_deflate)  # a shared client's conflict shows now
        self.model_deflate = model_deflate

    async def forget(self, session_id: str) -> None:
        """Drop the session's standby and its ADK session (only from the service made here)."""
        self._sessions.discard(session_id)
        standby = self._standby.pop(session_id, None)
        if standby is not None:
            await standby.discard()
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
        """Start connection ``connection_id`` for session ``session_id`` (warm if one waits)."""
        self._sessions.add(session_id)
        standby = self._standby.pop(session_id, None)
        # A standby that is not usable has already stopped (it failed before connecting).
        if standby is not None and standby.usable_as_standby:
            standby.arm(connection_id, handle, config, report)
            return standby
        log = SessionLog(logger, session_id)
        link = _Link(connection_id, handle, config, report, log, self.close_timeout_s)
        self._wire(link, session_id, config)
        return AdkConnection(
            self.runner, self.user_id, session_id, self._run_config(handle, config), link
        )

    def _run_config(self, handle: str | None, config: SessionConfig) -> RunConfig:
        return self.run_config.model_copy(
            update={
                "session_resumption": types.SessionResumptionConfig(handle=handle),
                "context_window_compression": _compression(config),
            }
        )

    def _wire(self, link: _Link, session_id: str, config: SessionConfig) -> None:
        link.direct = self.wire == "direct"
        link.model_deflate = self.model_deflate
        service = self.runner.session_service
        if isinstance(service, BoundedSessionService):
            link.session_service = service
        if self.warm_standby:

            def prepare_later() -> None:
                loop = asyncio.get_running_loop()
                loop.call_later(STANDBY_DELAY_S, self._prepare_standby, session_id, config)

            link.on_ready = prepare_later

    def _prepare_standby(self, session_id: str, config: SessionConfig) -> None:
        if session_id not in self._sessions or session_id in self._standby:
            return
        log = SessionLog(logger, session_id)
        link = _Link(-1, None, config, _ignore_report, log, self.close_timeout_s)
        link.armed = asyncio.Event()
        self._wire(link, session_id, config)
        self._standby[session_id] = AdkConnection(
            self.runner, self.user_id, session_id, self._run_config(None, config), link
        )


def _ignore_report(event: ev.Event) -> None:
    """A standby reports nothing until it is armed."""


def _has_streaming_tool(agent: Any) -> bool:
    """Whether ``agent`` or a sub-agent has a tool that reads the live audio (``input_stream``).

    ADK copies every chunk in its ``LiveRequestQueue`` to such a tool while it runs, so audio
    for these agents must go through that queue.
    """
    for tool in getattr(agent, "tools", None) or ():
        function = getattr(tool, "func", tool)
        if callable(function):
            try:
                if "input_stream" in inspect.signature(function).parameters:
                    return True
            except (TypeError, ValueError):  # no signature to read
                continue
    return any(_has_streaming_tool(sub) for sub in getattr(agent, "sub_agents", None) or ())
