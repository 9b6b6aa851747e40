"""``voicefsm interview``: a spoken interview in the terminal, on Gemini Live or on the fake.

    voicefsm interview --fake --minutes 1 --time-scale 20   # offline, about one minute
    voicefsm interview --fake --wav answer.wav --show-transcript
    GOOGLE_API_KEY=... voicefsm interview --mic --play        # Gemini Live
    GOOGLE_API_KEY=... voicefsm interview --wav answer.wav --minutes 5

One :class:`voicefsm.host.SessionHost` runs the session. Upstream (``--upstream``, chosen as
``voicefsm serve`` chooses): ADK's ``Runner`` with an ``LlmAgent`` interviewer
(:class:`voicefsm.adk.AdkUpstream`) when ``google-adk`` is installed, else the direct
google-genai upstream (:class:`voicefsm.genai_live.GenaiUpstream`), talking either to the Gemini
Live API (``GOOGLE_API_KEY``) or, with ``--fake``, to :class:`voicefsm.testing.FakeLiveServer`
running its scripted :class:`~voicefsm.testing.Interviewer` in this process over TLS on
127.0.0.1. The fake sends a GoAway every ``--go-away-every`` seconds, so the rotations are visible.

The terminal is the client: candidate audio comes from a WAV file (``--wav``), the microphone
(``--mic``, needs the optional ``sounddevice`` package) or, by default, silence, in 20 ms chunks
of 16 kHz 16-bit mono PCM at real-time pace. Interviewer audio (24 kHz) is played with ``--play``
(``sounddevice`` again) or just counted. The script prints the state timeline (from the host's
structured notes), the warning and an end summary; transcripts only with ``--show-transcript``.
This is an application built on the library, not an example to copy: an embedding backend uses
:class:`voicefsm.service.InterviewService` (see the FastAPI and aiohttp guides).
Ctrl-C ends the interview cleanly (``user_ended``); a second Ctrl-C cancels the host.

``--minutes`` sets the interview length; the warning and the other interview-time settings of
the 45-minute defaults are scaled with it, so ``--minutes 1`` plays a "45-minute" policy in one
minute. ``--time-scale`` (fake only) makes the scripted interviewer speak faster.

Exit status: 0 when the interview ended with ``time_limit`` or ``user_ended``, 1 for any other
end reason, 2 for a usage problem (no key, an unsupported WAV, no ``sounddevice`` for --mic).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
import wave
from array import array
from collections.abc import AsyncGenerator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from voicefsm import protocol  # light: pydantic and transitions, no ADK or genai
from voicefsm.ports import (
    HostNote,
    StateNote,
    Upstream,
    UpstreamCloseNote,
    UpstreamOpenNote,
    UpstreamTornDownNote,
)

if TYPE_CHECKING:  # ADK and genai wait until after argument parsing (keeps --help fast)
    from voicefsm import SessionConfig, SessionRecord
    from voicefsm.model import TranscriptLine
    from voicefsm.ports import ClientInput
    from voicefsm.protocol import ServerMessage
    from voicefsm.testing import FakeLiveConnection, Interviewer

DEFAULT_MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
INPUT_RATE = 16_000  # what the Live API takes: 16 kHz, 16-bit, mono
OUTPUT_RATE = 24_000  # what it sends back
CHUNK_SECONDS = 0.020
CHUNK_SAMPLES = int(INPUT_RATE * CHUNK_SECONDS)  # 320
CHUNK_BYTES = CHUNK_SAMPLES * 2  # 640
PLAYBACK_BUFFER_SECONDS = 3.0
REFERENCE_MINUTES = 45.0  # the policy the defaults of SessionConfig are written for

INSTRUCTION = """\
You are Alex, a friendly, professional interviewer running a {minutes}-minute behavioral
interview for a software engineering role, by voice.

- Start by greeting the candidate, introducing yourself in one sentence and saying how the
  interview will go. Then ask your first question.
