"""The direct google-genai upstream: each connection is one ``client.aio.live.connect``.

No ADK in the path. Each upstream connection is one task that

* opens ``client.aio.live.connect`` with the handle the session chose
  (``SessionResumptionConfig``) and the session's context-window compression, bounded by
  ``SessionConfig.connect_timeout_s`` (genai's ``connect()`` itself waits for ``setupComplete``
  with no timeout);
* reports :class:`~voicefsm.events.UpstreamReady` once the setup is complete, then every server
  message as voicefsm events (:class:`GenaiClassifier`) — GoAway and resumption updates
  included — in wire order: on the direct wire as websockets parses each frame (inside its
  ``data_received``, no task wake-up per message), else from that one task;
* reports exactly one :class:`~voicefsm.events.UpstreamClosed` however the connection ends (a
  close code on receive, a failed send, a refused or timed-out connect) and then stops: it never
  reconnects by itself, the session decides;
* sends candidate audio and text in order — in the caller's turn while the websocket takes
  frames at once, else from a small sender task — keeping a ledger of the audio not yet
  written (and, for a connection that proved dead, written but never confirmed by a pong),
  which :meth:`GenaiConnection.close` hands back;
* pings the peer (``SessionConfig.upstream_ping_interval_s``); no pong within
  ``upstream_pong_timeout_s`` is a resumable 1006 close;
* answers tool calls with the handlers given to :class:`GenaiUpstream` (``tool_response``).

This module imports google-genai only; it works with google-genai 2.x and 3.x.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import inspect
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Final, cast

from google import genai
from google.genai import errors, types
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from voicefsm import events as ev
from voicefsm.classify import FIELD_RULES
from voicefsm.host import SessionLog
from voicefsm.liveness import UNCONFIRMED_MAX_CHUNKS as UNCONFIRMED_MAX_CHUNKS
from voicefsm.liveness import AudioLedger, check_liveness, wait_or_abort
from voicefsm.model import SessionConfig
from voicefsm.ports import Report
from voicefsm.sending import (
    INPUT_AUDIO_MIME,
    Resume,
    between_messages,
    realtime_audio_frame,
    takes_a_frame_now,
)

logger = logging.getLogger("voicefsm.genai")

"""What the candidate's audio is sent as."""

ToolHandler = Callable[..., Awaitable[Any]] | Callable[..., Any]
"""A tool: called with the model's arguments as keyword arguments; returns a mapping (sent as
the function response) or any other value (sent as ``{"result": value}``). A coroutine
function runs on the event loop; a plain function runs in a worker thread."""

_CONVERT_CONTENT = dict(FIELD_RULES)["content"]
_CONVERT_USAGE = dict(FIELD_RULES)["usage_metadata"]


