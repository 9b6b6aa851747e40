"""Script steps for :class:`~voicefsm.testing.FakeLiveServer`.

A script is a sequence of steps run, in order, on one connection once its setup frame arrived
(and the resumption handle, if any, was accepted). Each step is a small frozen dataclass with an
``async run(conn)`` method, so you can write your own steps too. When the script ends the
connection stays open and keeps recording until the client leaves; ``Close``/``Abort`` end it.

Counts in the ``WaitFor*`` steps are totals for the connection, not "more since this step":
``WaitForAudio(5)`` returns at once if five chunks have already arrived. Their ``timeout``
defaults to None (wait until the condition holds or the connection ends); a timeout that fires
is a script error (the connection is closed with 1011 and the server re-raises it on exit).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voicefsm.testing import _wire

if TYPE_CHECKING:
    from voicefsm.testing.fake_live import FakeLiveConnection

__all__ = [
    "Abort",
    "Close",
    "Gate",
    "GenerationComplete",
    "GoAway",
    "Hang",
    "HangOnClose",
    "IgnorePings",
    "InputTranscript",
    "Interrupted",
    "ModelAudio",
    "ModelText",
    "OutputTranscript",
    "Refuse",
    "ResumptionUpdate",
    "SendRaw",
    "SetupComplete",
    "Sleep",
    "Step",
    "StopReading",
    "ToolCall",
    "ToolCallCancellation",
    "TurnComplete",
    "Usage",
    "WaitForAudio",
    "WaitForEvent",
    "WaitForText",
    "WaitForToolResponse",
    "WaitUntil",
]


class Step(abc.ABC):
    """Base class of script steps: one action of a connection script.

    Subclass it (a frozen dataclass works well) and implement :meth:`run` to add a step.
    Sharing this base also lets type checkers infer ``list[Step]`` for a literal script.
    """

    __slots__ = ()

    @abc.abstractmethod
    async def run(self, conn: FakeLiveConnection) -> None:
        """Perform the action on ``conn``."""


# --------------------------------------------------------------------------- handshake / setup


@dataclass(frozen=True, slots=True)
class Refuse(Step):
    """Reject the WebSocket handshake with an HTTP status (genai raises ``InvalidStatus``).

    Only valid as the first step of a list script; the rest of the script is ignored.
    """

    status: int = 503
    """HTTP status code of the rejection."""
    body: str = "Service Unavailable\n"
    """Plain-text response body."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Refuse is handled at the handshake; reaching it here is a script mistake."""
        raise ValueError("Refuse() is only valid as the first step of a script")


@dataclass(frozen=True, slots=True)
class SetupComplete(Step):
    """Answer the setup with ``{"setupComplete": {"sessionId": ...}}``.

    A script that never runs this step leaves genai's ``connect()`` waiting forever
    (it has no timeout of its own).
    """

    session_id: str | None = None
    """Session id; defaults to ``sess-<connection number>``."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send ``setupComplete``."""
        await conn.send_setup_complete(self.session_id)


# --------------------------------------------------------------------------- server content


@dataclass(frozen=True, slots=True)
class ModelAudio(Step):
    """Send model audio (raw PCM bytes) as one inline-data part of a ``modelTurn``."""

    pcm: bytes
    """Audio bytes; base64-encoded on the wire."""
    mime_type: str = _wire.DEFAULT_OUTPUT_MIME_TYPE
    """MIME type, ``audio/pcm;rate=24000`` by default."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the audio."""
        await conn.send_model_audio(self.pcm, self.mime_type)


@dataclass(frozen=True, slots=True)
class ModelText(Step):
    """Send model text as one text part of a ``modelTurn`` (TEXT response modality)."""

    text: str
    """The text."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the text."""
        await conn.send_model_text(self.text)


@dataclass(frozen=True, slots=True)
class OutputTranscript(Step):
    """Send ``serverContent.outputTranscription`` (a transcript of the model's speech)."""

    text: str
    """Transcript text (a chunk; ADK concatenates chunks until ``finished``)."""
    finished: bool = False
    """The ``finished`` flag."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the transcription."""
        await conn.send_output_transcription(self.text, self.finished)


@dataclass(frozen=True, slots=True)
class InputTranscript(Step):
    """Send ``serverContent.inputTranscription`` (a transcript of the user's speech)."""

    text: str
    """Transcript text (a chunk; ADK concatenates chunks until ``finished``)."""
    finished: bool = False
    """The ``finished`` flag."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the transcription."""
        await conn.send_input_transcription(self.text, self.finished)


