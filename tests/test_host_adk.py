"""The session host on the real ADK Runner and genai client, against the loopback fake over TLS.

Time is scaled through the config (a "45-minute" policy plays out in seconds); nothing here mocks
genai or ADK.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google import genai
from google.adk.agents import LiveRequestQueue, LlmAgent, RunConfig
from google.adk.runners import Runner
from google.adk.tools import ToolContext
from live_rig import Rig
from loopback import (
    INTERVIEWER_PCM,
    MODEL,
    assert_deflate_offered,
    assert_every_chunk_in_order_once_resent,
    chunk,
    fast_config,
    listen_then_speak,
    sequence_numbers,
    streaming,
    upstream_tasks,
)

from voicefsm import EndReason, Session, State
from voicefsm import events as ev
from voicefsm.adk import _LINK, AdkUpstream, BoundedSessionService, live_model
from voicefsm.host import SessionHost
from voicefsm.memory import MemoryChannel, MemorySink
from voicefsm.metrics import Metrics
from voicefsm.model import LogKind, SessionRecord
from voicefsm.ports import EndNote, LogNote, StateNote, UpstreamOpenNote, UpstreamTornDownNote
from voicefsm.testing import FakeLiveConnection, FakeLiveServer, Refuse


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

    async with FakeLiveServer(scripts=[first, setup_only]) as server, Rig(server) as rig:
        rig.send_audio(3)
        await rig.wait_state("live", count=2)
        second = (await server.wait_for_connections(2))[1]
        record = await rig.end()
    assert second.resumption_handle == "h-2"  # h-1 would mean it rotated before the boundary
    assert server.connections[0].closed_by == "client"
    assert record.stats.goaways == 1
    assert record.stats.resumes == 1
    assert len(rig.channel.audio) == 2


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
    async with FakeLiveServer(scripts=[first, setup_only]) as server, Rig(server, config) as rig:
        second = (await server.wait_for_connections(2))[1]
        await rig.wait_state("live", count=2)
        first_conn = server.connections[0]
        record = await rig.end()
    assert first_conn.closed_at is not None
    rotated_after = first_conn.closed_at - goaway_sent[0]
    assert 1.0 < rotated_after < 3.0
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

    async with FakeLiveServer(scripts=[first, second, setup_only]) as server, Rig(server) as rig:
        await rig.wait_state("live", count=3)
        record = await rig.end()
    assert [c.resumption_handle for c in server.connections] == [None, "h-1", "h-1"]
    assert len(server.connections) == 3  # ADK never reconnected on its own
    assert record.stats.ignored_resumption_updates == 1
    assert record.stats.resumes == 2
    assert record.end_reason is EndReason.USER_ENDED


async def test_the_adk_session_is_dropped_when_the_interview_ends() -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server, Rig(server) as rig:
        await rig.wait_state("live")
        upstream = rig.upstream
        service = upstream.runner.session_service
        key = {"app_name": upstream.runner.app_name, "user_id": upstream.user_id}
        assert await service.get_session(**key, session_id=rig.session.session_id) is not None
        await rig.end()
    assert await service.get_session(**key, session_id=rig.session.session_id) is None


async def test_1007_ends_with_error_and_no_retry() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.close(1007, "context exhausted")

    async with FakeLiveServer(scripts=[first]) as server, Rig(server) as rig:
        record = await rig.finish()
        assert len(server.connections) == 1
    assert record.end_reason is EndReason.ERROR
    assert "context window is exhausted" in (record.end_detail or "")
    ended = [m for m in rig.channel.messages if m.type == "session_ended"]
    assert len(ended) == 1


async def test_repeated_refusals_end_upstream_lost_after_the_budget_with_backoff() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_input_transcription("Hello", finished=True)
        await conn.send_resumption_update("h-1")
        await conn.close(1011, "internal error")

    config = fast_config(resume_max_attempts=4, resume_backoff_base_s=0.1, resume_backoff_jitter=0)
    scripts = [first, *[[Refuse(503)]] * 4]
    async with FakeLiveServer(scripts=scripts) as server, Rig(server, config) as rig:
        record = await rig.finish()
    assert record.end_reason is EndReason.UPSTREAM_LOST
    assert "gave up after 4 failed connection attempts" in (record.end_detail or "")
    opened = [c.opened_at for c in server.connections]
    assert len(opened) == 5
    gaps = [b - a for a, b in itertools.pairwise(opened[1:])]
    # Backoff 0.1, 0.2, 0.4 s between the failed attempts (the first retry is immediate).
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert gap >= expected * 0.9


async def test_a_setup_that_hangs_hits_the_connect_timeout_then_a_fresh_connection() -> None:
    async def hang(conn: FakeLiveConnection) -> None:
        await conn.wait_closed(timeout=None)  # never answers the setup

    config = fast_config(connect_timeout_s=0.5)
    async with FakeLiveServer(scripts=[hang, setup_only]) as server, Rig(server, config) as rig:
        await rig.wait_state("live")
        assert rig.states() == ["resuming", "live"]
        hung = server.connections[0]
        await hung.wait_closed()
        record = await rig.end()
    assert hung.closed_by == "client"
    assert server.connections[1].resumption_handle is None  # nothing was said yet
    assert record.stats.connect_attempts == 2


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

    async with FakeLiveServer(scripts=[first, resumed]) as server, Rig(server) as rig:
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
    async with FakeLiveServer(scripts=[setup_only]) as server, Rig(server, config) as rig:
        record = await rig.finish()
        first = server.connections[0]
        await first.wait_closed()
    warnings = [m for m in rig.channel.messages if m.type == "session_warning"]
    assert len(warnings) == 1
    assert [t.text for t in first.text_inputs] == [config.wrap_up_prompt.replace("{minutes}", "1")]
    assert record.end_reason is EndReason.TIME_LIMIT
    assert record.ended_at is not None
    assert record.ended_at >= record.deadline
    assert first.closed_by == "client"
    assert len(server.connections) == 1
    assert rig.channel.closed is not None
    assert [m.type for m in rig.channel.messages].count("session_ended") == 1


async def test_transcripts_are_recorded_in_order_and_never_sent_to_the_client() -> None:
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

    async with FakeLiveServer(scripts=[first]) as server, Rig(server) as rig:
        # Lines are recorded before the turn status that follows them reaches the client.
        async with asyncio.timeout(10):
            await rig.channel.wait_for(
                lambda c: [m.type for m in c.messages].count("turn_status") >= 2
            )
        record = await rig.end()
    lines = rig.sink.transcripts[record.session_id]
    assert [(line.seq, line.role, line.text) for line in lines] == [
        (0, "interviewer", "Welcome aboard"),
        (1, "user", "I am ready"),
    ]
    assert not [m for m in rig.channel.messages if m.type == "transcript"]
    assert len(rig.channel.audio) == 1


async def test_tools_keep_working_through_adk() -> None:
    answers: list[str] = []

    def record_answer(text: str) -> dict[str, str]:
        """Record the candidate's answer."""
        answers.append(text)
        return {"status": "recorded"}

    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_tool_call("record_answer", {"text": "ready"})
        await conn.send_turn_complete()
        await conn.wait_for_tool_responses(1)
        await conn.wait_closed()

    agent = LlmAgent(name="interviewer", model=MODEL, instruction="x", tools=[record_answer])
    async with FakeLiveServer(scripts=[first]) as server, Rig(server, agent=agent) as rig:
        conn = (await server.wait_for_connections(1))[0]
        await conn.wait_for_tool_responses(1)
        record = await rig.end()
    assert answers == ["ready"]
    assert conn.tool_names == ["record_answer"]
    assert conn.tool_responses[0].name == "record_answer"
    assert record.stats.tool_calls == 1


