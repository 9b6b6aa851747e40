"""Benchmarks for the voicefsm session engine, as ratios against a floor measured in the same run.

Run from the repository root::

    python benchmarks/bench_engine.py                     # default run (~20 s)
    python benchmarks/bench_engine.py --quick             # a few seconds, noisier
    python benchmarks/bench_engine.py --markdown docs/benchmarks.md
    python benchmarks/bench_engine.py --profile state-change   # cProfile one workload

Every timed figure is the median over several repeats; in each repeat the engine and its floor
(baseline) are measured back to back, in alternating order, so that a noisy neighbour on a shared
machine slows both. Nothing here asserts an absolute number: the table says whether each target
is met, and the ratio column says how far the engine is from the floor on this machine.

What is measured (the module constants below give the sizes):

1. ``session.handle(ClientAudio(chunk), now)`` and ``session.handle(ModelAudio(chunk), now)`` in
   state ``live`` with the production default config, ``now`` advancing 20 ms per call, so the
   heartbeat ping timer fires on its own every 15 s of virtual time. A fresh session serves each
   batch of 2,000 calls (40 s of virtual time, under the 45 s client heartbeat timeout, which
   interviewer audio alone does not reset). Floor: a ``__slots__`` session that looks its handler
   up by ``type(event)`` in a dict, calls it, and returns a one-element list holding a frozen
   dataclass, driven by the same loop with a ``__slots__`` event.
2. ``Session(config)`` and ``Session(config).start(now)``. Floor: a plain ``__slots__`` object
   with as many attributes as ``Session``.
3. Memory per started session: tracemalloc over 10,000 sessions kept alive (the effects
   ``start()`` returned are dropped, as a host would after carrying them out; the config is
   shared), and the source lines that allocate it. Floor: the same ``__slots__`` object.
4. A state change: ``live -> resuming -> live`` through ``UpstreamClosed(1011)`` and
   ``UpstreamReady``, divided by two. It includes everything the engine builds for a change
   (``StateChanged``, a ``SessionStateMessage`` for the client, a ``PersistRecord`` snapshot,
   the ``OpenUpstream`` of the resume). Also the bare ``transitions`` trigger on a minimal model,
   the pieces a change builds timed alone, and ablations: the same benchmark with
   ``Session._trigger`` or ``Session._save_now`` swapped out in this process only (the library is
   not modified), paired with the unmodified engine in every repeat. Floor: a dict
   ``(state, trigger) -> dest`` transition in the same dispatch as (1).
5. ``voicefsm.simulate.simulate("interview", seed=7)``: wall time (GC on) and engine calls per
   second. Floor: the dispatch floor of (1) driven for the same number of calls.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import linecache
import os
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any

import pydantic
import pydantic_core
import transitions
from _harness import write_heading_section

import voicefsm
from voicefsm import Session, SessionConfig, State
from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.machine import MACHINE, TRANSITIONS
from voicefsm.protocol import SessionStateMessage
from voicefsm.simulate import Simulation, simulate

T0 = 1_800_000_000.0
"""Start of virtual time (an epoch second, like production)."""
STEP = 0.02
"""Audio cadence: ``now`` advances 20 ms per event."""
CLIENT_CHUNK = bytes(640)  # 20 ms of 16 kHz 16-bit mono
MODEL_CHUNK = bytes(960)  # 20 ms of 24 kHz 16-bit mono
CONFIG = SessionConfig()
"""Production defaults: 15 s heartbeat interval, 45 s heartbeat timeout, 45 min limit."""

AUDIO_BATCH = 2_000
"""Calls per fresh session: 40 s of virtual time, under the 45 s heartbeat timeout."""
RESUME_BATCH = 500
"""``live -> resuming -> live`` cycles per fresh session (20 s of virtual time)."""
KIB = 1024
TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    repeats: int  # repeats of every micro-benchmark
    audio_batches: int  # fresh sessions (of AUDIO_BATCH calls) per repeat
    create_n: int  # sessions created per repeat
    memory_n: int  # sessions kept alive for the memory figure
    memory_repeats: int
    resume_batches: int  # fresh sessions (of RESUME_BATCH cycles) per repeat
    trigger_n: int
    sim_repeats: int


DEFAULT = Plan(
    repeats=11,
    audio_batches=25,
    create_n=20_000,
    memory_n=10_000,
    memory_repeats=3,
    resume_batches=8,
    trigger_n=20_000,
    sim_repeats=9,
)
QUICK = Plan(
    repeats=3,
    audio_batches=5,
    create_n=3_000,
    memory_n=2_000,
    memory_repeats=1,
    resume_batches=2,
    trigger_n=3_000,
    sim_repeats=2,
)


# --------------------------------------------------------------------------- the floor


class FloorAudio:
    """The floor's audio event: a ``__slots__`` object."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class FloorClosed:
    __slots__ = ("code", "connection_id")

    def __init__(self, code: int | None, connection_id: int | None = None) -> None:
        self.code = code
        self.connection_id = connection_id


class FloorReady:
    __slots__ = ("connection_id",)

    def __init__(self, connection_id: int | None = None) -> None:
        self.connection_id = connection_id