class GenaiClassifier:
    """Turns one connection's genai ``LiveServerMessage`` stream into voicefsm events.

    The Live API sends transcripts in fragments; a finished line is reported as one
    ``finished=True`` event carrying the whole text, when the fragment marked finished arrives
    or, failing that, at the next interruption, generation or turn end (what ADK does too).
    Fragments are also reported as they come, with ``finished=False``.
    """

    __slots__ = ("_heard", "_said", "connection_id")

    def __init__(self, connection_id: int | None = None) -> None:
        self.connection_id = connection_id
        self._heard = ""
        self._said = ""

    def classify(self, message: types.LiveServerMessage) -> list[ev.Event]:
        """The events of one message, in wire order.

        Within a ``serverContent``: input transcript, output transcript, the model turn's parts
        (audio, tool activity), the transcripts a boundary completes, interrupted, turn
        complete — the order :data:`voicefsm.classify.FIELD_RULES` uses for ADK. A GoAway is
        tagged with ``connection_id``. Setup completion, voice-activity signals and tool-call
        cancellations are bookkeeping (no event); a message with nothing voicefsm knows
        becomes one :class:`~voicefsm.events.Unknown`.
        """
        out: list[ev.Event] = []
        known = False
        content = message.server_content
        if content is not None:
            known = True
            heard = content.input_transcription
            if heard is not None:
                if heard.text:
                    self._heard += heard.text
                    out.append(ev.InputTranscript(text=heard.text, finished=False))
                if heard.finished:
                    self._flush_heard(out)
            said = content.output_transcription
            if said is not None:
                if said.text:
                    self._said += said.text
                    out.append(ev.OutputTranscript(text=said.text, finished=False))
                if said.finished:
                    self._flush_said(out)
            if content.model_turn is not None:
                out.extend(_CONVERT_CONTENT(content.model_turn))
            if content.interrupted or content.turn_complete or content.generation_complete:
                self._flush_heard(out)
                self._flush_said(out)
            if content.interrupted:
                out.append(ev.Interrupted())
            if content.turn_complete:
                out.append(ev.TurnComplete())
        if message.tool_call is not None:
            known = True
            for call in message.tool_call.function_calls or ():
                out.append(ev.ToolActivity(name=call.name or "?", phase="call"))
        update = message.session_resumption_update
        if update is not None:
            known = True
            out.append(
                ev.ResumptionUpdate(
                    handle=update.new_handle or None, resumable=bool(update.resumable)
                )
            )
        if message.usage_metadata is not None:
            known = True
            out.extend(_CONVERT_USAGE(message.usage_metadata))
        if message.go_away is not None:
            known = True
            out.append(
                ev.GoAway(time_left=message.go_away.time_left, connection_id=self.connection_id)
            )
        if not known and not _is_bookkeeping(message):
            out.append(ev.Unknown("LiveServerMessage with no recognised field"))
        return out

    def classify_wire(self, message: Mapping[str, Any]) -> list[ev.Event]:
        """:meth:`classify` for one server message as decoded JSON (the wire's camelCase).

        The same events, in the same order, without building genai's pydantic models: what the
        direct wire path of :class:`GenaiConnection` uses.
        """
        out: list[ev.Event] = []
        known = False
        content = _field(message, "serverContent", "server_content")
        if content is not None:
            known = True
            heard = _field(content, "inputTranscription", "input_transcription")
            if heard is not None:
                text = heard.get("text")
                if text:
                    self._heard += text
                    out.append(ev.InputTranscript(text=text, finished=False))
                if heard.get("finished"):
                    self._flush_heard(out)
            said = _field(content, "outputTranscription", "output_transcription")
            if said is not None:
                text = said.get("text")
                if text:
                    self._said += text
                    out.append(ev.OutputTranscript(text=text, finished=False))
                if said.get("finished"):
                    self._flush_said(out)
            turn = _field(content, "modelTurn", "model_turn")
            if turn is not None:
                for part in turn.get("parts") or ():
                    out.append(_wire_part(part))
            interrupted = content.get("interrupted")
            turn_complete = _field(content, "turnComplete", "turn_complete")
            if (
                interrupted
                or turn_complete
                or _field(content, "generationComplete", "generation_complete")
            ):
                self._flush_heard(out)
                self._flush_said(out)
            if interrupted:
                out.append(ev.Interrupted())
            if turn_complete:
                out.append(ev.TurnComplete())
        tool_call = _field(message, "toolCall", "tool_call")
        if tool_call is not None:
            known = True
            for call in _field(tool_call, "functionCalls", "function_calls") or ():
                out.append(ev.ToolActivity(name=call.get("name") or "?", phase="call"))
        update = _field(message, "sessionResumptionUpdate", "session_resumption_update")
        if update is not None:
            known = True
            out.append(
                ev.ResumptionUpdate(
                    handle=_field(update, "newHandle", "new_handle") or None,
                    resumable=bool(update.get("resumable")),
                )
            )
        usage = _field(message, "usageMetadata", "usage_metadata")
        if usage is not None:
            known = True
            out.append(
                ev.Usage(
                    prompt_tokens=_field(usage, "promptTokenCount", "prompt_token_count"),
                    response_tokens=_field(usage, "responseTokenCount", "response_token_count"),
                    total_tokens=_field(usage, "totalTokenCount", "total_token_count"),
                )
            )
        go_away = _field(message, "goAway", "go_away")
        if go_away is not None:
            known = True
            time_left = _field(go_away, "timeLeft", "time_left")
            out.append(ev.GoAway(time_left=time_left, connection_id=self.connection_id))
        if not known and not any(key in message for key in _WIRE_BOOKKEEPING):
            out.append(ev.Unknown("server message with no recognised field"))
        return out

    def _flush_heard(self, out: list[ev.Event]) -> None:
        if self._heard:
            out.append(ev.InputTranscript(text=self._heard, finished=True))
            self._heard = ""

    def _flush_said(self, out: list[ev.Event]) -> None:
        if self._said:
            out.append(ev.OutputTranscript(text=self._said, finished=True))
            self._said = ""


def _is_bookkeeping(message: types.LiveServerMessage) -> bool:
    return any(
        getattr(message, name, None) is not None
        for name in (
            "setup_complete",
            "tool_call_cancellation",
            "voice_activity_detection_signal",
            "voice_activity",
        )
    )


_WIRE_BOOKKEEPING: Final = frozenset(
    {
        "setupComplete",
        "setup_complete",
        "toolCallCancellation",
        "tool_call_cancellation",
        "voiceActivityDetectionSignal",
        "voice_activity_detection_signal",
        "voiceActivity",
        "voice_activity",
    }
)


