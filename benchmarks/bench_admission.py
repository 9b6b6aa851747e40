"""Admission control under an arrival ramp: deadline precision and audio, guard on against off.

Run from the repository root (needs ``pip install -e '.[test]'``)::

    python benchmarks/bench_admission.py --quick                 # a laptop: ~1 minute
    python benchmarks/bench_admission.py --repeats 3 --cpu 0 --fake-cpu 1
    python benchmarks/bench_admission.py --markdown docs/benchmarks.md   # write the section

One :class:`voicefsm.service.InterviewService` runs in this process (``--cpu`` pins it to one
core) on the direct genai upstream (``--upstream adk`` for ADK's); the fake Gemini Live server of
``bench_capacity.py`` runs in its own process (``--fake-cpu``). New interviews arrive at a steady
``--rate`` until ``--arrivals`` have come, which drives the worker past what one core carries:
each one is a client connection handed to :meth:`InterviewService.handle` (the real path:
connection limits, JWT authentication, the ``overload`` guard, the session's lease in a memory
store, its :class:`~voicefsm.host.SessionHost`) over an in-process transport. A client that gets
``session_created`` waits for ``session_state`` ``live``, then sends a stamped 640-byte chunk
every 20 ms on an absolute schedule, and receives interviewer audio and messages, until
``session_ended``. Each interview is short (``--time-limit``, warning
``--warning-before`` it), so its warning and its end both happen while the worker is loaded.

Variants, interleaved (the order rotates every repeat), each with a fresh service:

* ``guard``: ``InterviewService(..., overload=OverloadGuard())``, the defaults of
  :mod:`voicefsm.admission` (refuse while 8 sessions are still starting, while the loop's
  thread wanted the CPU >= 70 % of the last 1 s, or while >= 20 % of the last 2 s of 50 ms lag
  samples are over 25 ms); a refused client gets ``error`` ``server_busy`` and close 1013 and
  does not retry;
* ``lag-only``: the lag rule alone (``max_busy=None, max_starting=None``), the guard before the
  busy and starting rules;
* ``off``: ``overload=None``: every arrival is admitted;
* ``guard@MAX_LAG_MS/LATE_FRACTION/WINDOW_S[/MAX_BUSY/MAX_STARTING]``: the guard with other
  settings (``-`` turns the busy or starting rule off; the busy window is 1 s, or the lag
  window if shorter).

:class:`~voicefsm.limits.ServiceLimits` are raised out of the way, so only the guard refuses.

Per variant, pooled over the repeats:

* **warning / end lateness**: when ``session_warning`` / ``session_ended`` reached the client
  (the server's ``send_text`` on the transport), minus ``started_at + time_limit -
  warning_before`` / ``started_at + time_limit`` from the session's stored record (the engine's
  own clock, ``time.time``): p50, p99, max, and the share later than 50 ms;
  and, beside it, when the engine *fired* each (the ``warning`` / ``end`` entry of the stored
  log): the difference is the warning path after the engine (effects, the client send);
* **refused**: arrivals closed with 1013 ``server_busy``, by the guard's rule that refused
  them (starting, busy, lag); **admitted**: ``session_created``;
* **lost**: client chunks sent that the fake had not received 1 s after the last session ended,
  against the chunks the engine counted as not delivered (overflowed, unsent at the end,
  unsent upstream) in the stored records, and the frames still queued on the transport, never
  read, when the session was over (sent as it ended): per session, loss beyond both is silent;
  and, stricter, the chunks scheduled more than 0.1 s before their session's deadline that
  never reached the fake (audio the model should have heard);
* **loop lag p99** of this process (a 10 ms timer) and the **peak** of concurrent sessions.

Timing targets are reported, never enforced. With ``BENCH_ADMISSION_TRACE=1`` every session
with silently lost chunks prints which chunks (their schedule against the deadline) and what
its record counted.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import datetime
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import ask, command_line, lag_monitor, pct, pin, publish, rotated, spawned

HERE = Path(__file__).resolve().parent
SECRET = "bench-admission-secret-that-is-long-enough-for-hs256"
VARIANTS = ("guard", "off")
LATE_S = 0.05
END_MARGIN_S = 0.1
"""Chunks scheduled this long before their session's deadline must reach the model."""


