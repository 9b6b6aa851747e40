"""The asyncio host: runs one :class:`~voicefsm.Session` against an upstream and a client.

One inbox queue receives everything — client messages, upstream events, nothing else — and one
consumer (:meth:`SessionHost.run`) feeds the engine and carries out its effects, so no two tasks
ever touch a session. Timers come from ``next_timer()``: the consumer waits on the inbox at most
until then and feeds a :class:`~voicefsm.events.Tick`.

The host talks to the client through a :class:`ClientChannel` and to the model through an
:class:`Upstream`; web adapters and upstreams implement those small protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.engine import Session
from voicefsm.model import SessionConfig, SessionRecord, TranscriptLine
from voicefsm.protocol import ServerMessage

logger = logging.getLogger("voicefsm.host")

ClientInput = ev.ClientAudio | ev.ClientText | ev.ClientEnd | ev.HeartbeatAck | ev.Fatal
"""What a client channel delivers."""

Report = Callable[[ev.Event], None]
"""How an upstream connection hands events to the session's inbox."""


class ClientChannel(Protocol):
    """The client side, as the host sees it (a websocket, or :class:`MemoryChannel` in tests)."""

    async def receive(self) -> ClientInput | None:
        """The next message from the client; ``None`` once the client has gone."""
        ...

    async def send_audio(self, data: bytes) -> None:
        """Send interviewer audio."""
        ...

    async def send_message(self, message: ServerMessage) -> None:
        """Send a JSON message."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the connection to the client."""
        ...


class UpstreamConnection(Protocol):
    """One upstream connection, opened by :meth:`Upstream.open`."""

    def send_audio(self, data: bytes) -> None:
        """Queue candidate audio for sending, in order."""
        ...

    def send_text(self, text: str) -> None:
        """Queue a text turn for sending."""
        ...

    async def close(self) -> list[bytes]:
        """Stop the connection for good; return the audio it accepted but never sent."""
        ...


class Upstream(Protocol):
    """Opens connections to the model. Each one reports its events through ``report``.

    A connection reports :class:`~voicefsm.events.UpstreamReady` once it can take audio and
    exactly one :class:`~voicefsm.events.UpstreamClosed` if it ends by itself, both tagged with
    ``connection_id``. It must never reconnect on its own: the session decides.
    """

    def open(
        self,
        *,
        connection_id: int,
        handle: str | None,
        session_id: str,
        config: SessionConfig,
        report: Report,
    ) -> UpstreamConnection:
        """Start opening connection ``connection_id``, resuming ``handle`` if given.

        An upstream may also define ``async def forget(session_id)``: the host calls it once the
        session has ended, to drop per-session state (ADK's session, for instance).
        """
        ...


