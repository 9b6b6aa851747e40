"""Tests of voicefsm.testing.FakeLiveServer with the real google-genai client and real ADK.

No mocks: every test talks TLS WebSocket to the fake server on 127.0.0.1. Tests wait on events
(server records, received messages), not on sleeps; blocking awaits carry short timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import faulthandler
import json
import math
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websockets
from google import genai
from google.genai import errors, types
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from voicefsm.testing import (
    Abort,
    Close,
    ConnectionClosedWhileWaiting,
    FakeLiveServer,
    Gate,
    GenerationComplete,
    GoAway,
    Hang,
    HangOnClose,
    IgnorePings,
    InputTranscript,
    Interrupted,
    Interviewer,
    InterviewState,
    ModelAudio,
    OutputTranscript,
    Refuse,
    ResumptionUpdate,
    ScriptError,
    SetupComplete,
    StopReading,
    ToolCall,
    TurnComplete,
    Usage,
    WaitForAudio,
    WaitForEvent,
    WaitForText,
    WaitForToolResponse,
    WaitTimeout,
    speech_like_pcm,
)

MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
HANG_GUARD_SECONDS = 60.0
RECEIVE_TIMEOUT = 5.0
LIVE_PATH = "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent"


# --------------------------------------------------------------------------- helpers / fixtures


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    """Dump tracebacks and abort the run if a test hangs (no pytest-timeout plugin here).

    Awaits that could block have their own short timeouts; this is the last line of defence.
    """
    faulthandler.dump_traceback_later(HANG_GUARD_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def live_config(handle: str | None = None, *, compression: bool = False) -> types.LiveConnectConfig:
    """A LiveConnectConfig with session resumption (and optionally compression) enabled."""
    return types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        session_resumption=types.SessionResumptionConfig(handle=handle),
        context_window_compression=(
            types.ContextWindowCompressionConfig(
                trigger_tokens=25600, sliding_window=types.SlidingWindow(target_tokens=12800)
            )
            if compression
            else None
        ),
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
    )


async def receive_until(
    session: Any, stop: Callable[[types.LiveServerMessage], bool]
) -> list[types.LiveServerMessage]:
    """Collect messages until ``stop(message)``; ``session.receive()`` ends at every turn."""
    messages: list[types.LiveServerMessage] = []
    async with asyncio.timeout(RECEIVE_TIMEOUT):
        while True:
            async for message in session.receive():
                messages.append(message)
                if stop(message):
                    return messages


def is_turn_complete(message: types.LiveServerMessage) -> bool:
    """True for a ``serverContent.turnComplete`` message."""
    return bool(message.server_content and message.server_content.turn_complete)


def has_resumption_update(message: types.LiveServerMessage) -> bool:
    """True for a ``sessionResumptionUpdate`` message."""
    return message.session_resumption_update is not None


def audio_of(messages: list[types.LiveServerMessage]) -> bytes:
    """All model audio in the messages, joined."""
    return b"".join(m.data for m in messages if m.data)


def output_text(messages: list[types.LiveServerMessage]) -> str:
    """All output-transcription text in the messages, joined."""
    return "".join(
        m.server_content.output_transcription.text or ""
        for m in messages
        if m.server_content and m.server_content.output_transcription
    )


async def raw_connect(server: FakeLiveServer, path: str = LIVE_PATH) -> ClientConnection:
    """A plain websockets client (for wire-level tests)."""
    uri = server.base_url.replace("https://", "wss://") + path
    return await ws_connect(uri, ssl=server.client_ssl_context())


def b64(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- 1. genai round trip


async def test_genai_client_round_trip_records_and_receives() -> None:
    pcm_out = speech_like_pcm(0.04, seed=1)
    script = [
        SetupComplete(),
        WaitForAudio(2),
        WaitForText(1),
        ModelAudio(pcm_out[:960]),
        OutputTranscript("Hello"),
        ModelAudio(pcm_out[960:]),
        OutputTranscript(" there", finished=True),
        InputTranscript("hi", finished=True),
        GenerationComplete(),
        TurnComplete(),
        ResumptionUpdate(),
        Usage(prompt_tokens=10, response_tokens=20),
        GoAway("50s"),
        Hang(),
    ]
    async with FakeLiveServer(script) as server:
        assert server.base_url == f"https://127.0.0.1:{server.port}"
        # The exact recipe users write by hand.
        client = genai.Client(
            api_key="fake-key",
            http_options=types.HttpOptions(
                base_url=server.base_url,
                api_version="v1alpha",
                async_client_args={"ssl": server.client_ssl_context()},
            ),
        )
        chunk1, chunk2 = bytes(range(256)), b"\xfb\xff" * 160  # "+/" and "-_" base64 chars
        async with client.aio.live.connect(
            model=MODEL, config=live_config(compression=True)
        ) as session:
            assert session.session_id == "sess-1"
            await session.send_realtime_input(
                audio=types.Blob(data=chunk1, mime_type="audio/pcm;rate=16000")
            )
            await session.send_realtime_input(
                audio=types.Blob(data=chunk2, mime_type="audio/pcm;rate=16000")
            )
            await session.send_client_content(
                turns=types.Content(role="user", parts=[types.Part(text="Hi there")]),
                turn_complete=True,
            )
            turn = await receive_until(session, is_turn_complete)
            after = await receive_until(session, lambda m: m.go_away is not None)

        conn = server.connections[0]
        await conn.wait_closed()

    # What the client received.
    assert audio_of(turn) == pcm_out
    assert output_text(turn) == "Hello there"
    finished = [m for m in turn if m.server_content and m.server_content.output_transcription]
    assert finished[-1].server_content.output_transcription.finished is True  # type: ignore[union-attr]
    inputs = [m for m in turn if m.server_content and m.server_content.input_transcription]
    assert inputs[0].server_content.input_transcription.text == "hi"  # type: ignore[union-attr]
    assert any(m.server_content and m.server_content.generation_complete for m in turn)
    update = next(m.session_resumption_update for m in after if m.session_resumption_update)
    assert update.new_handle == "handle-1"
    assert update.resumable is True
    usage = next(m.usage_metadata for m in after if m.usage_metadata)
    assert (usage.prompt_token_count, usage.response_token_count) == (10, 20)
    assert usage.total_token_count == 30
    assert after[-1].go_away is not None
    assert after[-1].go_away.time_left == "50s"

    # What the server recorded.
    assert conn.api_version == "v1alpha"
    assert conn.api_key == "fake-key"
    assert conn.model == f"models/{MODEL}"
    assert conn.session_id == "sess-1"
    assert conn.session_resumption_enabled is True
    assert conn.resumption_handle is None
    assert conn.compression is not None
    assert conn.compression.trigger_tokens == 25600
    assert conn.compression.target_tokens == 12800
    assert conn.compression.sliding_window is True
    assert conn.audio_chunks == [chunk1, chunk2]
    assert conn.audio_mime_type == "audio/pcm;rate=16000"
    assert conn.texts == ["Hi there"]
    assert conn.text_inputs[0].turn_complete is True
    assert conn.text_inputs[0].role == "user"
    assert [e.kind for e in conn.timeline] == ["audio", "audio", "text"]
    assert [e.message_index for e in conn.timeline] == [0, 1, 2]
    assert conn.timeline[0].at <= conn.timeline[1].at <= conn.timeline[2].at
    assert conn.issued_handles == ["handle-1"]
    assert conn.setup_frame is not None
    assert "setup" in conn.setup_frame
    assert conn.frames_received[0] is conn.setup_frame
    assert conn.messages_sent[0] == {"setupComplete": {"sessionId": "sess-1"}}
    assert conn.close_received is not None
    assert conn.close_received.code == 1000
    assert conn.closed_by == "client"
    assert conn.protocol_errors == []
    assert conn.opened_at <= (conn.setup_at or 0) <= (conn.closed_at or 0)


# --------------------------------------------------------------------------- 2. close codes


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1011, "Internal error"), (1007, "context exhausted"), (1008, "policy violation")],
)
async def test_close_code_surfaces_as_api_error(code: int, reason: str) -> None:
    async with FakeLiveServer([SetupComplete(), WaitForAudio(1), Close(code, reason)]) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            await session.send_realtime_input(
                audio=types.Blob(data=b"\x00\x00" * 160, mime_type="audio/pcm;rate=16000")
            )
            with pytest.raises(errors.APIError) as caught:
                await receive_until(session, lambda m: False)
        conn = await server.wait_for_connection(1)
        await conn.wait_closed()
    assert caught.value.code == code
    assert caught.value.details == reason
    assert conn.close_sent is not None
    assert conn.close_sent.code == code
    assert conn.closed_by == "server"


async def test_abort_surfaces_as_api_error_1006() -> None:
    async with FakeLiveServer([SetupComplete(), Abort()]) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            with pytest.raises(errors.APIError) as caught:
                await receive_until(session, lambda m: False)
        conn = server.connections[0]
        await conn.wait_closed()
    assert caught.value.code == 1006
    assert conn.aborted is True
    assert conn.close_sent is None


async def test_close_before_setup_complete_fails_connect() -> None:
    async with FakeLiveServer([Close(1008, "no")]) as server:
        client = server.genai_client()
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=MODEL, config=live_config()):
                pass  # pragma: no cover - connect raises
    assert caught.value.code == 1008


async def test_refused_handshake_raises_invalid_status_then_next_connection_works() -> None:
    async with FakeLiveServer(scripts=[[Refuse(503)], [SetupComplete()]]) as server:
        client = server.genai_client()
        with pytest.raises(websockets.exceptions.InvalidStatus) as caught:
            async with client.aio.live.connect(model=MODEL, config=live_config()):
                pass  # pragma: no cover - connect raises
        assert caught.value.response.status_code == 503
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            assert session.session_id == "sess-2"
    first, second = server.connections
    assert first.refused_status == 503
    assert first.is_finished
    assert second.refused_status is None


async def test_hang_before_setup_complete_blocks_connect() -> None:
    async with FakeLiveServer([Hang()]) as server:
        client = server.genai_client()

        async def attempt() -> None:
            async with client.aio.live.connect(model=MODEL, config=live_config()):
                pass  # pragma: no cover - never gets here

        task = asyncio.create_task(attempt())
        conn = await server.wait_for_connection(1)
        await conn.wait_for_setup()  # the server has the setup and will never answer
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert conn.session_id is None
    assert conn.messages_sent == []


async def test_unknown_path_is_rejected_with_404() -> None:
    async with FakeLiveServer() as server:
        with pytest.raises(websockets.exceptions.InvalidStatus) as caught:
            await raw_connect(server, "/ws/something.Else")
        assert caught.value.response.status_code == 404
        assert server.rejected_paths == ["/ws/something.Else"]
        assert server.connections == []


# --------------------------------------------------------------------------- 3. resumption


async def test_resumption_with_issued_handle_is_accepted() -> None:
    scripts = [
        [SetupComplete(), ResumptionUpdate(state={"turn": 3}), Hang()],
        [SetupComplete(), Hang()],
    ]
    async with FakeLiveServer(scripts=scripts) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            messages = await receive_until(
                session, lambda m: m.session_resumption_update is not None
            )
        handle = messages[-1].session_resumption_update.new_handle  # type: ignore[union-attr]
        assert handle == "handle-1"
        async with client.aio.live.connect(model=MODEL, config=live_config(handle)) as session:
            assert session.session_id == "sess-2"
        second = server.connections[1]
        await second.wait_closed()
    assert second.resumption_handle == "handle-1"
    assert second.resumed_from is not None
    assert second.resumed_from.connection_number == 1
    assert second.resumed_from.state == {"turn": 3}
    assert second.resumption_rejected is False
    assert server.issued_handles["handle-1"].connection_number == 1


async def test_unknown_resumption_handle_is_closed_with_1008() -> None:
    async with FakeLiveServer() as server:
        client = server.genai_client()
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=MODEL, config=live_config("forged")):
                pass  # pragma: no cover - connect raises
        conn = server.connections[0]
        await conn.wait_closed()
    assert caught.value.code == 1008
    assert caught.value.details == "invalid resumption handle"
    assert conn.resumption_handle == "forged"
    assert conn.resumption_rejected is True
    assert conn.session_id is None


async def test_non_resumable_update_is_not_accepted_later() -> None:
    script = [SetupComplete(), ResumptionUpdate("h-off", resumable=False), Hang()]
    async with FakeLiveServer(script) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            messages = await receive_until(
                session, lambda m: m.session_resumption_update is not None
            )
        assert messages[-1].session_resumption_update.resumable is False  # type: ignore[union-attr]
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=MODEL, config=live_config("h-off")):
                pass  # pragma: no cover - connect raises
    assert caught.value.code == 1008


async def test_handles_can_be_preregistered_or_not_enforced() -> None:
    async with FakeLiveServer() as server:
        server.issue_handle("from-store", state="s")
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config("from-store")):
            pass
        server.enforce_resumption_handles = False
        async with client.aio.live.connect(model=MODEL, config=live_config("anything")):
            pass
    first, second = server.connections
    assert first.resumed_from is not None
    assert first.resumed_from.state == "s"
    assert first.resumed_from.connection_number is None
    assert second.resumption_handle == "anything"
    assert second.resumed_from is None
    assert second.resumption_rejected is False


# --------------------------------------------------------------------------- 4. real ADK


async def test_adk_run_live_against_fake_server() -> None:
    from google.adk.agents import LiveRequestQueue, LlmAgent, RunConfig
    from google.adk.models import Gemini
    from google.adk.runners import InMemoryRunner

    tool_calls: list[str] = []

    def record_answer(text: str) -> dict[str, str]:
        """Record the candidate's answer."""
        tool_calls.append(text)
        return {"status": "recorded"}

    model_audio = speech_like_pcm(0.02, seed=3)
    script = [
        SetupComplete(),
        WaitForAudio(3),
        InputTranscript("I am "),
        InputTranscript("ready", finished=True),
        OutputTranscript("Welcome"),
        ModelAudio(model_audio),
        OutputTranscript(" aboard", finished=True),
        ToolCall("record_answer", {"text": "ready"}),
        TurnComplete(),
        WaitForToolResponse(1),
        Usage(prompt_tokens=5, response_tokens=7),
        ResumptionUpdate(),
        Interrupted(),
        TurnComplete(),
        Hang(),
    ]
    async with FakeLiveServer(script) as server:
        agent = LlmAgent(
            name="interviewer",
            model=Gemini(model=MODEL, client=server.genai_client()),
            instruction="You are an interviewer.",
            tools=[record_answer],
        )
        runner = InMemoryRunner(agent=agent, app_name="fake-live-test")
        session = await runner.session_service.create_session(
            app_name="fake-live-test", user_id="u1"
        )
        run_config = RunConfig(
            response_modalities=[types.Modality.AUDIO],
            session_resumption=types.SessionResumptionConfig(),
            context_window_compression=types.ContextWindowCompressionConfig(
                trigger_tokens=1000, sliding_window=types.SlidingWindow(target_tokens=500)
            ),
        )
        queue = LiveRequestQueue()
        chunks = [bytes([i]) * 640 for i in range(1, 4)]
        for chunk in chunks:
            queue.send_realtime(types.Blob(data=chunk, mime_type="audio/pcm;rate=16000"))

        events: list[Any] = []
        interrupted = asyncio.Event()

        async def consume() -> None:
            async for event in runner.run_live(
                user_id="u1",
                session_id=session.id,
                live_request_queue=queue,
                run_config=run_config,
            ):
                events.append(event)
                if event.interrupted:
                    interrupted.set()

        consumer = asyncio.create_task(consume())
        waiter = asyncio.create_task(interrupted.wait())
        done, _ = await asyncio.wait(
            {consumer, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if consumer in done:
            consumer.result()  # surface the error
        assert interrupted.is_set(), "ADK never yielded the interrupted event"
        queue.close()
        await asyncio.wait_for(consumer, timeout=10)  # ADK returns on the 1000 close
        conn = server.connections[0]
        await conn.wait_closed()

    assert len(server.connections) == 1
    assert conn.tool_names == ["record_answer"]
    assert conn.session_resumption_enabled is True
    assert conn.compression is not None
    assert (conn.compression.trigger_tokens, conn.compression.target_tokens) == (1000, 500)
    assert conn.audio_chunks == chunks  # in order
    assert tool_calls == ["ready"]
    assert len(conn.tool_responses) == 1
    response = conn.tool_responses[0]
    assert (response.id, response.name) == ("fc-1", "record_answer")
    assert response.response == {"status": "recorded"}
    assert conn.close_received is not None
    assert conn.close_received.code == 1000
    assert conn.closed_by == "client"

    audio_events = [
        e for e in events if e.content and e.content.parts and e.content.parts[0].inline_data
    ]
    assert audio_events[0].content.parts[0].inline_data.data == model_audio
    assert audio_events[0].live_session_id == "sess-1"
    finished_in = [
        e.input_transcription.text
        for e in events
        if e.input_transcription and e.input_transcription.finished
    ]
    assert finished_in == ["I am ready"]
    finished_out = [
        e.output_transcription.text
        for e in events
        if e.output_transcription and e.output_transcription.finished
    ]
    assert finished_out == ["Welcome aboard"]
    calls = [e for e in events if e.get_function_calls()]
    responses = [e for e in events if e.get_function_responses()]
    assert calls[0].get_function_calls()[0].name == "record_answer"
    assert responses[0].get_function_responses()[0].id == "fc-1"
    assert any(e.turn_complete for e in events)
    assert any(e.usage_metadata for e in events)
    updates = [e for e in events if e.live_session_resumption_update]
    assert updates[0].live_session_resumption_update.new_handle == "handle-1"


async def test_adk_reconnects_on_go_away_and_1011_with_the_latest_handle() -> None:
    from google.adk.agents import LiveRequestQueue, LlmAgent, RunConfig
    from google.adk.models import Gemini
    from google.adk.runners import InMemoryRunner

    scripts = [
        [SetupComplete(), ResumptionUpdate(), WaitForAudio(1), GoAway("10s", close_after=True)],
        [SetupComplete(), ModelAudio(b"\x01\x00" * 10), ResumptionUpdate(), Close(1011, "oops")],
        [SetupComplete(), ModelAudio(b"\x02\x00" * 10), TurnComplete(), Close(1008, "policy")],
    ]
    async with FakeLiveServer(scripts=scripts) as server:
        agent = LlmAgent(
            name="interviewer", model=Gemini(model=MODEL, client=server.genai_client())
        )
        runner = InMemoryRunner(agent=agent, app_name="fake-live-test")
        session = await runner.session_service.create_session(
            app_name="fake-live-test", user_id="u1"
        )
        queue = LiveRequestQueue()
        queue.send_realtime(types.Blob(data=b"\x00\x00" * 160, mime_type="audio/pcm;rate=16000"))
        run_config = RunConfig(
            response_modalities=[types.Modality.AUDIO],
            session_resumption=types.SessionResumptionConfig(),
        )
        events: list[Any] = []

        async def consume() -> None:
            async for event in runner.run_live(
                user_id="u1", session_id=session.id, live_request_queue=queue, run_config=run_config
            ):
                events.append(event)

        with pytest.raises(errors.APIError) as caught:
            await asyncio.wait_for(consume(), timeout=10)
        queue.close()
        first, second, third = await server.wait_for_connections(3)
        await third.wait_closed()

    assert caught.value.code == 1008  # 1008 is not retried: run_live raises it
    assert [c.resumption_handle for c in (first, second, third)] == [None, "handle-1", "handle-2"]
    # ADK leaves at once on GoAway (it does not wait for timeLeft) and yields no event for it.
    assert first.closed_by == "client"
    assert first.close_received is not None
    assert first.close_received.code == 1000
    assert not any(e.go_away for e in events)
    assert second.close_sent is not None
    assert second.close_sent.code == 1011
    audio_sessions = [
        e.live_session_id
        for e in events
        if e.content and e.content.parts and e.content.parts[0].inline_data
    ]
    assert audio_sessions == ["sess-2", "sess-3"]


# --------------------------------------------------------------------------- 5. interviewer


async def test_interviewer_asks_questions_and_resumes_at_the_next_one() -> None:
    questions = ["First question?", "Second question?", "Third question?"]
    interviewer = Interviewer(
        questions=questions,
        time_scale=100.0,
        speech_seconds=0.4,
        answer_audio_chunks=2,
        answer_timeout=None,
        pause_seconds=0.0,
        closing_remark=None,
    )
    answer = [types.Blob(data=b"\x01\x00" * 320, mime_type="audio/pcm;rate=16000")] * 2
    async with FakeLiveServer(interviewer) as server:
        client = server.genai_client()
        handles: list[str] = []
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            for number in range(2):
                turn = await receive_until(session, is_turn_complete)
                assert output_text(turn) == questions[number]
                pcm = audio_of(turn)
                assert pcm == interviewer.audio_for(questions[number], number)
                assert len(pcm) == round(0.4 * 24000) * 2
                assert all(len(m.data or b"") == 1920 for m in turn if m.data)  # 40 ms chunks
                assert any(m.server_content and m.server_content.generation_complete for m in turn)
                for blob in answer:
                    await session.send_realtime_input(audio=blob)
                after = await receive_until(
                    session, lambda m: m.session_resumption_update is not None
                )
                placeholder = next(
                    m.server_content.input_transcription
                    for m in after
                    if m.server_content and m.server_content.input_transcription
                )
                assert placeholder.text == f"[answer to question {number + 1}]"
                assert placeholder.finished is True
                update = after[-1].session_resumption_update
                assert update is not None
                assert update.resumable is True
                assert update.new_handle
                handles.append(update.new_handle)

        # Resuming with the handle issued after question 2 continues with question 3 ...
        async with client.aio.live.connect(model=MODEL, config=live_config(handles[1])) as s2:
            turn = await receive_until(s2, is_turn_complete)
        # ... and with the one issued after question 1, with question 2.
        async with client.aio.live.connect(model=MODEL, config=live_config(handles[0])) as s3:
            turn_b = await receive_until(s3, is_turn_complete)

    assert output_text(turn) == "Third question?"
    assert output_text(turn_b) == "Second question?"
    assert len(set(handles)) == 2
    second, third = server.connections[1], server.connections[2]
    assert second.resumed_from is not None
    assert second.resumed_from.state == InterviewState(next_question=2)
    assert third.resumed_from is not None
    assert third.resumed_from.state == InterviewState(next_question=1)
    assert interviewer.asked[:2] == [(1, 0), (1, 1)]
    assert (2, 2) in interviewer.asked
    assert (3, 1) in interviewer.asked


async def test_interviewer_go_away_then_closes_with_1000() -> None:
    interviewer = Interviewer(
        questions=["Only question?"],
        time_scale=100.0,
        speech_seconds=0.2,
        answer_audio_chunks=1000,
        answer_timeout=None,
        pause_seconds=0.0,
        go_away_every=5.0,  # 50 ms real time
        go_away_time_left=3.0,  # 30 ms real time
    )
    async with FakeLiveServer(interviewer) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            seen = await receive_until(session, lambda m: m.go_away is not None)
            with pytest.raises(errors.APIError) as caught:
                await receive_until(session, lambda m: False)
        conn = server.connections[0]
        await conn.wait_closed()
    assert seen[-1].go_away is not None
    assert seen[-1].go_away.time_left == "3s"
    assert caught.value.code == 1000
    assert conn.close_sent is not None
    assert conn.close_sent.code == 1000
    assert conn.closed_by == "server"


async def test_go_away_step_closes_after_time_left() -> None:
    script = [SetupComplete(), GoAway(2.0, close_after=True, time_scale=100.0), Hang()]
    async with FakeLiveServer(script) as server:
        client = server.genai_client()
        async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
            seen = await receive_until(session, lambda m: m.go_away is not None)
            with pytest.raises(errors.APIError) as caught:
                await receive_until(session, lambda m: False)
    assert seen[-1].go_away is not None
    assert seen[-1].go_away.time_left == "2s"
    assert caught.value.code == 1000


def test_speech_like_pcm_is_deterministic_speech_like_audio() -> None:
    pcm = speech_like_pcm(1.0, seed=7)
    assert len(pcm) == 24000 * 2
    assert pcm == speech_like_pcm(1.0, seed=7)
    assert pcm != speech_like_pcm(1.0, seed=8)
    samples = array("h", pcm)
    peak = max(abs(s) for s in samples)
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    assert 0.1 * 32767 < peak <= 0.3 * 32767 + 1
    assert rms > 500
    # Syllables and gaps: the level varies a lot between 20 ms windows.
    windows = [max(abs(s) for s in samples[i : i + 480]) for i in range(0, len(samples), 480)]
    assert min(windows) < peak * 0.2 < peak * 0.8 < max(windows)
    assert speech_like_pcm(0.0) == b""
    with pytest.raises(ValueError, match="amplitude"):
        speech_like_pcm(1.0, amplitude=2.0)


# --------------------------------------------------------------------------- wire level


async def test_accepts_snake_and_camel_case_client_frames() -> None:
    a1, a2, a3 = b"\x01\x02" * 8, bytes(range(200, 256)), b"\x7f\xff" * 3
    frames: list[dict[str, Any]] = [
        {"realtimeInput": {"mediaChunks": [{"mimeType": "audio/pcm;rate=16000", "data": b64(a1)}]}},
        {
            "realtime_input": {
                "media_chunks": [
                    # URL-safe alphabet without padding (as some encoders produce)
                    {
                        "mime_type": "audio/pcm",
                        "data": base64.urlsafe_b64encode(a2).decode().rstrip("="),
                    }
                ]
            }
        },
        {"realtime_input": {"audio": {"data": b64(a3), "mime_type": "audio/pcm;rate=16000"}}},
        {"realtimeInput": {"activityStart": {}}},
        {"realtime_input": {"activity_end": {}}},
        {"realtimeInput": {"audioStreamEnd": True}},
        {"realtime_input": {"text": "typed"}},
        {"realtimeInput": {"video": {"mimeType": "image/jpeg", "data": b64(b"jpg")}}},
        {
            "clientContent": {
                "turns": [{"role": "user", "parts": [{"text": "hello "}, {"text": "you"}]}],
                "turnComplete": True,
            }
        },
        {"client_content": {"turns": [{"role": "user", "parts": [{"text": "again"}]}]}},
        {"toolResponse": {"functionResponses": [{"id": "a", "name": "f", "response": {"x": 1}}]}},
        {"tool_response": {"function_responses": [{"id": "b", "name": "g", "response": {}}]}},
        {"bogus": {}},
    ]
    setup = {
        "setup": {
            "model": "models/test",
            "session_resumption": {},
            "context_window_compression": {
                "triggerTokens": "1000",
                "slidingWindow": {"targetTokens": 500},
            },
        }
    }
    async with FakeLiveServer() as server:
        ws = await raw_connect(server)
        await ws.send(json.dumps(setup).encode())  # a binary frame is accepted too
        reply = await ws.recv()
        assert isinstance(reply, str)  # server messages are text frames
        assert json.loads(reply) == {"setupComplete": {"sessionId": "sess-1"}}
        for frame in frames:
            await ws.send(json.dumps(frame))
        conn = server.connections[0]
        await conn.wait_for(lambda c: len(c.timeline) == len(frames), description="all frames")
        await ws.close()
        await conn.wait_closed()
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}

    assert conn.audio_chunks == [a1, a2, a3]
    assert conn.video_chunks == [b"jpg"]
    assert conn.activity_starts == 1
    assert conn.activity_ends == 1
    assert conn.audio_stream_ends == 1
    assert conn.texts == ["typed", "hello you", "again"]
    assert [t.source for t in conn.text_inputs] == [
        "realtime_input",
        "client_content",
        "client_content",
    ]
    assert [t.turn_complete for t in conn.text_inputs] == [False, True, False]
    assert [(r.id, r.name, r.response) for r in conn.tool_responses] == [
        ("a", "f", {"x": 1}),
        ("b", "g", {}),
    ]
    assert [e.kind for e in conn.timeline] == [
        "audio",
        "audio",
        "audio",
        "activity_start",
        "activity_end",
        "audio_stream_end",
        "text",
        "video",
        "text",
        "text",
        "tool_response",
        "tool_response",
        "unknown",
    ]
    assert [e.message_index for e in conn.timeline][-1] == len(frames) - 1
    assert conn.session_resumption_enabled is True
    assert conn.compression is not None
    assert (conn.compression.trigger_tokens, conn.compression.target_tokens) == (1000, 500)
    assert len(conn.protocol_errors) == 1
    assert "bogus" in conn.protocol_errors[0]
    assert conn.close_received is not None
    assert conn.close_received.code == 1000
    assert leftovers == set()


async def test_send_encoded_puts_the_same_frame_on_the_wire_as_send() -> None:
    message = {"serverContent": {"outputTranscription": {"text": "héllo", "finished": False}}}

    async def script(conn: Any) -> None:
        await conn.send_setup_complete()
        await conn.send(message)
        await conn.send_encoded(json.dumps(message, separators=(",", ":")).encode())

    async with FakeLiveServer(script) as server:
        ws = await raw_connect(server)
        await ws.send(json.dumps({"setup": {"model": "models/x"}}))
        assert "setupComplete" in json.loads(await ws.recv())
        sent = await ws.recv()
        encoded = await ws.recv()
        await ws.close()
    assert isinstance(encoded, str)  # a text frame, as send() sends
    assert encoded == sent
    assert server.connections[0].messages_sent[1:] == [message, message]


async def test_unparsed_client_messages_are_only_counted() -> None:
    audio = {"realtime_input": {"audio": {"mime_type": "audio/pcm;rate=16000", "data": b64(b"a")}}}
    async with FakeLiveServer(parse_client_messages=False) as server:
        ws = await raw_connect(server)
        await ws.send(json.dumps({"setup": {"model": "models/x", "sessionResumption": {}}}))
        assert "setupComplete" in json.loads(await ws.recv())
        for frame in (json.dumps(audio), "not json", json.dumps({"client_content": {}})):
            await ws.send(frame)
        conn = server.connections[0]
        await conn.wait_for(lambda c: c.client_message_count == 3, description="3 messages")
        assert conn.is_open  # invalid JSON is not even looked at
        await ws.close()
        await conn.wait_closed()
    assert conn.session_resumption_enabled  # the setup frame is parsed as always
    assert conn.audio_chunk_count == 0
    assert conn.timeline == []
    assert conn.frames_received == [{"setup": {"model": "models/x", "sessionResumption": {}}}]
    assert conn.protocol_errors == []
    assert conn.close_received == conn.close_sent


async def test_gates_and_events_control_timing_without_sleeps() -> None:
    go_on = asyncio.Event()
    script = [
        SetupComplete(),
        Gate("before-transcript"),
        OutputTranscript("released", finished=True),
        WaitForEvent(go_on),
        TurnComplete(),
        Hang(),
    ]
    async with FakeLiveServer(script) as server:
        ws = await raw_connect(server)
        await ws.send(json.dumps({"setup": {"model": "models/x"}}))
        assert "setupComplete" in json.loads(await ws.recv())
        conn = await server.wait_for_gate("before-transcript")
        assert conn.number == 1
        assert conn.gates_reached == ["before-transcript"]
        assert len(conn.messages_sent) == 1  # the script is parked at the gate
        server.release("before-transcript")
        message = json.loads(await ws.recv())
        assert message == {
            "serverContent": {"outputTranscription": {"text": "released", "finished": True}}
        }
        go_on.set()
        assert json.loads(await ws.recv()) == {"serverContent": {"turnComplete": True}}
        await ws.close()


async def test_wait_helpers_raise_clear_errors() -> None:
    async with FakeLiveServer() as server:
        with pytest.raises(WaitTimeout, match="connection #1"):
            await server.wait_for_connection(1, timeout=0.01)
        ws = await raw_connect(server)
        await ws.send(json.dumps({"setup": {"model": "models/x"}}))
        conn = await server.wait_for_connection(1)
        await conn.wait_for_setup()
        with pytest.raises(WaitTimeout, match=r"5 audio chunks.*received 0 audio chunks"):
            await conn.wait_for_audio_chunks(5, timeout=0.01)
        await ws.close()
        await conn.wait_closed()
        with pytest.raises(ConnectionClosedWhileWaiting, match="ended while waiting"):
            await conn.wait_for_text_inputs(1)


async def test_script_errors_close_1011_and_are_reraised_on_exit() -> None:
    close_codes: list[int] = []

    async def run() -> None:
        async with FakeLiveServer([SetupComplete(), WaitForAudio(1, timeout=0.01)]) as server:
            client = server.genai_client()
            async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
                try:
                    await receive_until(session, lambda m: False)
                except errors.APIError as exc:
                    close_codes.append(exc.code)

    with pytest.raises(ScriptError, match="connection #1") as caught:
        await run()
    assert close_codes == [1011]
    assert isinstance(caught.value.__cause__, WaitTimeout)


# ----------------------------------------------------------------------------- silent peers


async def _connected(server: FakeLiveServer) -> ClientConnection:
    ws = await raw_connect(server)
    await ws.send(json.dumps({"setup": {"model": f"models/{MODEL}"}}))
    assert "setupComplete" in json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT))
    return ws