@dataclass(frozen=True, slots=True)
class FloorEffect:
    """The floor's one effect: a small frozen dataclass."""

    data: Any


FLOOR_TABLE: dict[tuple[str, str], str] = {
    ("live", "lose_upstream"): "resuming",
    ("resuming", "ready"): "live",
    ("live", "warn"): "warning",
}
"""The floor's transition table: ``(state, trigger) -> dest``."""


class FloorSession:
    """Dict dispatch on ``type(event)``, minimal work, one frozen-dataclass effect."""

    __slots__ = ("last_seen", "state")

    def __init__(self) -> None:
        self.state = "live"
        self.last_seen = 0.0

    def handle(self, event: Any, now: float) -> list[FloorEffect]:
        return FLOOR_HANDLERS[type(event)](self, event, now)

    def _on_audio(self, event: FloorAudio, now: float) -> list[FloorEffect]:
        self.last_seen = now
        return [FloorEffect(event.data)]

    def _on_closed(self, event: FloorClosed, now: float) -> list[FloorEffect]:
        self.state = FLOOR_TABLE[(self.state, "lose_upstream")]
        return [FloorEffect(self.state)]

    def _on_ready(self, event: FloorReady, now: float) -> list[FloorEffect]:
        self.state = FLOOR_TABLE[(self.state, "ready")]
        return [FloorEffect(self.state)]


FLOOR_HANDLERS: dict[type, Callable[[FloorSession, Any, float], list[FloorEffect]]] = {
    FloorAudio: FloorSession._on_audio,
    FloorClosed: FloorSession._on_closed,
    FloorReady: FloorSession._on_ready,
}


class TriggerModel:
    """The smallest model the shared ``MACHINE`` can drive (it calls ``_after_state_change``)."""

    __slots__ = ("state", "warning_given")

    def __init__(self) -> None:
        self.state = State.LIVE
        self.warning_given = False

    def _after_state_change(self, event_data: Any) -> None:
        pass

    def after(self, kwargs: dict[str, Any]) -> None:
        pass


def floor_trigger(model: TriggerModel, trigger: str, **kwargs: Any) -> None:
    """The floor's state change: one dict lookup, one assignment, one after-callback."""
    model.state = FLOOR_TABLE[(model.state, trigger)]  # type: ignore[assignment]
    model.after(kwargs)


FloorSlots = make_dataclass(
    "FloorSlots", [(name, Any, None) for name in Session.__slots__], slots=True
)
"""A plain ``__slots__`` class with as many attributes as :class:`Session`."""


# --------------------------------------------------------------------------- timing helpers


