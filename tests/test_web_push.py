"""Client frames pushed from uvicorn's websocket protocol straight into the session.

Under ``uvicorn_options()`` the websocket protocol offers ``voicefsm.push``: once a session runs,
each client frame is decoded in the protocol's receive callback and put into the session's
inbox, with no ASGI queue and no reader task. Real uvicorn on loopback, the real ADK upstream
against the fake Live server (the conformance stack of ``test_web``, Starlette only: the other
servers have no push and keep being read).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import pytest
from loopback import RecordingTransport, chunk, sequence_numbers
from test_web import AUTH, Stack, close_code, next_json, open_stack, start_session
from websockets.exceptions import ConnectionClosed

from voicefsm.host import CLIENT_BACKLOG_HIGH
from voicefsm.service import LiveSession, PushWebChannel
from voicefsm.testing import FakeLiveConnection
from voicefsm.web.uvicorn_server import MessagePush, QueueingWebSocketProtocol


async def until(predicate: Callable[[], bool], within: float = 10) -> None:
    """Wait (bounded) until ``predicate()`` holds: for server internals that notify no one."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def pushing(live: LiveSession) -> tuple[PushWebChannel, QueueingWebSocketProtocol]:
    """The session's channel, checked to be pushed to, and the uvicorn protocol under it."""
    channel = live.channel
    assert isinstance(channel, PushWebChannel)
    assert live.host._client_reader is None  # no reader task: the protocol delivers
    push = channel.transport.push  # type: ignore[attr-defined]
    assert isinstance(push, MessagePush)
    return channel, push._protocol


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final websocket frame (a zero mask leaves the payload as it is)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    return head + bytes(4) + payload


async def first_upstream(stack: Stack) -> FakeLiveConnection:
    await until(lambda: bool(stack.fake.connections))
    return stack.fake.connections[0]


async def test_frames_sent_with_the_auth_message_arrive_in_order_across_the_switch() -> None:
    """The auth message is read by ``receive()``; the 20 chunks sent in the same write wait in
    uvicorn's queue until the session starts pushing, which hands them over first."""
    async with open_stack("starlette") as stack:
        port = urlparse(stack.url).port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /interview HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        try:
            async with asyncio.timeout(10):
                assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
            auth = json.dumps({"type": "auth", "token": AUTH.issue("alice")}).encode()
            chunks = b"".join(client_frame(0x2, chunk(seq)) for seq in range(20))
            writer.write(client_frame(0x1, auth) + chunks)  # one write, one loopback segment
            upstream = await first_upstream(stack)
            await upstream.wait_for_audio_chunks(20)
            assert sequence_numbers([upstream]) == list(range(20))
            (live,) = stack.service.sessions.values()
            channel, _ = pushing(live)
            handed_over = channel.transport.push.handed_over  # type: ignore[attr-defined]
            assert handed_over > 0, "every chunk came after the switch: nothing was queued"
            writer.write(client_frame(0x2, chunk(20)))  # and on, pushed
            await upstream.wait_for_audio_chunks(21)
            assert sequence_numbers([upstream]) == list(range(21))
        finally:
            writer.close()


async def test_bad_frames_are_answered_while_pushing_and_too_many_stop_the_decoding() -> None:
    async with open_stack("starlette") as stack:
        ws, session_id = await start_session(stack)
        pushing(stack.service.sessions[session_id])
        await ws.send("{not json")
        assert (await next_json(ws, "error"))["code"] == "invalid_json"
        await ws.send(chunk(0))
        await (await first_upstream(stack)).wait_for_audio_chunks(1)
        for _ in range(200):  # the stack ends a session after 12 errors
            await ws.send("{not json")
        errors: list[dict[str, Any]] = []
        ended: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(10):
                async for frame in ws:
                    message = json.loads(frame) if isinstance(frame, str) else {}
                    if message.get("type") == "error":
                        errors.append(message)
                    elif message.get("type") == "session_ended":
                        ended = message
        except ConnectionClosed:
            pass
        assert ended is not None and ended["reason"] == "error"
        assert "broke the protocol 12 times" in ended["detail"]
        assert ws.close_code == 1000
        # Nothing was decoded (or answered) after the 12th error ended the session.
        assert 1 <= len(errors) <= 11
        metrics = stack.service.metrics.render().decode()
        assert 'voicefsm_client_errors_total{code="invalid_json"} 12.0' in metrics


@pytest.mark.parametrize("how", ["close frame", "tcp reset"])
async def test_a_client_that_leaves_while_pushing_is_gone_from_its_session(how: str) -> None:
    async with open_stack("starlette") as stack:
        ws, session_id = await start_session(stack)
        live = stack.service.sessions[session_id]
        channel, _ = pushing(live)
        await ws.send(chunk(0))
        await (await first_upstream(stack)).wait_for_audio_chunks(1)
        if how == "close frame":
            await ws.close()
        else:
            ws.transport.abort()
        await until(lambda: not live.host.session.client_connected)
        assert channel.done.is_set()
        await until(lambda: stack.service.admission.connections == 0)
        assert not live.host.session.ended  # within its grace window: it waits for the client
        again = await stack.connect("alice", query=f"session={session_id}")
        assert (await next_json(again, "session_state"))["state"] == "live"
        await again.send(chunk(1))
        await stack.fake.connections[0].wait_for_audio_chunks(2)
        assert sequence_numbers([stack.fake.connections[0]]) == [0, 1]
        await again.close()


