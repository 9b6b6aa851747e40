"""Refusal and failure paths of :class:`InterviewService` that run before any upstream opens.

Each drives ``service.handle`` with an in-memory transport that fails at one step, and checks
that the service gives back everything it took: the admission count, the reservation and the
new session's lease.
"""

from __future__ import annotations

from typing import Any

from loopback import RecordingTransport

from voicefsm import Session, SessionConfig
from voicefsm.auth import JWTAuthenticator
from voicefsm.limits import ServiceLimits
from voicefsm.service import InterviewService
from voicefsm.stores import MemoryStore

SECRET = "test-secret-that-is-long-enough-for-hs256"


class NeverOpened:
    """An upstream these paths must never reach."""

    def open(self, **_: Any) -> Any:
        raise AssertionError("no upstream may open on a refused or failed start")

    async def forget(self, session_id: str) -> None:
        pass


class ScriptedTransport(RecordingTransport):
    """A client transport that authenticates by query token and fails where it is told to."""

    def __init__(
        self, token: str, *, fail_accept: bool = False, fail_text_with: str | None = None
    ) -> None:
        super().__init__({"token": token})
        self.fail_accept = fail_accept
        self.fail_text_with = fail_text_with

    async def accept(self, subprotocol: str | None) -> None:
        if self.fail_accept:
            raise OSError("the client went during the handshake")

    async def send_text(self, text: str) -> None:
        if self.fail_text_with is not None and self.fail_text_with in text:
            raise OSError("the client is gone")
        await super().send_text(text)


def make_service(store: MemoryStore, sessions: list[Session], **options: Any) -> InterviewService:
    def factory(config: SessionConfig) -> Session:
        sessions.append(Session(config))
        return sessions[-1]

    return InterviewService(
        NeverOpened(),
        JWTAuthenticator(SECRET),
        store=store,
        worker_id="worker-a",
        orphan_sweep_s=None,
        session_factory=factory,
        **options,
    )


async def test_a_client_gone_before_session_created_leaves_no_lease_or_place() -> None:
    store = MemoryStore()
    sessions: list[Session] = []
    service = make_service(store, sessions)
    token = JWTAuthenticator(SECRET).issue("alice")
    transport = ScriptedTransport(token, fail_text_with="session_created")
    await service.handle(transport)
    assert len(sessions) == 1
    assert service.admission.sessions == 0 and service.admission.sessions_of("alice") == 0
    assert service.admission.connections == 0
    assert not service.sessions
    # The lease of the session nobody heard of is free at once, not after its TTL.
    lease = await store.acquire_lease(sessions[0].session_id, "worker-b", 15)
    assert lease is not None


async def test_a_refused_connection_that_drops_in_the_handshake_does_not_escape() -> None:
    service = make_service(MemoryStore(), [], service_limits=ServiceLimits(max_connections=1))
    assert service.admission.connect() is None  # the worker's one connection is taken
    token = JWTAuthenticator(SECRET).issue("alice")
    await service.handle(ScriptedTransport(token, fail_accept=True))  # raised OSError before
    assert service.admission.connections == 1


# ------------------------------------------------------- a session that ended, then drained


async def test_detaching_an_ended_session_does_nothing() -> None:
    """A drain (or a lost lease) that reaches a session which ended meanwhile must not mark it
    handed over: the lease is then released as for any end, and nothing is un-counted."""
    from genai_rig import GenaiRig

    from voicefsm.testing import FakeLiveConnection, FakeLiveServer

    async def setup_only(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(scripts=[setup_only]) as server, GenaiRig(server) as rig:
        await rig.wait_state("live")
        record = await rig.end()
        rig.host.detach("the server is shutting down; reconnect to continue")
        assert record.state.value == "ended"
        assert not rig.host.detached


def test_an_ended_session_then_detached_leaves_the_state_gauges_alone() -> None:
    from voicefsm import effects as fx
    from voicefsm.metrics import Metrics
    from voicefsm.model import State

    metrics = Metrics()
    observer = metrics.observer()
    observer(fx.StateChanged(State.CONNECTING, State.LIVE, "ready", 1.0), None)
    observer(fx.StateChanged(State.LIVE, State.ENDED, "user ended", 2.0), "user_ended")
    observer.detached(State.ENDED)
    gauges = {
        sample.labels["state"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "voicefsm_sessions"
        for sample in family.samples
    }
    assert all(value == 0 for value in gauges.values()), gauges