- Ask one question at a time and wait for the answer. Cover teamwork and conflict, ownership,
  a project that went wrong, learning from feedback, prioritising under pressure, and
  influencing without authority.
- Ask for concrete examples (situation, task, action, result). When an answer stays vague, ask
  one short follow-up question before moving on.
- Keep your own turns short: one or two sentences. Never evaluate or score the candidate aloud.
- If the candidate is silent for a long time, gently check whether they are still there.
- When you are told that time is running out, finish the current question, thank the
  candidate, invite their questions about the role, and close the interview politely.
"""

KICKOFF = "Hello, I'm the candidate and I'm ready to begin the interview."


class UsageError(ValueError):
    """A problem with the command line or the environment; exit status 2."""


# --------------------------------------------------------------------------- optional audio I/O


def load_sounddevice(purpose: str) -> ModuleType | None:
    """Import ``sounddevice`` if it and PortAudio are installed; otherwise say why, once."""
    try:
        return importlib.import_module("sounddevice")
    except ImportError:
        why = "the optional 'sounddevice' package is not installed (pip install sounddevice)"
    except OSError as error:  # sounddevice is there, the PortAudio library is not
        why = (
            f"sounddevice cannot load PortAudio ({error}); install it, e.g. "
            "apt install libportaudio2 or brew install portaudio"
        )
    print(f"{purpose}: {why}", file=sys.stderr)
    return None


class Player:
    """Plays interviewer audio through sounddevice; keeps at most a few seconds queued."""

    def __init__(self, sounddevice: ModuleType) -> None:
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._limit = int(OUTPUT_RATE * 2 * PLAYBACK_BUFFER_SECONDS)
        self.dropped_bytes = 0
        self._stream: Any = sounddevice.RawOutputStream(
            samplerate=OUTPUT_RATE, channels=1, dtype="int16", callback=self._callback
        )

    def start(self) -> None:
        """Start the output stream (PortAudio calls back for audio from now on)."""
        self._stream.start()

    def close(self) -> None:
        """Stop and close the output stream; errors on the way out are ignored."""
        with contextlib.suppress(Exception):
            self._stream.stop()
            self._stream.close()

    def feed(self, data: bytes) -> None:
        """Queue 24 kHz PCM for playback, dropping (and counting) what does not fit."""
        with self._lock:
            room = self._limit - len(self._buffer)
            if room < len(data):  # the interviewer runs faster than real time (--time-scale)
                self.dropped_bytes += len(data) - max(room, 0)
                data = data[: max(room, 0)]
            self._buffer += data

    def _callback(self, outdata: Any, frames: int, _time: Any, _status: Any) -> None:
        wanted = frames * 2
        with self._lock:
            piece = bytes(self._buffer[:wanted])
            del self._buffer[:wanted]
        outdata[: len(piece)] = piece
        if len(piece) < wanted:
            outdata[len(piece) :] = bytes(wanted - len(piece))


# --------------------------------------------------------------------------- audio sources


class WavReader:
    """Reads a PCM WAV file as 16 kHz mono 16-bit chunks: mixes channels down, resamples.

    Only 16-bit PCM is accepted (any rate, any number of channels); anything else is refused
    with a message that says how to convert it.
    """

    def __init__(self, path: Path) -> None:
        convert = f"convert it with: ffmpeg -i {path} -ac 1 -ar 16000 -sample_fmt s16 out.wav"
        try:
            self._wav = wave.open(str(path), "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError as error:
            raise UsageError(f"--wav: no such file: {path}") from error
        except (wave.Error, EOFError) as error:
            raise UsageError(
                f"--wav: {path} is not a PCM WAV file this script can read ({error}); {convert}"
            ) from error
        self.channels = self._wav.getnchannels()
        self.rate = self._wav.getframerate()
        width = self._wav.getsampwidth()
        if width != 2:
            self._wav.close()
            raise UsageError(
                f"--wav: {path} has {8 * width}-bit samples; only 16-bit PCM is supported; "
                f"{convert}"
            )
        self.seconds = self._wav.getnframes() / self.rate if self.rate else 0.0
        self._step = self.rate / INPUT_RATE  # input samples per output sample
        self._samples: list[int] = []  # mono input samples not yet consumed
        self._pos = 0.0  # position of the next output sample in _samples
        self._eof = False

    def describe(self) -> str:
        """The file's format, and what is done to it, for the start banner."""
        what = f"{self.rate} Hz, {self.channels} channel{'s' if self.channels > 1 else ''}"
        changes = []
        if self.channels > 1:
            changes.append("mixed to mono")
        if self.rate != INPUT_RATE:
            changes.append(f"resampled to {INPUT_RATE} Hz")
        return f"{what}, {self.seconds:.1f} s" + (f" ({', '.join(changes)})" if changes else "")

    def close(self) -> None:
        """Close the WAV file."""
        self._wav.close()

    def _read_mono(self, frames: int) -> bool:
        raw = self._wav.readframes(frames)
        if not raw:
            self._eof = True
            return False
        data = array("h")
        data.frombytes(raw[: len(raw) - len(raw) % 2])
        if sys.byteorder == "big":  # WAV is little-endian
            data.byteswap()
        if self.channels == 1:
            self._samples.extend(data)
        else:
            n = self.channels
            self._samples.extend(sum(data[i : i + n]) // n for i in range(0, len(data) - n + 1, n))
        return True

    def read_chunk(self) -> bytes | None:
        """The next 20 ms at 16 kHz mono (zero-padded at the end); ``None`` after the end."""
        out = array("h")
        if self.rate == INPUT_RATE:
            while len(self._samples) < CHUNK_SAMPLES and self._read_mono(CHUNK_SAMPLES):
                pass
            out.extend(self._samples[:CHUNK_SAMPLES])
            del self._samples[:CHUNK_SAMPLES]
        else:  # linear interpolation, streaming
            for _ in range(CHUNK_SAMPLES):
                index = int(self._pos)
                while index + 1 >= len(self._samples) and not self._eof:
                    self._read_mono(1024)
                if index + 1 >= len(self._samples):
                    break
                a, b = self._samples[index], self._samples[index + 1]
                out.append(int(a + (b - a) * (self._pos - index)))
                self._pos += self._step
            consumed = int(self._pos)
            if consumed > 4096:  # drop what is behind us
                del self._samples[:consumed]
                self._pos -= consumed
        if not out:
            return None
        if len(out) < CHUNK_SAMPLES:
            out.extend([0] * (CHUNK_SAMPLES - len(out)))
        if sys.byteorder == "big":
            out.byteswap()
        return out.tobytes()


def tone_chunk(index: int, frequency: float = 220.0, level: float = 0.05) -> bytes:
    """20 ms of a quiet sine tone, continuing the phase of chunk ``index - 1``."""
    start = index * CHUNK_SAMPLES
    peak = level * 32767
    samples = array(
        "h",
        (
            int(peak * math.sin(2 * math.pi * frequency * (start + i) / INPUT_RATE))
            for i in range(CHUNK_SAMPLES)
        ),
    )
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


async def paced(
    args: argparse.Namespace, reader: WavReader | None, say: Timeline
) -> AsyncGenerator[bytes, None]:
    """Candidate audio at real-time pace: the WAV (then silence), a tone, or silence."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    silence = bytes(CHUNK_BYTES)
    index = 0
    while True:
        chunk: bytes | None = None
        if reader is not None:
            chunk = reader.read_chunk()
            if chunk is None:
                say.note(f"the WAV file ended after {index * CHUNK_SECONDS:.1f} s; sending silence")
                reader.close()
                reader = None
        if chunk is None:
            chunk = tone_chunk(index) if args.tone else silence
        yield chunk
        index += 1
        due += CHUNK_SECONDS
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:  # the loop was blocked for a while: do not burst to catch up
            due = loop.time()


async def microphone(sounddevice: ModuleType) -> AsyncGenerator[bytes, None]:
    """Microphone audio, 20 ms blocks of 16 kHz mono 16-bit PCM."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def callback(indata: Any, _frames: int, _time: Any, _status: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

    stream = sounddevice.RawInputStream(
        samplerate=INPUT_RATE,
        channels=1,
        dtype="int16",
        blocksize=CHUNK_SAMPLES,
        callback=callback,
    )
    stream.start()
    try:
        while True:
            yield await queue.get()
    finally:
        stream.stop()
        stream.close()


# --------------------------------------------------------------------------- the terminal client


class Timeline:
    """Prints the host's structured notes (state changes, upstream opens and closes) with the
    elapsed time; pass it to :class:`~voicefsm.host.SessionHost` as ``on_note``.

    Notes never carry transcript text, so nothing said is printed unless ``--show-transcript``.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()

    def stamp(self) -> str:
        """The elapsed time since the interview started, as ``[mm:ss.s]``."""
        elapsed = time.monotonic() - self.started
        minutes, seconds = divmod(elapsed, 60)
        return f"[{int(minutes):02d}:{seconds:04.1f}]"

    def note(self, text: str) -> None:
        """Print one timeline line."""
        print(f"{self.stamp()}   {text}", flush=True)

    def __call__(self, note: HostNote) -> None:
        """Print a host note: state changes in capitals, upstream opens and closes as notes."""
        if isinstance(note, StateNote):
            print(
                f"{self.stamp()} {note.previous.value} -> {note.state.value.upper()}  ({note.why})",
                flush=True,
            )
        elif isinstance(note, UpstreamOpenNote):
            how = "resuming" if note.resuming else "fresh"
            resent = f", re-sending {note.resent_chunks} chunks" if note.resent_chunks else ""
            self.note(
                f"opening upstream #{note.connection_id} ({how}, attempt {note.attempt}{resent})"
            )
        elif isinstance(note, UpstreamCloseNote):
            self.note(f"closed upstream #{note.connection_id}: {note.reason}")
        elif isinstance(note, UpstreamTornDownNote) and note.unconfirmed_chunks:
            self.note(
                f"upstream #{note.connection_id}: {note.unconfirmed_chunks} chunks were never "
                "confirmed by the peer (counted as unsent)"
            )


class TerminalChannel:
    """The client side of the session (a :class:`voicefsm.ports.ClientChannel`) in a terminal."""

    def __init__(self, timeline: Timeline, player: Player | None) -> None:
        self._input: asyncio.Queue[ClientInput | None] = asyncio.Queue()
        self._timeline = timeline
        self._player = player
        self.audio_chunks = 0
        self.audio_bytes = 0
        self.turns = 0
        self.interruptions = 0
        self.pings = 0
        self.closed: tuple[int, str] | None = None
        self.ended = asyncio.Event()

    def push(self, message: ClientInput) -> None:
        """Hand the session something from the candidate (audio, text, the end)."""
        self._input.put_nowait(message)

    async def receive(self) -> ClientInput | None:
        """The next input for the session; ``None`` once the channel is closed."""
        return await self._input.get()

    async def send_audio(self, data: bytes) -> None:
        """Interviewer audio: played with ``--play``, counted either way."""
        self.audio_chunks += 1
        self.audio_bytes += len(data)
        if self._player is not None:
            self._player.feed(data)

    async def send_message(self, message: ServerMessage) -> None:
        """Show the warning and errors; count turns and pings; note the end."""
        if isinstance(message, protocol.SessionWarning):
            self._timeline.note(
                f"WARNING: {message.remaining_s:.0f} s left (the interviewer was asked to wrap up)"
            )
        elif isinstance(message, protocol.TurnStatus):
            if message.status == "turn_complete":
                self.turns += 1
            else:
                self.interruptions += 1
        elif isinstance(message, protocol.ErrorMessage):
            self._timeline.note(f"error from the session: {message.code}: {message.message}")
        elif isinstance(message, protocol.Ping):
            self.pings += 1  # no answer needed: the audio stream itself keeps the heartbeat
        elif isinstance(message, protocol.SessionEnded):
            self.ended.set()
        # session_state: the timeline prints state changes from the host's notes, with the why.

    async def close(self, code: int, reason: str) -> None:
        """The session closed the client: stop the input and note the code."""
        self.closed = (code, reason)
        self._input.put_nowait(None)
        self.ended.set()


class TranscriptPrinter:
    """A :class:`voicefsm.ports.SessionSink` that keeps the record and prints transcript lines
    only when asked to."""

    def __init__(self, timeline: Timeline, show: bool) -> None:
        self._timeline = timeline
        self._show = show
        self.record: SessionRecord | None = None
        self.lines = 0

    async def save(self, record: SessionRecord) -> None:
        """Keep the newest record (the summary reads it)."""
        self.record = record

    async def append_transcript(self, session_id: str, line: TranscriptLine) -> None:
        """Count a finished line, and print it with ``--show-transcript``."""
        self.lines += 1
        if self._show:
            who = "interviewer" if line.role == "interviewer" else "candidate  "
            self._timeline.note(f"{who} | {line.text}")


# --------------------------------------------------------------------------- configuration


def session_config(minutes: float) -> SessionConfig:
    """The production defaults, with the interview-time settings scaled to ``minutes``."""
    from voicefsm import SessionConfig

    defaults = SessionConfig()
    scale = minutes / REFERENCE_MINUTES
    return SessionConfig(
        time_limit_s=minutes * 60,
        warning_before_s=defaults.warning_before_s * scale,
        min_remaining_to_resume_s=defaults.min_remaining_to_resume_s * scale,
    )


def fake_script(args: argparse.Namespace, interviewer: Interviewer, timeline: Timeline) -> Any:
    """The scripted interviewer, plus a GoAway ``--go-away-every`` s after each setup.

    Durations here are real seconds (the GoAway's ``timeLeft`` too, so the session's rotation
    policy sees the truth). ``Interviewer`` issues a resumption handle after each answer; the
    real API sends updates all along, so before a GoAway this re-issues the latest resume point
    if the connection has none yet (otherwise a GoAway during the first question would leave the
    session nothing to resume with: ``upstream_lost``, correctly).
    """
    from voicefsm.testing import InterviewState

    async def rotate(conn: FakeLiveConnection) -> None:
        await asyncio.sleep(args.go_away_every)
        if not conn.issued_handles:
            resumed = conn.resumed_from.state if conn.resumed_from is not None else None
            point = resumed if isinstance(resumed, InterviewState) else InterviewState(0)
            await conn.send_resumption_update(state=point)
        await conn.send_go_away(args.go_away_time_left)
        if args.verbose:
            timeline.note(f"(fake) GoAway on connection #{conn.number}")
        conn.schedule_close(args.go_away_time_left, 1000, "session rotated")

    async def script(conn: FakeLiveConnection) -> None:
        if args.go_away_every > 0:
            conn.start_background(rotate(conn), name="go-away")
        await interviewer(conn)

    return script


DESCRIPTION = (
    "Run a spoken behavioral interview from the terminal on voicefsm: against the Gemini Live "
    "API when GOOGLE_API_KEY is set (through ADK when it is installed, else directly through "
    "google-genai; --upstream to choose), or against the built-in fake interviewer with "
    "--fake. Prints the state timeline and an end summary; Ctrl-C ends the interview "
    "(user_ended). Exit status: 0 for time_limit or user_ended, 1 for any other end, 2 for a "
    "usage problem."
)
EPILOG = (
    "examples:\n"
    "  voicefsm interview --fake --minutes 1 --time-scale 20\n"
    "  voicefsm interview --fake --wav answer.wav --show-transcript\n"
    "  GOOGLE_API_KEY=... voicefsm interview --mic --play"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``voicefsm interview`` options to ``parser``."""
    upstream = parser.add_argument_group("interviewer")
    upstream.add_argument(
        "--fake",
        action="store_true",
        help="use the in-process fake Live server's scripted interviewer (no key, no network)",
    )
    upstream.add_argument(
        "--upstream",
        choices=["auto", "adk", "genai"],
        default="auto",
        help="model connection: ADK, direct google-genai, or auto (ADK when installed, as "
        "voicefsm serve picks; default: auto)",
    )
    upstream.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Gemini Live model (default: {DEFAULT_MODEL})",
    )
    upstream.add_argument(
        "--minutes",
        type=float,
        default=REFERENCE_MINUTES,
        help="interview length in minutes; the warning and other interview-time settings of "
        "the 45-minute defaults scale with it (default: 45)",
    )
    upstream.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="--fake: how many times faster than real time the interviewer speaks (default: 1)",
    )
    upstream.add_argument(
        "--go-away-every",
        type=float,
        metavar="SECONDS",
        help="--fake: send a GoAway this long after each connection's setup, 0 for never "
        "(default: 10 minutes per 45, i.e. 13.3 s with --minutes 1)",
    )
    upstream.add_argument(
        "--go-away-time-left",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="--fake: the GoAway's timeLeft; the fake closes the connection then (default: 5)",
    )
    upstream.add_argument(
        "--kickoff",
        metavar="TEXT",
        help="a text turn sent first so the interviewer starts talking (default with Gemini: "
        f"{KICKOFF!r}; none with --fake; pass '' for none)",
    )
    audio = parser.add_argument_group("audio")
    source = audio.add_mutually_exclusive_group()
    source.add_argument(
        "--wav",
        type=Path,
        metavar="PATH",
        help="stream a 16-bit PCM WAV file as the candidate (other rates and stereo are "
        "converted), then silence",
    )
    source.add_argument(
        "--mic", action="store_true", help="use the microphone (needs the sounddevice package)"
    )
    source.add_argument(
        "--tone", action="store_true", help="stream a quiet 220 Hz tone instead of silence"
    )
    audio.add_argument(
        "--play",
        action="store_true",
        help="play the interviewer through sounddevice if installed (otherwise count bytes)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--show-transcript", action="store_true", help="print finished transcript lines"
    )
    output.add_argument(
        "--verbose", action="store_true", help="also log voicefsm.adk and the fake server"
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible option values (:class:`UsageError`); fill in scaled defaults."""
    if args.minutes <= 0 or not math.isfinite(args.minutes):
        raise UsageError("--minutes must be a positive number")
    if args.time_scale <= 0:
        raise UsageError("--time-scale must be positive")
    if args.go_away_every is None:
        args.go_away_every = 600.0 * args.minutes / REFERENCE_MINUTES
    if args.go_away_every < 0 or args.go_away_time_left < 0:
        raise UsageError("--go-away-every and --go-away-time-left must not be negative")
    if not args.fake and args.time_scale != 1.0:
        raise UsageError("--time-scale only applies to --fake")
    from voicefsm.serve import upstream_kind

    try:
        args.upstream = upstream_kind(args.upstream)
    except ValueError as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- the interview


def configure_logging(args: argparse.Namespace) -> None:
    """With ``--verbose``, log voicefsm at INFO (the timeline comes from the host's notes)."""
    if args.verbose:
        logging.basicConfig(
            level=logging.WARNING, format="             %(name)s: %(message)s", stream=sys.stdout
        )
        logging.getLogger("voicefsm").setLevel(logging.INFO)
        logging.getLogger("voicefsm.testing.websockets").setLevel(logging.WARNING)


async def interview(
    args: argparse.Namespace,
    reader: WavReader | None,
    sounddevice_in: ModuleType | None,
    sounddevice_out: ModuleType | None,
) -> int:
    """Run the interview to its end; print the timeline and the summary; return the status."""
    from voicefsm import EndReason, Session
    from voicefsm import events as ev
    from voicefsm.host import SessionHost

    timeline = Timeline()
    configure_logging(args)
    player = Player(sounddevice_out) if sounddevice_out is not None else None

    config = session_config(args.minutes)
    channel = TerminalChannel(timeline, player)
    sink = TranscriptPrinter(timeline, args.show_transcript)
    kickoff = args.kickoff if args.kickoff is not None else ("" if args.fake else KICKOFF)

    async with contextlib.AsyncExitStack() as stack:
        if args.fake:
            from voicefsm.testing import DEFAULT_QUESTIONS, FakeLiveServer, Interviewer

            # Answers long enough to spread the questions (and a closing remark) over the
            # interview: the fake takes any audio, silence included, as an answer.
            answer_seconds = max(1.0, config.time_limit_s / (len(DEFAULT_QUESTIONS) + 1))
            interviewer = Interviewer(
                time_scale=args.time_scale,
                answer_audio_chunks=max(1, round(answer_seconds / CHUNK_SECONDS)),
                answer_timeout=None,
            )
            server = FakeLiveServer(
                script=fake_script(args, interviewer, timeline),
                record_payloads=False,
                raise_script_errors=False,
            )
            await stack.enter_async_context(server)
            client = server.genai_client()
            where = (
                f"fake Live server {server.base_url} (scripted interviewer at "
                f"{args.time_scale:g}x, answers of {answer_seconds:.0f} s, "
                + (
                    f"GoAway every {args.go_away_every:.3g} s)"
                    if args.go_away_every > 0
                    else "no GoAway)"
                )
            )
        else:
            client = None
            where = f"Gemini Live API, model {args.model}"
        upstream = make_upstream(args, client)
        session = Session(config)
        host = SessionHost(session, upstream, client=channel, sink=sink, on_note=timeline)

        if reader is not None:
            heard = f"WAV {args.wav} ({reader.describe()})"
        elif args.mic:
            heard = "the microphone"
        else:
            heard = "a quiet tone" if args.tone else "silence"
        through = "ADK" if args.upstream == "adk" else "direct google-genai"
        print(f"interview {session.session_id[:12]}: {where}, through {through}")
        print(
            f"  {config.time_limit_s / 60:g} min, warning {config.warning_before_s:.3g} s before "
            f"the end; candidate audio: {heard}; interviewer audio: "
            + ("played" if player else "counted")
        )
        print("  Ctrl-C ends the interview.", flush=True)

        if player is not None:
            player.start()
            stack.callback(player.close)
        timeline.started = time.monotonic()
        host_task = asyncio.create_task(host.run(), name="voicefsm-host")
        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_interrupt() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                print("", flush=True)
                timeline.note("Ctrl-C: ending the interview (Ctrl-C again to cancel)")
                channel.push(ev.ClientEnd())
            else:
                host_task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
                loop.add_signal_handler(signum, on_interrupt)
                stack.callback(loop.remove_signal_handler, signum)

        sent = 0

        async def feed() -> None:
            nonlocal sent
            if kickoff:
                channel.push(ev.ClientText(kickoff))
            chunks = microphone(sounddevice_in) if sounddevice_in else paced(args, reader, timeline)
            async with contextlib.aclosing(chunks):
                async for data in chunks:
                    if host_task.done():
                        break
                    channel.push(ev.ClientAudio(data))
                    sent += 1

        feeder = asyncio.create_task(feed(), name="candidate-audio")
        try:
            record = await host_task
        except asyncio.CancelledError:
            record = None
            if sink.record is None or interrupts < 2:
                raise
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            if reader is not None:
                reader.close()
        if record is None:
            record = sink.record
        assert record is not None

    stats = record.stats
    ended_at = record.ended_at if record.ended_at is not None else time.time()
    print()
    print("summary")
    print(f"  session        {record.session_id}")
    print(f"  end reason     {record.end_reason}: {record.end_detail}")
    print(
        f"  duration       {ended_at - record.started_at:.1f} s "
        f"(limit {record.config.time_limit_s:g} s)"
    )
    print(
        f"  resumes        {stats.resumes} (GoAways {stats.goaways}, "
        f"connection attempts {stats.connect_attempts})"
    )
    print(
        f"  candidate      {sent} chunks sent ({sent * CHUNK_SECONDS:.1f} s); "
        f"{stats.chunks_buffered} held while the upstream was not ready, "
        f"{stats.chunks_flushed} flushed, {stats.chunks_overflowed} overflowed"
    )
    played = "played" if player is not None else "counted"
    print(
        f"  interviewer    {channel.audio_chunks} chunks, {channel.audio_bytes} bytes "
        f"({channel.audio_bytes / (OUTPUT_RATE * 2):.1f} s of audio, {played}), "
        f"{channel.turns} turn{'' if channel.turns == 1 else 's'}"
        + (f", {channel.interruptions} interrupted" if channel.interruptions else "")
    )
    if player is not None and player.dropped_bytes:
        print(f"                 {player.dropped_bytes / (OUTPUT_RATE * 2):.1f} s not played")
    shown = "" if args.show_transcript else " (--show-transcript prints them)"
    print(f"  transcript     {stats.transcript_lines} lines{shown}")
    ok = record.end_reason in (EndReason.TIME_LIMIT, EndReason.USER_ENDED)
    return 0 if ok else 1


def make_upstream(args: argparse.Namespace, client: Any) -> Upstream:
    """The interviewer's upstream that ``--upstream`` (resolved by :func:`check_arguments`)
    names, on ``client`` (``None``: a genai client for Gemini from the environment)."""
    instruction = INSTRUCTION.format(minutes=f"{args.minutes:g}")
    if args.upstream == "genai":
        from voicefsm.genai_live import GenaiUpstream

        return GenaiUpstream(args.model, client=client, instruction=instruction)
    from google.adk.agents import LlmAgent

    from voicefsm.adk import AdkUpstream

    agent = LlmAgent(name="interviewer", model=args.model, instruction=instruction)
    return AdkUpstream(agent, client=client)


def preflight(
    args: argparse.Namespace,
) -> tuple[WavReader | None, ModuleType | None, ModuleType | None]:
    """Check the environment before anything heavy is imported: key, WAV file, sounddevice."""
    if not args.fake and not (os.environ.get("GOOGLE_API_KEY") or os.environ.get("GEMINI_API_KEY")):
        raise UsageError(
            "GOOGLE_API_KEY is not set: set it to talk to the Gemini Live API, "
            "or pass --fake to run against the offline fake interviewer"
        )
    sounddevice_in = sounddevice_out = None
    if args.mic:
        sounddevice_in = load_sounddevice("--mic")
        if sounddevice_in is None:
            raise UsageError("--mic cannot work without sounddevice; use --wav PATH instead")
    if args.play:
        sounddevice_out = load_sounddevice("--play")
        if sounddevice_out is None:
            print("--play: counting interviewer audio bytes instead", file=sys.stderr)
    reader = WavReader(args.wav) if args.wav is not None else None
    return reader, sounddevice_in, sounddevice_out


def run(args: argparse.Namespace) -> int:
    """Run ``voicefsm interview`` with parsed arguments; return the exit status."""
    try:
        check_arguments(args)
        reader, sounddevice_in, sounddevice_out = preflight(args)
        return asyncio.run(interview(args, reader, sounddevice_in, sounddevice_out))
    except UsageError as error:
        print(f"voicefsm interview: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # no signal handlers (Windows) or before the session started
        print("\ninterrupted", file=sys.stderr)
        return 130
