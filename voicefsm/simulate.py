"""A whole interview in virtual time, through the real engine: ``voicefsm simulate``.

A scripted upstream (questions, answers, resumption handles, GoAways, drops, refusals) and a
scripted client (a microphone streaming 20 ms chunks, pong answers, a refresh) drive one
:class:`voicefsm.Session` for the full interview. Nothing sleeps: time advances in 20 ms steps and
jumps to exact timer and script times, so 45 minutes take a fraction of a second.

Every candidate chunk carries its sequence number, and the simulated upstream checks that chunks
arrive complete and in order across every resume: the summary reports any loss or reordering.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from voicefsm import effects as fx
from voicefsm import events as ev
from voicefsm.engine import Session
from voicefsm.model import (
    EndReason,
    SessionConfig,
    SessionRecord,
    SessionStats,
    State,
    TranscriptLine,
)
from voicefsm.protocol import ErrorMessage, Ping, SessionEnded, SessionWarning

CHUNK_S = 0.02
"""Audio cadence, both ways."""
CLIENT_CHUNK_BYTES = 640  # 20 ms of 16 kHz 16-bit mono
MODEL_CHUNK = bytes(960)  # 20 ms of 24 kHz 16-bit mono
START = 1_800_000_000.0  # an arbitrary epoch second, so times look like production ones


@dataclass(frozen=True)
class Action:
    """One scripted fault or client action at ``at`` seconds into the interview."""

    at: float
    kind: str
    arg: Any = None


@dataclass(frozen=True)
class Scenario:
    """A named script: what the upstream and the client do, and when."""

    name: str
    description: str
    build: Callable[[random.Random], list[Action]]


def _jitter(rng: random.Random, at: float, spread: float = 40.0) -> float:
    return at + rng.uniform(-spread, spread)


def _interview(rng: random.Random) -> list[Action]:
    time_lefts = ["50s", "10s", "30s", "5s"]
    actions = [Action(_jitter(rng, 60 * (9.5 + 10 * n)), "goaway", time_lefts[n]) for n in range(4)]
    drop = _jitter(rng, 24.5 * 60)
    actions += [
        Action(_jitter(rng, 14 * 60), "non_resumable_update"),
        Action(drop - 1, "refuse_next", 1),
        Action(drop, "close", 1011),
        Action(_jitter(rng, 33 * 60), "client_refresh", 4.0),
    ]
    return actions


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "interview",
            "GoAway about every 10 min (time_left 50s/10s/30s/5s), a non-resumable update, "
            "a refused reconnect, a 1011 drop, a client refresh; ends at the time limit",
            _interview,
        ),
        Scenario("clean", "no faults at all; ends at the time limit", lambda rng: []),
        Scenario(
            "outage",
            "the upstream drops at ~12 min and refuses every reconnect: upstream_lost",
            lambda rng: [Action(12 * 60 - 1, "refuse_next", 1000), Action(12 * 60, "close", 1006)],
        ),
        Scenario(
            "context-exhausted",
            "the upstream closes with 1007 at ~20 min: error, no retries",
            lambda rng: [Action(_jitter(rng, 20 * 60), "close", 1007)],
        ),
        Scenario(
            "user-ends",
            "the candidate ends the interview at ~17 min: user_ended",
            lambda rng: [Action(_jitter(rng, 17 * 60), "client_end")],
        ),
        Scenario(
            "client-leaves",
            "the client goes away at ~22 min and never returns: disconnected",
            lambda rng: [Action(_jitter(rng, 22 * 60), "client_leave")],
        ),
    ]
}
"""The built-in scenarios, by name."""


@dataclass
class SimulationResult:
    """What happened: the timeline, the end, and the counts the engine and the fakes kept."""

    scenario: str
    seed: int
    timeline: list[str]
    end_reason: EndReason | None
    end_detail: str | None
    ended_at_s: float
    stats: SessionStats
    client_chunks_sent: int = 0
    client_chunks_received_upstream: int = 0
    client_chunks_reordered: int = 0
    model_chunks_played: int = 0
    connections: int = 0
    session_ended_messages: int = 0
    transcript_lines: list[str] = field(default_factory=list)
    record: SessionRecord | None = None
    """The session's final record, with its event log and usage sums (for ``--timeline``)."""
    transcript: list[TranscriptLine] = field(default_factory=list)
    """The recorded transcript lines, as a store would keep them."""

    @property
    def client_chunks_lost(self) -> int:
        """Chunks neither delivered upstream nor accounted for as overflow or unsent at the end."""
        accounted = (
            self.client_chunks_received_upstream
            + self.stats.chunks_overflowed
            + self.stats.chunks_unsent_at_end
        )
        return self.client_chunks_sent - accounted

    def summary(self) -> str:
        """A short human-readable end summary."""
        stats = self.stats
        return "\n".join(
            [
                f"scenario {self.scenario} (seed {self.seed})",
                f"  ended        {self.end_reason} at {_clock(self.ended_at_s)}: {self.end_detail}",
                f"  resumes      {stats.resumes} ({stats.goaways} GoAway, "
                f"{self.connections} connections, {stats.connect_attempts} attempts)",
                f"  client audio {self.client_chunks_sent} chunks sent, "
                f"{self.client_chunks_received_upstream} reached the upstream, "
                f"{stats.chunks_buffered} buffered while resuming, {stats.chunks_flushed} flushed, "
                f"{stats.chunks_overflowed} overflowed, "
                f"{stats.chunks_unsent_at_end} unsent at the end, {self.client_chunks_lost} lost, "
                f"{self.client_chunks_reordered} out of order",
                f"  model audio  {self.model_chunks_played} chunks played",
                f"  transcript   {stats.transcript_lines} lines",
                f"  handles      {stats.ignored_resumption_updates} non-resumable updates ignored",
            ]
        )


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{rest:06.3f}"