def _audio_frame() -> str:
    data = base64.b64encode(bytes(640)).decode()
    return json.dumps({"realtimeInput": {"audio": {"data": data, "mimeType": "audio/pcm"}}})


async def test_a_peer_that_stops_reading_answers_nothing_and_records_nothing_more() -> None:
    script = [SetupComplete(), WaitForAudio(1), StopReading(), Hang()]
    async with FakeLiveServer(script) as server:
        ws = await _connected(server)
        await ws.send(_audio_frame())
        conn = server.connections[0]
        await conn.wait_for(lambda c: c.reading_stopped)
        for _ in range(5):
            await ws.send(_audio_frame())
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)
        ws.transport.abort()  # the fake, not reading, only notices when the server stops
        assert conn.audio_chunk_count == 1


async def test_a_peer_that_ignores_pings_still_records_audio() -> None:
    script = [SetupComplete(), IgnorePings(), Hang()]
    async with FakeLiveServer(script) as server:
        ws = await _connected(server)
        pong = await ws.ping()
        await ws.send(_audio_frame())
        conn = server.connections[0]
        await conn.wait_for_audio_chunks(1)
        assert not pong.done()
        assert conn.pings_ignored == 1
        await ws.close()
        await conn.wait_closed()


async def test_a_peer_that_hangs_on_close_never_answers_the_close_frame() -> None:
    script = [SetupComplete(), HangOnClose(), Hang()]
    async with FakeLiveServer(script) as server:
        ws = await _connected(server)
        conn = server.connections[0]
        await conn.wait_for(lambda c: c.script is script and c.setup_at is not None)
        ws.close_timeout = 0.3
        await ws.close()  # gives up after close_timeout and drops the connection
        await conn.wait_closed()
    assert conn.close_frames_ignored == 1
    assert ws.protocol.close_rcvd is None  # the handshake never completed