async def test_cancelling_the_host_ends_the_session_with_error_and_closes_everything() -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server, Rig(server) as rig:
        await rig.wait_state("live")
        assert rig.task is not None
        rig.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rig.task
        conn = server.connections[0]
        await conn.wait_closed()
    record = rig.sink.records[rig.session.session_id]
    assert record.end_reason is EndReason.ERROR
    assert record.end_detail == "host failure: the host was cancelled"
    assert [m.type for m in rig.channel.messages].count("session_ended") == 1


async def test_a_hundred_rotations_lose_no_client_audio() -> None:
    rotations = 100

    async def rotating(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update(f"h-{conn.number}")
        if conn.number <= rotations:
            await conn.wait_for_audio_chunks(3)
            await conn.send_go_away("5s")
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(script=rotating) as server, Rig(server) as rig:
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
    received = sequence_numbers(server.connections)
    assert received == list(range(rig.sent))  # every chunk, once, in order
    assert record.stats.goaways == rotations
    assert record.stats.resumes == rotations
    assert [m.type for m in rig.channel.messages].count("session_ended") == 1
    handles = [c.resumption_handle for c in server.connections]
    assert handles == [None] + [f"h-{n}" for n in range(1, rotations + 1)]


async def test_metrics_follow_rotations_and_the_end() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.send_go_away("20s")
        await conn.wait_closed()

    metrics = Metrics()
    async with (
        FakeLiveServer(scripts=[first, setup_only]) as server,
        Rig(server, metrics=metrics) as rig,
    ):
        await rig.wait_state("live", count=2)
        text = metrics.render().decode()
        assert 'voicefsm_sessions{state="live"} 1.0' in text
        await rig.end()
    text = metrics.render().decode()
    assert "voicefsm_resumes_total 1.0" in text
    assert "voicefsm_resume_seconds_count 1.0" in text
    assert 'voicefsm_sessions_ended_total{reason="user_ended"} 1.0' in text
    for state in ("connecting", "live", "warning", "resuming"):
        assert f'voicefsm_sessions{{state="{state}"}} 0.0' in text


@pytest.mark.live_api
@pytest.mark.skipif(not os.environ.get("GOOGLE_API_KEY"), reason="needs GOOGLE_API_KEY")
async def test_smoke_against_the_real_gemini_live_api() -> None:
    from voicefsm import Session
    from voicefsm.adk import AdkUpstream
    from voicefsm.host import SessionHost
    from voicefsm.memory import MemoryChannel

    model = os.environ.get("VOICEFSM_LIVE_MODEL", "gemini-2.5-flash-native-audio-preview-09-2025")
    agent = LlmAgent(name="interviewer", model=model, instruction="Greet the candidate briefly.")
    channel = MemoryChannel()
    session = Session(fast_config(time_limit_s=20, warning_before_s=5))
    host = SessionHost(session, AdkUpstream(agent), client=channel)
    task = asyncio.create_task(host.run())
    channel.push(ev.ClientText("Hello, I am ready for the interview."))
    async with asyncio.timeout(30):
        await channel.wait_for(lambda c: len(c.audio) > 0)
    channel.push(ev.ClientEnd())
    record = await asyncio.wait_for(task, 30)
    assert record.end_reason is EndReason.USER_ENDED
    assert record.stats.connect_attempts == 1


async def test_a_client_that_stops_reading_cannot_stall_the_session() -> None:
    class StuckChannel(MemoryChannel):
        async def send_message(self, message: Any) -> None:
            await asyncio.Event().wait()  # the socket's buffer is full and nobody reads

    config = fast_config(time_limit_s=3, warning_before_s=1)
    async with FakeLiveServer(scripts=[setup_only]) as server:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="x")
        host = SessionHost(
            Session(config),
            AdkUpstream(agent, client=server.genai_client()),
            client=StuckChannel(),
            client_send_timeout_s=0.2,
        )
        record = await asyncio.wait_for(host.run(), 15)
    assert record.end_reason is EndReason.TIME_LIMIT  # the deadline still fired
    assert not record.client_connected