def timed(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds ``fn(*args)`` takes, with the cyclic GC off (as ``timeit`` does)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start
    finally:
        if was_enabled:
            gc.enable()


def paired(
    repeats: int, engine: Callable[[], float], floor: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run engine and floor measurements back to back ``repeats`` times, alternating order."""
    engine_values: list[float] = []
    floor_values: list[float] = []
    for repeat in range(repeats):
        if repeat % 2:
            floor_values.append(floor())
            engine_values.append(engine())
        else:
            engine_values.append(engine())
            floor_values.append(floor())
        gc.collect()
    return engine_values, floor_values


@dataclass
class Row:
    """One line of the results table."""

    metric: str
    values: list[float]  # one per repeat (seconds, bytes, or calls/s)
    baseline_values: list[float]
    unit: str  # "s", "B" or "calls/s"
    target: str
    limit: float | None = None  # the target, in ``unit``; ``None``: informational
    limit_on_ratio: bool = False  # the target bounds the ratio, not the value
    higher_is_better: bool = False

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def baseline(self) -> float:
        return statistics.median(self.baseline_values)

    @property
    def ratio(self) -> float:
        """How many times the floor's cost (for a rate: floor rate / rate)."""
        if self.higher_is_better:
            return self.baseline / self.value
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.limit is None:
            return None
        measured = self.ratio if self.limit_on_ratio else self.value
        return measured <= self.limit


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.3g} µs"
        if value < 1:
            return f"{value * 1e3:.3g} ms"
        return f"{value:.3g} s"
    if unit == "B":
        return f"{value / KIB:.2f} KiB" if value >= KIB else f"{value:.0f} B"
    if unit == "calls/s":
        return f"{value / 1e6:.2f} M calls/s" if value >= 1e6 else f"{value / 1e3:.0f} k calls/s"
    return f"{value:.3g} {unit}"


def met_text(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**NO**")


# --------------------------------------------------------------------------- workloads


def live_session(index: int) -> Session:
    """A started session whose first upstream is ready: state ``live`` at ``T0 + 0.05``."""
    session = Session(CONFIG, session_id=f"bench-{index}", seed=index)
    opened = [e for e in session.start(T0) if isinstance(e, fx.OpenUpstream)]
    session.handle(ev.UpstreamReady(connection_id=opened[-1].connection_id), T0 + 0.05)
    assert session.state is State.LIVE, session.state
    return session


def resumable_session(index: int) -> tuple[Session, int]:
    """A live session mid-conversation holding a resumption handle; and its connection id."""
    session = Session(CONFIG, session_id=f"bench-resume-{index}", seed=index)
    opened = [e for e in session.start(T0) if isinstance(e, fx.OpenUpstream)]
    connection = opened[-1].connection_id
    session.handle(ev.UpstreamReady(connection_id=connection), T0 + 0.05)
    session.handle(ev.ModelAudio(MODEL_CHUNK), T0 + 0.06)  # the conversation has started
    session.handle(ev.ResumptionUpdate("bench-handle", True), T0 + 0.07)
    assert session.state is State.LIVE, session.state
    return session, connection


def drive_audio(handle: Callable[[Any, float], Any], event: type, data: bytes, n: int) -> None:
    """The audio loop, identical for the engine and the floor."""
    now = T0 + 0.1
    for _ in range(n):
        now += STEP
        handle(event(data), now)


def drive_resume_cycles(
    handle: Callable[[Any, float], Any], closed: type, ready: type, cycles: int, connection: int
) -> None:
    """``live -> resuming -> live`` ``cycles`` times: a 1011 close, then the new connection."""
    now = T0 + 0.1
    for _ in range(cycles):
        now += STEP
        handle(closed(1011, connection_id=connection), now)
        connection += 1  # the resume opened the next connection id
        now += STEP
        handle(ready(connection_id=connection), now)


def drive_trigger(trigger: Callable[..., Any], model: TriggerModel, n: int) -> None:
    now = T0
    live = State.LIVE
    for _ in range(n):
        model.state = live
        now += STEP
        trigger(model, now=now, why="bench", previous=live)


def drive_floor_trigger(model: TriggerModel, n: int) -> None:
    now = T0
    live = State.LIVE
    for _ in range(n):
        model.state = live
        now += STEP
        floor_trigger(model, "warn", now=now, why="bench", previous=live)


def repeat_call(fn: Callable[[], Any], n: int) -> None:
    for _ in range(n):
        fn()


def create_sessions(n: int) -> None:
    config = CONFIG
    for _ in range(n):
        Session(config)


def create_and_start_sessions(n: int) -> None:
    config = CONFIG
    for _ in range(n):
        Session(config).start(T0)


def create_floor(n: int) -> None:
    cls = FloorSlots
    for _ in range(n):
        cls()


def bytes_per_object(make: Callable[[int], Any], n: int) -> float:
    """Traced bytes still allocated per object after making ``n`` and keeping them alive."""
    keep: list[Any] = [None] * n
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(n):
            keep[index] = make(index)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del keep
    gc.collect()
    return (after - before) / n


def memory_breakdown(n: int, top: int = 6) -> list[tuple[str, float]]:
    """Where a started session's bytes are allocated: (source line, bytes per session)."""
    keep: list[Any] = [None] * n
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for index in range(n):
            keep[index] = started_session(index)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    del keep
    gc.collect()
    out = []
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip().replace("|", "\\|")
        where = "/".join(Path(frame.filename).parts[-2:])
        out.append((f"`{where}:{frame.lineno}` `{code}`", stat.size_diff / n))
    return out


def started_session(index: int) -> Session:
    session = Session(CONFIG)
    session.start(T0)  # the effects are dropped, as a host does once it carried them out
    return session


class CountingSession(Session):
    """A session that counts the engine calls a simulation makes."""

    __slots__ = ("calls",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def start(self, now: float) -> list[fx.Effect]:
        self.calls += 1
        return super().start(now)

    def handle(self, event: ev.Event, now: float) -> list[fx.Effect]:
        self.calls += 1
        return super().handle(event, now)


def count_simulation_calls() -> int:
    """Engine calls (``start`` + ``handle``) in ``simulate("interview", seed=7)``, exactly."""
    reference = simulate("interview", seed=7)
    sim = Simulation("interview", seed=7)
    counting = CountingSession(sim.session.config, session_id=sim.session.session_id, seed=7)
    sim.session = counting
    result = sim.run()
    same = (result.end_reason, result.stats, result.client_chunks_sent) == (
        reference.end_reason,
        reference.stats,
        reference.client_chunks_sent,
    )
    assert same, "the counting run diverged from simulate(); the call count would be wrong"
    return counting.calls


def time_simulation() -> float:
    """Wall time of one ``simulate("interview", seed=7)``, GC on (an end-to-end figure)."""
    start = time.perf_counter()
    simulate("interview", seed=7)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- the benchmarks


def noop_handle(event: Any, now: float) -> None:
    """What the audio loop costs with no session at all: the loop, the event, one call."""


def bench_audio(plan: Plan, name: str, event: type, data: bytes) -> Row:
    calls = plan.audio_batches * AUDIO_BATCH

    def engine() -> float:
        sessions = [live_session(i) for i in range(plan.audio_batches)]
        total = sum(timed(drive_audio, s.handle, event, data, AUDIO_BATCH) for s in sessions)
        for session in sessions:  # the batch stayed live and the client stayed attached
            assert session.state is State.LIVE, session.state
            assert session.client_connected
        return total / calls

    def floor() -> float:
        floors = [FloorSession() for _ in range(plan.audio_batches)]
        total = sum(timed(drive_audio, f.handle, FloorAudio, data, AUDIO_BATCH) for f in floors)
        return total / calls

    values, baseline = paired(plan.repeats, engine, floor)
    return Row(
        f"`handle({name}(chunk), now)` in `live`",
        values,
        baseline,
        "s",
        f"≤ 3{TIMES} baseline",
        limit=3.0,
        limit_on_ratio=True,
    )


def bench_create(plan: Plan) -> list[Row]:
    n = plan.create_n

    def floor() -> float:
        return timed(create_floor, n) / n

    created, floor_a = paired(plan.repeats, lambda: timed(create_sessions, n) / n, floor)
    started, floor_b = paired(plan.repeats, lambda: timed(create_and_start_sessions, n) / n, floor)
    target = "≤ 100 µs"
    return [
        Row("`Session(config)`", created, floor_a, "s", target, limit=100e-6),
        Row("`Session(config).start(now)`", started, floor_b, "s", target, limit=100e-6),
    ]


def bench_memory(plan: Plan) -> Row:
    n = plan.memory_n
    values, baseline = paired(
        plan.memory_repeats,
        lambda: bytes_per_object(started_session, n),
        lambda: bytes_per_object(lambda index: FloorSlots(), n),
    )
    return Row(
        f"memory per started session (N={n:,})",
        values,
        baseline,
        "B",
        "≤ 1 KiB",
        limit=KIB,
    )


def state_change_once(plan: Plan) -> float:
    """Seconds per state change over ``plan.resume_batches`` fresh sessions (one repeat)."""
    prepared = [resumable_session(i) for i in range(plan.resume_batches)]
    total = 0.0
    for session, connection in prepared:
        total += timed(
            drive_resume_cycles,
            session.handle,
            ev.UpstreamClosed,
            ev.UpstreamReady,
            RESUME_BATCH,
            connection,
        )
    for session, _ in prepared:  # every cycle resumed and came back live
        assert session.state is State.LIVE, session.state
        assert session.stats.resumes == RESUME_BATCH, session.stats.resumes
    return total / (plan.resume_batches * RESUME_BATCH * 2)


def bench_state_change(plan: Plan) -> Row:
    changes = plan.resume_batches * RESUME_BATCH * 2

    def engine() -> float:
        return state_change_once(plan)

    def floor() -> float:
        floors = [FloorSession() for _ in range(plan.resume_batches)]
        total = sum(
            timed(drive_resume_cycles, f.handle, FloorClosed, FloorReady, RESUME_BATCH, 1)
            for f in floors
        )
        return total / changes

    values, baseline = paired(plan.repeats, engine, floor)
    return Row(
        "engine call that changes state, `live → resuming → live` ÷ 2 (all effects included)",
        values,
        baseline,
        "s",
        "info (see below)",
    )


def bench_trigger(plan: Plan) -> Row:
    n = plan.trigger_n
    trigger = MACHINE.events["warn"].trigger

    def engine() -> float:
        model = TriggerModel()
        elapsed = timed(drive_trigger, trigger, model, n)
        assert model.state is State.WARNING, model.state
        return elapsed / n

    def floor() -> float:
        model = TriggerModel()
        return timed(drive_floor_trigger, model, n) / n

    values, baseline = paired(plan.repeats, engine, floor)
    return Row(
        'state change on the shared machine: `MACHINE.events["warn"].trigger(model, …)`',
        values,
        baseline,
        "s",
        "≤ 15 µs",
        limit=15e-6,
    )


def bench_breakdown(plan: Plan) -> list[tuple[str, list[float]]]:
    """Per-call cost of the pieces every state change builds, for the breakdown table."""
    n = plan.trigger_n
    session, _ = resumable_session(0)
    live = State.LIVE
    now = T0 + 1.0
    pieces: list[tuple[str, Callable[[], Any]]] = [
        ("`session.snapshot()` (the `PersistRecord` payload)", session.snapshot),
        (
            "`SessionStateMessage(...)` (pydantic, for the client)",
            lambda: SessionStateMessage(state=live, remaining_s=600.0),
        ),
        ("`StateChanged(...)` (frozen dataclass)", lambda: fx.StateChanged(live, live, "x", now)),
    ]
    out = []
    for label, fn in pieces:
        values = [timed(repeat_call, fn, n) / n for _ in range(plan.repeats)]
        out.append((label, values))
    return out


def bench_loop_overhead(plan: Plan) -> list[float]:
    """Per-call cost of the audio loop itself (event built, a no-op function called)."""
    calls = plan.audio_batches * AUDIO_BATCH
    return [
        timed(drive_audio, noop_handle, FloorAudio, CLIENT_CHUNK, calls) / calls
        for _ in range(plan.repeats)
    ]


class _EventData:
    """What ``Session._after_state_change`` reads from ``transitions``' ``EventData``."""

    __slots__ = ("kwargs",)

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs


def compile_table() -> dict[tuple[str, State], list[tuple[State, list[str], list[str]]]]:
    """``voicefsm.machine.TRANSITIONS`` as ``(trigger, source) -> [(dest, conditions, unless)]``."""

    def names(value: str | list[str] | None) -> list[str]:
        return [] if value is None else [value] if isinstance(value, str) else list(value)

    table: dict[tuple[str, State], list[tuple[State, list[str], list[str]]]] = {}
    for declared in TRANSITIONS:
        sources = declared["source"]
        for source in sources if isinstance(sources, list) else [sources]:
            table.setdefault((declared["trigger"], source), []).append(
                (declared["dest"], names(declared.get("conditions")), names(declared.get("unless")))
            )
    return table


TABLE = compile_table()


def table_trigger(self: Session, trigger: str, now: float, why: str) -> None:
    """Ablation: ``Session._trigger`` as a dict lookup over the same declarations."""
    previous = self.state
    for dest, conditions, unless in TABLE[(trigger, previous)]:
        if all(getattr(self, name) for name in conditions) and not any(
            getattr(self, name) for name in unless
        ):
            self.state = dest
            self._after_state_change(_EventData({"now": now, "why": why, "previous": previous}))
            return


@contextmanager
def patched(**members: Any) -> Iterator[None]:
    """Replace ``Session`` members for the ablations (benchmark process only), then restore."""
    saved = {name: Session.__dict__[name] for name in members}
    for name, value in members.items():
        setattr(Session, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(Session, name, value)


def one_cycle_effects() -> list[tuple[type, ...]]:
    """The effect types of one resume cycle, to check an ablation changes nothing else."""
    session, connection = resumable_session(0)
    closed = session.handle(ev.UpstreamClosed(1011, connection_id=connection), T0 + 1)
    ready = session.handle(ev.UpstreamReady(connection_id=connection + 1), T0 + 1.1)
    assert session.state is State.LIVE, session.state
    return [tuple(type(e) for e in closed), tuple(type(e) for e in ready)]


def bench_ablations(plan: Plan) -> list[tuple[str, list[float]]]:
    """The state change with parts of the engine swapped out: per repeat, ablated ÷ as is.

    Each repeat times the engine as is and every variant back to back (in rotating order), so
    the ratios hold on a machine whose speed drifts.
    """
    reference = one_cycle_effects()
    with patched(_trigger=table_trigger):
        assert one_cycle_effects() == reference, "the table trigger changed the effects"
    no_persist = lambda self: None  # noqa: E731
    cases: list[tuple[str, dict[str, Any]]] = [
        ("as is", {}),
        (
            "`Session._trigger` as a dict lookup on `TRANSITIONS` (same effects)",
            {"_trigger": table_trigger},
        ),
        ("`Session._save_now` a no-op (no `PersistRecord` built)", {"_save_now": no_persist}),
        ("both", {"_trigger": table_trigger, "_save_now": no_persist}),
    ]
    ratios: list[list[float]] = [[] for _ in cases[1:]]
    for repeat in range(plan.repeats):
        order = list(range(len(cases)))
        order = order[repeat % len(order) :] + order[: repeat % len(order)]
        seconds: dict[int, float] = {}
        for index in order:
            with patched(**cases[index][1]):
                seconds[index] = state_change_once(plan)
            gc.collect()
        for index in range(1, len(cases)):
            ratios[index - 1].append(seconds[index] / seconds[0])
    return [(label, values) for (label, _), values in zip(cases[1:], ratios, strict=True)]


def bench_simulate(plan: Plan) -> tuple[list[Row], int]:
    calls = count_simulation_calls()

    def floor() -> float:
        return timed(drive_audio, FloorSession().handle, FloorAudio, CLIENT_CHUNK, calls)

    walls, floor_walls = paired(plan.sim_repeats, time_simulation, floor)
    rates = [calls / wall for wall in walls]
    floor_rates = [calls / wall for wall in floor_walls]
    rows = [
        Row(
            '`simulate("interview", seed=7)` wall time',
            walls,
            floor_walls,
            "s",
            "well under 1 s (≤ 0.5 s)",
            limit=0.5,
        ),
        Row(
            f"engine calls per second in that simulation ({calls:,} calls)",
            rates,
            floor_rates,
            "calls/s",
            "info",
            higher_is_better=True,
        ),
    ]
    return rows, calls


# --------------------------------------------------------------------------- reporting


@dataclass
class Report:
    rows: list[Row]
    breakdown: list[tuple[str, list[float]]]
    ablations: list[tuple[str, list[float]]]
    memory_lines: list[tuple[str, float]]
    loop_overhead: list[float]
    state_change: Row
    trigger: Row
    sim_calls: int
    plan: Plan
    quick: bool
    seconds: float
    load: tuple[float, float]  # 1-minute load average before and after the run


def machine_info() -> dict[str, str]:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = "unknown"
    try:
        usable = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        usable = "?"
    return {
        "platform": platform.platform(),
        "machine": platform.machine() or "?",
        "processor": platform.processor() or "?",
        "cpus": f"{os.cpu_count()} (usable: {usable})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "transitions": transitions.__version__,
        "pydantic": f"{pydantic.VERSION} (pydantic-core {pydantic_core.__version__})",
        "voicefsm": f"{voicefsm.__version__} (git {described})",
    }


def table_lines(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| metric | value | baseline | ratio | target | met? |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.metric} | {fmt(row.value, row.unit)} | {fmt(row.baseline, row.unit)} "
            f"| {row.ratio:.1f}{TIMES} | {row.target} | {met_text(row.met)} |"
        )
    return lines


def breakdown_lines(report: Report) -> list[str]:
    total = report.state_change.value
    lines = [
        "Pieces timed alone, each once per state change:",
        "",
        "| piece | median | share of one state change |",
        "| --- | ---: | ---: |",
    ]
    parts = [(report.trigger.metric + " (`transitions`)", report.trigger.values)]
    parts += report.breakdown
    for label, values in parts:
        median = statistics.median(values)
        lines.append(f"| {label} | {fmt(median, 's')} | {median / total:.0%} |")
    lines += [
        f"| **one state change, whole** | **{fmt(total, 's')}** | 100% |",
        "",
        "The same state-change benchmark with parts of `Session` swapped out in the benchmark "
        "process (ablations; the library is unchanged). Each repeat times the engine as is and "
        "every variant back to back, so the ratio is paired; the time is that ratio applied to "
        "the state-change median above:",
        "",
        f"| variant | ÷ as is (paired median) | per state change ({TIMES} the row above) | saves "
        "| target ≤ 15 µs |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| engine as is | 1.00 | {fmt(total, 's')} | — | {met_text(total <= 15e-6)} |",
    ]
    for label, values in report.ablations:
        ratio = statistics.median(values)
        estimate = ratio * total
        lines.append(
            f"| {label} | {ratio:.2f} | {fmt(estimate, 's')} | {fmt(total - estimate, 's')} "
            f"({1 - ratio:.0%}) | {met_text(estimate <= 15e-6)} |"
        )
    lines += [
        "",
        "The ≤ 15 µs target is read here as DESIGN.md reads a state change: the shared machine's "
        "trigger (the target row above, met). The whole engine call that changes state also "
        "snapshots the record for the store and tells the client, and costs more than 15 µs. "
        "Replacing the trigger with a dict lookup compiled from `TRANSITIONS` would bring it to "
        "about half; it is not done because DESIGN.md asks that state changes go through the "
        "`transitions` machine. A session changes state a few dozen times in 45 minutes, so "
        "neither figure matters next to audio at about 100 events per second.",
    ]
    return lines


def memory_lines(report: Report) -> list[str]:
    total = next(row.value for row in report.rows if row.unit == "B")
    lines = [
        "| allocated at | bytes per session | share |",
        "| --- | ---: | ---: |",
    ]
    for where, size in report.memory_lines:
        lines.append(f"| {where} | {size:.0f} B | {size / total:.0%} |")
    lines.append(f"| **all** | **{total:.0f} B** | 100% |")
    return lines


def audio_net_lines(report: Report) -> list[str]:
    overhead = statistics.median(report.loop_overhead)
    lines = [
        f"The audio loop itself (build a `__slots__` event, advance `now`, call a no-op "
        f"function) costs {fmt(overhead, 's')} per call; net of it:",
        "",
        "| event | engine, net | baseline, net | net ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in report.rows[:2]:
        net, floor_net = row.value - overhead, row.baseline - overhead
        lines.append(
            f"| {row.metric} | {fmt(net, 's')} | {fmt(floor_net, 's')} "
            f"| {net / floor_net:.1f}{TIMES} |"
        )
    return lines


def spread_lines(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| metric | engine min / median / max | baseline min / median / max | repeats |",
        "| --- | --- | --- | ---: |",
    ]
    for row in rows:

        def three(values: list[float], unit: str = row.unit) -> str:
            low, mid, high = min(values), statistics.median(values), max(values)
            return f"{fmt(low, unit)} / {fmt(mid, unit)} / {fmt(high, unit)}"

        lines.append(
            f"| {row.metric} | {three(row.values)} | {three(row.baseline_values)} "
            f"| {len(row.values)} |"
        )
    return lines


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


SECTION_HEADING = "## Engine micro-benchmarks (`bench_engine.py`)"
"""This script's section of the Markdown file; other benchmarks own other ``##`` sections."""
FILE_TITLE = "# Benchmarks"


def markdown(report: Report) -> str:
    info = machine_info()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    plan = report.plan
    missed = [row.metric for row in report.rows if row.met is False]
    lines = [
        SECTION_HEADING,
        "",
        "Generated by `benchmarks/bench_engine.py`; do not edit by hand, re-run the command "
        "(it replaces this section and leaves the rest of the file alone).",
        "",
        f"* **Reproduce:** `{command_line()}` (from the repository root)",
        f"* **Date:** {now}; the whole run took {report.seconds:.0f} s"
        + (" (`--quick`: fewer repeats, noisier)" if report.quick else ""),
        f"* **Machine:** {info['platform']}, {info['machine']}, CPUs: {info['cpus']}; "
        f"1-minute load average {report.load[0]:.2f} before the run, {report.load[1]:.2f} after "
        "(other work on the machine shifts absolute times; the paired ratios hold better)",
        f"* **Python:** {info['python']}",
        f"* **Libraries:** transitions {info['transitions']}, pydantic {info['pydantic']}, "
        f"voicefsm {info['voicefsm']}",
        f"* **Method:** medians of {plan.repeats} repeats ({plan.memory_repeats} for memory, "
        f"{plan.sim_repeats} for the simulation); engine and baseline are measured back to back "
        "in each repeat, in alternating order; cyclic GC off while timing (as `timeit`), except "
        "for the simulation's wall time. Numbers are from a shared, noisy 2-core class of "
        "machine: compare ratios, not absolute values, across machines.",
        "",
        "### Results",
        "",
        *table_lines(report.rows),
        "",
        "*ratio* is how many times the baseline's cost the engine pays (for the calls-per-second "
        "row: baseline rate ÷ engine rate, so it reads the same way).",
        "",
    ]
    if missed:
        lines += [
            "**Targets not met:** " + "; ".join(missed) + ". See *Where a state change's time "
            "goes* below and `python benchmarks/bench_engine.py --profile state-change`.",
            "",
        ]
    lines += [
        "### What each row measures",
        "",
        "* **audio**: `session.handle(ClientAudio(chunk), now)` / `handle(ModelAudio(chunk), "
        "now)` on a `live` session with the default `SessionConfig`, building the event in the "
        "loop, `now` advancing 20 ms per call so the 15 s heartbeat ping fires by itself (one "
        f"call in 750 takes the timer path). A fresh session serves each batch of {AUDIO_BATCH:,} "
        "calls (40 s of virtual time, under the 45 s heartbeat timeout that interviewer audio "
        f"alone does not reset); {plan.audio_batches * AUDIO_BATCH:,} calls per repeat. "
        "*Baseline*: the same loop over a `__slots__` session that looks its handler up by "
        "`type(event)` in a dict, calls it, and returns `[FrozenDataclass(event.data)]`, with a "
        "`__slots__` event. Both figures include the loop and event construction.",
        "* **`Session(config)`** includes `uuid4()` for the session id and the `__slots__` "
        "counters (`SessionCounters`; the resume buffer is only created during an outage); "
        "**`.start(now)`** adds the first `OpenUpstream`, its log entry (`Logged`) and a "
        "`PersistRecord` snapshot (a pydantic `SessionRecord`). *Baseline*: a plain `__slots__` "
        f"object with the same number of attributes ({len(Session.__slots__)}). "
        f"{plan.create_n:,} objects per repeat.",
        f"* **memory**: `tracemalloc` over {plan.memory_n:,} started sessions kept alive; the "
        "effects `start()` returned are dropped (a host drops them once carried out) and the "
        "`SessionConfig` is shared. A session with its own config adds that model's size. "
        "*Baseline*: the same `__slots__` object.",
        "* **state change**: `live → resuming → live` through `UpstreamClosed(1011, "
        "connection_id=…)` then `UpstreamReady(connection_id=…)` on a session that holds a "
        "resumption handle and has started its conversation, divided by two. Each change "
        "includes what the engine builds for it: `StateChanged`, a `SessionStateMessage` for "
        "the client, its event-log entries (`Logged`; the log reaches its 500-entry bound "
        "within the batch), a `PersistRecord` with a fresh `SessionRecord` snapshot (log "
        f"included), and (for the close) the `OpenUpstream` of the resume. {RESUME_BATCH} "
        "cycles per fresh session. "
        "*Baseline*: the dispatch floor above doing a dict `(state, trigger) → dest` "
        "transition.",
        '* **`transitions` trigger alone**: `MACHINE.events["warn"].trigger(model, now=…, '
        "why=…, previous=…)` on a two-slot model whose `_after_state_change` does nothing "
        "(resetting `model.state` each time). *Baseline*: a dict lookup, an assignment and one "
        "after-callback with the same keyword arguments.",
        '* **simulation**: `voicefsm.simulate.simulate("interview", seed=7)`, a 45-minute '
        f"interview in virtual time with GoAways, a drop, a refused reconnect and a client "
        f"refresh; {report.sim_calls:,} engine calls (`start` + `handle`, counted exactly in a "
        "separate run). The wall time includes the simulated upstream and client. *Baseline*: "
        "the audio dispatch floor's loop run for the same number of calls, in the same repeat.",
        "",
        "### Audio, net of the benchmark loop",
        "",
        *audio_net_lines(report),
        "",
        "### Where a state change's time goes",
        "",
        *breakdown_lines(report),
        "",
        "### Where a started session's memory goes",
        "",
        "The largest allocations still alive per session (`tracemalloc`, by source line):",
        "",
        *memory_lines(report),
        "",
        "### Spread over repeats",
        "",
        *spread_lines(report.rows),
        "",
        "### Compared with the reference table in DESIGN.md",
        "",
        "DESIGN.md measured a shared `Machine(model=None, …)` at 30 µs to create a session, "
        "~0.4 KiB per session, 0.06 µs for audio as a plain method and 8 µs per state change "
        "(the bare trigger), against a floor of 0.2 µs / 64 B / 0.12 µs / 0.13 µs.",
        "",
        "| DESIGN.md figure | DESIGN.md | this run |",
        "| --- | ---: | ---: |",
    ]
    by_metric = {row.metric: row for row in report.rows}
    create_row = by_metric["`Session(config)`"]
    memory_row = next(row for row in report.rows if row.unit == "B")
    audio_row = report.rows[0]
    lines += [
        f"| create a session | 30 µs | {fmt(create_row.value, 's')} (`Session(config)`) |",
        f"| memory per session | ~0.4 KiB | {fmt(memory_row.value, 'B')} (started) |",
        f"| audio event | 0.06 µs | {fmt(audio_row.value, 's')} (`ClientAudio`, whole "
        "`handle()` call) |",
        f"| state change (trigger) | 8 µs | {fmt(report.trigger.value, 's')} (bare trigger); "
        f"{fmt(report.state_change.value, 's')} with the engine's effects |",
        f"| floor: audio / state change | 0.12 µs / 0.13 µs | {fmt(audio_row.baseline, 's')} "
        f"/ {fmt(report.trigger.baseline, 's')} (including the loop and the event) |",
        "",
    ]
    return "\n".join(lines)


def print_report(report: Report) -> None:
    print()
    print("\n".join(table_lines(report.rows)).replace("**", ""))
    print()
    print("\n".join(audio_net_lines(report)))
    print()
    print("where one state change's time goes:")
    print("\n".join(breakdown_lines(report)).replace("**", ""))
    print()
    print("where a started session's memory goes:")
    print("\n".join(memory_lines(report)).replace("**", ""))
    print()
    print("spread over repeats:")
    print("\n".join(spread_lines(report.rows)))
    missed = [row.metric for row in report.rows if row.met is False]
    print()
    if missed:
        print("TARGETS NOT MET: " + "; ".join(missed))
        print("profile it: python benchmarks/bench_engine.py --profile state-change")
    else:
        print("all targets met")
    print(f"({report.seconds:.1f} s; load average {report.load[0]:.2f} -> {report.load[1]:.2f})")


# --------------------------------------------------------------------------- main


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def run(plan: Plan, quick: bool) -> Report:
    started = time.perf_counter()
    load_before = load_average()

    def step(label: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f} s] {label}", file=sys.stderr, flush=True)

    step("audio: ClientAudio")
    client = bench_audio(plan, "ClientAudio", ev.ClientAudio, CLIENT_CHUNK)
    step("audio: ModelAudio")
    model = bench_audio(plan, "ModelAudio", ev.ModelAudio, MODEL_CHUNK)
    step("session creation")
    created = bench_create(plan)
    step("memory")
    memory = bench_memory(plan)
    step("memory breakdown")
    memory_lines = memory_breakdown(plan.memory_n)
    step("state change")
    state_change = bench_state_change(plan)
    step("transitions trigger")
    trigger = bench_trigger(plan)
    step("state-change breakdown")
    breakdown = bench_breakdown(plan)
    step("state-change ablations")
    ablations = bench_ablations(plan)
    step("loop overhead")
    loop_overhead = bench_loop_overhead(plan)
    step("simulate")
    sim_rows, sim_calls = bench_simulate(plan)
    rows = [client, model, *created, memory, state_change, trigger, *sim_rows]
    return Report(
        rows=rows,
        breakdown=breakdown,
        ablations=ablations,
        memory_lines=memory_lines,
        loop_overhead=loop_overhead,
        state_change=state_change,
        trigger=trigger,
        sim_calls=sim_calls,
        plan=plan,
        quick=quick,
        seconds=time.perf_counter() - started,
        load=(load_before, load_average()),
    )


PROFILES: dict[str, Callable[[], None]] = {
    "client-audio": lambda: [
        drive_audio(live_session(i).handle, ev.ClientAudio, CLIENT_CHUNK, AUDIO_BATCH)
        for i in range(10)
    ],
    "model-audio": lambda: [
        drive_audio(live_session(i).handle, ev.ModelAudio, MODEL_CHUNK, AUDIO_BATCH)
        for i in range(10)
    ],
    "create": lambda: create_sessions(5_000),
    "start": lambda: create_and_start_sessions(5_000),
    "state-change": lambda: [
        drive_resume_cycles(s.handle, ev.UpstreamClosed, ev.UpstreamReady, RESUME_BATCH, c)
        for s, c in (resumable_session(i) for i in range(4))
    ],
    "trigger": lambda: drive_trigger(MACHINE.events["warn"].trigger, TriggerModel(), 5_000),
    "simulate": lambda: simulate("interview", seed=7),
}


def profile(name: str) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(PROFILES[name])
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.strip_dirs().sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short, noisier run")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), help="cProfile one workload instead of benchmarking"
    )
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile)
        return 0
    report = run(QUICK if args.quick else DEFAULT, args.quick)
    print_report(report)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        replaced = write_heading_section(path, markdown(report), FILE_TITLE)
        print(f"{'updated' if replaced else 'wrote'} the engine section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