def _capacity() -> Any:
    # On sys.path (not loaded from a file) so that the fake's spawned process can import it.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import bench_capacity

    return bench_capacity


# --------------------------------------------------------------------------- one client


class BenchTransport:
    """An in-process client websocket: what the service sends is timed as it is sent."""

    def __init__(self, subprotocols: list[str]) -> None:
        self.subprotocols = subprotocols
        self.query: dict[str, str] = {}
        self.origin: str | None = None
        self.inbound: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.created = asyncio.Event()
        self.live = asyncio.Event()
        self.finished = asyncio.Event()
        self.session_id: str | None = None
        self.created_at: float | None = None
        self.warning_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.error_code: str | None = None
        self.error_message: str | None = None
        self.close_code: int | None = None
        self.model_chunks = 0
        self.unread = 0
        self.sent_due = array.array("d")
        """The scheduled send time (``time.monotonic``) of every audio chunk sent."""
        """Audio frames still queued, never read by the server, once the session is over."""

    async def accept(self, subprotocol: str | None) -> None:
        pass

    async def receive(self) -> str | bytes | None:
        return await self.inbound.get()

    async def send_text(self, text: str) -> None:
        at = time.time()
        message = json.loads(text)
        kind = message.get("type")
        if kind == "session_created":
            self.session_id = message["session_id"]
            self.created_at = at
            self.created.set()
        elif kind == "session_state" and message.get("state") == "live":
            self.live.set()
        elif kind == "session_warning" and self.warning_at is None:
            self.warning_at = at
        elif kind == "session_ended":
            self.ended_at = at
            self.end_reason = message.get("reason")
            self.finished.set()
        elif kind == "error":
            self.error_code = message.get("code")
            self.error_message = message.get("message")

    async def send_bytes(self, data: bytes) -> None:
        self.model_chunks += 1

    async def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
        self.inbound.put_nowait(None)
        self.created.set()
        self.finished.set()