async def test_observer_notes_follow_a_rotation_and_no_logger_is_left_per_session() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.wait_for_audio_chunks(2)
        await conn.send_go_away("20s")
        await conn.wait_closed()

    async with FakeLiveServer(scripts=[first, setup_only]) as server, Rig(server) as rig:
        rig.send_audio(2)
        await rig.wait_state("live", count=2)
        record = await rig.end()
        assert not upstream_tasks()
    session_id = record.session_id
    kinds = [
        (type(note).__name__, getattr(note, "connection_id", None), getattr(note, "state", None))
        for note in rig.notes
        if not isinstance(note, UpstreamTornDownNote | LogNote)
    ]
    # Within one batch of effects the (never blocking) upstream ones are carried out first.
    assert kinds == [
        ("UpstreamOpenNote", 1, None),
        ("StateNote", None, State.LIVE),
        ("UpstreamCloseNote", 1, None),
        ("UpstreamOpenNote", 2, None),
        ("StateNote", None, State.RESUMING),
        ("StateNote", None, State.LIVE),
        ("UpstreamCloseNote", 2, None),
        ("StateNote", None, State.ENDED),
        ("EndNote", None, None),
    ]
    torn_down = sorted(n.connection_id for n in rig.notes if isinstance(n, UpstreamTornDownNote))
    assert torn_down == [1, 2]
    logged = [n.entry.kind for n in rig.notes if isinstance(n, LogNote)]
    assert logged.count(LogKind.ROTATION) == 1
    opened = [n for n in rig.notes if isinstance(n, UpstreamOpenNote)]
    assert [n.resuming for n in opened] == [False, True]
    end = [n for n in rig.notes if isinstance(n, EndNote)]
    assert [n.reason for n in end] == [EndReason.USER_ENDED]
    assert all(n.session_id == session_id for n in rig.notes)
    registry = logging.Logger.manager.loggerDict
    assert not [name for name in registry if session_id[:12] in name]


class _OrderedConnection:
    """An upstream connection that writes its close into a shared list of what happened."""

    def __init__(self, inner: Any, connection_id: int, happened: list[str]) -> None:
        self._inner = inner
        self._id = connection_id
        self._happened = happened

    def send_audio(self, data: bytes) -> None:
        self._inner.send_audio(data)

    def send_text(self, text: str) -> None:
        self._inner.send_text(text)

    def close(self) -> list[bytes]:
        self._happened.append(f"close #{self._id}")
        return list(self._inner.close())

    async def wait_closed(self) -> int:
        return int(await self._inner.wait_closed())


