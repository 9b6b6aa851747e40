"""The asyncio host: runs one :class:`~voicefsm.Session` against an upstream and a client.

One inbox queue receives everything — client messages, upstream events, nothing else — and one
consumer (:meth:`SessionHost.run`) feeds the engine and carries out its effects, so no two tasks
ever touch a session. Timers come from ``next_timer()``: the consumer waits on the inbox at most
until then and feeds a :class:`~voicefsm.events.Tick`.

The consumer never awaits an upstream: closing a connection takes back its unsent audio at once
and leaves the tear-down (cancelling, the closing handshake, aborting the socket if the peer does
not answer) to a task beside it, so a dead peer cannot hold a timer, the audio or the client back.
``run()`` waits for every tear-down (each bounded by the upstream) before it returns.

The ports the host composes (:class:`~voicefsm.ports.ClientChannel`,
:class:`~voicefsm.ports.Upstream`, :class:`~voicefsm.ports.SessionSink`, the observer notes) are
in :mod:`voicefsm.ports`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any

from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.engine import Session
from voicefsm.memory import MemorySink
from voicefsm.model import SessionRecord, State
from voicefsm.ports import (
    ClientChannel,
    ClientInput,
    EndNote,
    HostNote,
    HostObserver,
    LogNote,
    PushClientChannel,
    SessionSink,
    StateNote,
    Upstream,
    UpstreamCloseNote,
    UpstreamConnection,
    UpstreamOpenNote,
    UpstreamTornDownNote,
)
from voicefsm.sending import Resume

logger = logging.getLogger("voicefsm.host")

__all__ = ["SessionHost", "SessionLog"]

TEARDOWN_DEFER_S = 0.5
"""Longest a closed connection's tear-down waits before it starts (at once if the session ended,
:data:`TEARDOWN_AFTER_READY_S` after the next connection is ready).

A rotation's new TLS and websocket handshakes and its first audio would otherwise share the event
loop with the old connection's tear-down (cancelling ``run_live``, the closing handshake); on
loopback that doubled the GoAway-to-setup gap. The old connection is silent meanwhile: it sends
and reports nothing after ``close()``.
"""

TEARDOWN_AFTER_READY_S = 0.05
"""Once the next connection is ready, its first audio goes out before the old one's tear-down."""

CLIENT_BACKLOG_HIGH = 32
"""Events in the session's inbox at which a pushing client is paused
(:meth:`~voicefsm.ports.PushClientChannel.pause_pushing`): the consumer is behind, and nothing
else would stop the client from filling the inbox. 32 is 0.64 s of 20 ms chunks; a session
keeping up holds a few."""

CLIENT_BACKLOG_LOW = 8
"""Events left in the inbox at which a paused client is resumed."""

TEARDOWN_GRACE_S = 2.0
"""How long ``run()`` waits, past the upstream's own bound, for a tear-down before cancelling it."""


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """A logger adapter that prefixes ``[<session id>]`` and puts ``session_id`` on records.

    One adapter per session, over one module logger: nothing per session stays in ``logging``'s
    registry after the session ends.
    """

    def __init__(self, base: logging.Logger, session_id: str) -> None:
        super().__init__(base, {"session_id": session_id})
        self.session_id = session_id
        self._prefix = f"[{session_id[:12]}] "

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        """Prefix the message with the session id and attach it as ``record.session_id``."""
        extra = kwargs.get("extra")
        kwargs["extra"] = {"session_id": self.session_id, **(extra or {})}
        return self._prefix + str(msg), kwargs


