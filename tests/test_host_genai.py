"""The session host on the direct google-genai upstream, against the loopback fake over TLS.

The same faults as the ADK upstream's tests (``test_host_adk.py``), with the real genai client
and no ADK anywhere: CI also runs this file with google-genai 3.x in a venv without ADK.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from genai_rig import GenaiRig
from google import genai
from google.genai import types
from loopback import (
    INTERVIEWER_PCM,
    MODEL,
    HostRig,
    assert_deflate_offered,
    assert_every_chunk_in_order_once_resent,
    chunk,
    fast_config,
    listen_then_speak,
    sequence_numbers,
    streaming,
    upstream_tasks,
)
from websockets.frames import Frame, Opcode

from voicefsm import EndReason
from voicefsm import events as ev
from voicefsm.genai_live import GenaiClassifier, GenaiTool, GenaiUpstream
from voicefsm.testing import FakeLiveConnection, FakeLiveServer, Refuse


@pytest.fixture(autouse=True, params=["direct", "genai"])
def wire(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on both wire paths of the upstream."""
    GenaiRig.wire = request.param
    yield request.param
    GenaiRig.wire = "direct"


async def setup_only(conn: FakeLiveConnection) -> None:
    await conn.send_setup_complete()
    await conn.wait_closed(timeout=None)


async def test_goaway_mid_turn_rotates_at_the_turn_boundary_with_the_latest_handle() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.send_model_audio(b"\x01\x00" * 480)  # the interviewer is mid-turn
        await conn.send_go_away("30s")
        await conn.wait_for_audio_chunks(3)
        await conn.send_model_audio(b"\x01\x00" * 480)
        await conn.send_resumption_update("h-2")
        await conn.send_turn_complete()
        await conn.wait_closed()

    async with FakeLiveServer(scripts=[first, setup_only]) as server, GenaiRig(server) as rig:
        rig.send_audio(3)
        await rig.wait_state("live", count=2)
        second = (await server.wait_for_connections(2))[1]
        record = await rig.end()
        assert not upstream_tasks()  # run() leaves no connection task behind
    assert second.resumption_handle == "h-2"  # h-1 would mean it rotated before the boundary
    assert server.connections[0].closed_by == "client"
    assert record.stats.goaways == 1
    assert record.stats.resumes == 1
    assert len(rig.channel.audio) == 2
    assert sequence_numbers(server.connections) == [0, 1, 2]


async def test_goaway_with_no_turn_boundary_rotates_before_time_left_runs_out() -> None:
    goaway_sent: list[float] = []

    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.send_model_audio(b"\x01\x00" * 480)
        goaway_sent.append(time.monotonic())
        await conn.send_go_away("3s")
        await conn.wait_closed()

    config = fast_config(goaway_margin_s=1.0)
    async with (
        FakeLiveServer(scripts=[first, setup_only]) as server,
        GenaiRig(server, config) as rig,
    ):
        second = (await server.wait_for_connections(2))[1]
        await rig.wait_state("live", count=2)
        first_conn = server.connections[0]
        record = await rig.end()
    assert first_conn.closed_at is not None
    assert 1.0 < first_conn.closed_at - goaway_sent[0] < 3.0
    assert second.resumption_handle == "h-1"
    assert record.end_reason is EndReason.USER_ENDED


