"""Admission control: a busy worker refuses new sessions (1013) and keeps the ones it holds.

The lag is injected through the monitor's ``record`` and a manual clock, so nothing here depends
on how loaded the machine is; the service runs for real (uvicorn, websockets, the genai upstream
against the loopback fake).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from typing import Any

import pytest
from live_rig import starlette_service
from loopback import fast_config, free_port
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from voicefsm.admission import LoopLagMonitor, OverloadGuard, thread_cpu_demand_s
from voicefsm.auth import JWTAuthenticator
from voicefsm.genai_live import GenaiUpstream
from voicefsm.service import InterviewService
from voicefsm.testing import FakeLiveConnection, FakeLiveServer

SECRET = "test-secret-that-is-long-enough-for-hs256"
AUTH = JWTAuthenticator(SECRET)


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ManualCpu:
    """The loop thread's CPU time, as the test says it is."""

    def __init__(self) -> None:
        self.used = 0.0

    def __call__(self) -> float:
        return self.used


class InjectedLag(LoopLagMonitor):
    """A monitor fed by the test only: the machine's own load never reaches it."""

    def start(self) -> None:
        pass


def test_the_monitor_keeps_the_worst_lag_of_its_window() -> None:
    clock = ManualClock()
    monitor = LoopLagMonitor(interval_s=0.05, window_s=2.0, clock=clock, cpu_clock=ManualCpu())
    assert monitor.recent_max_s == 0.0
    monitor.record(0.004)
    clock.now += 0.5
    monitor.record(0.080)
    clock.now += 0.5
    monitor.record(-0.001)  # early wake-ups count as no lag
    assert monitor.recent_max_s == pytest.approx(0.080)
    clock.now += 1.6  # the 80 ms sample is now 2.1 s old
    assert monitor.recent_max_s == 0.0


def test_admission_refuses_on_lag_or_session_count_and_counts_refusals() -> None:
    clock = ManualClock()
    monitor = LoopLagMonitor(window_s=1.0, clock=clock, cpu_clock=ManualCpu())
    admission = OverloadGuard(0.025, max_sessions=3, monitor=monitor)
    assert admission.refusal(0) is None
    monitor.record(0.030)
    assert admission.refusal(0) == "event-loop lag over 25 ms in 100% of the last 1 s (worst 30 ms)"
    clock.now += 1.5
    assert admission.refusal(2) is None
    assert admission.refusal(3) == "3 sessions running (limit 3)"
    assert admission.refused == 2
    with pytest.raises(ValueError, match="max_lag_s must be positive"):
        OverloadGuard(0)
    with pytest.raises(ValueError, match="window_s must cover"):
        LoopLagMonitor(interval_s=1.0, window_s=0.5)


def test_a_single_stall_refuses_nobody_but_sustained_lag_does() -> None:
    clock = ManualClock()
    monitor = LoopLagMonitor(interval_s=0.05, window_s=2.0, clock=clock, cpu_clock=ManualCpu())
    admission = OverloadGuard(0.025, monitor=monitor)
    for step in range(40):  # one 2 s window: a single 200 ms stall among on-time samples
        monitor.record(0.200 if step == 10 else 0.002)
        clock.now += 0.05
    assert admission.refusal(0) is None
    for step in range(40):  # overloaded: every third sample is 40 ms late
        monitor.record(0.040 if step % 3 == 0 else 0.002)
        clock.now += 0.05
    why = admission.refusal(0)
    assert why is not None and "over 25 ms in 3" in why and "worst 40 ms" in why
    with pytest.raises(ValueError, match="late_fraction"):
        OverloadGuard(0.025, late_fraction=0)


