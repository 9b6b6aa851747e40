"""A scripted interviewer for :class:`~voicefsm.testing.FakeLiveServer` demos and tests.

:class:`Interviewer` is a connection script (pass it as ``script=``). On each connection it
answers the setup, then for each question: streams synthetic speech-like audio (24 kHz, 16-bit,
mono) paced in real time, with output-transcription chunks, ``generationComplete`` and
``turnComplete``; waits for the candidate's answer; sends a finished input-transcription
placeholder, a resumable ``sessionResumptionUpdate`` with a fresh handle, and ``usageMetadata``.
Resuming with a handle continues with the question after the one the handle was issued at.

``time_scale`` speeds everything up (``time_scale=100`` runs 100x faster than real time); the
durations in the messages (``goAway.timeLeft``) stay in interview time.

:func:`speech_like_pcm` makes the audio with the standard library only (no numpy).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from voicefsm.testing.fake_live import FakeLiveConnection, WaitTimeout

__all__ = [
    "DEFAULT_QUESTIONS",
    "InterviewState",
    "Interviewer",
    "speech_like_pcm",
]

#: The default behavioral-interview questions.
DEFAULT_QUESTIONS: tuple[str, ...] = (
    "Welcome, and thanks for joining. To start, tell me about yourself and what drew you to "
    "this role.",
    "Describe a time you disagreed with a teammate. How did you resolve it?",
    "Tell me about a project that did not go as planned. What did you learn from it?",
    "Give me an example of a goal you set for yourself and how you achieved it.",
    "Describe a situation where you had to deliver under a tight deadline.",
    "Tell me about a time you received difficult feedback. What did you do with it?",
)

_DEFAULT_CLOSING = "That was my last question. Thank you for your time, and goodbye."
_OUTPUT_RATE = 24_000
_INPUT_BYTES_PER_SECOND = 16_000 * 2  # what the Live API expects as input: 16 kHz, 16-bit
_TOKENS_PER_AUDIO_SECOND = 32
# (F1, F2, F3) in Hz of a few vowels: a, i, e, o, u, ae, schwa-ish, er.
_VOWEL_FORMANTS: tuple[tuple[float, float, float], ...] = (
    (730.0, 1090.0, 2440.0),
    (270.0, 2290.0, 3010.0),
    (530.0, 1840.0, 2480.0),
    (570.0, 840.0, 2410.0),
    (300.0, 870.0, 2240.0),
    (660.0, 1720.0, 2410.0),
    (500.0, 1500.0, 2500.0),
    (490.0, 1350.0, 1690.0),
)


def _period_table(
    f0: float, formants: tuple[float, float, float], sample_rate: int, rng: random.Random
) -> list[float]:
    """One pitch period of a vowel: harmonics of f0 weighted by formant resonances."""
    size = max(8, round(sample_rate / f0))
    fundamental = sample_rate / size
    ceiling = min(4000.0, sample_rate / 2 - fundamental)
    partials: list[tuple[int, float, float]] = []
    harmonic = 1
    while harmonic * fundamental < ceiling:
        freq = harmonic * fundamental
        gain = sum(1.0 / (1.0 + ((freq - f) / (60.0 + 0.08 * f)) ** 2) for f in formants)
        gain /= math.sqrt(harmonic)  # glottal spectral tilt
        partials.append((harmonic, gain, rng.uniform(0.0, 2.0 * math.pi)))
        harmonic += 1
    step = 2.0 * math.pi / size
    table = [sum(g * math.sin(h * step * i + ph) for h, g, ph in partials) for i in range(size)]
    peak = max((abs(v) for v in table), default=0.0) or 1.0
    return [v / peak for v in table]


def speech_like_pcm(
    seconds: float,
    *,
    sample_rate: int = _OUTPUT_RATE,
    seed: int = 0,
    amplitude: float = 0.3,
) -> bytes:
    """Return deterministic speech-like audio: 16-bit little-endian mono PCM.

    Syllables of 110-240 ms, each a vowel (formant-weighted harmonics of a slowly moving pitch)
    under a raised-cosine envelope, with short gaps between "words". It sounds like mumbled
    speech and has speech-like level and rhythm, which is enough for VAD, meters and playback.

    Args:
        seconds: duration.
        sample_rate: samples per second (24000 is what the Live API sends).
        seed: the same seed gives the same bytes.
        amplitude: peak level, 0 < amplitude <= 1.

    Raises:
        ValueError: a negative duration, a non-positive rate or an amplitude out of range.
    """
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate!r}")
    if not 0 < amplitude <= 1:
        raise ValueError(f"amplitude must be in (0, 1], got {amplitude!r}")
    rng = random.Random(seed)
    total = round(seconds * sample_rate)
    samples = array("h", bytes(2 * total))
    base_f0 = rng.uniform(105.0, 200.0)
    peak = amplitude * 32767.0
    pos = 0
    syllable = 0
    while pos < total:
        length = max(1, int(sample_rate * rng.uniform(0.11, 0.24)))
        intonation = 1.0 + 0.08 * math.sin(syllable * 0.7) + rng.uniform(-0.04, 0.04)
        table = _period_table(base_f0 * intonation, rng.choice(_VOWEL_FORMANTS), sample_rate, rng)
        period = len(table)
        attack = max(1, length // 5)
        release = max(1, length // 3)
        end = min(total, pos + length)
        for i in range(end - pos):
            if i < attack:
                env = 0.5 - 0.5 * math.cos(math.pi * i / attack)
            elif i > length - release:
                env = 0.5 - 0.5 * math.cos(math.pi * (length - i) / release)
            else:
                env = 1.0
            samples[pos + i] = int(peak * env * table[i % period])
        pos = end
        if rng.random() < 0.35:  # a word boundary
            pos += int(sample_rate * rng.uniform(0.04, 0.12))
        syllable += 1
    if sys.byteorder == "big":  # pragma: no cover - little-endian machines
        samples.byteswap()
    return samples.tobytes()


@dataclass(frozen=True, slots=True)
class InterviewState:
    """What the interviewer stores with each resumption handle it issues."""

    next_question: int
    """Index (0-based) of the question to ask when a connection resumes with the handle."""


@dataclass
class Interviewer:
    """A connection script that runs a scripted spoken interview (see the module docstring).

    Use one instance as the server's default script so every connection (and every resumed
    one) shares it: ``FakeLiveServer(script=Interviewer(time_scale=50))``.
    """

    questions: Sequence[str] = DEFAULT_QUESTIONS
    """The questions, asked in order."""
    time_scale: float = 1.0
    """How much faster than real time to run (pacing, waits, GoAway timing)."""
    chunk_ms: int = 40
    """Duration of each model audio chunk in milliseconds (20-40 is typical)."""
    seconds_per_word: float = 0.3
    """Speech duration per word of a question (interview time)."""
    speech_seconds: float | None = None
    """If set, every utterance lasts exactly this long instead (interview time)."""
    answer_audio_chunks: int = 10
    """The candidate has answered after this many audio chunks (or any text input)."""
    answer_timeout: float | None = 30.0
    """Move on after this long (interview time) without an answer; None waits forever."""
    pause_seconds: float = 0.5
    """Pause before each question (interview time)."""
    closing_remark: str | None = _DEFAULT_CLOSING
    """Said after the last question (None: say nothing); the connection then stays open."""
    answer_placeholder: str = "[answer to question {number}]"
    """Text of the finished input transcription sent after each answer (``{number}`` is
    the 1-based question number)."""
    go_away_every: float | None = None
    """Send a GoAway this long (interview time) after each connection's setup; None: never."""
    go_away_time_left: float = 10.0
    """``timeLeft`` of that GoAway (interview time); the connection is closed when it elapses
    unless the client left first."""
    go_away_close_code: int = 1000
    """Close code used when ``go_away_time_left`` elapses."""
    asked: list[tuple[int, int]] = field(default_factory=list, init=False)
    """``(connection number, question index)`` for each question started, in order."""
    _audio_cache: dict[tuple[str, int], bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        """Validate the timing parameters."""
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale!r}")
        if self.chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be positive, got {self.chunk_ms!r}")
        if self.go_away_every is not None and self.go_away_every <= 0:
            raise ValueError(f"go_away_every must be positive, got {self.go_away_every!r}")

    async def __call__(self, conn: FakeLiveConnection) -> None:
        """Run the interview on one connection."""
        await conn.send_setup_complete()
        start = 0
        if conn.resumed_from is not None and isinstance(conn.resumed_from.state, InterviewState):
            start = conn.resumed_from.state.next_question
        if self.go_away_every is not None:
            conn.start_background(self._rotate(conn), name="go-away")
        for index in range(start, len(self.questions)):
            await self._sleep(self.pause_seconds)
            self.asked.append((conn.number, index))
            response_seconds = await self._speak(conn, self.questions[index], seed=index)
            base_chunks = conn.audio_chunk_count
            base_index = len(conn.audio_chunks)
            await self._await_answer(conn)
            await conn.send_input_transcription(
                self.answer_placeholder.format(number=index + 1), finished=True
            )
            await conn.send_resumption_update(state=InterviewState(next_question=index + 1))
            if conn.server.record_payloads:
                answer_bytes = sum(len(chunk) for chunk in conn.audio_chunks[base_index:])
                answer_seconds = answer_bytes / _INPUT_BYTES_PER_SECOND
            else:  # assume 20 ms chunks
                answer_seconds = (conn.audio_chunk_count - base_chunks) * 0.02
            await conn.send_usage(
                prompt_tokens=round(answer_seconds * _TOKENS_PER_AUDIO_SECOND),
                response_tokens=round(response_seconds * _TOKENS_PER_AUDIO_SECOND),
            )
        if self.closing_remark:
            await self._sleep(self.pause_seconds)
            await self._speak(conn, self.closing_remark, seed=len(self.questions))

    def audio_for(self, text: str, seed: int) -> bytes:
        """Return (and cache) the synthetic speech for one utterance."""
        key = (text, seed)
        pcm = self._audio_cache.get(key)
        if pcm is None:
            words = max(1, len(text.split()))
            seconds = self.speech_seconds
            if seconds is None:
                seconds = max(1.0, words * self.seconds_per_word)
            pcm = speech_like_pcm(seconds, seed=seed)
            self._audio_cache[key] = pcm
        return pcm

    async def _sleep(self, interview_seconds: float) -> None:
        if interview_seconds > 0:
            await asyncio.sleep(interview_seconds / self.time_scale)

    async def _speak(self, conn: FakeLiveConnection, text: str, seed: int) -> float:
        """Stream one utterance paced in (scaled) real time; return its duration in seconds."""
        pcm = self.audio_for(text, seed)
        chunk_bytes = max(2, _OUTPUT_RATE * self.chunk_ms // 1000 * 2)
        chunks = [pcm[i : i + chunk_bytes] for i in range(0, len(pcm), chunk_bytes)] or [b""]
        words = text.split()
        chunk_real_seconds = self.chunk_ms / 1000.0 / self.time_scale
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_word = 0
        for i, chunk in enumerate(chunks):
            delay = started + i * chunk_real_seconds - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.send_model_audio(chunk)
            # Spread the words over the audio: word j goes out with chunk j * chunks / words.
            while next_word < len(words) and next_word * len(chunks) // len(words) <= i:
                piece = words[next_word] if next_word == 0 else " " + words[next_word]
                finished = next_word == len(words) - 1
                await conn.send_output_transcription(piece, finished=finished)
                next_word += 1
        delay = started + len(chunks) * chunk_real_seconds - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await conn.send_generation_complete()
        await conn.send_turn_complete()
        return len(pcm) / (2 * _OUTPUT_RATE)

    async def _await_answer(self, conn: FakeLiveConnection) -> None:
        base_chunks = conn.audio_chunk_count
        base_texts = len(conn.text_inputs)
        timeout = None if self.answer_timeout is None else self.answer_timeout / self.time_scale
        # No answer in time: move on, as an interviewer would.
        with contextlib.suppress(WaitTimeout):
            await conn.wait_for(
                lambda c: (
                    c.audio_chunk_count - base_chunks >= self.answer_audio_chunks
                    or len(c.text_inputs) > base_texts
                ),
                description="the candidate's answer",
                timeout=timeout,
            )

    async def _rotate(self, conn: FakeLiveConnection) -> None:
        """Send a GoAway ``go_away_every`` after setup, close when its time is up."""
        assert self.go_away_every is not None
        await asyncio.sleep(self.go_away_every / self.time_scale)
        await conn.send_go_away(self.go_away_time_left)
        await asyncio.sleep(self.go_away_time_left / self.time_scale)
        await conn.close(self.go_away_close_code, "session rotated")