async def test_1011_and_1006_drops_resume_with_the_last_good_handle() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_output_transcription("Tell me about yourself.", finished=True)
        await conn.send_turn_complete()
        await conn.send_resumption_update("h-1")
        await conn.close(1011, "internal error")

    async def second(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update(None, resumable=False)  # must not erase h-1
        conn.abort()  # a drop with no close frame: 1006

    scripts = [first, second, setup_only]
    async with FakeLiveServer(scripts=scripts) as server, GenaiRig(server) as rig:
        await rig.wait_state("live", count=3)
        record = await rig.end()
    assert [c.resumption_handle for c in server.connections] == [None, "h-1", "h-1"]
    assert len(server.connections) == 3  # never reconnected on its own
    assert record.stats.ignored_resumption_updates == 1
    assert record.stats.resumes == 2
    assert record.end_reason is EndReason.USER_ENDED


async def test_1007_ends_with_error_and_no_retry() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.close(1007, "context exhausted")

    async with FakeLiveServer(scripts=[first]) as server, GenaiRig(server) as rig:
        record = await rig.finish()
        assert len(server.connections) == 1
    assert record.end_reason is EndReason.ERROR
    assert "context window is exhausted" in (record.end_detail or "")
    assert [m.type for m in rig.channel.messages].count("session_ended") == 1


async def test_1008_ends_with_error_and_no_retry() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.close(1008, "policy violation")

    async with FakeLiveServer(scripts=[first]) as server, GenaiRig(server) as rig:
        record = await rig.finish()
        assert len(server.connections) == 1
    assert record.end_reason is EndReason.ERROR
    assert [m.type for m in rig.channel.messages].count("session_ended") == 1


async def test_repeated_refusals_end_upstream_lost_after_the_budget_with_backoff() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_input_transcription("Hello", finished=True)
        await conn.send_resumption_update("h-1")
        await conn.close(1011, "internal error")

    config = fast_config(resume_max_attempts=4, resume_backoff_base_s=0.1, resume_backoff_jitter=0)
    scripts = [first, *[[Refuse(503)]] * 4]
    async with FakeLiveServer(scripts=scripts) as server, GenaiRig(server, config) as rig:
        record = await rig.finish()
    assert record.end_reason is EndReason.UPSTREAM_LOST
    assert "gave up after 4 failed connection attempts" in (record.end_detail or "")
    opened = [c.opened_at for c in server.connections]
    assert len(opened) == 5
    gaps = [b - a for a, b in itertools.pairwise(opened[1:])]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert gap >= expected * 0.9


async def test_a_setup_that_hangs_hits_the_connect_timeout_then_a_fresh_connection() -> None:
    async def hang(conn: FakeLiveConnection) -> None:
        await conn.wait_closed(timeout=None)  # never answers the setup

    config = fast_config(connect_timeout_s=0.5)
    async with (
        FakeLiveServer(scripts=[hang, setup_only]) as server,
        GenaiRig(server, config) as rig,
    ):
        await rig.wait_state("live")
        assert rig.states() == ["resuming", "live"]
        hung = server.connections[0]
        await hung.wait_closed()
        record = await rig.end()
    assert hung.closed_by == "client"
    assert server.connections[1].resumption_handle is None
    assert record.stats.connect_attempts == 2


async def test_the_connection_gives_up_on_a_setup_that_never_completes_by_itself() -> None:
    """genai's connect() waits for setupComplete forever; the connection does not."""

    async def hang(conn: FakeLiveConnection) -> None:
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(scripts=[hang]) as server:
        upstream = GenaiRig(server).upstream
        reports: list[ev.Event] = []
        reported = asyncio.Event()

        def report(event: ev.Event) -> None:
            reports.append(event)
            reported.set()

        connection = upstream.open(
            connection_id=1,
            handle=None,
            session_id="s-1",
            config=fast_config(connect_timeout_s=0.3),
            report=report,
        )
        async with asyncio.timeout(10):
            await reported.wait()
        assert connection.close() == []
        assert await connection.wait_closed() == 0
    assert len(reports) == 1
    closed = reports[0]
    assert isinstance(closed, ev.UpstreamClosed)
    assert closed.connection_id == 1
    assert "no setupComplete within 0.3 s" in closed.reason


async def test_close_does_not_wait_for_a_peer_that_never_answers_the_closing_handshake() -> None:
    async def deaf(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        conn.hang_on_close()
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(scripts=[deaf]) as server:
        upstream = GenaiRig(server, close_timeout_s=0.2).upstream
        ready = asyncio.Event()
        connection = upstream.open(
            connection_id=1,
            handle=None,
            session_id="s-1",
            config=fast_config(),
            report=lambda event: ready.set() if isinstance(event, ev.UpstreamReady) else None,
        )
        async with asyncio.timeout(10):
            await ready.wait()
        connection.send_audio(b"\x00" * 640)
        assert connection.close() == []  # the chunk was written at once
        # websockets alone would wait its 10 s close timeout; 0.2 s + an abort here.
        async with asyncio.timeout(3):
            unconfirmed = await connection.wait_closed()
        assert unconfirmed == 1  # written, but the peer never confirmed reading it
        assert connection.done
        assert not upstream_tasks()
        assert server.connections[0].close_frames_ignored == 1


@pytest.mark.parametrize("fault", ["stop_reading", "ignore_pings"])
async def test_a_silent_upstream_is_resumed_and_the_audio_it_swallowed_is_resent(
    fault: str,
) -> None:
    async def goes_silent(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.wait_for_audio_chunks(30)
        getattr(conn, fault)()  # from now on the connection is silent
        await conn.wait_closed(timeout=None)

    config = fast_config(upstream_ping_interval_s=0.2, upstream_pong_timeout_s=0.5)
    async with (
        FakeLiveServer(scripts=[goes_silent, setup_only]) as server,
        GenaiRig(server, config) as rig,
    ):
        stop = asyncio.Event()
        streamer = asyncio.create_task(streaming(rig, stop))
        second = await server.wait_for_connection(2, timeout=10)
        await rig.wait_state("live", count=2)
        await second.wait_for_audio_chunks(20)
        stop.set()
        await streamer
        first = server.connections[0]
        await second.wait_for(lambda c: sequence_numbers([c])[-1:] == [rig.sent - 1], timeout=10)
        record = await rig.end()
        assert not upstream_tasks()
    assert second.resumption_handle == "h-1"
    assert record.stats.resumes == 1
    duplicated = assert_every_chunk_in_order_once_resent(server, rig.sent)
    if fault == "stop_reading":
        assert first.reading_stopped
    else:
        assert first.pings_ignored >= 1
        assert duplicated > 0  # it had read them: re-sending errs on the side of no loss


async def test_audio_at_a_normal_end_is_delivered_or_counted_as_unsent() -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server, GenaiRig(server) as rig:
        await rig.wait_state("live")
        rig.send_audio(40)
        rig.channel.push(ev.ClientEnd())
        record = await rig.finish()
        conn = server.connections[0]
        await conn.wait_closed()
    assert conn.audio_chunk_count + record.stats.upstream_audio_unsent == 40


async def test_client_audio_sent_while_resuming_arrives_after_the_resume_in_order() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.wait_for_audio_chunks(20)
        await conn.send_go_away("10s")
        await conn.wait_closed()

    release = asyncio.Event()

    async def resumed(conn: FakeLiveConnection) -> None:
        await conn.wait_for_setup()
        await release.wait()
        await conn.send_setup_complete()
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(scripts=[first, resumed]) as server, GenaiRig(server) as rig:
        rig.send_audio(20)
        await rig.wait_state("resuming")
        rig.send_audio(50)  # the upstream is not ready: these are buffered
        second = (await server.wait_for_connections(2))[1]
        await second.wait_for_setup()
        assert second.audio_chunk_count == 0
        release.set()
        await second.wait_for_audio_chunks(50)
        rig.send_audio(10)
        await second.wait_for_audio_chunks(60)
        record = await rig.end()
    assert sequence_numbers(server.connections) == list(range(80))
    assert record.stats.chunks_buffered >= 50
    assert record.stats.chunks_flushed == record.stats.chunks_buffered
    assert record.stats.chunks_overflowed == 0


async def test_warning_reaches_client_and_model_then_the_time_limit_ends_everything() -> None:
    config = fast_config(time_limit_s=3, warning_before_s=1.5)
    async with FakeLiveServer(scripts=[setup_only]) as server, GenaiRig(server, config) as rig:
        record = await rig.finish()
        first = server.connections[0]
        await first.wait_closed()
    assert [m.type for m in rig.channel.messages].count("session_warning") == 1
    assert [t.text for t in first.text_inputs] == [config.wrap_up_prompt.replace("{minutes}", "1")]
    assert record.end_reason is EndReason.TIME_LIMIT
    assert first.closed_by == "client"
    assert [m.type for m in rig.channel.messages].count("session_ended") == 1


async def test_the_setup_carries_handle_compression_instruction_and_transcription() -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server, GenaiRig(server) as rig:
        await rig.wait_state("live")
        setup = server.connections[0].setup
        await rig.end()
    assert server.connections[0].compression is not None
    assert "inputAudioTranscription" in setup
    assert "outputAudioTranscription" in setup
    assert setup["systemInstruction"]["parts"][0]["text"] == "Interview."
    assert setup["generationConfig"]["responseModalities"] == ["AUDIO"]


async def test_transcripts_are_recorded_in_order() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_output_transcription("Welcome", finished=False)
        await conn.send_model_audio(b"\x02\x00" * 480)
        await conn.send_output_transcription(" aboard", finished=False)
        await conn.send_generation_complete()
        await conn.send_turn_complete()
        await conn.send_input_transcription("I am ", finished=False)
        await conn.send_input_transcription("ready", finished=True)
        await conn.send_turn_complete()
        await conn.wait_closed()

    async with FakeLiveServer(scripts=[first]) as server, GenaiRig(server) as rig:
        async with asyncio.timeout(10):
            await rig.channel.wait_for(
                lambda c: [m.type for m in c.messages].count("turn_status") >= 2
            )
        record = await rig.end()
        await server.connections[0].wait_closed()
        assert server.connections[0].closed_by == "client"
    lines = rig.sink.transcripts[record.session_id]
    assert [(line.seq, line.role, line.text) for line in lines] == [
        (0, "interviewer", "Welcome aboard"),
        (1, "user", "I am ready"),
    ]
    assert len(rig.channel.audio) == 1
    assert record.stats.unknown_events == 0


async def test_tool_calls_run_their_handler_and_answer_with_a_tool_response() -> None:
    answers: list[str] = []

    async def record_answer(text: str) -> dict[str, str]:
        """Record the candidate's answer."""
        answers.append(text)
        return {"status": "recorded"}

    def broken() -> None:
        """Always fails."""
        raise RuntimeError("boom")

    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_tool_call("record_answer", {"text": "ready"})
        await conn.send_tool_call("broken", {})
        await conn.send_turn_complete()
        await conn.wait_for_tool_responses(2)
        await conn.wait_closed()

    tools = [record_answer, GenaiTool(broken)]
    async with FakeLiveServer(scripts=[first]) as server, GenaiRig(server, tools=tools) as rig:
        conn = (await server.wait_for_connections(1))[0]
        await conn.wait_for_tool_responses(2)
        record = await rig.end()
    assert answers == ["ready"]
    assert sorted(conn.tool_names) == ["broken", "record_answer"]
    (tool,) = conn.setup["tools"]
    declared = {d["name"]: d for d in tool["functionDeclarations"]}
    # The handler's signature as JSON schema, the shape ADK sends; no response schema.
    assert declared["record_answer"] == {
        "name": "record_answer",
        "description": "Record the candidate's answer.",
        "parameters_json_schema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    }
    by_name = {response.name: response for response in conn.tool_responses}
    assert by_name["record_answer"].response == {"status": "recorded"}
    assert by_name["record_answer"].id == conn.tool_call_ids[0]
    assert by_name["broken"].response == {"error": "RuntimeError: boom"}
    assert record.stats.tool_calls == 2


async def test_a_cancelled_tool_call_gets_no_response() -> None:
    started = asyncio.Event()

    async def slow_lookup(query: str) -> dict[str, str]:
        """Look something up, slowly."""
        started.set()
        await asyncio.Event().wait()
        return {}

    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        call_id = await conn.send_tool_call("slow_lookup", {"query": "x"})
        await started.wait()
        await conn.send_tool_call_cancellation([call_id])
        await conn.send_tool_call("slow_lookup", {"query": "y"})
        await conn.wait_closed()

    async with (
        FakeLiveServer(scripts=[first]) as server,
        GenaiRig(server, tools=[slow_lookup], tool_timeout_s=0.3) as rig,
    ):
        conn = (await server.wait_for_connections(1))[0]
        await conn.wait_for_tool_responses(1)
        await rig.end()
    # Only the second call is answered (by the timeout); the cancelled one never is.
    assert [r.id for r in conn.tool_responses] == [conn.tool_call_ids[1]]
    assert conn.tool_responses[0].response == {"error": "the tool did not answer within 0.3 s"}


async def test_a_hundred_rotations_lose_no_client_audio() -> None:
    rotations = 100

    async def rotating(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update(f"h-{conn.number}")
        if conn.number <= rotations:
            await conn.wait_for_audio_chunks(3)
            await conn.send_go_away("5s")
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(script=rotating) as server, GenaiRig(server) as rig:
        stop = asyncio.Event()

        async def stream() -> None:
            while not stop.is_set():
                rig.send_audio(1)
                await asyncio.sleep(0.002)

        streamer = asyncio.create_task(stream())
        last = (await server.wait_for_connections(rotations + 1, timeout=120))[-1]
        await last.wait_for_audio_chunks(3)
        stop.set()
        await streamer
        earlier = sum(c.audio_chunk_count for c in server.connections[:-1])
        await last.wait_for_audio_chunks(rig.sent - earlier)
        record = await rig.end()
    assert sequence_numbers(server.connections) == list(range(rig.sent))
    assert record.stats.goaways == rotations
    assert record.stats.resumes == rotations
    handles = [c.resumption_handle for c in server.connections]
    assert handles == [None] + [f"h-{n}" for n in range(1, rotations + 1)]


def test_classify_keeps_wire_order_within_a_server_content() -> None:
    message = types.LiveServerMessage(
        server_content=types.LiveServerContent(
            input_transcription=types.Transcription(text="hi", finished=True),
            output_transcription=types.Transcription(text="hello"),
            model_turn=types.Content(
                parts=[types.Part(inline_data=types.Blob(data=b"\x01", mime_type="audio/pcm"))]
            ),
            interrupted=True,
            turn_complete=True,
        ),
        usage_metadata=types.UsageMetadata(prompt_token_count=5, response_token_count=2),
    )
    assert GenaiClassifier().classify(message) == [
        ev.InputTranscript("hi", False),
        ev.InputTranscript("hi", True),
        ev.OutputTranscript("hello", False),
        ev.ModelAudio(b"\x01", "audio/pcm"),
        ev.OutputTranscript("hello", True),  # the interruption completes the line
        ev.Interrupted(),
        ev.TurnComplete(),
        ev.Usage(prompt_tokens=5, response_tokens=2, total_tokens=None),
    ]


def test_classify_joins_transcript_fragments_into_one_finished_line() -> None:
    classifier = GenaiClassifier()

    def said(text: str, finished: bool = False) -> types.LiveServerMessage:
        return types.LiveServerMessage(
            server_content=types.LiveServerContent(
                output_transcription=types.Transcription(text=text, finished=finished)
            )
        )

    assert classifier.classify(said("Wel")) == [ev.OutputTranscript("Wel", False)]
    assert classifier.classify(said("come", finished=True)) == [
        ev.OutputTranscript("come", False),
        ev.OutputTranscript("Welcome", True),
    ]
    generation = types.LiveServerMessage(
        server_content=types.LiveServerContent(generation_complete=True)
    )
    assert classifier.classify(generation) == []  # nothing pending any more


def test_the_wire_classifier_agrees_with_the_pydantic_one() -> None:
    frames: list[dict[str, object]] = [
        {"serverContent": {"outputTranscription": {"text": "Wel"}}},
        {
            "serverContent": {
                "modelTurn": {
                    "parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": "AQI="}}]
                },
                "outputTranscription": {"text": "come", "finished": True},
            }
        },
        {"serverContent": {"inputTranscription": {"text": "hi"}, "turnComplete": True}},
        {"serverContent": {"interrupted": True, "generationComplete": True}},
        {"toolCall": {"functionCalls": [{"id": "fc-1", "name": "lookup", "args": {}}]}},
        {"sessionResumptionUpdate": {"newHandle": "h-1", "resumable": True}},
        {"sessionResumptionUpdate": {"resumable": False}},
        {"usageMetadata": {"promptTokenCount": 5, "responseTokenCount": 2, "totalTokenCount": 7}},
        {"goAway": {"timeLeft": "10s"}},
        {"setupComplete": {"sessionId": "s"}},
        {"toolCallCancellation": {"ids": ["fc-1"]}},
        {"somethingNew": {}},
        {"serverContent": {"modelTurn": {"parts": [{"text": "thinking"}]}}},
    ]
    by_wire, by_model = GenaiClassifier(3), GenaiClassifier(3)
    for frame in frames:
        # genai's parser consumes the dict it is given
        message = types.LiveServerMessage._from_response(response=copy.deepcopy(frame), kwargs={})
        wire_events = by_wire.classify_wire(frame)
        model_events = by_model.classify(message)
        if frame.get("somethingNew") is not None:  # only the wording differs
            assert [type(e) for e in wire_events] == [type(e) for e in model_events]
        else:
            assert wire_events == model_events, frame


def test_classify_tags_goaway_and_reads_resumption_updates() -> None:
    goaway = types.LiveServerMessage(go_away=types.LiveServerGoAway(time_left="20s"))
    update = types.LiveServerMessage(
        session_resumption_update=types.LiveServerSessionResumptionUpdate(
            new_handle="h-9", resumable=True
        )
    )
    assert GenaiClassifier(4).classify(goaway) == [ev.GoAway("20s", connection_id=4)]
    assert GenaiClassifier().classify(update) == [ev.ResumptionUpdate("h-9", True)]
    assert GenaiClassifier().classify(types.LiveServerMessage()) == [
        ev.Unknown("LiveServerMessage with no recognised field")
    ]
    bookkeeping = types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete())
    assert GenaiClassifier().classify(bookkeeping) == []


async def test_audio_keeps_its_order_when_the_websocket_applies_flow_control() -> None:
    """Sends run in the caller's turn while the socket takes them; once the peer stops
    reading, they queue (on genai's path, one may be left suspended for the sender task), in
    order."""
    release = asyncio.Event()

    async def slow_reader(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        transport = conn._require_ws().transport
        transport.pause_reading()  # stop_reading() without the resume this test needs
        await release.wait()
        transport.resume_reading()
        await conn.wait_closed(timeout=None)

    big = 64 * 1024
    count = 300  # ~26 MB of JSON: more than loopback socket buffers hold
    async with FakeLiveServer(scripts=[slow_reader]) as server:
        upstream = GenaiRig(server).upstream
        ready = asyncio.Event()
        connection = upstream.open(
            connection_id=1,
            handle=None,
            session_id="s-1",
            config=fast_config(),
            report=lambda event: ready.set() if isinstance(event, ev.UpstreamReady) else None,
        )
        async with asyncio.timeout(10):
            await ready.wait()
        backed_up = suspended = False
        for seq in range(count):
            # Random bytes: permessage-deflate would shrink a repeated pattern to nothing.
            connection.send_audio(seq.to_bytes(4, "big") + os.urandom(big - 4))
            backed_up = backed_up or bool(connection._outbox.items)
            suspended = suspended or connection._inflight is not None
            if seq % 20 == 0:
                await asyncio.sleep(0)  # let the loop run, as the host's consumer would
        assert backed_up  # flow control did kick in
        # genai's send suspends mid-write; the direct wire writes a frame whole or queues it.
        assert suspended is (GenaiRig.wire == "genai")
        release.set()
        conn = server.connections[0]
        await conn.wait_for_audio_chunks(count, timeout=60)
        unsent = connection.close()
        assert await connection.wait_closed() == 0
    assert unsent == []
    assert [int.from_bytes(chunk[:4], "big") for chunk in conn.audio_chunks] == list(range(count))


async def test_a_chunk_handled_after_the_deadline_was_due_is_counted_as_unsent() -> None:
    # A busy loop handles a client chunk after the deadline fell due, before the host's timer
    # woke it: the deadline fires first in that call and ends the session; the chunk is dropped.
    now = [time.time()]
    async with FakeLiveServer(scripts=[setup_only]) as server:
        upstream = GenaiUpstream(MODEL, client=server.genai_client(), wire=GenaiRig.wire)
        config = fast_config(time_limit_s=60)
        async with HostRig(server, upstream, config, clock=lambda: now[0]) as rig:
            await rig.wait_state("live")
            rig.send_audio(3)
            conn = server.connections[0]
            await conn.wait_for_audio_chunks(3)
            now[0] += 61  # past the limit, and no tick in between on the host's clock
            rig.send_audio(1)
            record = await rig.finish()
            await conn.wait_closed()
    assert record.end_reason is EndReason.TIME_LIMIT
    assert conn.audio_chunk_count == 3
    assert record.stats.upstream_audio_unsent == 1  # the fourth: none vanishes silently
    assert rig.sink.records[record.session_id].stats.upstream_audio_unsent == 1


async def test_a_pushing_client_is_paused_while_the_inbox_is_full_and_loses_nothing() -> None:
    """Chunks pushed faster than the consumer takes them (all at once, before it runs) pause
    the channel at CLIENT_BACKLOG_HIGH inbox events; it is resumed as the consumer catches up,
    and every chunk reaches the model, in order."""
    from voicefsm.host import CLIENT_BACKLOG_HIGH

    async with FakeLiveServer(scripts=[setup_only]) as server, GenaiRig(server) as rig:
        await rig.wait_state("live")
        pauses = 0
        pause = rig.channel.pause_pushing

        def counted_pause() -> None:
            nonlocal pauses
            pauses += 1
            pause()

        rig.channel.pause_pushing = counted_pause  # type: ignore[method-assign]
        inbox = rig.host._inbox
        rig.send_audio(CLIENT_BACKLOG_HIGH - 1)
        assert not rig.channel.paused and pauses == 0
        rig.send_audio(CLIENT_BACKLOG_HIGH * 3)  # the consumer has not run in between
        assert rig.channel.paused and pauses == 1
        assert len(inbox) == CLIENT_BACKLOG_HIGH
        await server.connections[0].wait_for_audio_chunks(rig.sent)
        assert sequence_numbers(server.connections) == list(range(rig.sent))
        assert not rig.channel.paused
        assert pauses >= 2  # the held chunks filled the inbox again as they were let through
        assert (await rig.end()).end_reason is EndReason.USER_ENDED


@pytest.mark.parametrize(
    ("options", "deflate"),
    [({}, False), ({"model_deflate": False}, False), ({"model_deflate": True}, True)],
)
async def test_the_model_websocket_offers_deflate_only_when_asked(
    options: dict[str, bool], deflate: bool
) -> None:
    """By default genai's websocket offers no extension, so none is negotiated; with
    ``model_deflate=True`` it offers permessage-deflate and the fake takes it. Audio flows both
    ways either way."""
    async with FakeLiveServer(scripts=[listen_then_speak]) as server:
        upstream = GenaiUpstream(MODEL, client=server.genai_client(), wire=GenaiRig.wire, **options)
        ready, spoke = asyncio.Event(), asyncio.Event()
        heard: list[bytes] = []

        def report(event: ev.Event) -> None:
            if isinstance(event, ev.UpstreamReady):
                ready.set()
            elif isinstance(event, ev.ModelAudio):
                heard.append(event.data)
                spoke.set()

        connection = upstream.open(
            connection_id=1, handle=None, session_id="s-1", config=fast_config(), report=report
        )
        async with asyncio.timeout(10):
            await ready.wait()
        for seq in range(3):
            connection.send_audio(chunk(seq))
        async with asyncio.timeout(10):
            await spoke.wait()
        negotiated = [extension.name for extension in connection._ws.protocol.extensions]
        assert connection.close() == []
        assert await connection.wait_closed() == 0
    conn = server.connections[0]
    assert_deflate_offered(conn, negotiated, deflate)
    assert sequence_numbers([conn]) == [0, 1, 2]
    assert heard == [INTERVIEWER_PCM]


def test_upstreams_on_one_client_must_agree_on_model_deflate() -> None:
    shared = genai.Client(api_key="fake-key")
    GenaiUpstream(MODEL, client=shared)
    GenaiUpstream(MODEL, client=shared, model_deflate=False)  # the same choice: fine
    with pytest.raises(ValueError, match=r"need a genai\.Client each"):
        GenaiUpstream(MODEL, client=shared, model_deflate=True)
    assert shared._api_client._websocket_ssl_ctx["compression"] is None  # left as it was
    on = genai.Client(api_key="fake-key")
    GenaiUpstream(MODEL, client=on, model_deflate=True)
    assert on._api_client._websocket_ssl_ctx["compression"] == "deflate"
    with pytest.raises(ValueError, match="compression='deflate'"):
        GenaiUpstream(MODEL, client=on)
    # A client whose own options turn compression off cannot be asked to deflate either.
    own = genai.Client(
        api_key="fake-key",
        http_options=types.HttpOptions(async_client_args={"compression": None}),
    )
    GenaiUpstream(MODEL, client=own)
    with pytest.raises(ValueError, match="compression=None"):
        GenaiUpstream(MODEL, client=own, model_deflate=True)


# ---------------------------------------------------------------------- one connection's reports
# On the direct wire the server's messages are classified as websockets parses them (pushed
# from its data_received); these tests hold both wires to the same reports.


class OneConnection:
    """One upstream connection opened straight from a :class:`GenaiUpstream`, its reports kept."""

    def __init__(self, upstream: GenaiUpstream, connection_id: int = 1) -> None:
        self.events: list[ev.Event] = []
        self._changed = asyncio.Event()
        self.connection = upstream.open(
            connection_id=connection_id,
            handle=None,
            session_id="s-1",
            config=fast_config(),
            report=self._report,
        )

    def _report(self, event: ev.Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, kind: type[ev.Event]) -> None:
        async with asyncio.timeout(10):
            while not any(isinstance(event, kind) for event in self.events):
                self._changed.clear()
                await self._changed.wait()

    async def closed(self) -> list[ev.Event]:
        """Every report once the upstream reported its close, the connection then stopped."""
        await self.wait_for(ev.UpstreamClosed)
        self.connection.close()
        await self.connection.wait_closed()
        return self.events


def audio(n: int) -> bytes:
    return n.to_bytes(2, "little") * 480


async def live_after(conn: FakeLiveConnection, after: str) -> None:
    """Set up; with ``after="live"`` also wait for the client's first chunk, which it sends
    once it reported ``UpstreamReady``, so what follows arrives on a running connection."""
    await conn.send_setup_complete()
    if after == "live":
        await conn.wait_for_audio_chunks(1)


async def opened(server: FakeLiveServer, after: str, tools: Sequence[Any] = ()) -> OneConnection:
    one = OneConnection(GenaiRig(server, tools=tools).upstream)
    if after == "live":
        await one.wait_for(ev.UpstreamReady)
        one.connection.send_audio(b"\x00" * 640)
    return one


async def reports(
    script: Callable[[FakeLiveConnection], Awaitable[None]], after: str
) -> list[ev.Event]:
    """Everything one connection to a fake playing ``script`` reported, up to its close."""
    async with FakeLiveServer(scripts=[script]) as server:
        one = await opened(server, after)
        return await one.closed()


@pytest.mark.parametrize("after", ["setup", "live"])
async def test_messages_keep_wire_order_right_after_setup_and_on_a_running_connection(
    after: str,
) -> None:
    """UpstreamReady first; audio, transcripts, resumption updates and GoAway in wire order;
    the close last. ``setup``: genai's connect() reads setupComplete, and the messages sent in
    the same breath reach the socket before the direct wire takes over from it."""
    mime = "audio/pcm;rate=24000"

    async def script(conn: FakeLiveConnection) -> None:
        await live_after(conn, after)
        for n in range(1, 31):
            await conn.send_model_audio(audio(n), mime)
            if n == 5:
                await conn.send_output_transcription("Hel")
            if n == 10:
                await conn.send_go_away("9s")
            if n == 20:
                await conn.send_resumption_update("h-20")
        await conn.send_output_transcription("lo", finished=True)
        await conn.send_turn_complete()
        await conn.close(1011, "internal error")

    events = await reports(script, after)
    expected: list[ev.Event] = [ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1")]
    for n in range(1, 31):
        expected.append(ev.ModelAudio(audio(n), mime))
        if n == 5:
            expected.append(ev.OutputTranscript("Hel", False))
        if n == 10:
            expected.append(ev.GoAway(time_left="9s", connection_id=1))
        if n == 20:
            expected.append(ev.ResumptionUpdate("h-20", True))
    expected += [
        ev.OutputTranscript("lo", False),
        ev.OutputTranscript("Hello", True),
        ev.TurnComplete(),
        ev.UpstreamClosed(1011, "internal error", connection_id=1),
    ]
    assert events == expected


@pytest.mark.parametrize("after", ["setup", "live"])
async def test_a_fragmented_message_is_assembled_and_later_messages_follow_in_order(
    after: str,
) -> None:
    mime = "audio/pcm;rate=24000"
    fragments = ['{"serverContent":{"outputTranscription":', '{"text":"split ', 'in three"}}}']

    async def script(conn: FakeLiveConnection) -> None:
        await live_after(conn, after)
        await conn.send_model_audio(audio(1), mime)
        await conn._require_ws().send(iter(fragments))  # one text message in three frames
        await conn.send_model_audio(audio(2), mime)
        await conn.send_go_away("5s")
        await conn._require_ws().send(iter(fragments))
        await conn.send_model_audio(audio(3), mime)
        await conn.close(1000)

    events = await reports(script, after)
    assert events == [
        ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1"),
        ev.ModelAudio(audio(1), mime),
        ev.OutputTranscript("split in three", False),
        ev.ModelAudio(audio(2), mime),
        ev.GoAway(time_left="5s", connection_id=1),
        ev.OutputTranscript("split in three", False),
        ev.ModelAudio(audio(3), mime),
        ev.UpstreamClosed(1000, "", connection_id=1),
    ]


@pytest.mark.parametrize("after", ["setup", "live"])
async def test_binary_and_non_object_frames_on_the_direct_wire(wire: str, after: str) -> None:
    if wire != "direct":
        pytest.skip("genai's receive() reads frames its own way")
    mime = "audio/pcm;rate=24000"
    part = {"inlineData": {"mimeType": mime, "data": base64.b64encode(audio(7)).decode()}}

    async def script(conn: FakeLiveConnection) -> None:
        await live_after(conn, after)
        ws = conn._require_ws()
        await ws.send(json.dumps({"serverContent": {"modelTurn": {"parts": [part]}}}).encode())
        await ws.send("not JSON")
        await ws.send("[1, 2]")
        await ws.send("")
        await ws.send(b"\xff\xfe")
        await conn.send_turn_complete()
        await conn.close(1000)

    events = await reports(script, after)
    assert events == [
        ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1"),
        ev.ModelAudio(audio(7), mime),  # from a binary frame
        ev.Unknown("a server frame that is not JSON"),
        ev.Unknown("a server frame that is not a JSON object"),
        ev.Unknown("server message with no recognised field"),
        ev.Unknown("a server frame that is not JSON"),  # binary, not UTF-8
        ev.TurnComplete(),
        ev.UpstreamClosed(1000, "", connection_id=1),
    ]


@pytest.mark.parametrize("after", ["setup", "live"])
async def test_a_text_frame_that_is_not_utf8_fails_the_connection_as_websockets_does(
    wire: str, after: str
) -> None:
    async def script(conn: FakeLiveConnection) -> None:
        await live_after(conn, after)
        await conn.send_output_transcription("before")
        ws = conn._require_ws()
        ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
        ws.send_data()
        await conn.send_output_transcription("after")
        await conn.wait_closed()

    async with FakeLiveServer(scripts=[script]) as server:
        one = await opened(server, after)
        events = await one.closed()
        conn = server.connections[0]
        await conn.wait_closed()
    assert events[:2] == [
        ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1"),
        ev.OutputTranscript("before", False),
    ]
    closes = [event for event in events if isinstance(event, ev.UpstreamClosed)]
    assert closes == [events[-1]] and len(events) == 3
    if wire == "direct":  # websockets closes with 1007 and reports the drop that follows
        assert conn.close_received is not None and conn.close_received.code == 1007


@pytest.mark.parametrize("after", ["setup", "live"])
async def test_a_message_the_wire_cannot_read_ends_the_connection_with_one_close(
    after: str,
) -> None:
    """A frame that makes classifying it fail (here a transcription that is not an object)
    ends this connection: one UpstreamClosed, nothing after it, a clean closing handshake,
    nothing raised into the event loop, and the next connection runs as usual."""
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))

    async def script(conn: FakeLiveConnection) -> None:
        await live_after(conn, after)
        await conn.send_output_transcription("fine")
        await conn.send({"serverContent": {"inputTranscription": "not an object"}})
        await conn.send_output_transcription("never reported")
        await conn.send_tool_call("record_answer", {"text": "never run"})
        await conn.wait_closed()

    try:
        async with FakeLiveServer(scripts=[script, setup_only]) as server:
            one = await opened(server, after)
            events = await one.closed()
            conn = server.connections[0]
            await conn.wait_closed()
            following = OneConnection(GenaiRig(server).upstream, connection_id=2)
            await following.wait_for(ev.UpstreamReady)
            following.connection.close()
            await following.connection.wait_closed()
    finally:
        loop.set_exception_handler(None)
    assert events[:2] == [
        ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1"),
        ev.OutputTranscript("fine", False),
    ]
    assert len(events) == 3
    closed = events[2]
    assert isinstance(closed, ev.UpstreamClosed)
    assert closed.code is None and closed.connection_id == 1
    assert conn.closed_by == "client"
    assert conn.close_received is not None and conn.close_received.code == 1000
    assert conn.tool_responses == []
    assert following.events == [ev.UpstreamReady(connection_id=2, upstream_session_id="sess-2")]
    assert loop_errors == []


async def test_nothing_is_reported_after_close_while_the_socket_still_delivers() -> None:
    after_close = asyncio.Event()
    sent = asyncio.Event()
    answers: list[str] = []

    async def record_answer(text: str) -> dict[str, str]:
        """Record the candidate's answer."""
        answers.append(text)
        return {"status": "recorded"}

    async def script(conn: FakeLiveConnection) -> None:
        await live_after(conn, "live")
        await after_close.wait()
        for n in range(1, 6):
            await conn.send_model_audio(audio(n))
        await conn.send_tool_call("record_answer", {"text": "late"})
        await conn.send_go_away("1s")
        sent.set()
        await conn.wait_closed()

    async with FakeLiveServer(scripts=[script]) as server:
        one = await opened(server, "live", tools=[record_answer])
        assert one.connection.close() == []
        after_close.set()
        async with asyncio.timeout(10):
            await sent.wait()
            # The pong comes after every frame sent before it: those have all been received.
            await (await one.connection._ws.ping())
        assert not one.connection._tool_tasks
        await one.connection.wait_closed()
        conn = server.connections[0]
        await conn.wait_closed()
    assert one.events == [ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1")]
    assert conn.tool_responses == []
    assert answers == []  # no tool started after close()


async def test_reading_resumes_when_the_messages_after_setup_filled_websockets_queue() -> None:
    """With websockets' queue one message deep, the messages that follow setupComplete
    before the direct wire takes over pause reading; taking them over resumes it."""

    async def script(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        for n in range(1, 21):
            await conn.send_output_transcription(f"{n} ")
        await conn.close(1000)

    async with FakeLiveServer(scripts=[script]) as server:
        upstream = GenaiRig(server).upstream
        upstream.client._api_client._websocket_ssl_ctx["max_queue"] = 1  # websockets' option
        events = await OneConnection(upstream).closed()
    assert events == [
        ev.UpstreamReady(connection_id=1, upstream_session_id="sess-1"),
        *[ev.OutputTranscript(f"{n} ", False) for n in range(1, 21)],
        ev.UpstreamClosed(1000, "", connection_id=1),
    ]