def _field(mapping: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field of a wire object: the API writes camelCase; snake_case is accepted too."""
    value = mapping.get(camel)
    return value if value is not None else mapping.get(snake)


def _wire_part(part: Mapping[str, Any]) -> ev.Event:
    inline = _field(part, "inlineData", "inline_data")
    if inline is not None:
        mime = _field(inline, "mimeType", "mime_type") or ""
        data = inline.get("data")
        if mime.startswith("audio/") and data:
            return ev.ModelAudio(data=base64.b64decode(data), mime_type=mime)
        return ev.Unknown(f"inline data of type {mime or 'unknown'}")
    call = _field(part, "functionCall", "function_call")
    if call is not None:
        return ev.ToolActivity(name=call.get("name") or "?", phase="call")
    response = _field(part, "functionResponse", "function_response")
    if response is not None:
        return ev.ToolActivity(name=response.get("name") or "?", phase="response")
    if part.get("text"):
        return ev.Unknown("text part")
    return ev.Unknown("empty or unrecognised content part")


def close_code(error: BaseException) -> tuple[int | None, str]:
    """The close code and reason an exception from genai or websockets stands for."""
    if isinstance(error, errors.APIError):
        return error.code, str(error.message or error.details or "")
    if isinstance(error, ConnectionClosed):
        frame = error.rcvd
        return (frame.code, frame.reason) if frame is not None else (1006, "no close frame")
    if isinstance(error, InvalidStatus):
        return None, f"HTTP {error.response.status_code} on connect"
    return None, f"{type(error).__name__}: {error}"


_CONNECTION_ERRORS = (errors.APIError, ConnectionClosed, InvalidStatus, OSError)


def _declare(handler: ToolHandler) -> types.FunctionDeclaration:
    """``handler``'s declaration, its parameters as JSON schema: the shape ADK sends the Live
    API (``parameters_json_schema``, no response schema); genai warns on its older schema."""
    declaration = types.FunctionDeclaration.from_callable_with_api_option(
        callable=handler, api_option="GEMINI_API", use_json_schema=True
    )
    return declaration.model_copy(update={"response_json_schema": None})


class GenaiTool:
    """A function the model may call: its declaration and its handler."""

    def __init__(
        self, handler: ToolHandler, declaration: types.FunctionDeclaration | None = None
    ) -> None:
        self.handler = handler
        self.declaration = declaration or _declare(handler)
        if not self.declaration.name:
            raise ValueError("a tool declaration needs a name")
        self.name: str = self.declaration.name
        self._is_async = inspect.iscoroutinefunction(handler)

    async def call(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Run the handler; its result as a function response payload."""
        if self._is_async:
            result = await self.handler(**arguments)
        else:
            result = await asyncio.to_thread(self.handler, **arguments)
        if isinstance(result, Mapping):
            return dict(result)
        return {"result": result}


class _Outbox:
    """What the sender task still has to send, in order; audio counts as unsent until sent."""

    __slots__ = ("items", "wakeup")

    def __init__(self) -> None:
        self.items: deque[bytes | str] = deque()
        self.wakeup = asyncio.Event()

    def put(self, item: bytes | str) -> None:
        self.items.append(item)
        self.wakeup.set()

    def unsent_audio(self) -> list[bytes]:
        return [item for item in self.items if isinstance(item, bytes)]


_CURRENT: contextvars.ContextVar[GenaiConnection] = contextvars.ContextVar("voicefsm_genai")

_DATA_OPCODES: Final = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


def _assembler_frames(ws: Any) -> deque[Frame] | None:
    """The frames websockets' asyncio assembler holds for ``recv()`` (websockets 15-17), if
    that is where this websockets keeps them."""
    queue = getattr(getattr(getattr(ws, "recv_messages", None), "frames", None), "queue", None)
    return queue if isinstance(queue, deque) else None


def _track_websockets(client: genai.Client) -> None:
    """Make the websockets this client opens register with the connection opening them.

    genai passes its client's websocket options to websockets' ``connect``; a
    ``create_connection`` class there sees every socket from its TCP handshake on, so voicefsm
    can ping it, bound its closing handshake and abort it even before ``setupComplete``. An
    earlier hook there (voicefsm's ADK upstream sets its own) is kept as the base class.
    """
    options = getattr(getattr(client, "_api_client", None), "_websocket_ssl_ctx", None)
    if not isinstance(options, dict):
        return  # another genai layout: pings and aborts then start at setupComplete
    base = options.get("create_connection", ClientConnection)
    if getattr(base, "_voicefsm_genai", False):
        return

    class _Tracked(base):  # type: ignore[valid-type,misc]
        _voicefsm_genai = True
        _voicefsm_take_frame: Callable[[Frame], None] | None = None
        """While set, data frames go here as they are parsed instead of to ``recv()``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            connection = _CURRENT.get(None)
            if connection is not None:
                connection._attach(self)

        def process_event(self, event: Any) -> None:
            take = self._voicefsm_take_frame
            if take is not None and isinstance(event, Frame) and event.opcode in _DATA_OPCODES:
                take(event)
            else:
                super().process_event(event)

    options["create_connection"] = _Tracked


def offer_model_deflate(client: Any, offer: bool) -> None:
    """Make the websockets ``client`` (a ``genai.Client``) opens offer permessage-deflate, or not.

    genai passes its client's websocket options to websockets' ``connect``; this sets their
    ``compression``: ``"deflate"`` (websockets' default) or ``None``, which offers nothing, so
    the model's server cannot compress either (RFC 7692). The options belong to the client, so
    every upstream on one client must make the same choice: a client whose options already say
    otherwise (another upstream's choice, or ``compression`` in its ``async_client_args``)
    raises ``ValueError``. A client without such options (another genai layout) is left as it
    is.
    """
    options = getattr(getattr(client, "_api_client", None), "_websocket_ssl_ctx", None)
    if not isinstance(options, dict):
        return
    wanted = "deflate" if offer else None
    if "compression" in options and options["compression"] != wanted:
        raise ValueError(
            f"this genai.Client's websocket options already say "
            f"compression={options['compression']!r}, so model_deflate={offer} cannot apply: "
            "upstreams that differ in model_deflate need a genai.Client each"
        )
    options["compression"] = wanted


class GenaiConnection:
    """One upstream connection: a ``live.connect`` session driven by one task.

    Built by :meth:`GenaiUpstream.open`. The host sends with :meth:`send_audio` and
    :meth:`send_text`, then calls :meth:`close` (at once, never blocks) and :meth:`wait_closed`
    (the socket work, bounded), as :class:`voicefsm.ports.UpstreamConnection` says.

    The audio ledger: chunks queued but not yet written are *unsent*; chunks written since the
    peer last proved it had read everything (a pong to a later ping, or its close frame) are
    *unconfirmed* (kept in an :class:`~voicefsm.liveness.AudioLedger`).
    """

    def __init__(
        self,
        upstream: GenaiUpstream,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> None:
        self.connection_id = connection_id
        self._upstream = upstream
        self._config = config
        self._report = report
        self._log = SessionLog(logger, session_id)
        self._outbox = _Outbox()
        self._closing = False
        self._closed_reported = False
        self._ws: Any = None
        self._session: Any = None
        self._tool_tasks: dict[str, asyncio.Task[None]] = {}
        self._sender_busy = False
        self._direct = False
        self._classify_wire = GenaiClassifier(connection_id).classify_wire
        self._pushing: asyncio.Future[bool] | None = None
        self._inflight: tuple[Coroutine[Any, Any, None], Any] | None = None
        self._ledger = AudioLedger()
        _track_websockets(upstream.client)
        self._task = asyncio.create_task(
            self._run(upstream.connect_config(handle, config), config.connect_timeout_s),
            name=f"voicefsm-upstream-{session_id[:12]}-{connection_id}",
        )

    # ------------------------------------------------------------------ the host's side

    def send_audio(self, data: bytes) -> None:
        """Send candidate audio, in order; it counts as unsent until written to the socket."""
        if self._closing:
            raise RuntimeError(f"upstream #{self.connection_id} is closed")
        self._put(data)

    def send_text(self, text: str) -> None:
        """Send a text turn (the candidate's, or the wrap-up prompt), in order."""
        if not self._closing:
            self._put(text)

    def close(self) -> list[bytes]:
        """Stop at once: nothing more is sent or reported. The socket work is :meth:`wait_closed`.

        Returns the chunks never written, preceded, if the liveness check found the connection
        dead, by those written since its last pong; a dead connection's socket is aborted now.
        """
        if self._closing:
            return []
        self._closing = True
        handed_back = self._outbox.unsent_audio()
        self._outbox.items.clear()
        self._outbox.wakeup.set()
        if self._ledger.dead:
            handed_back[:0] = self._ledger.hand_back()
            self._abort()
        for task in self._tool_tasks.values():
            task.cancel()
        return handed_back

    async def wait_closed(self) -> int:
        """Stop the connection: the closing handshake gets the upstream's ``close_timeout_s``,
        then the socket is aborted. Returns the chunks written but never confirmed by the peer.
        """
        if not self._closing:
            self.close()
        task = self._task
        timeout = self._upstream.close_timeout_s
        if not task.done():
            task.cancel()
            await wait_or_abort(task, timeout + 0.5, self._abort, self._log, self.connection_id)
        if self._inflight is not None:  # suspended in a send the sender never finished
            self._inflight[0].close()
            self._inflight = None
        tools = list(self._tool_tasks.values())
        if tools:
            await asyncio.wait(tools, timeout=timeout)
        return self._ledger.settle(self._ws)

    @property
    def done(self) -> bool:
        """Whether the connection's task has finished."""
        return self._task.done()

    # ------------------------------------------------------------------ the ledger

    def _wrote(self, item: bytes | str) -> None:
        if isinstance(item, bytes):
            self._ledger.wrote(item)

    def _unwrote(self, item: bytes | str) -> None:
        """Writing ``item`` failed before it reached the socket: it is unsent again."""
        if isinstance(item, bytes):
            self._ledger.unwrote(item)
        if not self._closing:
            self._outbox.items.appendleft(item)

    # ------------------------------------------------------------------ sending

    def _put(self, item: bytes | str) -> None:
        """Send ``item`` in the caller's turn when the websocket takes it at once, else queue it.

        A frame to an open websocket with room in its write buffer is written without
        suspending, so running the send coroutine here saves the sender task's wake-up per
        chunk. If it does suspend (flow control), the sender task finishes it before the next
        item; while anything is queued or in flight, items queue behind it, keeping the order.
        """
        session = self._session
        ws = self._ws
        if (
            session is None
            or self._outbox.items
            or self._sender_busy
            or self._inflight is not None
            or ws is None
            or not takes_a_frame_now(ws)
        ):
            self._outbox.put(item)
            return
        # genai writes the frame before its first await: from here on the chunk is "written".
        self._wrote(item)
        if self._direct and isinstance(item, bytes) and between_messages(ws):
            self._write_audio_frame(ws, item)
            return
        sending = self._send_one(session, item)
        try:
            yielded = sending.send(None)
        except StopIteration:
            return
        except Exception as error:  # this connection's end, never the host's
            self._unwrote(item)
            self._send_failed(error)
            return
        self._inflight = (sending, yielded)
        self._outbox.wakeup.set()

    def _write_audio_frame(self, ws: Any, item: bytes) -> None:
        """Write one audio frame now, through websockets' sans-I/O protocol.

        What ``ws.send()`` does for an open connection whose transport is not paused, without its
        coroutine, its async context manager and its ``drain()`` (which would not wait): the
        frame goes to the protocol and its bytes to the transport. If the transport's buffer
        fills, websockets pauses the connection, and later items take the queued path.
        """
        try:
            ws.protocol.send_text(realtime_audio_frame(item).encode("ascii"))
            ws.send_data()
        except Exception as error:  # this connection's end, never the host's
            self._unwrote(item)
            self._send_failed(error)

    def _send_one(self, session: Any, item: bytes | str) -> Coroutine[Any, Any, None]:
        if isinstance(item, bytes) and self._direct:
            return cast(Coroutine[Any, Any, None], self._ws.send(realtime_audio_frame(item)))
        if isinstance(item, bytes):
            return cast(
                Coroutine[Any, Any, None],
                session.send_realtime_input(
                    audio=types.Blob(data=item, mime_type=INPUT_AUDIO_MIME)
                ),
            )
        return cast(
            Coroutine[Any, Any, None],
            session.send_client_content(
                turns=types.Content(role="user", parts=[types.Part(text=item)]),
                turn_complete=True,
            ),
        )

    def _send_failed(self, error: BaseException) -> None:
        self._report_closed(*close_code(error))
        self._abort()  # the receive loop then ends too

    async def _send_loop(self, session: Any) -> None:
        outbox = self._outbox
        items = outbox.items
        try:
            while not self._closing:
                if self._inflight is not None:
                    sending, yielded = self._inflight
                    self._sender_busy = True
                    try:
                        await Resume(sending, yielded)
                    finally:
                        self._inflight = None
                        self._sender_busy = False
                if not items:
                    outbox.wakeup.clear()
                    await outbox.wakeup.wait()
                    continue
                item = items.popleft()
                self._wrote(item)
                self._sender_busy = True
                try:
                    await self._send_one(session, item)
                except _CONNECTION_ERRORS:
                    self._unwrote(item)
                    raise
                finally:
                    self._sender_busy = False
        except _CONNECTION_ERRORS as error:
            self._send_failed(error)

    # ------------------------------------------------------------------ the connection task

    def _attach(self, ws: Any) -> None:
        self._ws = ws
        ws.close_timeout = self._upstream.close_timeout_s

    def _emit(self, event: ev.Event) -> None:
        if not self._closing:
            self._report(event)

    def _report_closed(self, code: int | None, reason: str) -> None:
        if self._closed_reported:
            return
        self._closed_reported = True
        self._log.info("upstream #%d closed: %s %s", self.connection_id, code, reason)
        self._emit(ev.UpstreamClosed(code, reason, connection_id=self.connection_id))

    def _abort(self) -> None:
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def _run(self, live_config: types.LiveConnectConfig, connect_timeout_s: float) -> None:
        _CURRENT.set(self)
        upstream = self._upstream
        helpers: list[asyncio.Task[None]] = []
        try:
            connecting = upstream.client.aio.live.connect(model=upstream.model, config=live_config)
            try:
                async with asyncio.timeout(connect_timeout_s):
                    session = await connecting.__aenter__()
            except TimeoutError:
                self._report_closed(None, f"no setupComplete within {connect_timeout_s:g} s")
                return
            except _CONNECTION_ERRORS as error:
                self._report_closed(*close_code(error))
                return
            try:
                if self._ws is None:
                    self._attach(getattr(session, "_ws", None))
                setup = session.setup_complete
                if setup is None:
                    self._report_closed(None, "the server answered the setup without setupComplete")
                    return
                self._session = session
                self._direct = (
                    upstream.wire == "direct"
                    and self._ws is not None
                    and not getattr(upstream.client, "vertexai", False)
                )
                self._emit(
                    ev.UpstreamReady(
                        connection_id=self.connection_id, upstream_session_id=setup.session_id
                    )
                )
                helpers.append(asyncio.create_task(self._send_loop(session)))
                if self._ws is not None:
                    checking = check_liveness(
                        self._ws,
                        self._config,
                        self._ledger,
                        lambda: self._closing,
                        self._report_closed,
                    )
                    helpers.append(asyncio.create_task(checking))
                if self._direct:
                    await self._receive_direct(self._ws)
                else:
                    await self._receive_loop(session)
            finally:
                for helper in helpers:
                    helper.cancel()
                if helpers:
                    await asyncio.wait(helpers)
                with contextlib.suppress(Exception):
                    await connecting.__aexit__(None, None, None)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # anything else is this connection's end, never the host's
            self._log.warning("upstream #%d failed: %s", self.connection_id, type(error).__name__)
            self._report_closed(*close_code(error))

    async def _receive_loop(self, session: Any) -> None:
        classify = GenaiClassifier(self.connection_id).classify
        try:
            while True:
                # receive() stops after each complete turn; the connection goes on.
                async for message in session.receive():
                    for event in classify(message):
                        self._emit(event)
                    if message.tool_call is not None and not self._closing:
                        self._start_tools(session, message.tool_call)
                    if message.tool_call_cancellation is not None:
                        for call_id in message.tool_call_cancellation.ids or ():
                            task = self._tool_tasks.pop(call_id, None)
                            if task is not None:
                                task.cancel()
        except _CONNECTION_ERRORS as error:
            self._report_closed(*close_code(error))

    async def _receive_direct(self, ws: Any) -> None:
        """Server messages straight from the websocket's JSON: pushed while websockets allows.

        Once pushing, websockets hands each data frame to :meth:`_take_frame` as it parses it,
        inside its ``data_received``, so a model message costs no wake-up of this task. The
        frames that arrived with or after ``setupComplete``, before this switch, wait in
        websockets' assembler for ``recv()``; they go first, in order. This task then waits for
        the socket's end (or a fall-back to ``recv()``, or an error in :meth:`_take_frame`).
        """
        backlog = _assembler_frames(ws)
        lost = getattr(ws, "connection_lost_waiter", None)
        if (
            backlog is None
            or not isinstance(lost, asyncio.Future)
            or not getattr(type(ws), "_voicefsm_genai", False)
        ):
            await self._receive_wire(ws)  # another websockets layout: no push
            return
        pushing: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pushing = pushing

        def socket_lost(_: object) -> None:
            if not pushing.done():
                pushing.set_result(False)

        lost.add_done_callback(socket_lost)
        ws._voicefsm_take_frame = self._take_frame
        try:
            while backlog and ws._voicefsm_take_frame is not None:
                self._take_frame(backlog.popleft())
            ws.recv_messages.maybe_resume()  # the assembler may have paused reading
            fell_back = await pushing
        finally:
            ws._voicefsm_take_frame = None
            lost.remove_done_callback(socket_lost)
            self._pushing = None
            if pushing.done() and not pushing.cancelled():
                pushing.exception()  # retrieved, even when a cancel came first
        if fell_back:
            await self._receive_wire(ws)
        else:
            self._report_closed(*close_code(ws.protocol.close_exc))

    def _take_frame(self, frame: Frame) -> None:
        """One data frame, inside websockets' ``data_received``: its events reported now.

        Never raises into websockets: an error ends pushing and makes the connection task
        raise it, which closes the connection and reports it, as a receive error always did.
        A fragmented message, or a text frame that is not UTF-8, goes back to websockets'
        assembler with everything after it, and the connection task reads on with ``recv()``,
        which assembles it, or fails the connection with 1007, exactly as websockets does.
        """
        if self._closing:
            return
        try:
            if not frame.fin or frame.opcode is Opcode.CONT:
                self._fall_back(frame)
                return
            data = frame.data
            if frame.opcode is Opcode.TEXT:
                try:
                    raw: str | bytes = str(data, "utf-8")
                except UnicodeDecodeError:
                    self._fall_back(frame)
                    return
            else:
                raw = bytes(data)
            self._take_message(raw)
        except Exception as error:
            self._push_failed(error)

    def _fall_back(self, frame: Frame) -> None:
        ws = self._ws
        ws._voicefsm_take_frame = None
        backlog = _assembler_frames(ws)
        assert backlog is not None  # checked before pushing started
        backlog.appendleft(frame)  # before any frames of the backlog still queued
        ws.recv_messages.maybe_pause()
        pushing = self._pushing
        if pushing is not None and not pushing.done():
            pushing.set_result(True)

    def _push_failed(self, error: Exception) -> None:
        self._ws._voicefsm_take_frame = None  # later frames wait unread, as after any error
        pushing = self._pushing
        if pushing is not None and not pushing.done():
            if isinstance(error, StopIteration):  # a future cannot hold one
                error = RuntimeError(f"StopIteration: {error}")
            pushing.set_exception(error)

    async def _receive_wire(self, ws: Any) -> None:
        """The receive loop on the websocket itself: JSON to events, no pydantic models."""
        try:
            while True:
                self._take_message(await ws.recv())
        except ConnectionClosed as error:
            self._report_closed(*close_code(error))

    def _take_message(self, raw: str | bytes) -> None:
        """One server message from the wire: its events reported, its tool calls started."""
        try:
            message = json.loads(raw) if raw else {}
        except ValueError:
            self._emit(ev.Unknown("a server frame that is not JSON"))
            return
        if not isinstance(message, dict):
            self._emit(ev.Unknown("a server frame that is not a JSON object"))
            return
        for event in self._classify_wire(message):
            self._emit(event)
        tool_call = _field(message, "toolCall", "tool_call")
        if tool_call is not None and not self._closing:
            calls = _field(tool_call, "functionCalls", "function_calls") or ()
            self._start_tools(
                self._session,
                types.LiveServerToolCall(
                    function_calls=[types.FunctionCall.model_validate(c) for c in calls]
                ),
            )
        cancelled = _field(message, "toolCallCancellation", "tool_call_cancellation")
        if cancelled is not None:
            for call_id in cancelled.get("ids") or ():
                task = self._tool_tasks.pop(call_id, None)
                if task is not None:
                    task.cancel()

    # ------------------------------------------------------------------ tools

    def _start_tools(self, session: Any, tool_call: types.LiveServerToolCall) -> None:
        for call in tool_call.function_calls or ():
            call_id = call.id or f"call-{len(self._tool_tasks)}"
            task = asyncio.create_task(self._answer(session, call, call_id))
            self._tool_tasks[call_id] = task

    async def _answer(self, session: Any, call: types.FunctionCall, call_id: str) -> None:
        name = call.name or ""
        tool = self._upstream.tools.get(name)
        try:
            if tool is None:
                response: dict[str, Any] = {"error": f"no tool named {name!r}"}
            else:
                async with asyncio.timeout(self._upstream.tool_timeout_s):
                    response = await tool.call(call.args or {})
        except TimeoutError:
            response = {
                "error": f"the tool did not answer within {self._upstream.tool_timeout_s:g} s"
            }
        except Exception as error:
            self._log.warning("tool %s failed: %s", name, type(error).__name__)
            response = {"error": f"{type(error).__name__}: {error}"}
        finally:
            self._tool_tasks.pop(call_id, None)
        if self._closing:
            return
        try:
            await session.send_tool_response(
                function_responses=types.FunctionResponse(id=call.id, name=name, response=response)
            )
        except Exception as error:  # the connection is going; the receive loop reports it
            self._log.info("tool %s: response not sent (%s)", name, type(error).__name__)


class GenaiUpstream:
    """Opens upstream connections straight through google-genai (:class:`voicefsm.ports.Upstream`).

    ``model`` is the Live model; ``client`` a ``genai.Client`` (default: one from the
    environment, i.e. ``GOOGLE_API_KEY``); ``config`` the base ``LiveConnectConfig`` (voice,
    instruction, VAD ...): voicefsm fills in audio responses and both transcriptions unless set,
    and always sets the session's resumption handle and context-window compression.
    ``instruction`` is a shortcut for ``config.system_instruction``.

    ``tools`` are functions the model may call: :class:`GenaiTool` objects, or plain callables
    whose declaration genai derives from their signature and docstring. Each call runs its
    handler (bounded by ``tool_timeout_s``) and answers with a ``tool_response``; a handler that
    raises answers ``{"error": ...}``. ``close_timeout_s`` bounds a connection's closing
    handshake before its socket is aborted (websockets' default is 10 s). The session's
    ``upstream_ping_interval_s`` / ``upstream_pong_timeout_s`` drive the liveness check.

    ``wire``: genai opens every connection (handshake, setup, ``setupComplete``) and sends text
    turns and tool responses; with ``"direct"`` (the default, Gemini API clients) audio frames
    and server messages go straight over genai's websocket as the Live API's JSON, skipping
    genai's per-frame pydantic conversions (about a third of a raw genai session's CPU, see
    ``docs/benchmarks.md``), each server message classified as websockets parses it;
    ``"genai"`` uses ``send_realtime_input`` and ``receive()`` for
    every frame. Vertex AI clients always use ``"genai"``.

    ``model_deflate``: whether the websocket to the model offers permessage-deflate. Off by
    default: the audio is base64 in JSON, which deflate hardly shrinks beyond undoing base64's
    expansion, and compressing every frame both ways cost about a tenth of ``voicefsm serve``'s
    CPU at 100 interviews (``docs/upstreams.md``). The choice is written into ``client``'s
    websocket options, where voicefsm's ``create_connection`` hook goes too, when the upstream
    is built (:func:`offer_model_deflate`): it holds for everything else on that client as well,
    and upstreams sharing a client must agree (``ValueError`` otherwise).
    """

    def __init__(
        self,
        model: str,
        *,
        client: genai.Client | None = None,
        config: types.LiveConnectConfig | None = None,
        instruction: str | None = None,
        tools: Sequence[GenaiTool | ToolHandler] = (),
        tool_timeout_s: float = 30.0,
        close_timeout_s: float = 1.0,
        wire: str = "direct",
        model_deflate: bool = False,
    ) -> None:
        if not model:
            raise ValueError("GenaiUpstream needs a model name")
        if wire not in ("direct", "genai"):
            raise ValueError(f"wire must be 'direct' or 'genai', got {wire!r}")
        self.wire = wire
        if tool_timeout_s <= 0 or close_timeout_s <= 0:
            raise ValueError("tool_timeout_s and close_timeout_s must be positive")
        self.model = model
        self.client = client if client is not None else genai.Client()
        self.tool_timeout_s = tool_timeout_s
        self.close_timeout_s = close_timeout_s
        self.tools: dict[str, GenaiTool] = {}
        for tool in tools:
            wrapped = tool if isinstance(tool, GenaiTool) else GenaiTool(tool)
            if wrapped.name in self.tools:
                raise ValueError(f"two tools are named {wrapped.name!r}")
            self.tools[wrapped.name] = wrapped
        base = config or types.LiveConnectConfig()
        update: dict[str, Any] = {
            "response_modalities": base.response_modalities or [types.Modality.AUDIO],
            "input_audio_transcription": base.input_audio_transcription
            or types.AudioTranscriptionConfig(),
            "output_audio_transcription": base.output_audio_transcription
            or types.AudioTranscriptionConfig(),
        }
        if instruction is not None:
            update["system_instruction"] = types.Content(
                role="system", parts=[types.Part(text=instruction)]
            )
        if self.tools:
            declared = [tool.declaration for tool in self.tools.values()]
            update["tools"] = [*(base.tools or []), types.Tool(function_declarations=declared)]
        self.config = base.model_copy(update=update)
        # Last: a client is changed only by an upstream that was built.
        offer_model_deflate(self.client, model_deflate)
        self.model_deflate = model_deflate

    def connect_config(self, handle: str | None, config: SessionConfig) -> types.LiveConnectConfig:
        """The ``LiveConnectConfig`` of one connection: the base plus handle and compression."""
        return self.config.model_copy(
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

    async def forget(self, session_id: str) -> None:
        """Nothing to drop: this upstream keeps no state per session."""

    def open(
        self,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> GenaiConnection:
        """Start connection ``connection_id`` for session ``session_id``."""
        return GenaiConnection(
            self,
            connection_id=connection_id,
            handle=handle,
            session_id=session_id,
            config=config,
            report=report,
        )
