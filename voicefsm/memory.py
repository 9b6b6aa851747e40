"""In-memory ports for tests and embedded callers: a client channel and a sink.

:class:`MemoryChannel` is a :class:`~voicefsm.ports.ClientChannel` that a test pushes client
input into and reads the host's output from; :class:`MemorySink` is a
:class:`~voicefsm.ports.SessionSink` that keeps records and transcripts in dicts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from voicefsm.model import SessionRecord, TranscriptLine
from voicefsm.ports import ClientDelivery, ClientInput
from voicefsm.protocol import ServerMessage


class MemorySink:
    """Keeps the latest record and the transcript of each session in memory."""

    def __init__(self) -> None:
        self.records: dict[str, SessionRecord] = {}
        self.transcripts: dict[str, list[TranscriptLine]] = {}

    async def save(self, record: SessionRecord) -> None:
        """Keep ``record`` as the session's latest."""
        self.records[record.session_id] = record

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        """Append ``line`` to the session's transcript."""
        self.transcripts.setdefault(session_id, []).append(line)


class MemoryChannel:
    """An in-memory client channel: tests and embedded callers push input and read output.

    A :class:`~voicefsm.ports.PushClientChannel`: once a host called :meth:`start_pushing`,
    pushed input goes straight into the host's inbox (queued here while the host paused it).
    """

    def __init__(self) -> None:
        self._input: asyncio.Queue[ClientInput | None] = asyncio.Queue()
        self._deliver: ClientDelivery | None = None
        self.audio: list[bytes] = []
        self.messages: list[ServerMessage] = []
        self.closed: tuple[int, str] | None = None
        self.paused = False
        """Whether the host asked the channel to hold input back (:meth:`pause_pushing`)."""
        self._changed = asyncio.Condition()

    def push(self, message: ClientInput) -> None:
        """Deliver a message from the client."""
        self._put(message)

    def leave(self) -> None:
        """The client goes away (as a dropped websocket would)."""
        self._put(None)

    def start_pushing(self, deliver: ClientDelivery) -> None:
        """Hand input to ``deliver`` from now on, starting with what is queued."""
        self._deliver = deliver
        self._drain()

    def pause_pushing(self) -> None:
        """Queue pushed input instead of delivering it, until :meth:`resume_pushing`."""
        self.paused = True

    def resume_pushing(self) -> None:
        """Deliver the queued input, then deliver again as it is pushed."""
        self.paused = False
        self._drain()

    def _drain(self) -> None:
        while self._deliver is not None and not self.paused and not self._input.empty():
            self._deliver(self._input.get_nowait())

    def _put(self, message: ClientInput | None) -> None:
        if self._deliver is not None and not self.paused and self._input.empty():
            self._deliver(message)
        else:
            self._input.put_nowait(message)

    async def receive(self) -> ClientInput | None:
        """The next message from the client."""
        return await self._input.get()

    async def send_audio(self, data: bytes) -> None:
        """Record interviewer audio sent to the client."""
        self.audio.append(data)
        await self._notify()

    async def send_message(self, message: ServerMessage) -> None:
        """Record a message sent to the client."""
        self.messages.append(message)
        await self._notify()

    async def close(self, code: int, reason: str) -> None:
        """Record the close; further input ends."""
        self.closed = (code, reason)
        self._put(None)
        await self._notify()

    async def wait_for(self, predicate: Callable[[MemoryChannel], bool]) -> None:
        """Wait until ``predicate(self)`` holds (bound it with ``asyncio.timeout``)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


__all__ = ["MemoryChannel", "MemorySink"]
