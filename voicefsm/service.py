"""The web-facing service: authenticates client connections and runs their sessions.

Framework adapters (:mod:`voicefsm.web.starlette`, :mod:`voicefsm.web.aiohttp`) only turn their
websocket into a :class:`Transport` and call :meth:`InterviewService.handle`; everything else —
the origin check, authentication, session ownership, re-attaching a returning client, decoding
frames, counting protocol errors, metrics — lives here, once.

Close codes a client can see: 4401 (not authenticated, or not within ``auth_timeout_s``), 4403
(origin not allowed, or the session belongs to someone else), 4404 (no such session), 4408
(heartbeat timeout), 4409 (replaced by a newer connection to the same session), 4410 (this worker
gave the session up: reconnect), 4429 (the user runs too many sessions), 1013 (another worker
still holds the session, this worker is at a :class:`~voicefsm.limits.ServiceLimits` limit, or its
``overload`` guard finds it too busy for a new one: retry soon), 1009 (a frame over the limit,
refused by the websocket server), 1011 (the server could not start or keep the session, or could
not read from the client), 1000 (the session ended).

Sessions live in a :class:`~voicefsm.stores.SessionStore`. The worker that drives a session holds
its lease and writes through the fenced view, so a client that reconnects to *another* worker (or
to this one after a restart) gets the same session back: same deadline, same upstream handle,
the whole transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from voicefsm import events as ev
from voicefsm.admission import OverloadGuard
from voicefsm.auth import Authenticator, AuthError, Principal
from voicefsm.engine import Session
from voicefsm.host import SessionHost
from voicefsm.limits import Admission, Refusal, Reservation, ServiceLimits
from voicefsm.metrics import Metrics, SessionObserver
from voicefsm.model import SessionConfig, SessionRecord, State
from voicefsm.ports import ClientDelivery, ClientInput, Upstream
from voicefsm.protocol import ErrorMessage, ServerMessage, SessionCreated, SessionEnded
from voicefsm.stores import (
    Lease,
    LeaseKeeper,
    LeaseLost,
    MemoryStore,
    RetryingSink,
    SessionStore,
)
from voicefsm.web.decoder import AuthMessage, ClientDecoder, ProtocolLimits, ProtocolViolation

logger = logging.getLogger("voicefsm.service")

MEMORY_STORE_WARNING = (
    "sessions are kept in memory (MemoryStore): stopping or restarting this process ends every "
    "running interview (reason 'error'); pass a durable store (SQLite or Redis, see "
    "voicefsm.stores.open_store) to hand them over instead"
)
"""Logged once at start-up by a service on the memory store."""
MEMORY_SHUTDOWN_DETAIL = (
    "the server shut down, and sessions kept in memory (MemoryStore) cannot continue after a "
    "restart"
)
"""The end detail of a session ended by the shutdown of a service on the memory store."""

FENCED_OUT_REASON = "another worker took the session over; reconnect to continue"
"""The 4410 close reason of a worker that lost a session to another one."""

SUBPROTOCOL = "voicefsm.v1"
"""The subprotocol the server selects when the client offers it."""
TOKEN_SUBPROTOCOL_PREFIX = "bearer."
"""A client may offer ``bearer.<token>`` as a subprotocol to authenticate (browsers cannot set
headers on a websocket)."""


class Transport(Protocol):
    """A client websocket, as an adapter exposes it."""

    subprotocols: Sequence[str]
    """Subprotocols the client offered."""
    query: Mapping[str, str]
    """Query parameters of the request."""
    origin: str | None
    """The ``Origin`` header, if any."""

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the websocket handshake."""
        ...

    async def receive(self) -> str | bytes | None:
        """The next frame; ``None`` once the client has disconnected."""
        ...

    async def send_text(self, text: str) -> None:
        """Send a text frame."""
        ...

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket."""
        ...


PUSH_EXTENSION = "voicefsm.push"
"""The ASGI websocket scope's ``extensions`` key under which a server offers a :class:`FramePush`
(:class:`voicefsm.web.uvicorn_server.QueueingWebSocketProtocol` does)."""

FrameTarget = Callable[[str | bytes | None], None]
"""Called with each frame a pushing transport receives, and once with ``None`` when it is gone."""


class FramePush(Protocol):
    """A transport's switch from ``receive()`` to pushed frames (uvicorn's under
    :func:`voicefsm.web.starlette.uvicorn_options`:
    :class:`voicefsm.web.uvicorn_server.MessagePush`)."""

    def start(self, target: FrameTarget) -> None:
        """From now on call ``target`` with each frame (those already received first), then once
        with ``None``; synchronously, as frames arrive. ``receive()`` is not called again."""
        ...

    def pause(self) -> None:
        """Deliver nothing more, and stop reading the socket, until :meth:`resume`."""
        ...

    def resume(self) -> None:
        """Deliver what was held back, then read the socket again."""
        ...


@runtime_checkable
class PushingTransport(Transport, Protocol):
    """A :class:`Transport` that may push its frames instead (``push`` is ``None`` when the
    server under it does not offer that)."""

    push: FramePush | None
    """The switch to pushed frames, if the server offers it."""


MAX_PENDING_ANSWERS = 8
"""``error`` answers a pushing channel queues for a client; more are dropped (still counted)
until the client has read some: a client that floods garbage and reads nothing costs bounded
memory and at most one sending task."""


class WebChannel:
    """A :class:`~voicefsm.ports.ClientChannel` over a :class:`Transport`: decodes frames,
    answers bad ones with an ``error`` message, and ends the session after too many.

    :func:`web_channel` makes a :class:`PushWebChannel` instead when the transport can push.
    """

    def __init__(self, transport: Transport, limits: ProtocolLimits, metrics: Metrics) -> None:
        self.transport = transport
        self.decoder = ClientDecoder(limits)
        self.done = asyncio.Event()
        self._metrics = metrics
        self._closed = False

    async def receive(self) -> ClientInput | None:
        """The next client event (bad frames are answered and skipped).

        Never raises: a transport that fails is closed with 1011 and reported as the client
        leaving, so the session knows at once and the client sees why.
        """
        try:
            return await self._receive()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.warning("client link failed (%s); closing it with 1011", type(error).__name__)
            with contextlib.suppress(Exception):
                await self.close(1011, "the server could not read from this connection")
            self.done.set()
            return None

    async def _receive(self) -> ClientInput | None:
        while not self._closed:
            frame = await self.transport.receive()
            if frame is None:
                self.done.set()
                return None
            event, answer = self._decode(frame)
            if answer is not None:
                with contextlib.suppress(Exception):
                    await self.transport.send_text(answer)
            if event is not None:
                return event
        return None

    def _decode(self, frame: str | bytes) -> tuple[ClientInput | None, str | None]:
        """What a frame means for the session (``None``: nothing), and the ``error`` message
        that answers it, if any."""
        decoded = self.decoder.decode(frame, time.monotonic())
        if isinstance(decoded, ProtocolViolation):
            self._metrics.client_errors.labels(code=decoded.code).inc()
            answer = decoded.to_message().model_dump_json() if decoded.tell_client else None
            if self.decoder.too_many_errors:
                fatal = ev.Fatal(
                    f"the client broke the protocol {self.decoder.errors} times "
                    f"({', '.join(sorted(self.decoder.errors_by_code))})"
                )
                return fatal, answer
            return None, answer
        if isinstance(decoded, AuthMessage):
            return None, None  # already authenticated; a repeated auth message is harmless
        return decoded, None

    async def send_audio(self, data: bytes) -> None:
        """Send interviewer audio as a binary frame."""
        await self.transport.send_bytes(data)

    async def send_message(self, message: ServerMessage) -> None:
        """Send a JSON message."""
        await self.transport.send_text(message.model_dump_json())

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.transport.close(code, reason[:120])
        finally:
            self.done.set()


class PushWebChannel(WebChannel):
    """A :class:`WebChannel` whose transport pushes frames: a
    :class:`~voicefsm.ports.PushClientChannel`.

    Each frame is decoded in the transport's callback and the event handed to the host's
    ``deliver`` (the session's inbox) at once, with no reader task in between. A bad frame's
    ``error`` answer goes out from a task (at most :data:`MAX_PENDING_ANSWERS` queued), so the
    callback never waits for the client. After too many errors the session gets one
    :class:`~voicefsm.events.Fatal` and the channel decodes nothing more.
    """

    def __init__(
        self, transport: Transport, push: FramePush, limits: ProtocolLimits, metrics: Metrics
    ) -> None:
        super().__init__(transport, limits, metrics)
        self._push = push
        self._deliver: ClientDelivery | None = None
        self._broken = False
        self._answers: deque[str] = deque()
        self._answering: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    def start_pushing(self, deliver: ClientDelivery) -> None:
        """Hand every client event to ``deliver`` from now on (then ``None``, once)."""
        self._deliver = deliver
        self._push.start(self._on_frame)

    def pause_pushing(self) -> None:
        """Hold client frames back (the socket is not read) until :meth:`resume_pushing`."""
        self._push.pause()

    def resume_pushing(self) -> None:
        """Deliver again."""
        self._push.resume()

    def _on_frame(self, frame: str | bytes | None) -> None:
        deliver = self._deliver
        assert deliver is not None
        if frame is None:
            self.done.set()
            deliver(None)
            return
        if self._closed or self._broken:
            return
        try:
            event, answer = self._decode(frame)
            if answer is not None:
                self._answer(answer)
            if event is not None:
                if type(event) is ev.Fatal:
                    self._broken = True
                deliver(event)
        except Exception as error:  # never into the transport's callback
            logger.warning("client link failed (%s); closing it with 1011", type(error).__name__)
            self._broken = True
            self._closing = asyncio.get_running_loop().create_task(
                self.close(1011, "the server could not read from this connection")
            )
            deliver(None)

    def _answer(self, text: str) -> None:
        if len(self._answers) >= MAX_PENDING_ANSWERS:
            return
        self._answers.append(text)
        if self._answering is None:
            self._answering = asyncio.get_running_loop().create_task(
                self._send_answers(), name="voicefsm-client-answers"
            )

    async def _send_answers(self) -> None:
        try:
            while self._answers and not self._closed:
                text = self._answers.popleft()
                with contextlib.suppress(Exception):
                    await self.transport.send_text(text)
        finally:
            self._answering = None

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket (once); unsent answers are dropped."""
        answering = self._answering
        if answering is not None and answering is not asyncio.current_task():
            answering.cancel()
        self._answers.clear()
        await super().close(code, reason)


def web_channel(transport: Transport, limits: ProtocolLimits, metrics: Metrics) -> WebChannel:
    """The client channel over ``transport``: a :class:`PushWebChannel` when the transport can
    push its frames, else a plain :class:`WebChannel` that the host reads."""
    push = transport.push if isinstance(transport, PushingTransport) else None
    if push is not None:
        return PushWebChannel(transport, push, limits, metrics)
    return WebChannel(transport, limits, metrics)


@dataclass
class LiveSession:
    """A session this worker drives: its host, its task, its owner and its lease."""

    host: SessionHost
    owner: Principal
    lease: Lease
    task: asyncio.Task[SessionRecord] = field(init=False)
    channel: WebChannel | None = None
    observer: SessionObserver | None = None
    created_at: float = field(default_factory=time.time)
    reservation: Reservation | None = None
    release_on_detach: bool = False
    """Handed over on shutdown: save the record and release the lease for the next worker."""


class InterviewService:
    """Runs interview sessions for websocket clients of one process.

    ``upstream`` opens model connections (an :class:`~voicefsm.adk.AdkUpstream`);
    ``authenticator`` checks tokens (required: use a :class:`~voicefsm.auth.JWTAuthenticator`);
    ``store`` keeps records and transcripts (default: a :class:`~voicefsm.stores.MemoryStore`,
    which a restart empties); ``worker_id`` names this worker in leases (keep it stable across
    restarts of one process slot, e.g. ``host:port``); ``origins`` is an optional allow-list of
    ``Origin`` values. Tie it to the server's lifetime with :mod:`voicefsm.web.lifespan` (see
    ``docs/embedding.md`` for every option); :meth:`shutdown` drains it by hand.
    ``drain_timeout_s`` bounds that drain; ``orphan_sweep_s`` is how often (seconds; ``None``:
    never) this worker finalises sessions of a durable store that nobody drives any more
    (:mod:`voicefsm.orphans`).
    """

    def __init__(
        self,
        upstream: Upstream,
        authenticator: Authenticator,
        *,
        config: SessionConfig | None = None,
        store: SessionStore | None = None,
        worker_id: str | None = None,
        lease_ttl_s: float = 15.0,
        limits: ProtocolLimits | None = None,
        origins: Sequence[str] | None = None,
        metrics: Metrics | None = None,
        auth_timeout_s: float = 10.0,
        session_factory: Callable[[SessionConfig], Session] = Session,
        service_limits: ServiceLimits | None = None,
        drain_timeout_s: float = 10.0,
        orphan_sweep_s: float | None = 30.0,
        overload: OverloadGuard | None = None,
    ) -> None:
        self.upstream = upstream
        self.authenticator = authenticator
        self.config = config or SessionConfig()
        self.store: SessionStore = store if store is not None else MemoryStore()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_ttl_s = lease_ttl_s
        self.limits = limits or ProtocolLimits()
        self.origins = frozenset(origins) if origins else None
        self.metrics = metrics or Metrics()
        self.auth_timeout_s = auth_timeout_s
        self._session_factory = session_factory
        self.overload = overload
        """Refuses new sessions while this worker's event loop lags (:mod:`voicefsm.admission`)."""
        self.sessions: dict[str, LiveSession] = {}
        self._locks: dict[str, _SessionLock] = {}
        self.admission = Admission(service_limits)
        """Connections and sessions of this worker, counted against ``service_limits``."""
        if not drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s must be positive, not {drain_timeout_s!r}")
        self.drain_timeout_s = drain_timeout_s
        self.orphan_sweep_s = orphan_sweep_s
        self._started = False
        self._draining = False
        self._background: list[Callable[[], Awaitable[None]]] = []

    async def handle(self, transport: Transport) -> None:
        """Serve one client connection until it closes or its session ends."""
        await self.start()
        offered = list(transport.subprotocols)
        refusal = self.admission.connect()
        if refusal is not None:
            with contextlib.suppress(Exception):  # a client gone mid-handshake: nothing to tell
                await transport.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
                await _refuse(transport, refusal)
            return
        try:
            await self._handle(transport, offered)
        except Exception as error:  # nothing a client causes may escape as a bare 1006
            logger.exception("serving a client connection failed (%s)", type(error).__name__)
            with contextlib.suppress(Exception):
                await transport.close(1011, "the server failed to serve this connection")
        finally:
            self.admission.disconnect()

    async def _handle(self, transport: Transport, offered: list[str]) -> None:
        if self._draining:
            await transport.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
            await self._refuse_while_draining(transport)
            return
        principal = await self._admit(transport, offered)
        if principal is None:
            return
        session_id = transport.query.get("session")
        channel = web_channel(transport, self.limits, self.metrics)
        if session_id and not _plausible_session_id(session_id):
            await _unknown_session(channel)  # never logged or looked up: it is client input
            return
        live = (
            await self._reattach(session_id, principal, channel)
            if session_id
            else await self._start(principal, channel)
        )
        if live is None:
            return
        # Until the client leaves or the session is over (whatever happened to its host).
        waiter = asyncio.create_task(channel.done.wait())
        try:
            await asyncio.wait({waiter, live.task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not channel.done.is_set():
            await channel.close(1011, "the session stopped")

    @property
    def durable(self) -> bool:
        """Whether sessions outlive this process: the store is not a :class:`MemoryStore`."""
        return not isinstance(self.store, MemoryStore)

    @property
    def draining(self) -> bool:
        """Whether :meth:`shutdown` has begun: new connections are refused from then on."""
        return self._draining

    async def start(self) -> None:
        """Begin serving (idempotent): say at start-up what a restart does to running sessions.

        The lifespan helpers (:mod:`voicefsm.web.lifespan`) call it; :meth:`handle` calls it
        too, so a service that nobody started still works.
        """
        if self._started:
            return
        self._started = True
        if self.durable:
            logger.info(
                "worker %s: sessions are kept in %r; on shutdown they are handed over "
                "(clients get 4410 and reconnect) and continue after a restart or on another "
                "worker",
                self.worker_id,
                self.store,
            )
        else:
            logger.warning(MEMORY_STORE_WARNING)
        if self.durable and self.orphan_sweep_s is not None:
            self._start_orphan_sweeper(self.orphan_sweep_s)

    def _start_orphan_sweeper(self, every_s: float) -> None:
        from voicefsm.orphans import OrphanSweeper

        def count(record: SessionRecord) -> None:
            if record.end_reason is not None:
                self.metrics.ended.labels(reason=record.end_reason.value).inc()

        sweeper = OrphanSweeper(
            self.store,
            self.worker_id,
            every_s=every_s,
            lease_ttl_s=self.lease_ttl_s,
            on_finalised=count,
        )
        sweeper.start()
        self._background.append(sweeper.stop)

    async def shutdown(self, *, detach: bool | None = None, timeout_s: float | None = None) -> None:
        """Stop every session this worker drives, within a bounded drain, and wait for them.

        New connections are refused from the first call on. With ``detach`` (the default when
        the store is durable) each session is handed over un-ended: its record is saved, its
        lease released and its client closed with 4410 ("reconnect"); the reconnecting client
        continues it here after a restart, or on another worker. Otherwise (the memory store)
        each session ends with ``error`` and a detail that says why. Sessions still running
        after ``timeout_s`` (default ``drain_timeout_s``) are cancelled.
        """
        self._draining = True
        if self.overload is not None:
            await self.overload.monitor.stop()
        if detach is None:
            detach = self.durable
        for stop in self._background:
            await stop()
        self._background.clear()
        timeout = self.drain_timeout_s if timeout_s is None else timeout_s
        sessions = list(self.sessions.values())
        for live in sessions:
            self._stop_for_shutdown(live, detach=detach)
        tasks = [live.task for live in sessions]
        if tasks:
            logger.info(
                "draining %d session(s) (%s, at most %g s)",
                len(tasks),
                "handing them over" if detach else "ending them",
                timeout,
            )
            _, stuck = await asyncio.wait(tasks, timeout=timeout)
            for task in stuck:
                task.cancel()
            if stuck:
                logger.warning("%d session(s) did not stop in %g s; cancelled", len(stuck), timeout)
                await asyncio.wait(stuck, timeout=5)

    def _stop_for_shutdown(self, live: LiveSession, *, detach: bool) -> None:
        if detach:
            live.release_on_detach = True
            live.host.detach("the server is shutting down; reconnect to continue")
        else:
            live.host.post(ev.Fatal(MEMORY_SHUTDOWN_DETAIL))

    async def _refuse_while_draining(self, transport: Transport) -> None:
        if transport.query.get("session"):
            await transport.close(4410, "the server is shutting down; reconnect to continue")
        else:
            await transport.close(1013, "the server is shutting down; retry")

    # ------------------------------------------------------------------ steps

    async def _admit(self, transport: Transport, offered: list[str]) -> Principal | None:
        """Handshake, origin and token within ``auth_timeout_s`` of the app seeing the socket."""
        try:
            async with asyncio.timeout(self.auth_timeout_s):
                await transport.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
                if self.origins is not None and transport.origin not in self.origins:
                    logger.warning("refused a connection from origin %r", transport.origin)
                    await transport.close(4403, "origin not allowed")
                    return None
                return await self._authenticate(transport, offered)
        except TimeoutError:
            logger.info("refused a connection that did not authenticate in time")
            with contextlib.suppress(Exception):
                await transport.close(
                    4401, f"no valid token within {self.auth_timeout_s:g} s of connecting"
                )
            return None

    async def _authenticate(self, transport: Transport, offered: list[str]) -> Principal | None:
        token = next(
            (
                protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
                for protocol in offered
                if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX)
            ),
            None,
        ) or transport.query.get("token")
        if token is None:
            token = await self._first_message_token(transport)
        try:
            return await self.authenticator.authenticate(token)
        except AuthError as error:
            logger.info("refused an unauthenticated connection: %s", error)
            await transport.close(4401, str(error)[:120])
            return None

    async def _first_message_token(self, transport: Transport) -> str | None:
        # The deadline is _admit's: it covers the handshake and this first frame together.
        frame = await transport.receive()
        if frame is None:
            return None
        decoded = ClientDecoder(self.limits).decode(frame, time.monotonic())
        return decoded.token if isinstance(decoded, AuthMessage) else None

    async def _start(self, principal: Principal, channel: WebChannel) -> LiveSession | None:
        if self.overload is not None:  # new sessions only: running ones are never refused
            self.overload.start()
            starting = sum(
                1 for live in self.sessions.values() if live.host.session.state is State.CONNECTING
            )
            busy = self.overload.refusal(len(self.sessions), starting)
            if busy is not None:
                logger.warning("refused a new session: %s", busy)
                await channel.send_message(ErrorMessage(code="server_busy", message=busy))
                await channel.close(1013, "server busy, retry")
                return None
        reservation = self.admission.reserve(principal.user_id)
        if isinstance(reservation, Refusal):
            logger.info(
                "refused a new session of user %r: %s", principal.user_id, reservation.reason
            )
            await _refuse(channel.transport, reservation)
            return None
        lease: Lease | None = None
        try:
            session = self._session_factory(self.config)
            session.owner = principal.user_id
            lease = await self.store.acquire_lease(
                session.session_id, self.worker_id, self.lease_ttl_s
            )
            if lease is None:  # a fresh random id: only a broken store says no
                await channel.close(1011, "could not take the new session's lease")
                reservation.release()
                return None
            await channel.send_message(
                SessionCreated(session_id=session.session_id, time_limit_s=self.config.time_limit_s)
            )
            live = self._run(session, principal, lease, channel, attach=False)
        except BaseException:
            reservation.release()
            if lease is not None:  # the client went before it heard of the session
                with contextlib.suppress(Exception):
                    await self.store.release_lease(lease)
            raise
        live.reservation = reservation
        logger.info("session %s started for user %r", session.session_id, principal.user_id)
        return live

    def _run(
        self,
        session: Session,
        principal: Principal,
        lease: Lease,
        channel: WebChannel,
        *,
        attach: bool,
    ) -> LiveSession:
        host_of: list[SessionHost] = []

        def refused(session_id: str, error: BaseException) -> None:
            # Fenced out (another worker took the session): stop writing and hand it over;
            # the session lives on there, so it must not end here.
            if host_of and not host_of[0].session.ended:
                host_of[0].detach(FENCED_OUT_REASON)

        observer = self.metrics.observer()
        if session.started_at is not None:  # restored: its record was counted where it ran
            observer.baseline(session.snapshot())
        sink = RetryingSink(
            observer.following(self.store.fenced(lease)),  # metrics count what was stored
            name=session.session_id[:12],
            on_refused=refused,
        )
        host = SessionHost(
            session,
            self.upstream,
            client=None if attach else channel,
            sink=sink,
            observer=observer,
        )
        host_of.append(host)
        if attach:
            host.attach(channel)
        live = LiveSession(
            host=host, owner=principal, lease=lease, channel=channel, observer=observer
        )
        live.task = asyncio.create_task(
            self._drive(live, sink), name=f"voicefsm-session-{session.session_id[:12]}"
        )
        self.sessions[session.session_id] = live
        live.task.add_done_callback(lambda _: self._forget(session.session_id, live))
        if self._draining:  # it began as the drain started: stop it the same way
            self._stop_for_shutdown(live, detach=self.durable)
        return live

    async def _drive(self, live: LiveSession, sink: RetryingSink) -> SessionRecord:
        host = live.host

        def lost(error: LeaseLost) -> None:
            logger.warning("session %s: %s", host.session.session_id, error)
            host.detach(FENCED_OUT_REASON)

        try:
            async with LeaseKeeper(self.store, live.lease, on_lost=lost):
                record = await host.run()
                if host.detached and live.release_on_detach and record.state is not State.ENDED:
                    with contextlib.suppress(Exception):
                        await sink.save(record)  # the newest record, for the next worker
        finally:
            await sink.aclose(grace_s=10)
            if host.detached and live.observer is not None:
                live.observer.detached(host.session.state)
        if not host.detached or live.release_on_detach:
            with contextlib.suppress(Exception):
                await self.store.release_lease(live.lease)
        return record

    def _forget(self, session_id: str, live: LiveSession) -> None:
        if live.reservation is not None:
            live.reservation.release()
        if self.sessions.get(session_id) is live:
            del self.sessions[session_id]

    async def _reattach(
        self, session_id: str, principal: Principal, channel: WebChannel
    ) -> LiveSession | None:
        entry = self._locks.get(session_id)
        if entry is None:
            entry = self._locks[session_id] = _SessionLock()
        # The entry lives while anyone holds *or waits for* it: dropping it while reconnects
        # are queued would let a later one take a fresh lock and run beside them.
        entry.users += 1
        try:
            async with entry.lock:  # two reconnects at once must not start two hosts
                return await self._reattach_locked(session_id, principal, channel)
        finally:
            entry.users -= 1
            if entry.users == 0 and self._locks.get(session_id) is entry:
                del self._locks[session_id]

    async def _reattach_locked(
        self, session_id: str, principal: Principal, channel: WebChannel
    ) -> LiveSession | None:
        live = self.sessions.get(session_id)
        if live is not None and (live.host.session.ended or live.host.detached or live.task.done()):
            # Over, or handed back, but still tearing down: let it finish, then go by the store.
            await asyncio.wait({live.task})
            live = None
        if live is not None:
            if live.owner != principal:
                await self._refuse_other_user(session_id, principal, channel)
                return None
            previous = live.channel
            live.channel = channel
            live.host.attach(channel)
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous.close(4409, "replaced by a newer connection")
            logger.info("client re-attached to session %s", session_id)
            return live
        return await self._take_over(session_id, principal, channel)

    async def _take_over(
        self, session_id: str, principal: Principal, channel: WebChannel
    ) -> LiveSession | None:
        """Pick up a session this worker does not drive: from the store, under a new lease."""
        stored = await self.store.load(session_id)
        if stored is None:
            await _unknown_session(channel)
            return None
        record = stored.record
        if record.owner != principal.user_id:
            await self._refuse_other_user(session_id, principal, channel)
            return None
        if record.state is State.ENDED:
            await self._tell_ended(record, channel)
            return None
        reservation = self.admission.reserve(principal.user_id, new=False)
        if isinstance(reservation, Refusal):
            await _refuse(channel.transport, reservation)
            return None
        try:
            live = await self._take_over_reserved(session_id, principal, channel)
        except BaseException:
            reservation.release()
            raise
        if live is None:
            reservation.release()
        else:
            live.reservation = reservation
        return live

    async def _take_over_reserved(
        self, session_id: str, principal: Principal, channel: WebChannel
    ) -> LiveSession | None:
        lease = await self._acquire_when_free(session_id)
        if lease is None:
            await channel.send_message(
                ErrorMessage(code="session_busy", message="another worker still drives it")
            )
            await channel.close(1013, "the session is driven elsewhere; retry")
            return None
        try:
            return await self._restore_under(lease, session_id, principal, channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.release_lease(lease)
            raise

    async def _restore_under(
        self, lease: Lease, session_id: str, principal: Principal, channel: WebChannel
    ) -> LiveSession | None:
        stored = await self.store.load(session_id)  # the newest record, now that it is ours
        if stored is None or stored.record.state is State.ENDED:
            await self.store.release_lease(lease)
            if stored is not None:
                await self._tell_ended(stored.record, channel)
            return None
        record = stored.record
        # Lines are appended as they are said, the record is saved separately: a worker that
        # died between the two leaves more lines than the record counts. Number on after the
        # last stored line (it cannot grow now: the old worker's writes are fenced off).
        lines = await self.store.read_transcript(session_id)
        if lines and lines[-1].seq >= record.transcript_count:
            record = record.model_copy(update={"transcript_count": lines[-1].seq + 1})
        session = Session.restore(record, time.time())
        logger.info(
            "took over session %s (lease token %d, handle %s)",
            session_id,
            lease.token,
            "kept" if stored.record.resumption_handle else "none",
        )
        return self._run(session, principal, lease, channel, attach=True)

    async def _acquire_when_free(self, session_id: str) -> Lease | None:
        """The lease, waiting (bounded) for a dead worker's lease to run out."""
        deadline = time.monotonic() + self.lease_ttl_s + 2.0
        while True:
            lease = await self.store.acquire_lease(session_id, self.worker_id, self.lease_ttl_s)
            if lease is not None or time.monotonic() >= deadline:
                return lease
            await asyncio.sleep(0.25)  # the store has no "lease released" notification

    async def _tell_ended(self, record: SessionRecord, channel: WebChannel) -> None:
        assert record.end_reason is not None
        await channel.send_message(
            SessionEnded(
                reason=record.end_reason,
                detail=record.end_detail or "",
                timestamp=record.ended_at or 0.0,
            )
        )
        await channel.close(1000, f"session ended: {record.end_reason}")

    async def _refuse_other_user(
        self, session_id: str, principal: Principal, channel: WebChannel
    ) -> None:
        logger.warning(
            "user %r tried to attach to session %s of another user", principal.user_id, session_id
        )
        await channel.close(4403, "this session belongs to another user")


@dataclass
class _SessionLock:
    """A per-session lock and how many reconnects hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


async def _refuse(transport: Transport, refusal: Refusal) -> None:
    """Tell the client why (an ``error`` message), then close with the refusal's code."""
    with contextlib.suppress(Exception):
        await transport.send_text(
            ErrorMessage(code=refusal.error_code, message=refusal.reason).model_dump_json()
        )
    with contextlib.suppress(Exception):
        await transport.close(refusal.close_code, refusal.reason[:120])


MAX_SESSION_ID_LENGTH = 128
"""Longest ``?session=`` value looked up; longer ones are unknown sessions."""


def _plausible_session_id(session_id: str) -> bool:
    """Whether a client-supplied session id may name a session (and so be logged and looked up)."""
    return (
        len(session_id) <= MAX_SESSION_ID_LENGTH
        and session_id.isprintable()
        and not any(character.isspace() for character in session_id)
    )


async def _unknown_session(channel: WebChannel) -> None:
    await channel.send_message(
        ErrorMessage(code="unknown_session", message="no session with that id")
    )
    await channel.close(4404, "unknown session")