class _Upstream:
    """The scripted Live model: answers connects, speaks questions, issues handles."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.connected: int | None = None  # id of the ready connection
        self.connections = 0
        self.issued: set[str] = set()
        self.refuse = 0
        self.next_chunk = 0  # sequence number the upstream expects next
        self.received = 0
        self.reordered = 0
        self.speaking_until = 0.0
        self.question = 0

    def receive_audio(self, data: bytes) -> None:
        (seq,) = struct.unpack_from(">I", data)
        if seq != self.next_chunk:
            self.reordered += 1
        self.next_chunk = max(self.next_chunk, seq + 1)
        self.received += 1


class Simulation:
    """One scripted run. Build it, call :meth:`run`; :data:`SCENARIOS` names the scripts."""

    def __init__(
        self,
        scenario: str = "interview",
        seed: int = 7,
        config: SessionConfig | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(
                f"unknown scenario {scenario!r}; choose one of: {', '.join(sorted(SCENARIOS))}"
            )
        self.scenario = SCENARIOS[scenario]
        self.seed = seed
        self.rng = random.Random(seed)
        self.session = Session(config, session_id=f"sim-{scenario}-{seed}", seed=seed)
        self.upstream = _Upstream(self.rng)
        self.on_line = on_line
        self.timeline: list[str] = []
        self.queue: list[tuple[float, int, str, Any]] = []
        self._order = 0
        self.client_attached = True
        self.client_chunk_seq = 0
        self.model_chunks = 0
        self.ended_messages = 0
        self.lines: list[str] = []
        self.transcript: list[TranscriptLine] = []

    # --------------------------------------------------------------- plumbing

    def _at(self, at: float, kind: str, arg: Any = None) -> None:
        self._order += 1
        heapq.heappush(self.queue, (at, self._order, kind, arg))

    def _log(self, now: float, text: str) -> None:
        line = f"{_clock(now - START)}  {self.session.state:<10} {text}"
        self.timeline.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def _apply(self, effects: list[fx.Effect], now: float) -> None:
        upstream = self.upstream
        for effect in effects:
            kind = type(effect)
            if kind is fx.SendAudioUpstream:
                if upstream.connected is not None:  # else it is lost, and the summary says so
                    upstream.receive_audio(effect.data)  # type: ignore[union-attr]
            elif kind is fx.SendAudioToClient:
                self.model_chunks += 1
            elif isinstance(effect, fx.OpenUpstream):
                self._open(effect, now)
            elif isinstance(effect, fx.CloseUpstream):
                if upstream.connected == effect.connection_id:
                    upstream.connected = None
            elif isinstance(effect, fx.StateChanged):
                self._log(now, f"{effect.previous} -> {effect.state}: {effect.why}")
            elif isinstance(effect, fx.RecordTranscript):
                self.lines.append(f"[{effect.line.seq}] {effect.line.role}: {effect.line.text}")
                self.transcript.append(effect.line)
            elif isinstance(effect, fx.SendToClient):
                self._client_message(effect.message, now)

    def _client_message(self, message: Any, now: float) -> None:
        if isinstance(message, SessionWarning):
            self._log(now, f"warning sent: {message.remaining_s:.0f} s left")
        elif isinstance(message, SessionEnded):
            self.ended_messages += 1
        elif isinstance(message, ErrorMessage):
            self._log(now, f"client told: {message.code}")
        elif isinstance(message, Ping) and self.client_attached:
            self._at(now + 0.05, "pong")

    def _open(self, effect: fx.OpenUpstream, now: float) -> None:
        upstream = self.upstream
        upstream.connections += 1
        how = f"resuming handle {effect.handle}" if effect.handle else "fresh"
        self._log(now, f"open upstream #{effect.connection_id} ({how}, attempt {effect.attempt})")
        if effect.handle is not None and effect.handle not in upstream.issued:
            self._at(now + 0.03, "closed", (effect.connection_id, 1008, "invalid handle"))
        elif upstream.refuse > 0:
            upstream.refuse -= 1
            self._at(now + 0.01, "closed", (effect.connection_id, None, "connection refused"))
        else:
            self._at(now + self.rng.uniform(0.04, 0.12), "ready", effect.connection_id)

    def _feed(self, event: ev.Event, now: float) -> None:
        self._apply(self.session.handle(event, now), now)

    # --------------------------------------------------------------- the conversation

    def _next_question(self, now: float) -> None:
        upstream = self.upstream
        upstream.question += 1
        upstream.speaking_until = now + self.rng.uniform(6, 12)
        self._at(upstream.speaking_until, "turn_end", upstream.question)

    def _turn_end(self, question: int, now: float) -> None:
        upstream = self.upstream
        if upstream.connected is None or question != upstream.question:
            return
        self._feed(ev.OutputTranscript(f"Question {question}: tell me about a time ...", True), now)
        self._feed(ev.TurnComplete(), now)
        handle = f"handle-{question}-{upstream.connections}"
        upstream.issued.add(handle)
        self._feed(ev.ResumptionUpdate(handle, True), now)
        # The Live API reports each turn's prompt, which holds the context so far: it grows.
        usage = ev.Usage(
            prompt_tokens=2000 * question,
            response_tokens=100 * question,
            total_tokens=2100 * question,
            prompt_by_modality=(("AUDIO", 1700 * question), ("TEXT", 300 * question)),
            response_by_modality=(("AUDIO", 100 * question),),
        )
        self._feed(usage, now)
        answer = self.rng.uniform(30, 90)
        self._at(now + answer, "answer_end", question)

    def _answer_end(self, question: int, now: float) -> None:
        if self.upstream.connected is None or question != self.upstream.question:
            return
        self._feed(ev.InputTranscript(f"Answer to question {question}.", True), now)
        self._next_question(now)

    # --------------------------------------------------------------- script actions

    def _script(self, action: Action, now: float) -> None:
        upstream = self.upstream
        kind = action.kind
        if kind == "goaway":
            if upstream.connected is None:
                return
            self._log(now, f"upstream sends GoAway (time_left={action.arg})")
            connection = upstream.connected
            self._feed(ev.GoAway(action.arg, connection_id=connection), now)
            self._at(now + float(str(action.arg).rstrip("s")), "goaway_expired", connection)
        elif kind == "close":
            if upstream.connected is None:
                return
            connection, upstream.connected = upstream.connected, None
            self._log(now, f"upstream closes the connection with {action.arg}")
            self._feed(ev.UpstreamClosed(action.arg, "scripted", connection_id=connection), now)
        elif kind == "non_resumable_update":
            self._log(now, "upstream sends a non-resumable update (no handle)")
            self._feed(ev.ResumptionUpdate(None, False), now)
        elif kind == "refuse_next":
            upstream.refuse = action.arg
        elif kind == "client_refresh":
            self._log(now, f"client refreshes the page (back in {action.arg:g} s)")
            self.client_attached = False
            self._feed(ev.ClientGone("page refresh"), now)
            self._at(now + action.arg, "client_back")
        elif kind == "client_leave":
            self._log(now, "client goes away for good")
            self.client_attached = False
            self._feed(ev.ClientGone("tab closed"), now)
        elif kind == "client_end":
            self._log(now, "client asks to end the interview")
            self._feed(ev.ClientEnd(), now)

    def _discrete(self, kind: str, arg: Any, now: float) -> None:
        upstream = self.upstream
        if kind == "script":
            self._script(arg, now)
        elif kind == "ready":
            if self.session.state in (State.CONNECTING, State.RESUMING):
                upstream.connected = arg
                self._feed(
                    ev.UpstreamReady(connection_id=arg, upstream_session_id=f"sess-{arg}"), now
                )
                if upstream.question == 0 or upstream.speaking_until < now:
                    self._next_question(now)
        elif kind == "closed":
            connection, code, reason = arg
            self._log(now, f"upstream #{connection} fails: {reason}")
            self._feed(ev.UpstreamClosed(code, reason, connection_id=connection), now)
        elif kind == "goaway_expired":
            if upstream.connected == arg:
                upstream.connected = None
                self._log(now, "GoAway time ran out: upstream closes")
                self._feed(ev.UpstreamClosed(1000, "go away", connection_id=arg), now)
        elif kind == "turn_end":
            self._turn_end(arg, now)
        elif kind == "answer_end":
            self._answer_end(arg, now)
        elif kind == "client_back":
            self.client_attached = True
            self._log(now, "client is back")
            self._feed(ev.ClientBack(), now)
        elif kind == "pong" and self.client_attached:
            self._feed(ev.HeartbeatAck(), now)

    # --------------------------------------------------------------- the loop

    def _due(self, until: float) -> Iterator[tuple[float, str, Any]]:
        """Discrete happenings (script, upstream, timers) up to ``until``, in time order."""
        session = self.session
        while True:
            timer = session.next_timer()
            queued = self.queue[0][0] if self.queue else None
            if timer is not None and timer <= until and (queued is None or timer <= queued):
                yield timer, "tick", None
            elif queued is not None and queued <= until:
                at, _, kind, arg = heapq.heappop(self.queue)
                yield at, kind, arg
            else:
                return

    def run(self) -> SimulationResult:
        """Run the interview to its end and return what happened."""
        session = self.session
        config = session.config
        for action in self.scenario.build(self.rng):
            self._at(START + action.at, "script", action)
        self._log(START, f"scenario {self.scenario.name}: {self.scenario.description}")
        self._apply(session.start(START), START)
        handle = session.handle
        upstream = self.upstream
        pad = bytes(CLIENT_CHUNK_BYTES - 4)
        pack = struct.Struct(">I").pack
        step = 0
        horizon = START + config.time_limit_s + 60
        now = START
        while not session.ended and now < horizon:
            step += 1
            now = START + step * CHUNK_S
            for at, kind, arg in self._due(now):
                if kind == "tick":
                    self._apply(handle(ev.Tick(), at), at)
                else:
                    self._discrete(kind, arg, at)
                if session.ended:
                    break
            if session.ended:
                break
            if self.client_attached:
                chunk = pack(self.client_chunk_seq) + pad
                self.client_chunk_seq += 1
                self._apply(handle(ev.ClientAudio(chunk), now), now)
            if upstream.connected is not None and now < upstream.speaking_until:
                self._apply(handle(ev.ModelAudio(MODEL_CHUNK), now), now)
        record = session.snapshot()
        ended_at = (record.ended_at or now) - START
        self._log(ended_at + START, f"session ended: {session.end_reason} ({session.end_detail})")
        return SimulationResult(
            scenario=self.scenario.name,
            seed=self.seed,
            timeline=self.timeline,
            end_reason=session.end_reason,
            end_detail=session.end_detail,
            ended_at_s=ended_at,
            stats=record.stats,
            client_chunks_sent=self.client_chunk_seq,
            client_chunks_received_upstream=upstream.received,
            client_chunks_reordered=upstream.reordered,
            model_chunks_played=self.model_chunks,
            connections=upstream.connections,
            session_ended_messages=self.ended_messages,
            transcript_lines=self.lines,
            record=record,
            transcript=self.transcript,
        )


def simulate(
    scenario: str = "interview",
    seed: int = 7,
    config: SessionConfig | None = None,
    on_line: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Run one scripted interview in virtual time (see :data:`SCENARIOS`)."""
    return Simulation(scenario, seed, config, on_line).run()