@dataclass(frozen=True, slots=True)
class TurnComplete(Step):
    """Send ``serverContent.turnComplete`` (genai's ``session.receive()`` stops after it)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send ``turnComplete``."""
        await conn.send_turn_complete()


@dataclass(frozen=True, slots=True)
class Interrupted(Step):
    """Send ``serverContent.interrupted`` (the model was barged in on)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send ``interrupted``."""
        await conn.send_interrupted()


@dataclass(frozen=True, slots=True)
class GenerationComplete(Step):
    """Send ``serverContent.generationComplete``."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send ``generationComplete``."""
        await conn.send_generation_complete()


@dataclass(frozen=True, slots=True)
class Usage(Step):
    """Send ``usageMetadata`` with prompt/response/total token counts."""

    prompt_tokens: int = 0
    """``promptTokenCount``."""
    response_tokens: int = 0
    """``responseTokenCount`` (ADK maps it to ``candidates_token_count``)."""
    total_tokens: int | None = None
    """``totalTokenCount``; defaults to prompt + response."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the usage metadata."""
        await conn.send_usage(self.prompt_tokens, self.response_tokens, self.total_tokens)


@dataclass(frozen=True, slots=True)
class ToolCall(Step):
    """Send ``toolCall`` with one function call.

    ADK (for non-3.x models) buffers tool calls until the next ``turnComplete``, then runs the
    tool and answers with ``tool_response``; follow with ``TurnComplete()`` and
    ``WaitForToolResponse()``.
    """

    name: str
    """Function name."""
    args: Mapping[str, Any] | None = None
    """Function arguments (a JSON object)."""
    call_id: str | None = None
    """Call id; defaults to ``fc-N`` (numbered per server)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the tool call."""
        await conn.send_tool_call(self.name, self.args, self.call_id)


@dataclass(frozen=True, slots=True)
class ToolCallCancellation(Step):
    """Send ``toolCallCancellation`` for some function call ids."""

    ids: Sequence[str]
    """The ids to cancel."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the cancellation."""
        await conn.send_tool_call_cancellation(self.ids)


@dataclass(frozen=True, slots=True)
class ResumptionUpdate(Step):
    """Send ``sessionResumptionUpdate``; a resumable handle is registered as issued.

    With the defaults a fresh ``handle-N`` is sent with ``resumable: true``. With
    ``resumable=False`` and no handle, ``newHandle`` is omitted (as the API does while the
    model is generating).
    """

    handle: str | None = None
    """The handle; None makes a fresh one when resumable."""
    resumable: bool = True
    """The ``resumable`` flag."""
    state: object = None
    """Opaque data stored with the handle (``conn.resumed_from.state`` when resumed)."""
    last_consumed_index: int | None = None
    """Sent as ``lastConsumedClientMessageIndex`` if given."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the update."""
        await conn.send_resumption_update(
            self.handle,
            self.resumable,
            state=self.state,
            last_consumed_index=self.last_consumed_index,
        )


@dataclass(frozen=True, slots=True)
class GoAway(Step):
    """Send ``{"goAway": {"timeLeft": "50s"}}``, optionally closing when the time is up.

    With ``close_after=True`` the connection is closed with ``close_code`` once ``time_left``
    (divided by ``time_scale``) has elapsed, unless the client left first; the script goes on
    meanwhile, as the real server keeps serving until then.
    """

    time_left: str | float = "50s"
    """A protobuf Duration string (``"50s"``) or seconds."""
    close_after: bool = False
    """Close the connection when ``time_left`` elapses."""
    close_code: int = 1000
    """Close code used with ``close_after`` (1006 aborts instead)."""
    close_reason: str = "session rotated"
    """Close reason used with ``close_after``."""
    time_scale: float = 1.0
    """Real seconds = ``time_left`` / ``time_scale`` (the string sent is not scaled)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the GoAway and, if asked, schedule the close."""
        text = await conn.send_go_away(self.time_left)
        if self.close_after:
            delay = _wire.parse_duration(text) / self.time_scale
            conn.schedule_close(delay, self.close_code, self.close_reason)