def test_busy_share_is_cpu_time_over_wall_time_in_its_span() -> None:
    clock, cpu = ManualClock(), ManualCpu()
    monitor = LoopLagMonitor(interval_s=0.05, window_s=2.0, clock=clock, cpu_clock=cpu)
    assert monitor.busy_share(1.0) is None  # no sample yet
    monitor.record(0.0)
    assert monitor.busy_share(1.0) is None  # one sample spans no time
    for _ in range(20):  # 1 s at 30 % busy
        clock.now += 0.05
        cpu.used += 0.015
        monitor.record(0.0)
    assert monitor.busy_share(1.0) == pytest.approx(0.3)
    for _ in range(10):  # then 0.5 s at 90 %
        clock.now += 0.05
        cpu.used += 0.045
        monitor.record(0.0)
    assert monitor.busy_share(0.5) == pytest.approx(0.9)
    assert monitor.busy_share(1.0) == pytest.approx(0.6)  # half of each
    assert monitor.busy_share(2.0) == pytest.approx((0.3 + 0.45) / 1.5)  # all it holds
    clock.now += 2.5  # every sample expired
    assert monitor.busy_share(1.0) is None
    monitor.record(0.0, cpu_s=5.0)  # an explicit reading, as the sampling task takes it
    clock.now += 0.1
    monitor.record(0.0, cpu_s=5.1)
    assert monitor.busy_share(1.0) == pytest.approx(1.0)


def test_a_busy_loop_refuses_before_its_lag_shows_and_admits_once_it_eases() -> None:
    clock, cpu = ManualClock(), ManualCpu()
    monitor = LoopLagMonitor(interval_s=0.05, window_s=2.0, clock=clock, cpu_clock=cpu)
    guard = OverloadGuard(0.025, monitor=monitor, max_busy=0.8, busy_window_s=1.0)
    for _ in range(21):  # on time, but the thread is on the CPU 85 % of the time
        monitor.record(0.002)
        clock.now += 0.05
        cpu.used += 0.0425
    assert guard.refusal(50) == "event loop busy 85% of the last 1 s (limit 80%)"
    for _ in range(21):  # the same lag, 60 % busy: admitted
        monitor.record(0.002)
        clock.now += 0.05
        cpu.used += 0.03
    assert guard.refusal(50) is None
    assert guard.refused == 1
    unguarded = OverloadGuard(0.025, monitor=monitor, max_busy=None)
    cpu.used += 10.0  # however busy: that rule is off
    monitor.record(0.002)
    assert unguarded.refusal(50) is None
    with pytest.raises(ValueError, match="max_busy"):
        OverloadGuard(max_busy=1.5)
    with pytest.raises(ValueError, match="busy_window_s"):
        OverloadGuard(busy_window_s=3.0, monitor=LoopLagMonitor(window_s=2.0))


def test_sessions_still_starting_are_bounded() -> None:
    clock, cpu = ManualClock(), ManualCpu()
    monitor = LoopLagMonitor(clock=clock, cpu_clock=cpu)
    guard = OverloadGuard(monitor=monitor, max_starting=4)
    assert guard.refusal(10, 3) is None
    assert guard.refusal(10, 4) == "4 session(s) still starting (limit 4)"
    assert OverloadGuard(monitor=monitor, max_starting=None).refusal(10, 400) is None
    with pytest.raises(ValueError, match="max_starting"):
        OverloadGuard(max_starting=0)


def test_the_lag_rule_still_refuses_an_idle_thread_on_a_stolen_core() -> None:
    # A neighbour holding the core: this thread is hardly on the CPU, but its timers are late.
    clock, cpu = ManualClock(), ManualCpu()
    monitor = LoopLagMonitor(interval_s=0.05, window_s=2.0, clock=clock, cpu_clock=cpu)
    guard = OverloadGuard(0.025, monitor=monitor)
    for _ in range(40):
        monitor.record(0.060)
        clock.now += 0.05
        cpu.used += 0.005
    why = guard.refusal(5)
    assert why is not None and why.startswith("event-loop lag over 25 ms in 100%")


def test_the_cpu_demand_of_a_thread_counts_at_least_its_cpu_time() -> None:
    demand, cpu = thread_cpu_demand_s(), time.thread_time()
    while time.thread_time() - cpu < 0.1:  # work, on this thread, for 100 ms of CPU
        sum(range(1000))
    # Run time plus run-queue wait, so never less than the CPU time (the kernel's run-time
    # figure may trail by a scheduler tick: a generous margin).
    assert thread_cpu_demand_s() - demand >= 0.05


def block_the_loop(seconds: float) -> None:
    """Hold the event loop, as a worker past its capacity does."""
    time.sleep(seconds)