class _Inbox:
    """The session's inbox: a deque with one waiter, and the consumer's timer as one handle.

    Cheaper per event than ``asyncio.Queue`` plus an ``asyncio.timeout()`` per read: the timer
    handle is only re-armed when the engine's next timer changes, not once per chunk.
    """

    __slots__ = ("_armed_for", "_handle", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[ev.Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None

    def put(self, event: ev.Event) -> None:
        self._items.append(event)
        self._wake()

    def take(self) -> ev.Event | None:
        return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    async def wait(self, until: float | None, clock: Callable[[], float]) -> None:
        """Return once an event was put, or at ``until`` (a ``clock`` time), whichever first."""
        loop = asyncio.get_running_loop()
        if until is not None and (until != self._armed_for or self._handle is None):
            if self._handle is not None:
                self._handle.cancel()
            self._armed_for = until
            self._handle = loop.call_later(max(0.0, until - clock()), self._fire)
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


class SessionHost:
    """Runs one session to its end: the single consumer of the session's inbox.

    ``clock`` gives epoch seconds (``time.time``). ``run()`` returns the final record once the
    session has ended; it never leaves a connection or task behind. Cancelling ``run()`` ends the
    session with ``error`` before the cancellation propagates.

    Two hooks, both called synchronously on the consumer (they must not block):
    ``observer(change, end_reason)`` with every state change (the metrics' hook), and
    ``on_note(note)`` with structured :data:`~voicefsm.ports.HostNote` s — state changes,
    upstream opens, closes and finished tear-downs, and the end.
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
        on_note: HostObserver | None = None,
        client_send_timeout_s: float = 5.0,
    ) -> None:
        self.session = session
        self.upstream = upstream
        self.sink: SessionSink = sink if sink is not None else MemorySink()
        self._clock = clock
        self._inbox = _Inbox()
        self._client: ClientChannel | None = None
        self._client_reader: asyncio.Task[None] | None = None
        self._paused_client: PushClientChannel | None = None
        self._connections: dict[int, UpstreamConnection] = {}
        self._current: UpstreamConnection | None = None
        self._carry: list[bytes] = []
        self._teardowns: set[asyncio.Task[int]] = set()
        self._deferred: list[tuple[UpstreamConnection, int, float]] = []
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._pending_client = client
        self._observer = observer
        self._on_note = on_note
        self.client_send_timeout_s = client_send_timeout_s
        self._detach_reason: str | None = None
        self._audio_refused_at_end = 0
        self._save_owed = False
        self._log = SessionLog(logger, session.session_id)

    # ------------------------------------------------------------------ entry points

    def post(self, event: ev.Event) -> None:
        """Put an event into the session's inbox (from any task of this event loop)."""
        self._inbox.put(event)

    def attach(self, client: ClientChannel) -> None:
        """Attach a (re)connecting client: it replaces any previous one and gets the state."""
        self._start_reader(client)
        self.post(ev.ClientBack())

    def detach(self, reason: str) -> None:
        """Stop driving the session *without ending it* (another worker owns it now).

        ``run()`` closes the upstream and the client (4410, ``reason``) and returns the session's
        record as it stands; whoever holds the session next restores it from its stored record.
        Once the session has ended there is nothing to hand over: the call does nothing.
        """
        if self.session.ended:
            return
        self._detach_reason = reason
        self.post(ev.Tick())  # wake the consumer

    @property
    def detached(self) -> bool:
        """Whether :meth:`detach` stopped this host."""
        return self._detach_reason is not None

    async def run(self) -> SessionRecord:
        """Drive the session until it ends (or :meth:`detach`); return its record."""
        session = self.session
        if self._pending_client is not None:
            self._start_reader(self._pending_client)
            self._pending_client = None
        try:
            await self._apply(session.start(self._clock()))
            event: ev.Event | None = None
            while not session.ended and self._detach_reason is None:
                event = await self._next_event()
                if self._detach_reason is not None:
                    break
                owed = self._save_owed
                await self._apply(session.handle(event, self._clock()))
                if owed and self._save_owed and type(event) is not ev.ClientAudio:
                    await self._save_owed_record()  # owed by an earlier call, not superseded
                if self._deferred and type(event) is ev.UpstreamReady:
                    self._defer_teardowns(TEARDOWN_AFTER_READY_S)
            if type(event) is ev.ClientAudio and session.ended:
                # A chunk handled after a timer was due (the deadline, on a busy loop): the timer
                # fired first and ended the session, so the engine dropped the chunk unheard.
                self._audio_refused_at_end = 1
            if self._detach_reason is not None and not session.ended:
                self._log.warning("detached without ending the session: %s", self._detach_reason)
                client, self._client = self._client, None
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close(4410, self._detach_reason[:120])
        except asyncio.CancelledError:
            await self._fail("the host was cancelled")
            raise
        except Exception as error:
            self._log.exception("session host failed")
            await self._fail(f"{type(error).__name__}: {error}")
        finally:
            await self._shutdown()
        return session.snapshot()

    # ------------------------------------------------------------------ the loop

    async def _next_event(self) -> ev.Event:
        inbox = self._inbox
        while True:
            event = inbox.take()
            if event is not None:
                paused = self._paused_client
                if paused is not None and len(inbox) <= CLIENT_BACKLOG_LOW:
                    self._paused_client = None
                    paused.resume_pushing()  # may deliver (and pause) right here
                return event
            timer = self.session.next_timer()
            if timer is not None and timer <= self._clock():
                return ev.Tick()
            await inbox.wait(timer, self._clock)

    async def _fail(self, detail: str) -> None:
        if self.session.ended:
            return
        with contextlib.suppress(Exception):
            effects = self.session.handle(ev.Fatal(f"host failure: {detail}"), self._clock())
            # Carry out the end effects even while being cancelled.
            await asyncio.shield(self._apply(effects))

    async def _save_owed_record(self) -> None:
        if self._save_owed:
            self._save_owed = False
            await self.sink.save(self.session.snapshot())

    async def _shutdown(self) -> None:
        try:
            await self._save_owed_record()
        except Exception as error:  # a store outage must not keep the connections open
            self._log.warning("saving the session's record at the end failed: %r", error)
        for connection_id in list(self._connections):
            self._close_upstream(connection_id, "the host is stopping")
        self._current = None
        self._start_teardowns()
        if self._teardowns:
            # Each tear-down is bounded by its upstream; this is a second, outer bound.
            _, stuck = await asyncio.wait(self._teardowns, timeout=TEARDOWN_GRACE_S + 10.0)
            for task in stuck:
                self._log.error("an upstream tear-down did not finish; cancelling it")
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=TEARDOWN_GRACE_S)
        await self._count_late_unsent()
        if self.session.ended or self.detached:
            try:
                await self.upstream.forget(self.session.session_id)
            except Exception as error:
                self._log.warning("forgetting the upstream session failed: %r", error)
        if self._client_reader is not None:
            self._client_reader.cancel()
            await asyncio.wait({self._client_reader})  # never raises, unlike awaiting it
            self._client_reader = None

    async def _count_late_unsent(self) -> None:
        """Hand the engine the unsent-audio counts that arrived after its loop stopped."""
        late: list[ev.UpstreamAudioUnsent] = []
        queued_audio = self._audio_refused_at_end
        self._inbox.close()
        while (event := self._inbox.take()) is not None:
            if isinstance(event, ev.UpstreamAudioUnsent):
                late.append(event)
            elif isinstance(event, ev.ClientAudio):
                queued_audio += 1
        if queued_audio:
            # Read from the client before the session stopped, but never handed to the engine.
            late.append(ev.UpstreamAudioUnsent(queued_audio, "client audio queued at the end"))
        if self._carry:
            late.append(ev.UpstreamAudioUnsent(len(self._carry), "the host stopped"))
            self._carry = []
        if self.detached and not self.session.ended:
            # The next worker owns the record now; only say what this one could not send.
            for event in late:
                self._log.warning("%d audio chunks unsent: %s", event.chunks, event.reason)
            return
        for event in late:
            try:
                await self._apply(self.session.handle(event, self._clock()))
            except Exception as error:
                self._log.warning("recording unsent audio failed: %r", error)

    # ------------------------------------------------------------------ effects

    async def _apply(self, effects: list[fx.Effect]) -> None:
        # The upstream effects never block: carry them out first, in their order, so that a new
        # connection is not opened only after a store write or a client send was awaited. The
        # others follow in their order; the order within each channel is the engine's.
        # A call that replaces a connection (a rotation: close the old, open the new) starts the
        # new one first, before the old one's close work, so its connect is on its way as early as
        # the call allows. Its record is not written while that connect runs: after the next call
        # that is not client audio (the new connection's UpstreamReady, or its failure), the
        # session's record as it then stands is, unless that call wrote its own. Every record is
        # a whole snapshot, so the later one carries the rotation; a restore from the record
        # before it resumes with the same handle.
        later: list[fx.Effect] | None = None
        opening: tuple[fx.OpenUpstream, UpstreamConnection] | None = None
        for effect in effects:
            kind = type(effect)
            if kind is fx.SendAudioUpstream:
                if self._current is not None:
                    self._current.send_audio(effect.data)  # type: ignore[union-attr]
            elif kind is fx.SendAudioToClient and later is None:
                await self._to_client(effect)  # type: ignore[arg-type]
            elif kind is fx.SendTextUpstream:
                if self._current is not None:
                    self._current.send_text(effect.text)  # type: ignore[union-attr]
            elif kind is fx.OpenUpstream:
                if opening is not None and opening[0] is effect:
                    self._finish_open(effect, opening[1])
                else:
                    self._finish_open(effect, self._start_open(effect))  # type: ignore[arg-type]
            elif kind is fx.CloseUpstream:
                if opening is None:
                    opening = self._open_ahead(effects)
                self._close_upstream(effect.connection_id, effect.reason)  # type: ignore[union-attr]
            elif later is None:
                later = [effect]
            else:
                later.append(effect)
        if later is None:
            return
        for effect in later:
            if isinstance(effect, fx.SendAudioToClient | fx.SendToClient | fx.CloseClient):
                await self._to_client(effect)
            elif isinstance(effect, fx.RecordTranscript):
                await self.sink.append_transcript(self.session.session_id, effect.line)
            elif isinstance(effect, fx.PersistRecord):
                if opening is not None and not self.session.ended:
                    self._save_owed = True
                else:
                    self._save_owed = False  # this record is newer than the one owed
                    await self.sink.save(effect.record)
            elif isinstance(effect, fx.StateChanged):
                self._state_changed(effect)
            elif isinstance(effect, fx.Logged) and self._on_note is not None:
                self._note(LogNote(self.session.session_id, effect.entry))

    def _note(self, note: HostNote) -> None:
        if self._on_note is not None:
            try:
                self._on_note(note)
            except Exception:
                self._log.exception("the host observer failed")

    def _state_changed(self, effect: fx.StateChanged) -> None:
        self._log.info("%s -> %s: %s", effect.previous, effect.state, effect.why)
        reason = self.session.end_reason
        if self._observer is not None:
            self._observer(effect, reason.value if reason is not None else None)
        session_id = self.session.session_id
        ended = effect.state is State.ENDED
        self._note(
            StateNote(
                session_id,
                effect.previous,
                effect.state,
                effect.why,
                effect.at,
                reason if ended else None,
            )
        )
        if ended and reason is not None:
            self._note(EndNote(session_id, reason, self.session.end_detail or "", effect.at))

    def _open_ahead(
        self, effects: list[fx.Effect]
    ) -> tuple[fx.OpenUpstream, UpstreamConnection] | None:
        """Start the connection a call opens after its closes, before those closes' work."""
        for effect in effects:
            if type(effect) is fx.OpenUpstream:
                return effect, self._start_open(effect)
        return None

    def _start_open(self, effect: fx.OpenUpstream) -> UpstreamConnection:
        # The upstream only starts the connection here (nothing is sent to it yet), so the old
        # connections can still be closed after it and their unsent audio go to it first.
        connection = self.upstream.open(
            connection_id=effect.connection_id,
            handle=effect.handle,
            session_id=self.session.session_id,
            config=self.session.config,
            report=self.post,
        )
        self._connections[effect.connection_id] = connection
        return connection

    def _finish_open(self, effect: fx.OpenUpstream, connection: UpstreamConnection) -> None:
        # Whatever else is still registered is dead or being replaced: take back its unsent audio.
        for connection_id in [c for c in self._connections if c != effect.connection_id]:
            self._close_upstream(connection_id, "replaced by a new connection")
        self._current = connection
        carried, self._carry = self._carry, []
        self._log.info(
            "opened upstream #%d (%s, attempt %d, %d chunks to re-send)",
            effect.connection_id,
            "resuming" if effect.handle else "fresh",
            effect.attempt,
            len(carried),
        )
        self._note(
            UpstreamOpenNote(
                self.session.session_id,
                effect.connection_id,
                effect.handle is not None,
                effect.attempt,
                len(carried),
            )
        )
        for chunk in carried:
            connection.send_audio(chunk)

    def _close_upstream(self, connection_id: int, reason: str) -> None:
        connection = self._connections.pop(connection_id, None)
        if connection is None:
            return
        if connection is self._current:
            self._current = None
        started = time.monotonic()
        try:
            handed_back = connection.close()
        except Exception as error:  # a failing close must not end the interview
            self._log.warning("closing upstream #%d failed: %r", connection_id, error)
            handed_back = []
        if self.session.ended:
            self._count_unsent(len(handed_back), "the session ended")
        else:
            self._carry.extend(handed_back)
        self._log.info("closed upstream #%d: %s", connection_id, reason)
        self._note(
            UpstreamCloseNote(self.session.session_id, connection_id, reason, len(handed_back))
        )
        self._deferred.append((connection, connection_id, started))
        if self.session.ended:
            self._start_teardowns()
        elif self._deferred_timer is None:
            self._defer_teardowns(TEARDOWN_DEFER_S)

    def _defer_teardowns(self, delay: float) -> None:
        if self._deferred_timer is not None:
            if self._deferred_timer.when() <= asyncio.get_running_loop().time() + delay:
                return
            self._deferred_timer.cancel()
        loop = asyncio.get_running_loop()
        self._deferred_timer = loop.call_later(delay, self._start_teardowns)

    def _start_teardowns(self) -> None:
        """Start the tear-down of every closed connection (beside the consumer)."""
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        deferred, self._deferred = self._deferred, []
        for connection, connection_id, started in deferred:
            name = f"voicefsm-upstream-{self.session.session_id[:12]}-{connection_id}-teardown"
            coro = self._tear_down(connection, connection_id, started)
            task = asyncio.create_task(coro, name=name)
            self._teardowns.add(task)
            task.add_done_callback(self._teardowns.discard)

    async def _tear_down(
        self, connection: UpstreamConnection, connection_id: int, started: float
    ) -> int:
        try:
            unconfirmed = await connection.wait_closed()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log.warning("tearing down upstream #%d failed: %r", connection_id, error)
            unconfirmed = 0
        seconds = time.monotonic() - started
        self._log.info("upstream #%d torn down in %.3f s", connection_id, seconds)
        self._note(
            UpstreamTornDownNote(self.session.session_id, connection_id, seconds, unconfirmed)
        )
        self._count_unsent(unconfirmed, f"upstream #{connection_id} closed unconfirmed")
        return unconfirmed

    def _count_unsent(self, chunks: int, reason: str) -> None:
        if chunks <= 0:
            return
        self._log.warning("%d audio chunks may never have reached the model: %s", chunks, reason)
        # Through the inbox, so the consumer stays the only caller of the engine; whatever is
        # still queued when the loop stops is handled by _shutdown.
        self.post(ev.UpstreamAudioUnsent(chunks, reason))

    async def _to_client(
        self, effect: fx.SendAudioToClient | fx.SendToClient | fx.CloseClient
    ) -> None:
        client = self._client
        if client is None:
            return
        sending = self._send(client, effect)
        try:
            # Most sends finish without suspending (a socket with room in its buffer): run the
            # send up to its first suspension, and only a send that suspends gets the timeout
            # (a client that stops reading must not stall the consumer, and so every timer).
            suspended_on = sending.send(None)
        except StopIteration:
            return
        except Exception as error:
            self._client_send_failed(client, error)
            return
        try:
            async with asyncio.timeout(self.client_send_timeout_s):
                await Resume(sending, suspended_on)
        except Exception as error:  # a dead or stuck client socket is the client leaving
            self._client_send_failed(client, error)

    def _client_send_failed(self, client: ClientChannel, error: Exception) -> None:
        self._log.info("client send failed (%s); treating the client as gone", type(error).__name__)
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
            self._client_reader = None
        self._client = client
        self._paused_client = None  # a replaced client is being closed: never resumed
        if isinstance(client, PushClientChannel):
            client.start_pushing(functools.partial(self._deliver, client))
            return
        self._client_reader = asyncio.create_task(
            self._read_client(client), name=f"voicefsm-client-{self.session.session_id[:12]}"
        )

    def _deliver(self, client: PushClientChannel, message: ClientInput | None) -> None:
        """A pushing client's message: into the inbox, unless another client replaced it."""
        if self._client is not client:
            return
        if message is None:
            self._client = None
            self.post(ev.ClientGone("the client connection closed"))
        else:
            inbox = self._inbox
            inbox.put(message)
            if len(inbox) >= CLIENT_BACKLOG_HIGH and self._paused_client is None:
                self._paused_client = client
                client.pause_pushing()

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
