"""A fake Gemini Live (``BidiGenerateContent``) server for offline tests.

:class:`FakeLiveServer` listens on 127.0.0.1 over TLS (certificates from ``trustme``) and speaks
the real Live API wire protocol, so an unmodified ``google.genai.Client`` -- and ADK's ``Gemini``
model built on it -- can connect to it. What the server sends on each connection is scripted
(see :mod:`voicefsm.testing.steps` and :class:`~voicefsm.testing.interviewer.Interviewer`);
everything the client sends is recorded on a :class:`FakeLiveConnection`.

Example::

    async with FakeLiveServer([SetupComplete(), WaitForAudio(1), TurnComplete()]) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model="gemini-2.5-flash", config=...) as session:
            ...
        conn = server.connections[0]
        assert conn.audio_chunks
"""

# The wait helpers take a ``timeout`` argument on purpose: they raise WaitTimeout with a message
# that says what was awaited and what was received so far, which asyncio.timeout() cannot do.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from voicefsm.testing import _wire
from voicefsm.testing._waiting import ConditionWaiters
from voicefsm.testing.steps import Refuse, SetupComplete, Step

if TYPE_CHECKING:
    from google.genai import Client
    from google.genai.types import HttpOptions

__all__ = [
    "ClientEvent",
    "ClientEventKind",
    "CloseInfo",
    "CompressionConfig",
    "ConnectionClosedWhileWaiting",
    "FakeLiveConnection",
    "FakeLiveError",
    "FakeLiveServer",
    "IssuedHandle",
    "Script",
    "ScriptError",
    "ScriptFunction",
    "TextInput",
    "ToolResponse",
    "WaitTimeout",
]

logger = logging.getLogger("voicefsm.testing")

#: A script written as a coroutine function: it receives the connection and drives it.
ScriptFunction: TypeAlias = Callable[["FakeLiveConnection"], Awaitable[None]]
#: What a connection runs once its setup frame arrived: a list of steps or a coroutine function.
Script: TypeAlias = Sequence[Step] | ScriptFunction

#: The script used when none is configured: answer the setup, then record until the client leaves.
DEFAULT_SCRIPT: Sequence[Step] = (SetupComplete(),)

_PATH_RE = re.compile(
    r"^/ws/google\.ai\.generativelanguage\.(?P<version>[A-Za-z0-9_]+)"
    r"\.GenerativeService\.(?P<method>BidiGenerateContent(?:Constrained)?)$"
)
_DEFAULT_TIMEOUT = 5.0
_INVALID_HANDLE_REASON = "invalid resumption handle"


class FakeLiveError(Exception):
    """Base class of the errors raised by the fake Live server."""


class WaitTimeout(FakeLiveError, TimeoutError):
    """A ``wait_for_*`` helper gave up; the message says what was awaited and what was seen."""


class ConnectionClosedWhileWaiting(FakeLiveError):
    """The connection closed while a ``wait_for_*`` helper was waiting on it."""


class ScriptError(FakeLiveError):
    """A connection script raised; re-raised when the server's ``async with`` block exits.

    The original exception is chained as ``__cause__``.
    """


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """A WebSocket close frame: its code and reason."""

    code: int
    """Close code, e.g. 1000, 1008, 1011."""
    reason: str
    """Close reason text (may be empty)."""


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """The ``contextWindowCompression`` part of a setup frame, normalised."""

    trigger_tokens: int | None
    """``trigger_tokens`` / ``triggerTokens``, or None if absent."""
    target_tokens: int | None
    """``sliding_window.target_tokens``, or None if absent."""
    sliding_window: bool
    """True if a ``sliding_window`` object was present."""
    raw: Mapping[str, Any]
    """The object exactly as the client sent it."""


@dataclass(frozen=True, slots=True)
class TextInput:
    """Text the client sent: a ``client_content`` message or ``realtime_input.text``."""

    text: str
    """All text parts of the message, concatenated (may be empty)."""
    source: Literal["client_content", "realtime_input"]
    """Which message carried the text."""
    turn_complete: bool
    """``client_content.turn_complete``; always False for ``realtime_input``."""
    role: str | None = None
    """Role of the last turn of a ``client_content`` message, if given."""
    turns: tuple[Mapping[str, Any], ...] = ()
    """The raw ``turns`` of a ``client_content`` message."""


@dataclass(frozen=True, slots=True)
class ToolResponse:
    """One function response from a ``tool_response`` message."""

    id: str | None
    """The function call id it answers (``fc-N`` for calls made with ``send_tool_call``)."""
    name: str | None
    """The function name."""
    response: Mapping[str, Any] | None
    """The ``response`` object, as sent."""


@dataclass(frozen=True, slots=True)
class IssuedHandle:
    """A resumption handle the server handed out (or was told to accept)."""

    handle: str
    """The handle string."""
    connection_number: int | None
    """The connection whose ``sessionResumptionUpdate`` carried it; None if pre-registered."""
    issued_at: float
    """``time.monotonic()`` when it was issued."""
    state: object = None
    """Opaque script state stored with the handle (the interviewer keeps its position here)."""


ClientEventKind: TypeAlias = Literal[
    "audio",
    "video",
    "text",
    "tool_response",
    "activity_start",
    "activity_end",
    "audio_stream_end",
    "unknown",
]


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """One thing the client sent after the setup frame, in arrival order."""

    kind: ClientEventKind
    """What it was."""
    at: float
    """``time.monotonic()`` when the server received it."""
    message_index: int
    """0-based index of the client message that carried it (the setup frame is not counted)."""
    payload: object = None
    """bytes for audio/video (None if payloads are not recorded), :class:`TextInput`,
    :class:`ToolResponse`, the raw frame for ``unknown``, None otherwise."""


@dataclass(slots=True)
class _Gate:
    reached_by: list[int] = field(default_factory=list)
    released: bool = False


def _describe(value: Any, depth: int = 0) -> Any:
    """Return a log-safe copy of a frame: payload bytes and text replaced by their sizes."""
    if depth > 6:
        return "..."
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "data" and isinstance(item, str):
                out[key] = f"<{len(item)} base64 chars>"
            elif key == "text" and isinstance(item, str):
                out[key] = f"<{len(item)} chars>"
            else:
                out[key] = _describe(item, depth + 1)
        return out
    if isinstance(value, list):
        if len(value) > 4:
            return [_describe(v, depth + 1) for v in value[:4]] + [f"... {len(value)} items"]
        return [_describe(v, depth + 1) for v in value]
    return value