async def test_the_monitor_measures_a_blocked_loop() -> None:
    monitor = LoopLagMonitor(interval_s=0.01, window_s=5.0)
    monitor.start()
    try:
        await asyncio.sleep(0.03)
        blocked_s = 0.12
        block_the_loop(blocked_s)
        await asyncio.sleep(0.03)
        assert monitor.recent_max_s >= blocked_s * 0.5
    finally:
        await monitor.stop()


async def live_until_closed(conn: FakeLiveConnection) -> None:
    await conn.send_setup_complete()
    await conn.send_resumption_update(f"h-{conn.number}")
    await conn.wait_closed(timeout=None)


async def next_json(ws: ClientConnection, kind: str, within: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(within):
        while True:
            frame = await ws.recv()
            if isinstance(frame, str) and json.loads(frame).get("type") == kind:
                message: dict[str, Any] = json.loads(frame)
                return message


async def open_client(url: str, user: str) -> ClientConnection:
    return await connect(url, subprotocols=["voicefsm.v1", f"bearer.{AUTH.issue(user)}"])  # type: ignore[list-item]


async def test_a_busy_worker_refuses_new_sessions_with_1013_and_keeps_the_running_one() -> None:
    clock = ManualClock()
    monitor = InjectedLag(window_s=2.0, clock=clock, cpu_clock=ManualCpu())
    admission = OverloadGuard(0.025, monitor=monitor)
    async with FakeLiveServer(script=live_until_closed) as fake:
        upstream = GenaiUpstream("gemini-live", client=fake.genai_client())
        service = InterviewService(upstream, AUTH, config=fast_config(), overload=admission)
        async with starlette_service(service, free_port()) as url:
            running = await open_client(url, "alice")
            await next_json(running, "session_created")
            assert (await next_json(running, "session_state"))["state"] == "live"

            monitor.record(0.060)  # the loop fell 60 ms behind
            refused = await open_client(url, "bob")
            error = await next_json(refused, "error")
            assert error["code"] == "server_busy"
            assert "worst 60 ms" in error["message"]
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(refused.recv(), 10)
            assert refused.close_code == 1013
            assert refused.close_reason == "server busy, retry"
            assert len(service.sessions) == 1

            # The running interview is untouched: its audio still reaches the model.
            for seq in range(5):
                await running.send(struct.pack(">I", seq) + bytes(636))
            await fake.connections[0].wait_for_audio_chunks(5)

            clock.now += 2.5  # the lag is over: admission resumes
            admitted = await open_client(url, "carol")
            await next_json(admitted, "session_created")
            assert len(service.sessions) == 2
            assert admission.refused == 1
            await running.close()
            await admitted.close()


async def test_a_worker_with_sessions_still_starting_refuses_more_with_1013() -> None:
    setup = asyncio.Event()

    async def slow_setup(conn: FakeLiveConnection) -> None:
        await setup.wait()  # the first session stays in `connecting` until the test says
        await live_until_closed(conn)

    monitor = InjectedLag(window_s=2.0, clock=ManualClock(), cpu_clock=ManualCpu())
    admission = OverloadGuard(0.025, monitor=monitor, max_starting=1)
    async with FakeLiveServer(script=slow_setup) as fake:
        upstream = GenaiUpstream("gemini-live", client=fake.genai_client())
        service = InterviewService(
            upstream, AUTH, config=fast_config(connect_timeout_s=60), overload=admission
        )
        async with starlette_service(service, free_port()) as url:
            starting = await open_client(url, "alice")
            await next_json(starting, "session_created")

            refused = await open_client(url, "bob")
            error = await next_json(refused, "error")
            assert error == {
                "type": "error",
                "code": "server_busy",
                "message": "1 session(s) still starting (limit 1)",
            }
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(refused.recv(), 10)
            assert (refused.close_code, refused.close_reason) == (1013, "server busy, retry")

            setup.set()  # the first one goes live: the next is admitted
            assert (await next_json(starting, "session_state"))["state"] == "live"
            admitted = await open_client(url, "carol")
            await next_json(admitted, "session_created")
            assert len(service.sessions) == 2
            assert admission.refused == 1
            await starting.close()
            await admitted.close()