class SessionSink(Protocol):
    """Where the host persists records and transcript lines (a store)."""

    async def save(self, record: SessionRecord) -> object:
        """Save the latest record of a session (the result, e.g. a version, is ignored)."""
        ...

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> object:
        """Append one finished transcript line."""
        ...


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
    """An in-memory client channel: tests and embedded callers push input and read output."""

    def __init__(self) -> None:
        self._input: asyncio.Queue[ClientInput | None] = asyncio.Queue()
        self.audio: list[bytes] = []
        self.messages: list[ServerMessage] = []
        self.closed: tuple[int, str] | None = None
        self._changed = asyncio.Condition()

    def push(self, message: ClientInput) -> None:
        """Deliver a message from the client."""
        self._input.put_nowait(message)

    def leave(self) -> None:
        """The client goes away (as a dropped websocket would)."""
        self._input.put_nowait(None)

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
        self._input.put_nowait(None)
        await self._notify()

    async def wait_for(self, predicate: Callable[[MemoryChannel], bool]) -> None:
        """Wait until ``predicate(self)`` holds (bound it with ``asyncio.timeout``)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class SessionHost:
    """Runs one session to its end: the single consumer of the session's inbox.

    ``clock`` gives epoch seconds (``time.time``). ``run()`` returns the final record once the
    session has ended; it never leaves a connection or task behind. Cancelling ``run()`` ends the
    session with ``error`` before the cancellation propagates. ``observer`` is called with every
    state change (and the end reason, on the change into ``ended``), e.g. for metrics.
    """

    def __init__(
        self,
        session: Session,
        upstream: Upstream,
        *,
        client: ClientChannel | None = None,
        sink: SessionSink | None = None,
        clock: Callable[[], float] = time.time,
        observer: Callable[[fx.StateChanged, str | None], None] | None = None,
        client_send_timeout_s: float = 5.0,
    ) -> None:
        self.session = session
        self.upstream = upstream
        self.sink: SessionSink = sink if sink is not None else MemorySink()
        self._clock = clock
        self._inbox: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._client: ClientChannel | None = None
        self._client_reader: asyncio.Task[None] | None = None
        self._connections: dict[int, UpstreamConnection] = {}
        self._current: UpstreamConnection | None = None
        self._carry: list[bytes] = []
        self._pending_client = client
        self._observer = observer
        self.client_send_timeout_s = client_send_timeout_s
        self._detach_reason: str | None = None

    # ------------------------------------------------------------------ entry points

    def post(self, event: ev.Event) -> None:
        """Put an event into the session's inbox (from any task of this event loop)."""
        self._inbox.put_nowait(event)

    def attach(self, client: ClientChannel) -> None:
        """Attach a (re)connecting client: it replaces any previous one and gets the state."""
        self._start_reader(client)
        self.post(ev.ClientBack())

    def detach(self, reason: str) -> None:
        """Stop driving the session *without ending it* (another worker owns it now).

        ``run()`` closes the upstream and the client (4410, ``reason``) and returns the session's
        record as it stands; whoever holds the session next restores it from its stored record.
        """
        self._detach_reason = reason
        self.post(ev.Tick())  # wake the consumer

    @property
    def detached(self) -> bool:
        """Whether :meth:`detach` stopped this host."""
        return self._detach_reason is not None

    async def run(self) -> SessionRecord:
        """Drive the session until it ends (or :meth:`detach`); return its record."""
        session = self.session
        log = logger.getChild(session.session_id[:12])
        if self._pending_client is not None:
            self._start_reader(self._pending_client)
            self._pending_client = None
        try:
            await self._apply(session.start(self._clock()), log)
            while not session.ended and self._detach_reason is None:
                event = await self._next_event()
                if self._detach_reason is not None:
                    break
                await self._apply(session.handle(event, self._clock()), log)
            if self._detach_reason is not None and not session.ended:
                log.warning("detached without ending the session: %s", self._detach_reason)
                client, self._client = self._client, None
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close(4410, self._detach_reason[:120])
        except asyncio.CancelledError:
            await self._fail("the host was cancelled", log)
            raise
        except Exception as error:
            log.exception("session host failed")
            await self._fail(f"{type(error).__name__}: {error}", log)
        finally:
            await self._shutdown()
        return session.snapshot()

    # ------------------------------------------------------------------ the loop

    async def _next_event(self) -> ev.Event:
        with contextlib.suppress(asyncio.QueueEmpty):
            return self._inbox.get_nowait()
        timer = self.session.next_timer()
        if timer is None:
            return await self._inbox.get()
        delay = timer - self._clock()
        if delay <= 0:
            return ev.Tick()
        try:
            async with asyncio.timeout(delay):
                return await self._inbox.get()
        except TimeoutError:
            return ev.Tick()

    async def _fail(
        self, detail: str, log: logging.LoggerAdapter[logging.Logger] | logging.Logger
    ) -> None:
        if self.session.ended:
            return
        with contextlib.suppress(Exception):
            effects = self.session.handle(ev.Fatal(f"host failure: {detail}"), self._clock())
            # Carry out the end effects even while being cancelled.
            await asyncio.shield(self._apply(effects, log))

    async def _shutdown(self) -> None:
        for connection in list(self._connections.values()):
            with contextlib.suppress(Exception):
                await connection.close()
        self._connections.clear()
        self._current = None
        forget = getattr(self.upstream, "forget", None)
        if forget is not None and (self.session.ended or self.detached):
            with contextlib.suppress(Exception):
                await forget(self.session.session_id)
        if self._client_reader is not None:
            self._client_reader.cancel()
            await asyncio.wait({self._client_reader})  # never raises, unlike awaiting it
            self._client_reader = None

    # ------------------------------------------------------------------ effects

    async def _apply(
        self, effects: list[fx.Effect], log: logging.LoggerAdapter[logging.Logger] | logging.Logger
    ) -> None:
        for effect in effects:
            if isinstance(effect, fx.SendAudioUpstream):
                if self._current is not None:
                    self._current.send_audio(effect.data)
            elif isinstance(effect, fx.SendAudioToClient):
                await self._to_client(effect)
            elif isinstance(effect, fx.SendTextUpstream):
                if self._current is not None:
                    self._current.send_text(effect.text)
            elif isinstance(effect, fx.SendToClient | fx.CloseClient):
                await self._to_client(effect)
            elif isinstance(effect, fx.OpenUpstream):
                await self._open(effect, log)
            elif isinstance(effect, fx.CloseUpstream):
                await self._close_upstream(effect.connection_id)
                log.info("closed upstream #%d: %s", effect.connection_id, effect.reason)
            elif isinstance(effect, fx.RecordTranscript):
                await self.sink.append_transcript(self.session.session_id, effect.line)
            elif isinstance(effect, fx.PersistRecord):
                await self.sink.save(effect.record)
            elif isinstance(effect, fx.StateChanged):
                log.info("%s -> %s: %s", effect.previous, effect.state, effect.why)
                if self._observer is not None:
                    reason = self.session.end_reason
                    self._observer(effect, reason.value if reason is not None else None)

    async def _open(
        self, effect: fx.OpenUpstream, log: logging.LoggerAdapter[logging.Logger] | logging.Logger
    ) -> None:
        # Whatever is still registered is dead or being replaced: take back its unsent audio.
        for connection_id in list(self._connections):
            await self._close_upstream(connection_id)
        log.info(
            "opening upstream #%d (%s, attempt %d)",
            effect.connection_id,
            "resuming" if effect.handle else "fresh",
            effect.attempt,
        )
        connection = self.upstream.open(
            connection_id=effect.connection_id,
            handle=effect.handle,
            session_id=self.session.session_id,
            config=self.session.config,
            report=self.post,
        )
        self._connections[effect.connection_id] = connection
        self._current = connection
        carried, self._carry = self._carry, []
        for chunk in carried:
            connection.send_audio(chunk)
        if carried:
            log.info("re-sending %d audio chunks the previous connection never sent", len(carried))

    async def _close_upstream(self, connection_id: int) -> None:
        connection = self._connections.pop(connection_id, None)
        if connection is None:
            return
        if connection is self._current:
            self._current = None
        try:
            unsent = await connection.close()
        except Exception as error:  # a failing close must not end the interview
            logger.warning("closing upstream #%d failed: %s", connection_id, type(error).__name__)
            unsent = []
        if not self.session.ended:
            self._carry.extend(unsent)

    async def _to_client(
        self, effect: fx.SendAudioToClient | fx.SendToClient | fx.CloseClient
    ) -> None:
        client = self._client
        if client is None:
            return
        try:
            # A client that stops reading must not stall the consumer (and so every timer).
            async with asyncio.timeout(self.client_send_timeout_s):
                await self._send(client, effect)
        except Exception as error:  # a dead or stuck client socket is the client leaving
            logger.info(
                "client send failed (%s); treating the client as gone", type(error).__name__
            )
            if self._client is client:
                self._client = None
                self.post(ev.ClientGone(f"send failed: {type(error).__name__}"))

    async def _send(
        self, client: ClientChannel, effect: fx.SendAudioToClient | fx.SendToClient | fx.CloseClient
    ) -> None:
        if isinstance(effect, fx.SendAudioToClient):
            await client.send_audio(effect.data)
        elif isinstance(effect, fx.SendToClient):
            await client.send_message(effect.message)
        else:
            self._client = None
            await client.close(effect.code, effect.reason)

    # ------------------------------------------------------------------ client reader

    def _start_reader(self, client: ClientChannel) -> None:
        if self._client_reader is not None:
            self._client_reader.cancel()
        self._client = client
        self._client_reader = asyncio.create_task(
            self._read_client(client), name=f"voicefsm-client-{self.session.session_id[:12]}"
        )

    async def _read_client(self, client: ClientChannel) -> None:
        reason = "the client connection closed"
        try:
            while True:
                message = await client.receive()
                if message is None:
                    break
                self.post(message)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            reason = f"client receive failed: {type(error).__name__}"
        if self._client is client:
            self._client = None
            self.post(ev.ClientGone(reason))