@dataclass(frozen=True, slots=True)
class SendRaw(Step):
    """Send any JSON object as a server message (an escape hatch for unmodelled messages)."""

    message: Mapping[str, Any]
    """The message, camelCase keys, e.g. ``{"toolCall": {"functionCalls": [...]}}``."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Send the message."""
        await conn.send(self.message)


# --------------------------------------------------------------------------- ending


@dataclass(frozen=True, slots=True)
class Close(Step):
    """Close the connection with a close frame (genai raises ``APIError`` with this code).

    Code 1006 has no close frame: it aborts the TCP connection instead (see :class:`Abort`).
    """

    code: int = 1000
    """Close code (1000, 1007, 1008, 1011, ...)."""
    reason: str = ""
    """Close reason."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Close the connection and wait for the closing handshake."""
        await conn.close(self.code, self.reason)


@dataclass(frozen=True, slots=True)
class Abort(Step):
    """Drop the TCP connection without a close frame (genai raises ``APIError(1006)``)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Abort the transport."""
        conn.abort()


@dataclass(frozen=True, slots=True)
class StopReading(Step):
    """Stop reading the socket (no more audio, pongs or close answers are processed)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Pause reading the transport."""
        conn.stop_reading()


@dataclass(frozen=True, slots=True)
class IgnorePings(Step):
    """Keep reading but never answer a ping."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Drop every pong from now on."""
        conn.ignore_pings()


@dataclass(frozen=True, slots=True)
class HangOnClose(Step):
    """Never complete a closing handshake the client starts."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Drop the client's close frame from now on."""
        conn.hang_on_close()


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True, slots=True)
class Sleep(Step):
    """Wait for a fixed time (prefer the event-driven waits in tests)."""

    seconds: float
    """Seconds to wait."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Sleep."""
        await asyncio.sleep(self.seconds)


@dataclass(frozen=True, slots=True)
class Hang(Step):
    """Do nothing until the connection ends (e.g. never answer the setup)."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Wait forever; the script is cancelled when the connection ends."""
        await asyncio.get_running_loop().create_future()


@dataclass(frozen=True, slots=True)
class Gate(Step):
    """Wait until the test calls ``server.release(name)``.

    ``await server.wait_for_gate(name)`` tells the test the script got here. Releases are
    sticky per server (a released gate stays open) until ``server.reset_gate(name)``.
    """

    name: str
    """Gate name, shared by every connection of the server."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Mark the gate reached and wait for its release."""
        await conn.server._pass_gate(self.name, conn)


@dataclass(frozen=True, slots=True)
class WaitForEvent(Step):
    """Wait until an ``asyncio.Event`` owned by the test is set."""

    event: asyncio.Event
    """The event to wait for."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Wait for the event."""
        await self.event.wait()


@dataclass(frozen=True, slots=True)
class WaitForAudio(Step):
    """Wait until the connection has received ``count`` audio chunks in total."""

    count: int
    """Total number of chunks to wait for."""
    timeout: float | None = None
    """Seconds, or None to wait until the connection ends."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Wait for the chunks."""
        await conn.wait_for_audio_chunks(self.count, timeout=self.timeout)


@dataclass(frozen=True, slots=True)
class WaitForText(Step):
    """Wait until the connection has received ``count`` text inputs in total."""

    count: int = 1
    """Total number of text inputs (``client_content`` or ``realtime_input.text``)."""
    timeout: float | None = None
    """Seconds, or None to wait until the connection ends."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Wait for the text inputs."""
        await conn.wait_for_text_inputs(self.count, timeout=self.timeout)


@dataclass(frozen=True, slots=True)
class WaitForToolResponse(Step):
    """Wait until the connection has received ``count`` function responses in total."""

    count: int = 1
    """Total number of function responses."""
    timeout: float | None = None
    """Seconds, or None to wait until the connection ends."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Wait for the function responses."""
        await conn.wait_for_tool_responses(self.count, timeout=self.timeout)


@dataclass(frozen=True, slots=True)
class WaitUntil(Step):
    """Wait until ``predicate(conn)`` is true (re-checked on every client message)."""

    predicate: Callable[[FakeLiveConnection], bool]
    """A function of the connection record."""
    description: str = "condition"
    """Used in error messages."""
    timeout: float | None = None
    """Seconds, or None to wait until the connection ends."""

    async def run(self, conn: FakeLiveConnection) -> None:
        """Wait for the predicate."""
        await conn.wait_for(self.predicate, description=self.description, timeout=self.timeout)