def _optional_int(value: Any) -> int | None:
    """Convert a protobuf JSON integer (int or decimal string) to int, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


class FakeLiveConnection:
    """One connection to a :class:`FakeLiveServer`: everything it recorded, plus controls.

    Scripts and tests use the ``send_*`` methods to push server messages, :meth:`close` /
    :meth:`abort` to end the connection, and the ``wait_for_*`` methods to wait for what the
    client sends. The record attributes are filled in by the server and must be treated as
    read-only. Times are ``time.monotonic()`` values.
    """

    def __init__(
        self,
        server: FakeLiveServer,
        number: int,
        *,
        path: str,
        api_version: str,
        method: str,
        headers: Mapping[str, str],
        script: Script,
    ) -> None:
        """Create the record of connection ``number`` (1-based). Called by the server."""
        self.server: FakeLiveServer = server
        """The server that accepted the connection."""
        self.number: int = number
        """1-based position among the server's connections (refused ones included)."""
        self.path: str = path
        """The request path (``/ws/google.ai.generativelanguage.<version>.GenerativeService.*``)."""
        self.api_version: str = api_version
        """The API version taken from the path, e.g. ``v1alpha``."""
        self.method: str = method
        """``BidiGenerateContent`` or ``BidiGenerateContentConstrained``."""
        self.headers: dict[str, str] = {k.lower(): v for k, v in headers.items()}
        """Handshake request headers, names lower-cased."""
        self.script: Script = script
        """The script this connection runs."""
        self.opened_at: float = time.monotonic()
        """When the handshake request arrived."""
        self.setup_at: float | None = None
        """When the setup frame arrived."""
        self.closed_at: float | None = None
        """When the connection ended (None while open)."""
        self.refused_status: int | None = None
        """The HTTP status if the handshake was refused (:class:`~voicefsm.testing.Refuse`)."""
        self.setup_frame: dict[str, Any] | None = None
        """The first client frame, e.g. ``{"setup": {...}}``, exactly as received."""
        self.session_id: str | None = None
        """The session id sent in ``setupComplete`` (None if never sent)."""
        self.session_resumption_enabled: bool = False
        """True if the setup frame had a ``sessionResumption`` object (with or without handle)."""
        self.resumption_handle: str | None = None
        """The ``sessionResumption.handle`` the client asked to resume, or None."""
        self.resumed_from: IssuedHandle | None = None
        """The accepted handle's record when the client resumed with a known handle."""
        self.resumption_rejected: bool = False
        """True if the handle was unknown and the server closed with 1008."""
        self.compression: CompressionConfig | None = None
        """The setup's ``contextWindowCompression``, or None if the client sent none."""
        self.audio_chunks: list[bytes] = []
        """Every audio chunk received, decoded, in order (empty if payloads are not recorded)."""
        self.audio_chunk_count: int = 0
        """Number of audio chunks received (counted even if payloads are not recorded)."""
        self.audio_mime_type: str | None = None
        """MIME type of the last audio chunk, e.g. ``audio/pcm;rate=16000``."""
        self.video_chunks: list[bytes] = []
        """Non-audio realtime blobs (``video`` or non-audio ``media_chunks``), decoded."""
        self.text_inputs: list[TextInput] = []
        """Text turns: every ``client_content`` message and every ``realtime_input.text``."""
        self.tool_responses: list[ToolResponse] = []
        """Every function response, in order."""
        self.activity_starts: int = 0
        """Number of ``activityStart`` signals."""
        self.activity_ends: int = 0
        """Number of ``activityEnd`` signals."""
        self.audio_stream_ends: int = 0
        """Number of ``audioStreamEnd`` signals."""
        self.timeline: list[ClientEvent] = []
        """Everything above, interleaved in arrival order."""
        self.frames_received: list[dict[str, Any]] = []
        """Every raw client frame including the setup (empty if payloads are not recorded)."""
        self.messages_sent: list[dict[str, Any]] = []
        """Every server message sent (empty if payloads are not recorded)."""
        self.issued_handles: list[str] = []
        """Resumable handles this connection sent in ``sessionResumptionUpdate``."""
        self.tool_call_ids: list[str] = []
        """Ids of the function calls this connection sent."""
        self.gates_reached: list[str] = []
        """Names of the :class:`~voicefsm.testing.Gate` steps this connection reached."""
        self.protocol_errors: list[str] = []
        """Problems with client frames (invalid JSON, bad base64, unknown messages)."""
        self.close_sent: CloseInfo | None = None
        """The close frame the server sent (its own close, or the echo of the client's)."""
        self.close_received: CloseInfo | None = None
        """The close frame the client sent (or echoed), None if it never sent one."""
        self.closed_by: Literal["client", "server"] | None = None
        """Who started the closing handshake; ``"server"`` for :meth:`abort`; None if the TCP
        connection just dropped."""
        self.aborted: bool = False
        """True if the server dropped the TCP connection without a close frame (code 1006)."""
        self.script_error: Exception | None = None
        """The exception the script raised, if any."""
        self.reading_stopped: bool = False
        """True once :meth:`stop_reading` was called."""
        self.pings_ignored: int = 0
        """Pings left unanswered after :meth:`ignore_pings`."""
        self.close_frames_ignored: int = 0
        """Client close frames dropped after :meth:`hang_on_close`."""
        self._ws: ServerConnection | None = None
        self._finished = False
        self._message_index = 0
        self._waiters = ConditionWaiters()
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        """Return a short description without payloads."""
        return f"<FakeLiveConnection #{self.number} {self._summary()}>"

    # ----------------------------------------------------------------------------- properties

    @property
    def is_open(self) -> bool:
        """True while the WebSocket is open."""
        return self._ws is not None and not self._finished and self._ws.state is State.OPEN

    @property
    def is_finished(self) -> bool:
        """True once the connection ended (or was refused) and its record is final."""
        return self._finished

    @property
    def setup(self) -> Mapping[str, Any]:
        """The inner ``setup`` object of the setup frame (empty before it arrived)."""
        if self.setup_frame is None:
            return {}
        inner = _wire.get_mapping(self.setup_frame, "setup")
        return inner if inner is not None else {}

    @property
    def model(self) -> str | None:
        """The ``setup.model`` the client asked for, e.g. ``models/gemini-2.5-flash``."""
        value = self.setup.get("model")
        return value if isinstance(value, str) else None

    @property
    def api_key(self) -> str | None:
        """The ``x-goog-api-key`` handshake header, if any."""
        return self.headers.get("x-goog-api-key")

    @property
    def tool_names(self) -> list[str]:
        """Names of the function declarations in the setup frame."""
        names: list[str] = []
        for tool in _wire.get_field(self.setup, "tools") or []:
            if not isinstance(tool, Mapping):
                continue
            for decl in _wire.get_field(tool, "function_declarations") or []:
                if isinstance(decl, Mapping) and isinstance(decl.get("name"), str):
                    names.append(decl["name"])
        return names

    @property
    def client_message_count(self) -> int:
        """Client messages received after the setup frame (counted even when not parsed)."""
        return self._message_index

    @property
    def received_audio(self) -> bytes:
        """All recorded input audio chunks joined."""
        return b"".join(self.audio_chunks)

    @property
    def texts(self) -> list[str]:
        """The text of each :attr:`text_inputs` entry."""
        return [item.text for item in self.text_inputs]

    # ----------------------------------------------------------------------------- sending

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one raw server message (a JSON object, camelCase keys) as a text frame.

        Raises:
            FakeLiveError: the connection was refused or has not started.
            websockets.exceptions.ConnectionClosed: the connection is closed.
        """
        ws = self._require_ws()
        payload = json.dumps(message, separators=(",", ":"))
        await ws.send(payload)
        if self.server.record_payloads:
            self.messages_sent.append(dict(message))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connection #%d sent %s", self.number, _describe(message))

    async def send_encoded(self, payload: bytes) -> None:
        """Send one server message already encoded as UTF-8 JSON text, as a text frame.

        The frame on the wire is what :meth:`send` sends for the decoded message; a load
        generator builds its frames once and skips the per-message encoding. Recorded in
        :attr:`messages_sent` (decoded) like :meth:`send` when payloads are recorded.

        Raises:
            FakeLiveError: the connection was refused or has not started.
            websockets.exceptions.ConnectionClosed: the connection is closed.
        """
        ws = self._require_ws()
        await ws.send(payload, text=True)
        if self.server.record_payloads or logger.isEnabledFor(logging.DEBUG):
            message = json.loads(payload)
            if self.server.record_payloads:
                self.messages_sent.append(message)
            logger.debug("connection #%d sent %s", self.number, _describe(message))

    async def send_setup_complete(self, session_id: str | None = None) -> str:
        """Send ``setupComplete``; the session id defaults to ``sess-<number>``. Returns it."""
        sid = session_id if session_id is not None else f"sess-{self.number}"
        self.session_id = sid
        await self.send({"setupComplete": {"sessionId": sid}})
        return sid

    async def send_model_audio(
        self, pcm: bytes, mime_type: str = _wire.DEFAULT_OUTPUT_MIME_TYPE
    ) -> None:
        """Send model audio as one ``serverContent.modelTurn`` inline-data part."""
        part = {"inlineData": {"mimeType": mime_type, "data": _wire.encode_base64(pcm)}}
        await self.send({"serverContent": {"modelTurn": {"role": "model", "parts": [part]}}})

    async def send_model_text(self, text: str) -> None:
        """Send model text as one ``serverContent.modelTurn`` text part (TEXT modality)."""
        part = {"text": text}
        await self.send({"serverContent": {"modelTurn": {"role": "model", "parts": [part]}}})

    async def send_output_transcription(self, text: str, finished: bool = False) -> None:
        """Send ``serverContent.outputTranscription`` (what the model said)."""
        await self.send(
            {"serverContent": {"outputTranscription": {"text": text, "finished": finished}}}
        )

    async def send_input_transcription(self, text: str, finished: bool = False) -> None:
        """Send ``serverContent.inputTranscription`` (what the user said)."""
        await self.send(
            {"serverContent": {"inputTranscription": {"text": text, "finished": finished}}}
        )

    async def send_turn_complete(self) -> None:
        """Send ``serverContent.turnComplete`` (genai's ``receive()`` stops after it)."""
        await self.send({"serverContent": {"turnComplete": True}})

    async def send_interrupted(self) -> None:
        """Send ``serverContent.interrupted``."""
        await self.send({"serverContent": {"interrupted": True}})

    async def send_generation_complete(self) -> None:
        """Send ``serverContent.generationComplete``."""
        await self.send({"serverContent": {"generationComplete": True}})

    async def send_usage(
        self,
        prompt_tokens: int = 0,
        response_tokens: int = 0,
        total_tokens: int | None = None,
    ) -> None:
        """Send ``usageMetadata``; the total defaults to prompt + response tokens."""
        total = prompt_tokens + response_tokens if total_tokens is None else total_tokens
        await self.send(
            {
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "responseTokenCount": response_tokens,
                    "totalTokenCount": total,
                }
            }
        )

    async def send_tool_call(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        call_id: str | None = None,
    ) -> str:
        """Send a ``toolCall`` with one function call; the id defaults to ``fc-N``. Returns it."""
        fc_id = call_id if call_id is not None else self.server._next_tool_call_id()
        self.tool_call_ids.append(fc_id)
        call = {"id": fc_id, "name": name, "args": dict(args or {})}
        await self.send({"toolCall": {"functionCalls": [call]}})
        return fc_id

    async def send_tool_call_cancellation(self, ids: Sequence[str]) -> None:
        """Send ``toolCallCancellation`` for the given function call ids."""
        await self.send({"toolCallCancellation": {"ids": list(ids)}})

    async def send_resumption_update(
        self,
        handle: str | None = None,
        resumable: bool = True,
        *,
        state: object = None,
        last_consumed_index: int | None = None,
    ) -> str | None:
        """Send ``sessionResumptionUpdate`` and register the handle as issued.

        Args:
            handle: the handle; when None and ``resumable``, a fresh ``handle-N`` is made.
                When not ``resumable`` and None, ``newHandle`` is left out (as the API does).
            resumable: the ``resumable`` flag. Only resumable handles are registered, so only
                they are accepted in a later setup.
            state: opaque data stored with the handle, visible to the resuming connection as
                ``conn.resumed_from.state``.
            last_consumed_index: sent as ``lastConsumedClientMessageIndex`` if given.

        Returns:
            The handle sent, or None.
        """
        if handle is None and resumable:
            handle = self.server._next_handle()
        update: dict[str, Any] = {"resumable": resumable}
        if handle is not None:
            update["newHandle"] = handle
        if last_consumed_index is not None:
            update["lastConsumedClientMessageIndex"] = str(last_consumed_index)
        if handle is not None and resumable:
            self.server._register_handle(handle, self.number, state)
            self.issued_handles.append(handle)
        await self.send({"sessionResumptionUpdate": update})
        return handle

    async def send_go_away(self, time_left: str | float) -> str:
        """Send ``goAway``; ``time_left`` is a Duration string (``"50s"``) or seconds.

        Returns the Duration string sent.
        """
        text = _wire.format_duration(time_left)
        await self.send({"goAway": {"timeLeft": text}})
        return text

    # ----------------------------------------------------------------------------- closing

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with a close frame and wait for the closing handshake.

        Code 1006 cannot be sent in a close frame; it is emulated with :meth:`abort`.
        Does nothing if the connection is already closed.
        """
        if code == 1006:
            self.abort()
            return
        ws = self._ws
        if ws is None or ws.state in (State.CLOSING, State.CLOSED):
            return
        logger.debug("connection #%d closing with %d", self.number, code)
        await ws.close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame; the client sees code 1006."""
        ws = self._ws
        if ws is None or ws.state is State.CLOSED:
            return
        self.aborted = True
        logger.debug("connection #%d aborting the TCP connection", self.number)
        ws.transport.abort()

    # ----------------------------------------------------------------------------- faults

    def stop_reading(self) -> None:
        """Stop reading from the socket, as a hung peer would: nothing the client sends after
        this is processed (no audio recorded, no pong, no answer to a close frame), and once
        the socket buffers fill, the client's writes block."""
        ws = self._require_ws()
        self.reading_stopped = True
        ws.transport.pause_reading()
        self._changed()

    def ignore_pings(self) -> None:
        """Keep reading (audio is still recorded) but never answer a ping with a pong."""
        ws = self._require_ws()
        protocol = ws.protocol
        send_frame = protocol.send_frame

        def without_pongs(frame: Frame) -> None:
            if frame.opcode is Opcode.PONG:
                self.pings_ignored += 1
                self._changed()
                return
            send_frame(frame)

        protocol.send_frame = without_pongs  # type: ignore[method-assign]

    def hang_on_close(self) -> None:
        """Never complete a closing handshake the client starts: its close frame is read and
        dropped, and the TCP connection stays open until the client aborts it."""
        ws = self._require_ws()
        protocol = ws.protocol
        recv_frame = protocol.recv_frame

        def ignoring_close(frame: Frame) -> None:
            if frame.opcode is Opcode.CLOSE:
                self.close_frames_ignored += 1
                self._changed()
                return
            recv_frame(frame)

        protocol.recv_frame = ignoring_close  # type: ignore[method-assign]

    def schedule_close(
        self, delay: float, code: int = 1000, reason: str = ""
    ) -> asyncio.Task[None] | None:
        """Close the connection after ``delay`` seconds unless it closed before.

        Runs in the background (cancelled when the connection ends). Returns the task, or None
        if the connection is not open.
        """
        if not self.is_open:
            return None

        async def _close_later() -> None:
            await asyncio.sleep(delay)
            await self.close(code, reason)

        return self.start_background(_close_later(), name="close-later")

    def start_background(
        self, coro: Coroutine[Any, Any, None], *, name: str | None = None
    ) -> asyncio.Task[None]:
        """Run ``coro`` beside the script; it is cancelled when the connection ends.

        An exception other than ``ConnectionClosed`` counts as a script error: it is recorded
        and the connection is closed with 1011.

        Raises:
            FakeLiveError: the connection is not open.
        """
        if not self.is_open:
            coro.close()
            raise FakeLiveError(f"connection #{self.number} is not open")

        async def _guarded() -> None:
            try:
                await coro
            except ConnectionClosed:
                pass
            except Exception as exc:
                await self._fail(exc)

        task_name = f"fake-live-{self.number}-{name or 'background'}"
        task = asyncio.create_task(_guarded(), name=task_name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ----------------------------------------------------------------------------- waiting

    async def wait_for(
        self,
        predicate: Callable[[FakeLiveConnection], bool],
        *,
        description: str = "condition",
        timeout: float | None = _DEFAULT_TIMEOUT,
        fail_on_close: bool = True,
    ) -> None:
        """Wait until ``predicate(self)`` is true; it is re-checked whenever the record changes.

        Args:
            predicate: a function of this connection.
            description: used in error messages.
            timeout: seconds; None waits forever.
            fail_on_close: raise :class:`ConnectionClosedWhileWaiting` as soon as the connection
                has ended and the predicate is still false.

        Raises:
            WaitTimeout: ``timeout`` elapsed.
            ConnectionClosedWhileWaiting: see ``fail_on_close``.
        """

        def give_up() -> Exception | None:
            if fail_on_close and self._finished:
                return ConnectionClosedWhileWaiting(
                    f"connection #{self.number} ended while waiting for {description} "
                    f"({self._summary()})"
                )
            return None

        try:
            async with asyncio.timeout(timeout):
                await self._waiters.wait_until(lambda: predicate(self), give_up=give_up)
        except TimeoutError:
            raise WaitTimeout(
                f"connection #{self.number}: timed out after {timeout}s waiting for "
                f"{description} ({self._summary()})"
            ) from None

    async def wait_for_setup(self, timeout: float | None = _DEFAULT_TIMEOUT) -> Mapping[str, Any]:
        """Wait until the setup frame arrived; return its inner ``setup`` object."""
        await self.wait_for(
            lambda c: c.setup_frame is not None, description="the setup frame", timeout=timeout
        )
        return self.setup

    async def wait_for_audio_chunks(
        self, count: int, timeout: float | None = _DEFAULT_TIMEOUT
    ) -> None:
        """Wait until at least ``count`` audio chunks in total were received."""
        await self.wait_for(
            lambda c: c.audio_chunk_count >= count,
            description=f"{count} audio chunks",
            timeout=timeout,
        )

    async def wait_for_text_inputs(
        self, count: int = 1, timeout: float | None = _DEFAULT_TIMEOUT
    ) -> None:
        """Wait until at least ``count`` text inputs in total were received."""
        await self.wait_for(
            lambda c: len(c.text_inputs) >= count,
            description=f"{count} text inputs",
            timeout=timeout,
        )

    async def wait_for_tool_responses(
        self, count: int = 1, timeout: float | None = _DEFAULT_TIMEOUT
    ) -> None:
        """Wait until at least ``count`` function responses in total were received."""
        await self.wait_for(
            lambda c: len(c.tool_responses) >= count,
            description=f"{count} tool responses",
            timeout=timeout,
        )

    async def wait_closed(self, timeout: float | None = _DEFAULT_TIMEOUT) -> None:
        """Wait until the connection ended and its record (close codes) is final."""
        await self.wait_for(
            lambda c: c._finished,
            description="the connection to close",
            timeout=timeout,
            fail_on_close=False,
        )

    # ----------------------------------------------------------------------------- internals

    def _summary(self) -> str:
        if self.refused_status is not None:
            state = f"refused with HTTP {self.refused_status}"
        elif self._finished:
            state = "closed"
            if self.close_sent is not None or self.close_received is not None:
                sent = self.close_sent.code if self.close_sent else None
                rcvd = self.close_received.code if self.close_received else None
                state += f" (sent {sent}, received {rcvd})"
            elif self.aborted:
                state += " (aborted)"
        elif self.setup_frame is None:
            state = "open, no setup yet"
        else:
            state = "open"
        return (
            f"{state}; received {self.audio_chunk_count} audio chunks, "
            f"{len(self.text_inputs)} text inputs, {len(self.tool_responses)} tool responses"
        )

    def _require_ws(self) -> ServerConnection:
        if self._ws is None:
            raise FakeLiveError(f"connection #{self.number} has no open WebSocket")
        return self._ws

    def _changed(self) -> None:
        self._waiters.notify()
        self.server._changed()

    def _mark_refused(self, status: int) -> None:
        self.refused_status = status
        self.closed_at = time.monotonic()
        self._finished = True
        self._changed()

    def _mark_abandoned(self) -> None:
        if not self._finished:
            self.protocol_errors.append("the WebSocket handshake did not complete")
            self.closed_at = time.monotonic()
            self._finished = True
            self._changed()

    async def _fail(self, exc: Exception) -> None:
        """Record a script error and close the connection with 1011."""
        if self.script_error is None:
            self.script_error = exc
        self.server._script_errors.append((self.number, exc))
        logger.error("connection #%d: script failed: %r", self.number, exc, exc_info=exc)
        with contextlib.suppress(ConnectionClosed):
            await self.close(1011, f"fake server script error: {type(exc).__name__}")

    async def _serve(self, ws: ServerConnection) -> None:
        """Run the connection: read the setup, check resumption, run the script, record."""
        self._ws = ws
        logger.info("connection #%d opened (%s %s)", self.number, self.api_version, self.method)
        try:
            await self._serve_inner(ws)
        finally:
            await self._stop_background()
            if ws.state is not State.CLOSED and not self.aborted:
                with contextlib.suppress(Exception):
                    await ws.close(1000)
            self._record_close(ws)
            self.closed_at = time.monotonic()
            self._finished = True
            self._changed()
            logger.info(
                "connection #%d closed (sent=%s, received=%s, by=%s%s)",
                self.number,
                self.close_sent.code if self.close_sent else None,
                self.close_received.code if self.close_received else None,
                self.closed_by,
                ", aborted" if self.aborted else "",
            )

    async def _serve_inner(self, ws: ServerConnection) -> None:
        try:
            raw = await ws.recv()
        except ConnectionClosed:
            return
        frame = self._parse_frame(raw)
        if frame is None:
            await self.close(1007, "invalid JSON")
            return
        self._record_frame(frame)
        setup = _wire.get_mapping(frame, "setup")
        if setup is None:
            self.protocol_errors.append(f"first message is not a setup message: {list(frame)}")
            await self.close(1007, "the first message must be a setup message")
            return
        self._record_setup(frame, setup)
        if self.resumption_handle is not None:
            issued = self.server._issued.get(self.resumption_handle)
            if issued is None and self.server.enforce_resumption_handles:
                self.resumption_rejected = True
                self._changed()
                logger.info(
                    "connection #%d: unknown resumption handle, closing with 1008", self.number
                )
                await self.close(1008, _INVALID_HANDLE_REASON)
                return
            self.resumed_from = issued
        self._changed()

        script_task = asyncio.create_task(self._run_script(), name=f"fake-live-{self.number}")
        receive_task = asyncio.create_task(
            self._receive_loop(ws), name=f"fake-live-{self.number}-recv"
        )
        try:
            await asyncio.wait({script_task, receive_task}, return_when=asyncio.FIRST_COMPLETED)
            if not receive_task.done():
                # The script is done: keep recording until the client leaves.
                await receive_task
        finally:
            script_task.cancel()
            receive_task.cancel()
            await asyncio.gather(script_task, receive_task, return_exceptions=True)

    async def _run_script(self) -> None:
        script = self.script
        try:
            if isinstance(script, Sequence):
                for step in script:
                    logger.debug("connection #%d step %s", self.number, type(step).__name__)
                    await step.run(self)
            else:
                await script(self)
        except (ConnectionClosed, ConnectionClosedWhileWaiting):
            logger.debug("connection #%d: script stopped, connection closed", self.number)
        except Exception as exc:
            await self._fail(exc)

    async def _stop_background(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive_loop(self, ws: ServerConnection) -> None:
        if not self.server.parse_client_messages:
            await self._count_messages(ws)
            return
        while True:
            try:
                raw = await ws.recv()
            except ConnectionClosed:
                return
            frame = self._parse_frame(raw)
            if frame is None:
                await self.close(1007, "invalid JSON")
                continue
            self._record_frame(frame)
            self._on_client_message(frame)
            self._changed()

    async def _count_messages(self, ws: ServerConnection) -> None:
        # Read every message off the socket (frames parsed, inflated, pings answered as
        # always) but leave its JSON alone: only the count changes.
        while True:
            try:
                await ws.recv(decode=False)
            except ConnectionClosed:
                return
            self._message_index += 1
            self._changed()

    def _parse_frame(self, raw: str | bytes) -> dict[str, Any] | None:
        try:
            frame = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self.protocol_errors.append(f"invalid JSON: {exc}")
            logger.warning("connection #%d: invalid JSON frame", self.number)
            return None
        if not isinstance(frame, dict):
            self.protocol_errors.append(f"frame is not a JSON object: {type(frame).__name__}")
            logger.warning("connection #%d: frame is not a JSON object", self.number)
            return None
        return frame

    def _record_frame(self, frame: dict[str, Any]) -> None:
        if self.server.record_payloads:
            self.frames_received.append(frame)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connection #%d received %s", self.number, _describe(frame))

    def _record_setup(self, frame: dict[str, Any], setup: Mapping[str, Any]) -> None:
        self.setup_frame = frame
        self.setup_at = time.monotonic()
        resumption = _wire.get_mapping(setup, "session_resumption")
        self.session_resumption_enabled = resumption is not None
        if resumption is not None:
            handle = _wire.get_field(resumption, "handle")
            self.resumption_handle = handle if isinstance(handle, str) and handle else None
        compression = _wire.get_mapping(setup, "context_window_compression")
        if compression is not None:
            window = _wire.get_mapping(compression, "sliding_window")
            self.compression = CompressionConfig(
                trigger_tokens=_optional_int(_wire.get_field(compression, "trigger_tokens")),
                target_tokens=(
                    _optional_int(_wire.get_field(window, "target_tokens")) if window else None
                ),
                sliding_window=window is not None,
                raw=dict(compression),
            )

    def _add_event(self, kind: ClientEventKind, index: int, at: float, payload: object) -> None:
        self.timeline.append(ClientEvent(kind=kind, at=at, message_index=index, payload=payload))

    def _add_blob(
        self,
        blob: Mapping[str, Any],
        hint: Literal["audio", "video", "media"],
        index: int,
        at: float,
    ) -> None:
        mime = _wire.get_field(blob, "mime_type")
        mime = mime if isinstance(mime, str) else ""
        data = _wire.get_field(blob, "data")
        if not isinstance(data, str):
            self.protocol_errors.append(f"blob without base64 data (mime type {mime!r})")
            return
        try:
            decoded = _wire.decode_base64(data)
        except ValueError as exc:
            self.protocol_errors.append(str(exc))
            logger.warning("connection #%d: %s", self.number, exc)
            return
        is_audio = hint == "audio" or (hint == "media" and mime.startswith("audio/"))
        keep = self.server.record_payloads
        if is_audio:
            self.audio_chunk_count += 1
            self.audio_mime_type = mime or self.audio_mime_type
            if keep:
                # Without payloads an audio entry per chunk would still grow without bound
                # over a long session: only the count is kept.
                self.audio_chunks.append(decoded)
                self._add_event("audio", index, at, decoded)
        else:
            if keep:
                self.video_chunks.append(decoded)
            self._add_event("video", index, at, decoded if keep else None)

    def _on_client_message(self, frame: Mapping[str, Any]) -> None:
        index = self._message_index
        self._message_index += 1
        at = time.monotonic()
        handled = False

        realtime = _wire.get_mapping(frame, "realtime_input")
        if realtime is not None:
            handled = True
            self._on_realtime_input(realtime, index, at)

        content = _wire.get_mapping(frame, "client_content")
        if content is not None:
            handled = True
            turns = [t for t in _wire.get_field(content, "turns") or [] if isinstance(t, Mapping)]
            texts: list[str] = []
            role: str | None = None
            for turn in turns:
                turn_role = _wire.get_field(turn, "role")
                role = turn_role if isinstance(turn_role, str) else role
                for part in _wire.get_field(turn, "parts") or []:
                    text = _wire.get_field(part, "text") if isinstance(part, Mapping) else None
                    if isinstance(text, str):
                        texts.append(text)
            item = TextInput(
                text="".join(texts),
                source="client_content",
                turn_complete=bool(_wire.get_field(content, "turn_complete", False)),
                role=role,
                turns=tuple(turns),
            )
            self.text_inputs.append(item)
            self._add_event("text", index, at, item)

        tool = _wire.get_mapping(frame, "tool_response")
        if tool is not None:
            handled = True
            for response in _wire.get_field(tool, "function_responses") or []:
                if not isinstance(response, Mapping):
                    continue
                fr_id = _wire.get_field(response, "id")
                name = _wire.get_field(response, "name")
                body = _wire.get_field(response, "response")
                record = ToolResponse(
                    id=fr_id if isinstance(fr_id, str) else None,
                    name=name if isinstance(name, str) else None,
                    response=body if isinstance(body, Mapping) else None,
                )
                self.tool_responses.append(record)
                self._add_event("tool_response", index, at, record)

        if not handled:
            self.protocol_errors.append(f"unknown client message: {sorted(frame)}")
            logger.warning("connection #%d: unknown client message %s", self.number, list(frame))
            self._add_event("unknown", index, at, dict(frame))

    def _on_realtime_input(self, realtime: Mapping[str, Any], index: int, at: float) -> None:
        audio = _wire.get_mapping(realtime, "audio")
        if audio is not None:
            self._add_blob(audio, "audio", index, at)
        for blob in _wire.get_field(realtime, "media_chunks") or []:
            if isinstance(blob, Mapping):
                self._add_blob(blob, "media", index, at)
        video = _wire.get_mapping(realtime, "video")
        if video is not None:
            self._add_blob(video, "video", index, at)
        text = _wire.get_field(realtime, "text")
        if isinstance(text, str):
            item = TextInput(text=text, source="realtime_input", turn_complete=False)
            self.text_inputs.append(item)
            self._add_event("text", index, at, item)
        if _wire.has_field(realtime, "activity_start"):
            self.activity_starts += 1
            self._add_event("activity_start", index, at, None)
        if _wire.has_field(realtime, "activity_end"):
            self.activity_ends += 1
            self._add_event("activity_end", index, at, None)
        if _wire.get_field(realtime, "audio_stream_end") is True:
            self.audio_stream_ends += 1
            self._add_event("audio_stream_end", index, at, None)

    def _record_close(self, ws: ServerConnection) -> None:
        protocol = ws.protocol
        if protocol.close_sent is not None:
            self.close_sent = CloseInfo(protocol.close_sent.code, protocol.close_sent.reason)
        if protocol.close_rcvd is not None:
            self.close_received = CloseInfo(protocol.close_rcvd.code, protocol.close_rcvd.reason)
        if self.aborted:
            self.closed_by = "server"
        elif protocol.close_rcvd_then_sent is not None:
            self.closed_by = "client" if protocol.close_rcvd_then_sent else "server"
        elif protocol.close_sent is not None:
            self.closed_by = "server"
        elif protocol.close_rcvd is not None:
            self.closed_by = "client"


class FakeLiveServer:
    """A fake Gemini Live server on 127.0.0.1 over TLS, scripted per connection.

    Use it as an async context manager; it listens on a free port::

        async with FakeLiveServer(script=[SetupComplete(), Hang()]) as server:
            client = genai.Client(api_key="fake-key", http_options=server.http_options())

    Connections are numbered from 1 in handshake order (refused ones included). Connection ``n``
    runs ``scripts[n - 1]`` if given (or whatever :meth:`set_script` set), else ``script``, else
    :data:`DEFAULT_SCRIPT` (answer the setup, then record until the client leaves).

    Resumption: handles sent with ``sessionResumptionUpdate`` (resumable) are registered. A setup
    naming any other handle is closed with 1008 ``"invalid resumption handle"`` unless
    ``enforce_resumption_handles`` is False. :meth:`issue_handle` pre-registers a handle.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        scripts: Sequence[Script] = (),
        enforce_resumption_handles: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        record_payloads: bool = True,
        parse_client_messages: bool = True,
        raise_script_errors: bool = True,
        close_timeout: float = 2.0,
        max_message_size: int = 16 * 1024 * 1024,
    ) -> None:
        """Configure the server; nothing listens until :meth:`start` / ``async with``.

        Args:
            script: default script for every connection without its own.
            scripts: scripts for connections 1, 2, ... in order.
            enforce_resumption_handles: close a setup naming an unknown handle with 1008.
            host: address to listen on (the certificate is issued for it).
            port: port to listen on; 0 picks a free one.
            record_payloads: keep decoded audio and raw frames; when False only counts and the
                non-audio records are kept, audio is left out of the timeline too (for long
                demo sessions: memory stays flat).
            parse_client_messages: parse and record what the client sends after the setup
                frame; when False each message is read and only counted
                (:attr:`FakeLiveConnection.client_message_count`), and the ``wait_for_*``
                helpers on client input never see anything (for load generators that need
                nothing from the client's messages).
            raise_script_errors: re-raise the first script error as :class:`ScriptError` when
                the ``async with`` block exits without an exception of its own.
            close_timeout: seconds to wait for a client's closing handshake.
            max_message_size: largest client frame accepted, in bytes.
        """
        self.default_script: Script = script if script is not None else DEFAULT_SCRIPT
        """Script for connections without a specific one (assignable)."""
        self.enforce_resumption_handles: bool = enforce_resumption_handles
        """Reject unknown resumption handles with 1008 (assignable)."""
        self.record_payloads: bool = record_payloads
        """Keep audio bytes and raw frames (see ``__init__``)."""
        self.parse_client_messages: bool = parse_client_messages
        """Parse and record client messages after the setup (see ``__init__``)."""
        self.raise_script_errors: bool = raise_script_errors
        """Re-raise script errors on exit (see ``__init__``)."""
        self.rejected_paths: list[str] = []
        """Paths of handshakes rejected with HTTP 404."""
        self._scripts: dict[int, Script] = {i + 1: s for i, s in enumerate(scripts)}
        self._host = host
        self._requested_port = port
        self._close_timeout = close_timeout
        self._max_message_size = max_message_size
        self._server: Server | None = None
        self._port: int | None = None
        self._tmpdir: Path | None = None
        self._ca_pem: bytes | None = None
        self._connections: list[FakeLiveConnection] = []
        self._pending: dict[object, FakeLiveConnection] = {}
        self._issued: dict[str, IssuedHandle] = {}
        self._gates: dict[str, _Gate] = {}
        self._script_errors: list[tuple[int, Exception]] = []
        self._waiters = ConditionWaiters()
        self._handle_counter = 0
        self._tool_call_counter = 0

    def __repr__(self) -> str:
        """Return the address and the number of connections."""
        where = self.base_url if self._port is not None else "not started"
        return f"<FakeLiveServer {where} connections={len(self._connections)}>"

    # ----------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> FakeLiveServer:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server; re-raise a script error if the block itself did not raise."""
        await self.stop()
        if exc_type is None and self.raise_script_errors and self._script_errors:
            number, error = self._script_errors[0]
            more = len(self._script_errors) - 1
            suffix = f" (and {more} more)" if more else ""
            raise ScriptError(
                f"the script of connection #{number} raised {error!r}{suffix}"
            ) from error

    async def start(self) -> None:
        """Create the TLS certificates and start listening.

        Raises:
            ImportError: ``trustme`` is not installed.
            RuntimeError: the server is already running.
        """
        if self._server is not None:
            raise RuntimeError("FakeLiveServer is already running")
        try:
            import trustme
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "voicefsm.testing.FakeLiveServer needs the optional 'trustme' package; "
                "install it with: pip install 'voicefsm[testing]'"
            ) from exc
        ca = trustme.CA()
        server_cert = ca.issue_cert(self._host)
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(server_context)
        self._ca_pem = ca.cert_pem.bytes()
        tmpdir = Path(tempfile.mkdtemp(prefix="voicefsm-fake-live-"))
        (tmpdir / "ca.pem").write_bytes(self._ca_pem)
        self._tmpdir = tmpdir
        try:
            server = await serve(
                self._handle,
                self._host,
                self._requested_port,
                ssl=server_context,
                process_request=self._process_request,
                close_timeout=self._close_timeout,
                max_size=self._max_message_size,
                logger=logging.getLogger("voicefsm.testing.websockets"),
            )
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            self._tmpdir = None
            raise
        self._server = server
        self._port = int(next(iter(server.sockets)).getsockname()[1])
        logger.info("fake Live server listening on %s", self.base_url)

    async def stop(self) -> None:
        """Close every connection (code 1001), wait for their handlers, stop listening.

        Idempotent. The CA file is deleted.
        """
        server = self._server
        if server is None:
            return
        server.close()
        await server.wait_closed()
        self._server = None
        for conn in self._pending.values():  # handshakes that failed after process_request
            conn._mark_abandoned()
        self._pending.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        logger.info("fake Live server stopped (%d connections)", len(self._connections))

    # ----------------------------------------------------------------------------- addressing

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port (valid once started)."""
        if self._port is None:
            raise RuntimeError("FakeLiveServer is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT`` (no trailing slash) for ``HttpOptions.base_url``."""
        return f"https://{self._host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        """The PEM of the CA that signed the server certificate."""
        if self._ca_pem is None:
            raise RuntimeError("FakeLiveServer is not started")
        return self._ca_pem

    @property
    def ca_pem_path(self) -> Path:
        """A file holding :attr:`ca_pem` (e.g. for ``SSL_CERT_FILE``); deleted on stop."""
        if self._tmpdir is None:
            raise RuntimeError("FakeLiveServer is not started")
        return self._tmpdir / "ca.pem"

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a new client ``SSLContext`` that trusts the server's certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        return context

    def http_options(self, api_version: str = "v1alpha") -> HttpOptions:
        """Return ``google.genai.types.HttpOptions`` pointing a client at this server."""
        from google.genai import types

        return types.HttpOptions(
            base_url=self.base_url,
            api_version=api_version,
            async_client_args={"ssl": self.client_ssl_context()},
        )

    def genai_client(self, api_key: str = "fake-key", api_version: str = "v1alpha") -> Client:
        """Return a ``google.genai.Client`` (Gemini API mode) connected to this server."""
        from google import genai

        return genai.Client(api_key=api_key, http_options=self.http_options(api_version))

    # ----------------------------------------------------------------------------- scripts

    def set_script(self, number: int, script: Script) -> None:
        """Use ``script`` for connection ``number`` (1-based), overriding ``scripts``."""
        if number < 1:
            raise ValueError(f"connection numbers start at 1, got {number}")
        self._scripts[number] = script

    def script_for(self, number: int) -> Script:
        """Return the script connection ``number`` runs (or will run)."""
        return self._scripts.get(number, self.default_script)

    # ----------------------------------------------------------------------------- records

    @property
    def connections(self) -> Sequence[FakeLiveConnection]:
        """Every connection so far, in handshake order (``connections[0]`` is #1)."""
        return self._connections

    @property
    def issued_handles(self) -> Mapping[str, IssuedHandle]:
        """Every handle the server accepts for resumption, by handle."""
        return self._issued

    @property
    def script_errors(self) -> Sequence[tuple[int, Exception]]:
        """``(connection number, exception)`` for each script error so far."""
        return self._script_errors

    def connection(self, number: int) -> FakeLiveConnection:
        """Return connection ``number`` (1-based).

        Raises:
            IndexError: there is no such connection yet.
        """
        if not 1 <= number <= len(self._connections):
            raise IndexError(f"no connection #{number} (have {len(self._connections)})")
        return self._connections[number - 1]

    def issue_handle(self, handle: str, *, state: object = None) -> IssuedHandle:
        """Accept ``handle`` for resumption as if a connection had issued it."""
        return self._register_handle(handle, None, state)

    async def wait_for_connection(
        self, number: int, timeout: float | None = _DEFAULT_TIMEOUT
    ) -> FakeLiveConnection:
        """Wait until connection ``number`` (1-based) exists (its handshake arrived); return it.

        Raises:
            WaitTimeout: ``timeout`` elapsed first.
        """
        await self._wait(lambda: len(self._connections) >= number, f"connection #{number}", timeout)
        return self._connections[number - 1]

    async def wait_for_connections(
        self, count: int, timeout: float | None = _DEFAULT_TIMEOUT
    ) -> Sequence[FakeLiveConnection]:
        """Wait until at least ``count`` connections exist; return all of them."""
        await self._wait(lambda: len(self._connections) >= count, f"{count} connections", timeout)
        return self._connections

    # ----------------------------------------------------------------------------- gates

    def release(self, name: str) -> None:
        """Release the :class:`~voicefsm.testing.Gate` ``name`` (sticky until reset)."""
        self._gate(name).released = True
        self._changed()

    def reset_gate(self, name: str) -> None:
        """Close gate ``name`` again and forget who reached it."""
        self._gates[name] = _Gate()
        self._changed()

    def gate_reached(self, name: str) -> bool:
        """True once some connection's script reached the gate ``name``."""
        return bool(self._gate(name).reached_by)

    async def wait_for_gate(
        self, name: str, timeout: float | None = _DEFAULT_TIMEOUT
    ) -> FakeLiveConnection:
        """Wait until a script reaches the gate ``name``; return the (first) connection."""
        await self._wait(lambda: bool(self._gate(name).reached_by), f"gate {name!r}", timeout)
        return self.connection(self._gate(name).reached_by[0])

    async def _pass_gate(self, name: str, conn: FakeLiveConnection) -> None:
        """Mark gate ``name`` reached by ``conn`` and wait until it is released."""
        self._gate(name).reached_by.append(conn.number)
        conn.gates_reached.append(name)
        conn._changed()
        await self._waiters.wait_until(lambda: self._gate(name).released)

    # ----------------------------------------------------------------------------- internals

    def _gate(self, name: str) -> _Gate:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate()
        return gate

    def _changed(self) -> None:
        self._waiters.notify()

    async def _wait(
        self, predicate: Callable[[], bool], description: str, timeout: float | None
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._waiters.wait_until(predicate)
        except TimeoutError:
            raise WaitTimeout(
                f"fake Live server: timed out after {timeout}s waiting for {description} "
                f"({len(self._connections)} connections so far)"
            ) from None

    def _next_handle(self) -> str:
        self._handle_counter += 1
        return f"handle-{self._handle_counter}"

    def _next_tool_call_id(self) -> str:
        self._tool_call_counter += 1
        return f"fc-{self._tool_call_counter}"

    def _register_handle(self, handle: str, number: int | None, state: object) -> IssuedHandle:
        issued = IssuedHandle(
            handle=handle, connection_number=number, issued_at=time.monotonic(), state=state
        )
        self._issued[handle] = issued
        return issued

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        match = _PATH_RE.match(path)
        if match is None:
            self.rejected_paths.append(path)
            logger.warning("fake Live server: rejected unknown path %s with 404", path)
            return ws.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        number = len(self._connections) + 1
        script = self.script_for(number)
        conn = FakeLiveConnection(
            self,
            number,
            path=path,
            api_version=match.group("version"),
            method=match.group("method"),
            headers=dict(request.headers.raw_items()),
            script=script,
        )
        self._connections.append(conn)
        first = script[0] if isinstance(script, Sequence) and script else None
        if isinstance(first, Refuse):
            logger.info("connection #%d refused with HTTP %d", number, first.status)
            conn._mark_refused(first.status)
            return ws.respond(first.status, first.body)
        self._pending[ws.id] = conn
        self._changed()
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn = self._pending.pop(ws.id, None)
        if conn is None:  # pragma: no cover - process_request always registers
            await ws.close(1011, "fake server: unknown connection")
            return
        await conn._serve(ws)