class _OrderedUpstream(AdkUpstream):
    """An ADK upstream that writes each open into a shared list of what happened."""

    def __init__(self, *args: Any, happened: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.happened = happened

    def open(self, *, connection_id: int, **kwargs: Any) -> Any:  # type: ignore[override]
        self.happened.append(f"open #{connection_id}")
        inner = super().open(connection_id=connection_id, **kwargs)
        return _OrderedConnection(inner, connection_id, self.happened)


async def test_a_rotation_starts_the_new_connection_before_closing_the_old_one() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await conn.wait_for_audio_chunks(5)
        await conn.send_go_away("20s")
        await conn.wait_closed()

    happened: list[str] = []
    agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
    async with FakeLiveServer(scripts=[first, setup_only]) as server:
        upstream = _OrderedUpstream(agent, client=server.genai_client(), happened=happened)
        async with Rig(server, upstream=upstream) as rig:
            stop = asyncio.Event()
            streamer = asyncio.create_task(streaming(rig, stop))
            second = await server.wait_for_connection(2, timeout=10)
            await rig.wait_state("live", count=2)
            await second.wait_for_audio_chunks(5)
            stop.set()
            await streamer
            await second.wait_for(
                lambda c: sequence_numbers([c])[-1:] == [rig.sent - 1], timeout=10
            )
            record = await rig.end()
        assert not upstream_tasks()
    # Make before break: the rotation's connect is under way before the old connection's close.
    assert happened == ["open #1", "open #2", "close #1", "close #2"]
    assert record.stats.resumes == 1
    assert second.resumption_handle == "h-1"
    assert_every_chunk_in_order_once_resent(server, rig.sent)


async def test_warning_and_end_arrive_on_schedule_while_an_old_connection_hangs_closing() -> None:
    async def first(conn: FakeLiveConnection) -> None:
        conn.hang_on_close()  # the rotated-away connection never answers the close frame
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        # Short enough that the connection cannot outlive the deadline: a rotation is due.
        await conn.send_go_away("1s")
        await conn.wait_closed(timeout=None)

    config = fast_config(time_limit_s=3, warning_before_s=1.5)
    closed_when_ended: list[float | None] = []

    async with FakeLiveServer(scripts=[first, setup_only]) as server:
        hung_close_s = 4.0  # the hung close outlasts the interview
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        upstream = AdkUpstream(agent, client=server.genai_client(), close_timeout_s=hung_close_s)
        async with Rig(server, config, upstream=upstream) as rig:
            rig.host._on_note = lambda note: (
                closed_when_ended.append(server.connections[0].closed_at)
                if isinstance(note, EndNote)
                else None,
                rig.notes.append(note),
            )
            rig.send_audio(5)
            record = await rig.finish()
            assert not upstream_tasks()  # run() waited for the hung tear-down
            hung, second = server.connections
            await hung.wait_closed()
    assert hung.close_frames_ignored == 1
    types = [m.type for m in rig.channel.messages]
    assert types.count("session_warning") == 1
    assert types.index("session_warning") < types.index("session_ended")
    assert record.end_reason is EndReason.TIME_LIMIT
    # The end reached the client while the first connection was still hanging in its close.
    assert closed_when_ended == [None]
    assert [t.text for t in second.text_inputs] == [config.wrap_up_prompt.replace("{minutes}", "1")]
    assert sequence_numbers(server.connections) == list(range(5))


async def test_run_leaves_no_upstream_task_behind_when_the_last_close_hangs() -> None:
    async def hangs_closing(conn: FakeLiveConnection) -> None:
        conn.hang_on_close()
        await conn.send_setup_complete()
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(scripts=[hangs_closing]) as server, Rig(server) as rig:
        await rig.wait_state("live")
        record = await rig.end()
        assert not upstream_tasks()
        conn = server.connections[0]
        await conn.wait_closed()
    assert conn.close_frames_ignored == 1
    assert record.end_reason is EndReason.USER_ENDED
    torn_down = [n for n in rig.notes if isinstance(n, UpstreamTornDownNote)]
    assert [n.connection_id for n in torn_down] == [1]


def silent_config(**overrides: Any) -> Any:
    """Short liveness settings: a silent upstream is noticed within 0.2 + 0.5 s."""
    return fast_config(upstream_ping_interval_s=0.2, upstream_pong_timeout_s=0.5, **overrides)


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

    async with (
        FakeLiveServer(scripts=[goes_silent, setup_only]) as server,
        Rig(server, silent_config()) as rig,
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
    closes = [n.entry for n in rig.notes if isinstance(n, LogNote)]
    silent = [e for e in closes if e.kind is LogKind.UPSTREAM_CLOSED and e.connection_id == 1]
    assert len(silent) == 1
    assert "no pong" in (silent[0].why or "")


@pytest.mark.parametrize("wire", ["adk", "direct"])
async def test_audio_still_queued_at_a_normal_end_is_counted_as_unsent(wire: Any) -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        upstream = AdkUpstream(agent, client=server.genai_client(), wire=wire)
        async with Rig(server, upstream=upstream) as rig:
            await rig.wait_state("live")
            rig.send_audio(40)
            rig.channel.push(ev.ClientEnd())  # the end is handled before ADK sent them all
            record = await rig.finish()
            conn = server.connections[0]
            await conn.wait_closed()
    received = conn.audio_chunk_count
    if wire == "adk":
        assert record.stats.upstream_audio_unsent > 0  # still in ADK's queue
    else:
        assert received == 40  # each written to the socket as the host handled it
    assert received + record.stats.upstream_audio_unsent == 40
    assert rig.sink.records[record.session_id].stats.upstream_audio_unsent == (
        record.stats.upstream_audio_unsent
    )


async def test_client_audio_still_in_the_inbox_at_the_end_is_counted_as_unsent() -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server, Rig(server) as rig:
        await rig.wait_state("live")
        rig.send_audio(5)
        rig.channel.push(ev.ClientEnd())
        rig.send_audio(7)  # read from the client, queued behind the end: never sent
        record = await rig.finish()
        conn = server.connections[0]
        await conn.wait_closed()
    assert record.end_reason is EndReason.USER_ENDED
    # Every chunk the client sent is either at the fake or counted: none vanish silently.
    assert conn.audio_chunk_count + record.stats.upstream_audio_unsent == 12
    assert record.stats.upstream_audio_unsent >= 7
    unsent = [e for e in record.log if e.kind is LogKind.AUDIO_UNSENT]
    assert any("queued at the end" in (e.why or "") for e in unsent)


async def test_the_adk_session_stays_small_over_many_rotations() -> None:
    rotations = 30
    copied: list[int] = []

    class CountingService(BoundedSessionService):
        async def get_session(self, **kwargs: Any) -> Any:
            session = await super().get_session(**kwargs)
            copied.append(len(session.events) if session is not None else -1)
            return session

    async def talkative(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        for n in range(3):
            await conn.send_output_transcription(f"Question {conn.number}.{n}?", finished=True)
            await conn.send_turn_complete()
            await conn.send_input_transcription(f"Answer {conn.number}.{n}.", finished=True)
        await conn.send_resumption_update(f"h-{conn.number}")
        if conn.number <= rotations:
            await conn.send_go_away("5s")
        await conn.wait_closed(timeout=None)

    async with FakeLiveServer(script=talkative) as server:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        service = CountingService()
        upstream = AdkUpstream(agent, client=server.genai_client())
        upstream.runner.session_service = service
        async with Rig(server, upstream=upstream) as rig:
            await rig.wait_state("live", count=rotations + 1, within=60)
            await server.connections[-1].wait_for(lambda c: bool(c.issued_handles))
            key = {"app_name": upstream.runner.app_name, "user_id": upstream.user_id}
            stored = service.sessions[key["app_name"]][key["user_id"]][rig.session.session_id]
            stored_events = len(stored.events)
            record = await rig.end()
    assert record.stats.resumes == rotations
    assert len(rig.sink.transcripts[record.session_id]) >= 6 * rotations
    assert stored_events < 2 * service.keep  # not ~6 events per connection, for ever
    # A new run_live copies none of ADK's history (the first finds no session and makes one).
    assert copied[-rotations:] == [0] * rotations


async def test_a_pushing_client_channel_needs_no_reader_task() -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server, Rig(server) as rig:
        await rig.wait_state("live")
        readers = [t for t in asyncio.all_tasks() if t.get_name().startswith("voicefsm-client-")]
        assert readers == []  # MemoryChannel pushes straight into the inbox
        rig.send_audio(10)
        conn = server.connections[0]
        await conn.wait_for_audio_chunks(10)
        replaced = MemoryChannel()
        rig.host.attach(replaced)
        rig.channel.push(ev.ClientEnd())  # from the replaced client: ignored
        replaced.push(ev.ClientAudio(chunk(10)))  # handled after it, in inbox order
        await conn.wait_for_audio_chunks(11)
        assert not rig.session.ended
        replaced.push(ev.ClientEnd())
        record = await rig.finish()
    assert sequence_numbers([conn]) == list(range(11))
    assert record.end_reason is EndReason.USER_ENDED
    assert replaced.closed is not None


class StandbyPrepared(AdkUpstream):
    """An ADK upstream that says when it has prepared a warm standby."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.standby_prepared = asyncio.Event()

    def _prepare_standby(self, session_id: str, config: Any) -> None:
        super()._prepare_standby(session_id, config)
        self.standby_prepared.set()


async def test_a_warm_standby_connects_on_rotation_with_the_current_adk_state() -> None:
    seen: list[list[str]] = []

    def record_answer(text: str, tool_context: ToolContext) -> dict[str, str]:
        """Record the candidate's answer."""
        answers = [*tool_context.state.get("answers", []), text]
        tool_context.state["answers"] = answers
        seen.append(answers)
        return {"status": "recorded"}

    standby_ready = asyncio.Event()

    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await standby_ready.wait()  # the next connection's run_live waits, warm
        await conn.send_tool_call("record_answer", {"text": "one"})
        await conn.send_turn_complete()
        await conn.wait_for_tool_responses(1)
        await conn.send_go_away("20s")
        await conn.wait_closed()

    async def second(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_tool_call("record_answer", {"text": "two"})
        await conn.send_turn_complete()
        await conn.wait_for_tool_responses(1)
        await conn.wait_closed()

    agent = LlmAgent(name="interviewer", model=MODEL, instruction="x", tools=[record_answer])
    async with FakeLiveServer(scripts=[first, second]) as server:
        upstream = StandbyPrepared(agent, client=server.genai_client())
        rig = Rig(server, agent=agent, upstream=upstream)
        await rig.__aenter__()
        async with asyncio.timeout(10):
            await upstream.standby_prepared.wait()
        standby = rig.upstream._standby[rig.session.session_id]
        standby_ready.set()
        second_conn = await server.wait_for_connection(2, timeout=10)
        await second_conn.wait_for_tool_responses(1)
        assert rig.upstream._standby.get(rig.session.session_id) is not standby
        record = await rig.end()
        await rig.__aexit__()
        assert not upstream_tasks()
    assert seen == [["one"], ["one", "two"]]  # the standby's state was refreshed
    assert record.stats.resumes == 1
    assert second_conn.resumption_handle == "h-1"
    # The compression config was put into the standby's connect config before it was armed.
    config = rig.session.config
    for conn in server.connections[:2]:
        assert conn.compression is not None
        assert conn.compression.trigger_tokens == config.compression_trigger_tokens
        assert conn.compression.target_tokens == config.compression_target_tokens


async def test_a_warm_standby_copies_the_adk_state_again_only_when_it_changed() -> None:
    copies: list[int] = []  # the connection each get_session was for (-1: a standby not yet armed)

    class Counting(BoundedSessionService):
        async def get_session(self, **kwargs: Any) -> Any:
            link = _LINK.get(None)
            copies.append(link.connection_id if link is not None else 0)
            return await super().get_session(**kwargs)

    standby_ready = asyncio.Event()

    async def first(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update("h-1")
        await standby_ready.wait()
        await conn.send_go_away("20s")
        await conn.wait_closed()

    async with FakeLiveServer(scripts=[first, setup_only]) as server:
        agent = LlmAgent(
            name="interviewer", model=live_model(MODEL, server.genai_client()), instruction="x"
        )
        runner = Runner(
            app_name="voicefsm", agent=agent, session_service=Counting(), auto_create_session=True
        )
        upstream = StandbyPrepared(agent, runner=runner)
        async with Rig(server, upstream=upstream) as rig:
            async with asyncio.timeout(10):
                await upstream.standby_prepared.wait()
            standby_ready.set()
            await rig.wait_state("live", count=2)
            record = await rig.end()
        assert not upstream_tasks()
    assert record.stats.resumes == 1
    # One copy per run_live start-up (connection 1, then the standby that became connection 2);
    # the state never changed, so the standby took no second copy when it connected.
    assert copies[:2] == [1, -1]
    assert 2 not in copies


async def test_client_sends_that_suspend_or_not_all_arrive_in_order() -> None:
    class SometimesSlow(MemoryChannel):
        async def send_audio(self, data: bytes) -> None:
            if data[0] % 2:
                await asyncio.sleep(0)  # suspends: finished under the send timeout
            await super().send_audio(data)

    async def talks(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        for n in range(20):
            await conn.send_model_audio(bytes([n]) * 480)
        await conn.send_turn_complete()
        await conn.wait_closed()

    channel = SometimesSlow()
    async with FakeLiveServer(scripts=[talks]) as server:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="x")
        host = SessionHost(
            Session(fast_config()), AdkUpstream(agent, client=server.genai_client()), client=channel
        )
        task = asyncio.create_task(host.run())
        async with asyncio.timeout(10):
            await channel.wait_for(lambda c: len(c.audio) == 20)
        channel.push(ev.ClientEnd())
        record = await asyncio.wait_for(task, 15)
    assert [chunk[0] for chunk in channel.audio] == list(range(20))
    assert record.end_reason is EndReason.USER_ENDED
    assert record.client_connected  # no send was taken for a failure


def _audio_wire_keys(conn: FakeLiveConnection) -> set[str]:
    """How the client's audio frames were spelled: ``audio`` or ``mediaChunks``."""
    keys: set[str] = set()
    for frame in conn.frames_received:
        realtime = frame.get("realtimeInput") or frame.get("realtime_input")
        if isinstance(realtime, dict):
            keys.update(key for key in ("audio", "mediaChunks", "media_chunks") if key in realtime)
    return keys


@pytest.mark.parametrize("wire", ["direct", "adk"])
async def test_audio_and_text_turns_reach_the_model_in_order_on_either_wire(wire: Any) -> None:
    async with FakeLiveServer(scripts=[setup_only]) as server:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        upstream = AdkUpstream(agent, client=server.genai_client(), wire=wire)
        assert upstream.wire == wire
        async with Rig(server, upstream=upstream) as rig:
            await rig.wait_state("live")
            conn = server.connections[0]
            rig.send_audio(20)
            await conn.wait_for_audio_chunks(20)
            # One burst: the text turn is queued for ADK between chunks the host may write itself.
            rig.send_audio(10)
            rig.channel.push(ev.ClientText("hello"))
            rig.send_audio(10)
            await conn.wait_for_audio_chunks(40)
            await conn.wait_for_text_inputs(1)
            await rig.end()
    kinds = [e.kind for e in conn.timeline if e.kind in ("audio", "text")]
    assert kinds == ["audio"] * 30 + ["text"] + ["audio"] * 10
    assert sequence_numbers([conn]) == list(range(40))
    assert _audio_wire_keys(conn) == ({"audio"} if wire == "direct" else {"mediaChunks"})


async def test_the_direct_wire_leaves_audio_to_adk_where_adk_needs_it() -> None:
    async def listen(input_stream: LiveRequestQueue) -> AsyncIterator[str]:
        """A streaming tool: ADK copies the live audio to it."""
        yield "listening"

    def client() -> genai.Client:
        return genai.Client(api_key="unused")  # never connects

    plain = LlmAgent(name="interviewer", model=MODEL, instruction="x")
    streaming_tool = LlmAgent(name="interviewer", model=MODEL, instruction="x", tools=[listen])
    parent = LlmAgent(name="lead", model=MODEL, instruction="x", sub_agents=[streaming_tool])
    assert AdkUpstream(plain, client=client()).wire == "direct"
    assert AdkUpstream(streaming_tool, client=client()).wire == "adk"
    assert AdkUpstream(parent, client=client()).wire == "adk"
    saving = RunConfig(save_live_blob=True)
    assert AdkUpstream(plain, client=client(), run_config=saving).wire == "adk"
    with pytest.raises(ValueError, match="wire"):
        AdkUpstream(plain, client=client(), wire="genai")  # type: ignore[arg-type]


class _ReportOrderUpstream(AdkUpstream):
    """An ADK upstream that writes each connection's ready and model-audio reports into a list."""

    def __init__(self, *args: Any, happened: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.happened = happened

    def open(self, *, connection_id: int, report: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        def noted(event: ev.Event) -> None:
            if isinstance(event, ev.UpstreamReady):
                self.happened.append(f"ready #{connection_id}")
            elif isinstance(event, ev.ModelAudio):
                self.happened.append(f"audio #{connection_id}")
            report(event)

        return super().open(connection_id=connection_id, report=noted, **kwargs)


async def test_the_session_goes_live_before_adk_reads_the_frames_after_setup_complete() -> None:
    async def burst(conn: FakeLiveConnection) -> None:
        # setupComplete and a model turn in one go: the turn is waiting on the client's socket
        # when the connect returns.
        await conn.send_setup_complete()
        for _ in range(3):
            await conn.send_model_audio(b"\x01\x00" * 480)
        await conn.send_turn_complete()
        await conn.wait_closed()

    happened: list[str] = []

    def on_note(note: Any) -> None:
        if isinstance(note, StateNote) and note.state is State.LIVE:
            happened.append("live")

    agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
    async with FakeLiveServer(script=burst) as server:
        upstream = _ReportOrderUpstream(agent, client=server.genai_client(), happened=happened)
        async with Rig(server, upstream=upstream, on_note=on_note) as rig:
            await rig.wait_state("live")
            async with asyncio.timeout(10):
                await rig.channel.wait_for(lambda channel: len(channel.audio) >= 3)
            await rig.end()
    # The buffered audio went out and the client was told before any later frame was reported.
    assert happened[:2] == ["ready #1", "live"]
    assert happened[2:] == ["audio #1"] * 3


class _SavesSink(MemorySink):
    """A memory sink that also keeps, per save, the state and the rotation counters saved."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[tuple[str, int, int]] = []

    async def save(self, record: SessionRecord) -> None:
        self.saved.append((record.state.value, record.stats.goaways, record.stats.resumes))
        await super().save(record)


async def goaway_after_three_chunks(conn: FakeLiveConnection) -> None:
    """Live with a handle; a GoAway once three client chunks arrived."""
    await conn.send_setup_complete()
    await conn.send_resumption_update("h-1")
    await conn.wait_for_audio_chunks(3)
    await conn.send_go_away("20s")
    await conn.wait_closed()


async def test_a_rotation_writes_its_record_once_the_new_connection_is_ready() -> None:
    scripts = [goaway_after_three_chunks, setup_only]
    async with FakeLiveServer(scripts=scripts) as server, Rig(server) as rig:
        sink = _SavesSink()
        rig.host.sink = sink
        stop = asyncio.Event()
        streamer = asyncio.create_task(streaming(rig, stop))
        second = await server.wait_for_connection(2, timeout=10)
        await rig.wait_state("live", count=2)
        # A warm rotation can finish within one 5 ms streaming step: stream on into it.
        await second.wait_for_audio_chunks(3)
        stop.set()
        await streamer
        await second.wait_for(lambda c: sequence_numbers([c])[-1:] == [rig.sent - 1], timeout=10)
        record = await rig.end()
    # No store write while the new connection was connecting: the rotation's record (resuming,
    # one GoAway, no resume yet) was superseded by the ready call's, which carries it.
    assert ("resuming", 1, 0) not in sink.saved
    assert ("live", 1, 1) in sink.saved
    assert sink.records[record.session_id].stats.goaways == 1
    assert_every_chunk_in_order_once_resent(server, rig.sent)


class _BrokenStoreSink(MemorySink):
    """A memory sink whose store goes down once ``broken`` is set."""

    broken = False

    async def save(self, record: SessionRecord) -> None:
        if self.broken:
            raise ConnectionError("the store is down")
        await super().save(record)


async def test_a_store_outage_with_a_rotation_write_owed_still_closes_everything() -> None:
    async def never_ready(conn: FakeLiveConnection) -> None:
        await conn.wait_closed()  # no setupComplete: the rotation's write stays owed

    scripts = [goaway_after_three_chunks, never_ready]
    async with FakeLiveServer(scripts=scripts) as server, Rig(server) as rig:
        sink = _BrokenStoreSink()
        rig.host.sink = sink
        rig.send_audio(5)
        await rig.wait_state("resuming")
        await server.wait_for_connection(2, timeout=10)
        sink.broken = True
        rig.host.detach("handed over")
        await rig.finish()
        # The owed write failed, and the host still closed both connections on its way out.
        assert not upstream_tasks()
        for conn in server.connections:
            await conn.wait_closed()


@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("client_of", ["upstream", "model"])
async def test_the_model_websocket_offers_deflate_only_when_asked(
    deflate: bool, client_of: str
) -> None:
    """Off by default: no extension is offered, none negotiated; ``model_deflate=True``:
    permessage-deflate. The choice reaches a client given to the upstream (when it is built)
    and one only the live model has (at connect). Audio flows both ways either way."""
    options = {"model_deflate": True} if deflate else {}
    async with FakeLiveServer(scripts=[listen_then_speak]) as server:
        if client_of == "upstream":
            agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
            upstream = AdkUpstream(agent, client=server.genai_client(), **options)
        else:
            model = live_model(MODEL, server.genai_client())
            agent = LlmAgent(name="interviewer", model=model, instruction="Interview.")
            upstream = AdkUpstream(agent, **options)
        async with Rig(server, upstream=upstream) as rig:
            await rig.wait_state("live")
            rig.send_audio(3)
            async with asyncio.timeout(10):
                await rig.channel.wait_for(lambda channel: bool(channel.audio))
            conn = server.connections[0]
            negotiated = [extension.name for extension in conn._require_ws().protocol.extensions]
            await rig.end()
    assert_deflate_offered(conn, negotiated, deflate)
    assert sequence_numbers([conn]) == [0, 1, 2]
    assert b"".join(rig.channel.audio) == INTERVIEWER_PCM


def test_upstreams_on_one_client_must_agree_on_model_deflate() -> None:
    from voicefsm.genai_live import GenaiUpstream

    shared = genai.Client(api_key="fake-key")
    agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
    AdkUpstream(agent, client=shared)
    GenaiUpstream(MODEL, client=shared)  # the same choice on the other upstream: fine
    with pytest.raises(ValueError, match=r"need a genai\.Client each"):
        AdkUpstream(agent, client=shared, model_deflate=True)
    with pytest.raises(ValueError, match=r"need a genai\.Client each"):
        GenaiUpstream(MODEL, client=shared, model_deflate=True)
    assert shared._api_client._websocket_ssl_ctx["compression"] is None