async def _client(
    service: Any, token: str, ident: int, time_limit: float, sent: dict[int, int]
) -> tuple[int, BenchTransport]:
    """One arrival: connect, and if admitted, talk until the session ends."""
    cap = _capacity()
    transport = BenchTransport(["voicefsm.v1", f"bearer.{token}"])
    handler = asyncio.create_task(service.handle(transport))
    await transport.created.wait()
    if transport.session_id is not None:
        waiter = asyncio.create_task(transport.live.wait())
        await asyncio.wait({waiter, handler}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if transport.live.is_set() and transport.created_at is not None:
            # Until session_ended, as a real client (a bound in case the end never comes).
            stop_wall = transport.created_at + time_limit + 10.0
            start = time.monotonic()
            stop_at = start + (stop_wall - time.time())
            for seq in itertools.count():
                due = start + seq * cap.CHUNK_S
                if due >= stop_at or transport.finished.is_set():
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                chunk = cap.STAMP.pack(due, ident, seq) + bytes(cap.CHUNK_BYTES - cap.STAMP.size)
                transport.inbound.put_nowait(chunk)
                sent[ident] += 1
                transport.sent_due.append(due)
    await asyncio.wait({handler}, timeout=120)
    while not transport.inbound.empty():  # frames the server never read
        if isinstance(transport.inbound.get_nowait(), bytes):
            transport.unread += 1
    transport.inbound.put_nowait(None)
    return ident, transport


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One variant, one repeat."""

    variant: str
    offered: int
    admitted: int
    refused_busy: int
    refused_other: int
    ended_on_time: int
    ended_otherwise: int
    warnings_missing: int
    warning_late_s: list[float]
    end_late_s: list[float]
    warning_fired_late_s: list[float]
    """When the engine gave each warning (its log entry) minus its schedule."""
    end_fired_late_s: list[float]
    """When the engine ended each session at its limit (its log entry) minus the deadline."""
    sent: int
    lost: int
    counted: int
    unread: int
    silent: int
    lost_before_end: int
    lag_p99_ms: float
    peak_sessions: int
    seconds: float
    load: tuple[float, float] = field(default=(0.0, 0.0))
    refused_by: dict[str, int] = field(default_factory=dict)
    """Busy refusals by the guard's rule: ``starting``, ``busy``, ``lag``, ``other``."""
    stolen_max: float = 0.0
    """The largest share of a 1 s span the loop's thread spent runnable but waiting for its
    core (taken by a neighbour or another thread): what no admission rule can prevent."""


def worst_wait_share(samples: Sequence[tuple[float, float, float]], span_s: float) -> float:
    """The largest (demand - CPU time) / wall time over ``span_s`` windows of the samples."""
    worst = 0.0
    start = 0
    for end in range(len(samples)):
        while samples[end][0] - samples[start][0] > span_s:
            start += 1
        at0, cpu0, demand0 = samples[start]
        at1, cpu1, demand1 = samples[end]
        if at1 - at0 >= span_s / 2:
            worst = max(worst, ((demand1 - demand0) - (cpu1 - cpu0)) / (at1 - at0))
    return worst


def refusal_rule(message: str | None) -> str:
    """Which of the guard's rules a ``server_busy`` message names."""
    text = message or ""
    if "still starting" in text:
        return "starting"
    if text.startswith("event loop busy"):
        return "busy"
    if text.startswith("event-loop lag"):
        return "lag"
    return "other"


def make_guard(variant: str) -> Any:
    """The overload guard of a variant: ``off``, ``guard`` (the defaults), ``lag-only`` (the
    defaults without the busy and starting rules), or
    ``guard@MAX_LAG_MS/LATE_FRACTION/WINDOW_S[/MAX_BUSY/MAX_STARTING]`` (``-`` turns the busy or
    starting rule off; e.g. ``guard@25/0.2/2/0.7/4``)."""
    from voicefsm.admission import (
        DEFAULT_MAX_BUSY,
        DEFAULT_MAX_STARTING,
        LoopLagMonitor,
        OverloadGuard,
    )

    if variant == "off":
        return None
    if variant == "guard":
        return OverloadGuard()
    if variant == "lag-only":
        return OverloadGuard(max_busy=None, max_starting=None)
    parts = variant.split("@", 1)[1].split("/")
    if len(parts) not in (3, 5):
        raise ValueError(f"bad variant {variant!r}")
    lag_ms, fraction, window = (float(part) for part in parts[:3])
    busy: float | None = DEFAULT_MAX_BUSY
    starting: int | None = DEFAULT_MAX_STARTING
    if len(parts) == 5:
        busy = None if parts[3] == "-" else float(parts[3])
        starting = None if parts[4] == "-" else int(parts[4])
    monitor = LoopLagMonitor(window_s=window)
    return OverloadGuard(
        lag_ms / 1000,
        late_fraction=fraction,
        monitor=monitor,
        max_busy=busy,
        busy_window_s=min(window, 1.0),
        max_starting=starting,
    )


def make_upstream(kind: str, base_url: str, ca_pem: str) -> Any:
    """The service's upstream, pointed at the fake."""
    from google import genai
    from google.genai import types

    cap = _capacity()
    context = ssl.create_default_context(cadata=ca_pem)
    client = genai.Client(
        api_key="fake-key",
        http_options=types.HttpOptions(
            base_url=base_url, api_version="v1alpha", async_client_args={"ssl": context}
        ),
    )
    instruction = "Interview the candidate."
    if kind == "adk":
        from google.adk.agents import LlmAgent

        from voicefsm.adk import AdkUpstream

        return AdkUpstream(
            LlmAgent(name="interviewer", model=cap.MODEL, instruction=instruction), client=client
        )
    from voicefsm.genai_live import GenaiUpstream

    return GenaiUpstream(cap.MODEL, client=client, instruction=instruction)


async def run_once(
    upstream: Any,
    pipe: multiprocessing.connection.Connection,
    variant: str,
    args: argparse.Namespace,
    ids: itertools.count[int],
) -> RunResult:
    """One arrival ramp against a fresh service."""
    from voicefsm import SessionConfig, State
    from voicefsm.admission import thread_cpu_demand_s
    from voicefsm.auth import JWTAuthenticator
    from voicefsm.limits import ServiceLimits
    from voicefsm.model import LogKind
    from voicefsm.service import InterviewService

    authenticator = JWTAuthenticator(SECRET)
    config = SessionConfig(
        time_limit_s=args.time_limit,
        warning_before_s=args.warning_before,
        heartbeat_interval_s=max(30.0, args.time_limit * 2),
        heartbeat_timeout_s=3600,
        min_remaining_to_resume_s=min(10.0, args.time_limit / 4),  # no rotation here
    )
    roomy = 1_000_000
    service = InterviewService(
        upstream,
        authenticator,
        config=config,
        service_limits=ServiceLimits(
            max_connections=roomy, max_sessions=roomy, max_sessions_per_user=roomy
        ),
        overload=make_guard(variant),
        orphan_sweep_s=None,
    )
    token = authenticator.issue("candidate", ttl_s=3600)
    load_before = os.getloadavg()[0]
    ask(pipe, "collect")  # forget arrivals of earlier runs
    sent: dict[int, int] = {}
    lags: list[float] = []
    stop_monitor = asyncio.Event()
    monitor = asyncio.create_task(lag_monitor(lags, stop_monitor))
    peak = 0

    cpu_samples: list[tuple[float, float, float]] = []
    """(monotonic, the loop thread's CPU time, its CPU demand: run plus run-queue wait)."""

    async def watch_peak() -> None:
        nonlocal peak
        while not stop_monitor.is_set():
            peak = max(peak, len(service.sessions))
            cpu_samples.append((time.monotonic(), time.thread_time(), thread_cpu_demand_s()))
            await asyncio.sleep(0.05)

    peak_watcher = asyncio.create_task(watch_peak())
    began = time.monotonic()
    clients: list[asyncio.Task[tuple[int, BenchTransport]]] = []
    for k in range(args.arrivals):
        due = began + k / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ident = next(ids)
        sent[ident] = 0
        clients.append(asyncio.create_task(_client(service, token, ident, args.time_limit, sent)))
    finished = await asyncio.gather(*clients)
    transports = [transport for _, transport in finished]
    seconds = time.monotonic() - began
    stop_monitor.set()
    await asyncio.wait({monitor, peak_watcher})
    await asyncio.sleep(1.0)  # what has not reached the fake by now counts as lost
    fake = ask(pipe, "collect")
    received: dict[int, int] = fake["received"]
    # Chunks scheduled over END_MARGIN_S before their session's deadline, which the fake got.
    arrived_before: dict[int, list[float]] = {}
    for ident, scheduled in zip(fake["interview"], fake["scheduled"], strict=True):
        arrived_before.setdefault(ident, []).append(scheduled)
    wall_minus_mono = time.time() - time.monotonic()
    idents = list(sent)
    warning_late: list[float] = []
    end_late: list[float] = []
    warning_fired: list[float] = []
    end_fired: list[float] = []
    counted = 0
    unread = 0
    silent = 0
    lost_before = 0
    missing = 0
    for ident, transport in finished:
        lost_here = max(0, sent[ident] - received.get(ident, 0))
        if transport.session_id is None:
            silent += lost_here
            continue
        stored = await service.store.load(transport.session_id)
        if stored is None or stored.record.started_at is None:
            silent += lost_here
            continue
        record = stored.record
        stats = record.stats
        counted_here = stats.chunks_overflowed + stats.chunks_unsent_at_end
        counted_here += stats.upstream_audio_unsent
        counted += counted_here
        unread += transport.unread
        silent_here = max(0, lost_here - counted_here - transport.unread)
        silent += silent_here
        deadline = record.started_at + args.time_limit
        if silent_here and os.environ.get("BENCH_ADMISSION_TRACE"):
            got = set(arrived_before.get(ident, ()))
            missing_at = [
                round(due - (deadline - wall_minus_mono), 3)
                for due in transport.sent_due
                if due not in got
            ]
            unsent_by_reason = [
                (entry.count, entry.why)
                for entry in record.log
                if entry.kind is LogKind.AUDIO_UNSENT
            ]
            print(
                f"  silent {silent_here} (interview {ident}): lost {lost_here} "
                f"counted {counted_here} "
                f"unread {transport.unread}; lost chunks at (s from the deadline) {missing_at}; "
                f"unsent by reason {unsent_by_reason}",
                flush=True,
            )
        cutoff = deadline - wall_minus_mono - END_MARGIN_S
        due_before = sum(1 for due in transport.sent_due if due < cutoff)
        got_before = sum(1 for due in arrived_before.get(ident, ()) if due < cutoff)
        lost_before += max(0, due_before - got_before)
        if transport.warning_at is not None:
            warning_late.append(transport.warning_at - (deadline - args.warning_before))
        else:
            missing += 1
        if transport.ended_at is not None and transport.end_reason == "time_limit":
            end_late.append(transport.ended_at - deadline)
        for entry in record.log:
            if entry.kind is LogKind.WARNING:
                warning_fired.append(entry.at - (deadline - args.warning_before))
            elif (
                entry.kind is LogKind.STATE
                and entry.state_to is State.ENDED
                and record.end_reason == "time_limit"
            ):
                end_fired.append(entry.at - deadline)
    await service.shutdown()
    lost = sum(max(0, sent[ident] - received.get(ident, 0)) for ident in idents)
    admitted = [t for t in transports if t.session_id is not None]
    busy = [t for t in transports if t.session_id is None and t.error_code == "server_busy"]
    refused_by: dict[str, int] = {}
    for refused in busy:
        rule = refusal_rule(refused.error_message)
        refused_by[rule] = refused_by.get(rule, 0) + 1
    return RunResult(
        variant=variant,
        offered=len(transports),
        admitted=len(admitted),
        refused_busy=len(busy),
        refused_other=len(transports) - len(admitted) - len(busy),
        ended_on_time=sum(1 for t in admitted if t.end_reason == "time_limit"),
        ended_otherwise=sum(1 for t in admitted if t.end_reason != "time_limit"),
        warnings_missing=missing,
        warning_late_s=warning_late,
        end_late_s=end_late,
        warning_fired_late_s=warning_fired,
        end_fired_late_s=end_fired,
        sent=sum(sent.values()),
        lost=lost,
        counted=counted,
        unread=unread,
        silent=silent,
        lost_before_end=lost_before,
        lag_p99_ms=pct(lags, 0.99) * 1000,
        peak_sessions=peak,
        seconds=seconds,
        load=(load_before, os.getloadavg()[0]),
        refused_by=refused_by,
        stolen_max=worst_wait_share(cpu_samples, 1.0),
    )


# --------------------------------------------------------------------------- the report


def lateness_row(values: Sequence[float]) -> str:
    """p50 / p99 / max in ms and the share over 50 ms."""
    if not values:
        return "— | — | — | —"
    late = sum(1 for v in values if v > LATE_S) / len(values)
    return (
        f"{pct(values, 0.5) * 1000:.1f} | {pct(values, 0.99) * 1000:.1f} "
        f"| {max(values) * 1000:.1f} | {late:.1%}"
    )


def _ms(values: Sequence[float], q: float) -> str:
    if not values:
        return "—"
    return f"{(max(values) if q >= 1 else pct(values, q)) * 1000:.0f}"


def describe(result: RunResult) -> str:
    """One line per run, for the console."""

    def short(values: Sequence[float]) -> str:
        if not values:
            return "—"
        late = sum(1 for v in values if v > LATE_S) / len(values)
        return (
            f"p50 {pct(values, 0.5) * 1000:.0f} p99 {pct(values, 0.99) * 1000:.0f} "
            f"max {max(values) * 1000:.0f} ms >50ms {late:.0%}"
        )

    return (
        f"{result.variant:5s} admitted {result.admitted}/{result.offered} busy "
        f"{result.refused_busy} {result.refused_by} other {result.refused_other} "
        f"peak {result.peak_sessions}  "
        f"warning {short(result.warning_late_s)} (fired {short(result.warning_fired_late_s)})  "
        f"end {short(result.end_late_s)} (fired {short(result.end_fired_late_s)})  "
        f"lost {result.lost}/{result.sent} (counted {result.counted}, "
        f"unread {result.unread}, silent {result.silent}, "
        f"before the end {result.lost_before_end})  "
        f"other ends {result.ended_otherwise}  lag p99 {result.lag_p99_ms:.0f} ms  "
        f"core taken {result.stolen_max:.0%}  "
        f"load {result.load[0]:.1f}->{result.load[1]:.1f}"
    )


def build_report(results: list[RunResult], args: argparse.Namespace, command: str) -> str:
    """The markdown section: per-variant lateness, refusals, audio; per-repeat spread."""
    loads = [r.load[0] for r in results] + [r.load[1] for r in results]
    lines = [
        "<!-- admission:begin -->",
        "## Admission control under an arrival ramp (`bench_admission.py`)",
        "",
        f"`{command}` — {datetime.date.today().isoformat()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        + (f"pinned to CPU {args.cpu}" if args.cpu is not None else "not pinned")
        + (f", fake on CPU {args.fake_cpu}" if args.fake_cpu is not None else "")
        + f"; upstream {args.upstream}; 1-minute load average {min(loads):.1f} to {max(loads):.1f} "
        "during the runs (the machine is shared).",
        "",
        f"{args.arrivals} arrivals at {args.rate:g}/s per run (up to "
        f"{min(args.arrivals, round(args.rate * args.time_limit))} interviews at once if all are "
        f"admitted), each {args.time_limit:g} s long with its warning {args.warning_before:g} s "
        f"before the end; {args.repeats} repeat(s) per variant, interleaved. Lateness is pooled "
        "over the repeats: the moment the message reached the client minus its schedule from "
        "the session record.",
        "",
        "| variant | admitted / offered | refused 1013 busy | peak at once | warning p50 | p99 "
        "| max ms | > 50 ms | end p50 | p99 | max ms | > 50 ms | chunks lost / sent "
        "| counted | unread at the end | lost silently | lost > 0.1 s before the end "
        "| loop lag p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in args.variants:
        runs = [r for r in results if r.variant == variant]
        if not runs:
            continue
        warnings = [v for r in runs for v in r.warning_late_s]
        ends = [v for r in runs for v in r.end_late_s]
        lines.append(
            f"| {variant} | {sum(r.admitted for r in runs)} / {sum(r.offered for r in runs)} "
            f"| {sum(r.refused_busy for r in runs)} "
            f"| {statistics.median(r.peak_sessions for r in runs):.0f} "
            f"| {lateness_row(warnings)} | {lateness_row(ends)} "
            f"| {sum(r.lost for r in runs)} / {sum(r.sent for r in runs)} "
            f"| {sum(r.counted for r in runs)} | {sum(r.unread for r in runs)} "
            f"| {sum(r.silent for r in runs)} | {sum(r.lost_before_end for r in runs)} "
            f"| {statistics.median(r.lag_p99_ms for r in runs):.0f} |"
        )
    lines += [
        "",
        "Per repeat (share of warnings / ends later than 50 ms, admitted, peak, and the most of "
        "a second the loop's thread spent waiting for its core):",
        "",
    ]
    for variant in args.variants:
        runs = [r for r in results if r.variant == variant]

        def share(values: Sequence[float]) -> str:
            if not values:
                return "—"
            return f"{sum(1 for v in values if v > LATE_S) / len(values):.0%}"

        parts = [
            f"{share(r.warning_late_s)} / {share(r.end_late_s)}, {r.admitted}, {r.peak_sessions}, "
            f"{r.stolen_max:.0%}"
            for r in runs
        ]
        lines.append(f"* {variant}: " + "; ".join(parts))
    lines.append("")
    for variant in args.variants:
        runs = [r for r in results if r.variant == variant]
        fired_w = [v for r in runs for v in r.warning_fired_late_s]
        fired_e = [v for r in runs for v in r.end_fired_late_s]
        rules: dict[str, int] = {}
        for run in runs:
            for rule, count in run.refused_by.items():
                rules[rule] = rules.get(rule, 0) + count
        by_rule = ", ".join(f"{rule} {count}" for rule, count in sorted(rules.items()))
        lines.append(
            f"* {variant}: when the engine fired them (its log), warnings p99 / max "
            f"{_ms(fired_w, 0.99)} / {_ms(fired_w, 1.0)} ms and ends {_ms(fired_e, 0.99)} / "
            f"{_ms(fired_e, 1.0)} ms late; busy refusals by rule: {by_rule or 'none'}; "
            f"other refusals {sum(r.refused_other for r in runs)}; admitted "
            f"sessions that ended other than at their time limit "
            f"{sum(r.ended_otherwise for r in runs)}; without a warning "
            f"{sum(r.warnings_missing for r in runs)}."
        )
    lines += ["", "<!-- admission:end -->"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="arrivals per second")
    parser.add_argument("--arrivals", type=int, default=240, help="arrivals per run")
    parser.add_argument("--time-limit", type=float, default=10.0, help="interview length, s")
    parser.add_argument("--warning-before", type=float, default=4.0, help="warning lead, s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated: off, guard (the defaults), lag-only (no busy or starting rule), "
        "guard@MAX_LAG_MS/LATE_FRACTION/WINDOW_S[/MAX_BUSY/MAX_STARTING] ('-': that rule off)",
    )
    parser.add_argument("--upstream", choices=("genai", "adk"), default="genai")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--fake-cpu", type=int, default=None, help="pin the fake's process")
    parser.add_argument("--quick", action="store_true", help="a short ramp, one repeat")
    parser.add_argument("--markdown", type=Path, help="write the section into this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rate, args.arrivals, args.time_limit, args.warning_before = 15.0, 90, 6.0, 2.0
        args.repeats = 1
    args.variants = [v for v in str(args.variants).split(",") if v]
    for variant in args.variants:
        try:
            make_guard(variant)
        except (ValueError, IndexError):
            parser.error(
                f"bad variant {variant!r}: off, guard, lag-only or "
                "guard@MAX_LAG_MS/FRACTION/WIN_S[/MAX_BUSY/MAX_STARTING]"
            )
    if not 0 < args.warning_before < args.time_limit - 1:
        parser.error("--warning-before must be positive and over 1 s shorter than --time-limit")
    if args.rate <= 0 or args.arrivals < 1:
        parser.error("--rate must be positive and --arrivals at least 1")
    return args


async def amain(
    args: argparse.Namespace, pipe: multiprocessing.connection.Connection
) -> list[RunResult]:
    """Every (repeat, variant) run, interleaved, after one discarded warm-up ramp."""
    import logging

    logging.disable(logging.WARNING)
    hello = pipe.recv()
    upstream = make_upstream(args.upstream, hello["base_url"], hello["ca_pem"])
    ids = itertools.count()
    # The first sessions pay one-off costs (lazy imports, pydantic schema builds).
    warm = argparse.Namespace(**{**vars(args), "arrivals": 3, "rate": 10.0})
    await run_once(upstream, pipe, "off", warm, ids)
    results: list[RunResult] = []
    for repeat in range(args.repeats):
        for variant in rotated(args.variants, repeat):
            result = await run_once(upstream, pipe, variant, args, ids)
            results.append(result)
            print(f"#{repeat + 1} {describe(result)}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print (and optionally write) the report."""
    args = parse_args(argv)
    with spawned(_capacity().fake_process, args.fake_cpu) as (parent, _):
        pin(args.cpu)
        results = asyncio.run(amain(args, parent))
    command = command_line("bench_admission.py", argv)
    publish(build_report(results, args, command), args.markdown, "admission")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