async def test_a_flood_is_held_back_by_tcp_while_the_session_is_behind() -> None:
    """The session's consumer is stuck sending to a client that does not read; the client
    floods. The inbox stops growing at CLIENT_BACKLOG_HIGH (the socket is not read meanwhile)
    and, once the consumer goes on, every chunk arrives, in order."""
    speak = asyncio.Event()

    async def speaks_when_told(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update(f"h-{conn.number}")
        await speak.wait()
        await conn.send_model_audio(bytes(1920))
        await conn.wait_closed(timeout=None)

    async with open_stack("starlette") as stack:
        stack.fake.set_script(1, speaks_when_told)
        ws, session_id = await start_session(stack)
        live = stack.service.sessions[session_id]
        channel, protocol = pushing(live)
        live.host.client_send_timeout_s = 120  # stuck until the test lets it go
        sending = asyncio.Event()
        send_bytes = channel.transport.send_bytes

        async def noted_send_bytes(data: bytes) -> None:
            sending.set()
            await send_bytes(data)

        channel.transport.send_bytes = noted_send_bytes  # type: ignore[method-assign]
        deliver = channel._deliver
        assert deliver is not None
        inbox = live.host._inbox
        most = 0

        def measured(message: Any) -> None:
            nonlocal most
            deliver(message)
            most = max(most, len(inbox))

        channel._deliver = measured
        protocol.pause_writing()  # as asyncio does for a client that stopped reading
        speak.set()
        await sending.wait()  # the consumer now waits for the socket to drain
        flood = 3 * CLIENT_BACKLOG_HIGH // 2  # under the stack's burst of 60
        for seq in range(flood):
            await ws.send(chunk(seq))
        await until(lambda: len(inbox) >= CLIENT_BACKLOG_HIGH)
        assert protocol.read_paused
        assert most <= CLIENT_BACKLOG_HIGH
        protocol.resume_writing()
        upstream = stack.fake.connections[0]
        await upstream.wait_for_audio_chunks(flood)
        assert sequence_numbers([upstream]) == list(range(flood))
        assert most <= CLIENT_BACKLOG_HIGH
        assert not protocol.read_paused and not protocol._held  # resumed once it caught up
        assert isinstance(await ws.recv(), bytes)  # the interviewer's chunk, sent at last
        await ws.close()
        assert await close_code(ws) is not None


async def test_a_replaced_pushing_client_delivers_nothing_more() -> None:
    async with open_stack("starlette") as stack:
        first, session_id = await start_session(stack)
        live = stack.service.sessions[session_id]
        first_channel, _ = pushing(live)
        second = await stack.connect("alice", query=f"session={session_id}")
        await next_json(second, "session_state")
        second_channel, _ = pushing(live)
        assert second_channel is not first_channel
        with contextlib.suppress(ConnectionClosed):
            await first.send(chunk(0))  # reaches a channel the session no longer listens to
        assert await close_code(first) == 4409
        await second.send(chunk(1))
        upstream = stack.fake.connections[0]
        await upstream.wait_for_audio_chunks(1)
        assert sequence_numbers([upstream]) == [1]
        await second.close()


class RecordingPush:
    """A :class:`~voicefsm.service.FramePush` that hands the test its target."""

    def __init__(self) -> None:
        self.target: Callable[[str | bytes | None], None] | None = None

    def start(self, target: Callable[[str | bytes | None], None]) -> None:
        self.target = target

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class ClosingTransport(RecordingTransport):
    """A pushing transport that records its close and the answers sent."""

    def __init__(self) -> None:
        super().__init__()
        self.push = RecordingPush()

    async def receive(self) -> str | bytes | None:
        raise AssertionError("a pushing channel is never read")


async def test_a_failure_in_the_push_callback_closes_1011_and_reports_the_client_gone() -> None:
    from voicefsm.metrics import Metrics
    from voicefsm.service import web_channel
    from voicefsm.web.decoder import ProtocolLimits

    transport = ClosingTransport()
    channel = web_channel(transport, ProtocolLimits(), Metrics())
    assert isinstance(channel, PushWebChannel)
    delivered: list[object] = []

    def deliver(message: object) -> None:
        delivered.append(message)
        if message is not None:
            raise RuntimeError("the session's inbox broke")

    channel.start_pushing(deliver)  # type: ignore[arg-type]
    target = transport.push.target
    assert target is not None
    target(chunk(0))  # must not raise into the protocol's data_received
    target(chunk(1))  # decoded no more
    assert delivered[1:] == [None] and len(delivered) == 2
    await until(lambda: transport.closed is not None)
    assert transport.closed is not None and transport.closed[0] == 1011
    assert channel.done.is_set()
