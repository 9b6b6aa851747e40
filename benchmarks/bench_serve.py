"""The whole server: ``voicefsm serve`` against a bare Starlette websocket relay, N clients each.

Run from the repository root::

    python benchmarks/bench_serve.py --quick
    python benchmarks/bench_serve.py --sizes 25,50,100 --repeats 3 --cpu 0
    python benchmarks/bench_serve.py --quick --markdown docs/benchmarks.md   # write the section

Three kinds of process: the fake Gemini Live server (``bench_capacity.py``'s interviewer on the
wire: model audio every 40 ms on an absolute schedule, each chunk stamped with its scheduled
send time; here with frames encoded once, one task sending for all connections, and the
clients' messages counted but not parsed, see :class:`ModelAudioSchedule`);
two servers under test, both uvicorn pinned to ``--cpu``:

* ``voicefsm-serve``: ``voicefsm serve --upstream genai`` (service, session hosts, the direct
  genai upstream; memory store, admission control off so it can be driven past saturation;
  uvicorn as ``voicefsm.web.starlette.uvicorn_options()`` sets it up, i.e. ``websockets-sansio``
  through :class:`voicefsm.web.uvicorn_server.QueueingWebSocketProtocol`);
* ``starlette-relay``: a bare Starlette app on stock ``websockets-sansio`` that relays each
  client websocket to its own ``client.aio.live.connect`` (client audio in, model audio out,
  nothing else);

and this process, running N websocket clients: each sends a 640-byte binary frame every 20 ms on
an absolute schedule and receives interviewer audio. By default (``--clients raw``) the clients
speak RFC 6455 themselves over asyncio protocols, with one pre-built masked audio frame each and
one task feeding them all, so that the load generator stays cheap next to the servers;
``--clients websockets`` gives each client a ``websockets`` connection and a task. Both servers
run for the whole benchmark; the runs alternate between them (the order rotates every repeat).

By default the clients offer permessage-deflate as browsers do (``--offer-deflate yes``): a
server that takes it inflates every client chunk and deflates every interviewer chunk.
``--offer-deflate both`` runs every (server, N, repeat) twice, offering and not, paired. The
audio both ways is speech-like PCM (tones and noise, :func:`speech_like_pcm`), which deflates
about as little as real speech does.

Per server and N, over a ``--window`` after a ``--warmup``:

* **server CPU per interview** (utime + stime of the server's process / N / window), ms per s;
* **interviewer-audio latency** p50/p99: the fake's scheduled send time to the arrival at the
  client; **jitter p99**: per chunk, its latency minus the lowest latency of its client (how
  unevenly the audio arrives), over every chunk of every client;
* **model chunks** received against those the fake scheduled (a shortfall is audio that never
  arrived or is still queued);
* **clients CPU** and **fake CPU**: this process and the fake's over the window, in % of a core
  (the harness must not be what saturates).

"Holds N" means jitter p99 <= 50 ms with every scheduled chunk received.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import heapq
import itertools
import json
import math
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import (
    add_size_arguments,
    command_line,
    median_of,
    paired_ratio,
    parse_sizes,
    pct,
    pin,
    publish,
    run_profiled,
    spawned,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "bench-serve-secret-that-is-long-enough-for-hs256"
SERVERS = ("voicefsm-serve", "starlette-relay")
BEFORE = "voicefsm-before"
"""``voicefsm serve`` from another checkout (``--compare-root``), for a paired before/after."""
VOICEFSM_KINDS = ("voicefsm-serve", BEFORE)
"""The servers that speak voicefsm's protocol (the relay takes no token)."""
MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
CHUNK_BYTES = 640
CHUNK_S = 0.02
MODEL_CHUNK_S = 0.04
MODEL_CHUNK_BYTES = 1920  # 40 ms of 24 kHz 16-bit mono
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
"""What Chrome and Firefox offer (``Sec-WebSocket-Extensions``) on every websocket."""
DEFLATE_SUFFIX = " +deflate"
"""Appended to a server's name for the runs whose clients offered permessage-deflate."""


def speech_like_pcm(seconds: float, rate: int, seed: int) -> bytes:
    """16-bit mono PCM that deflates about as badly as speech does: tones plus noise.

    Silence would deflate to almost nothing and understate what compressing audio costs.
    """
    import array
    import math
    import random

    rng = random.Random(seed)
    samples = array.array("h")
    for i in range(int(seconds * rate)):
        t = i / rate
        tone = 3000 * math.sin(2 * math.pi * 180 * t) + 1500 * math.sin(2 * math.pi * 720 * t)
        samples.append(int(tone * (0.6 + 0.4 * math.sin(2 * math.pi * 3 * t)) + rng.gauss(0, 400)))
    return samples.tobytes()


# --------------------------------------------------------------------------- the bare relay


def relay_main(port: int, base_url: str, ca_file: str) -> None:
    """The baseline server: Starlette + uvicorn, one raw genai live session per websocket."""
    import ssl

    import uvicorn
    from google import genai
    from google.genai import types
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    client = genai.Client(
        api_key="fake-key",
        http_options=types.HttpOptions(
            base_url=base_url,
            api_version="v1alpha",
            async_client_args={"ssl": ssl.create_default_context(cafile=ca_file)},
        ),
    )
    config = types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
        session_resumption=types.SessionResumptionConfig(),
    )

    async def relay(websocket: WebSocket) -> None:
        await websocket.accept()
        async with client.aio.live.connect(model=MODEL, config=config) as session:

            async def to_client() -> None:
                while True:
                    async for message in session.receive():
                        content = message.server_content
                        if content is not None and content.model_turn is not None:
                            for part in content.model_turn.parts or ():
                                if part.inline_data is not None and part.inline_data.data:
                                    await websocket.send_bytes(part.inline_data.data)

            sender = asyncio.create_task(to_client())
            try:
                while True:
                    data = await websocket.receive_bytes()
                    await session.send_realtime_input(
                        audio=types.Blob(data=data, mime_type="audio/pcm;rate=16000")
                    )
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                sender.cancel()
                await asyncio.wait({sender})

    app = Starlette(routes=[WebSocketRoute("/interview", relay)])
    profile_windows(os.environ.get("BENCH_SERVE_PROFILE"))
    uvicorn.run(app, host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning")


def profile_windows(path: str | None) -> None:
    """With a ``path``: SIGUSR1 starts cProfile in this process, SIGUSR2 stops it and writes
    the stats so far to ``path`` (the benchmark brackets each measured window with them)."""
    if not path:
        return
    import cProfile
    import signal

    profiler = cProfile.Profile()

    def start(signum: int, frame: Any) -> None:
        profiler.enable()

    def stop(signum: int, frame: Any) -> None:
        profiler.disable()
        profiler.dump_stats(path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def serve_main(argv: list[str]) -> None:
    """``voicefsm serve`` with :func:`profile_windows` (only used with ``--profile-server``)."""
    from voicefsm.cli import main

    profile_windows(os.environ.get("BENCH_SERVE_PROFILE"))
    raise SystemExit(main(argv))


# --------------------------------------------------------------------------- servers


def fake_main(pipe: Any, cpu: int | None, profile: str | None) -> None:
    """The fake Live server's process, optionally under cProfile."""
    pin(cpu)
    run_profiled(_serve_fake(pipe), profile)


STAMP_BYTES = 9
"""A model chunk's stamp: its scheduled send time (``>d``) and one zero byte, so that the stamp
is whole base64 quanta (12 characters) and the audio after it can be encoded once."""


class ModelAudioSchedule:
    """What the fake sends on every connection: ``bench_capacity.py``'s interviewer, one task.

    After ``setupComplete``: a 40 ms model audio chunk on the connection's absolute schedule,
    each stamped with its scheduled send time; an output transcription after every 12th chunk;
    a turn complete and a resumption update after every 50th. A connection's chunks stop when
    it closes.

    The frames are the ones :meth:`~voicefsm.testing.FakeLiveConnection.send_model_audio`
    would send, encoded once: per chunk only the stamp's 12 base64 characters are new. One task
    sends for every connection (each wake-up sends whatever has come due), instead of a task
    and a sleep per connection. It awaits each send in turn, so a connection whose write
    buffer is full (its server has stopped reading for longer than the socket buffers hold,
    seconds of audio) holds the others up until it drains.
    """

    def __init__(self) -> None:
        body = MODEL_CHUNK_BYTES - STAMP_BYTES
        assert body % 3 == 0  # the audio's base64 starts on a quantum boundary
        pcm = speech_like_pcm(2.0, 24000, seed=1)  # chunks differ: none deflates to a copy
        marker = "@DATA@"
        message = {
            "serverContent": {
                "modelTurn": {
                    "role": "model",
                    "parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": marker}}],
                }
            }
        }
        head, tail = json.dumps(message, separators=(",", ":")).encode().split(marker.encode())
        self._audio = [
            (head, base64.b64encode(pcm[i : i + body]) + tail)
            for i in range(0, len(pcm) - body + 1, body)
        ]
        self._transcription = self._encoded(
            {"serverContent": {"outputTranscription": {"text": "word ", "finished": False}}}
        )
        self._turn_complete = self._encoded({"serverContent": {"turnComplete": True}})
        self._due: list[tuple[float, int, int, Any]] = []  # (due, order, k, connection): a heap
        self._order = itertools.count()
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _encoded(message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode()

    def audio_frame(self, due: float, k: int) -> bytes:
        """Chunk ``k``'s ``serverContent`` frame, stamped ``due``."""
        head, rest = self._audio[k % len(self._audio)]
        return head + base64.b64encode(struct.pack(">dx", due)) + rest

    async def script(self, conn: Any) -> None:
        """The connection's script: answer the setup, then leave the sending to the task."""
        await conn.send_setup_complete()
        heapq.heappush(self._due, (time.monotonic(), next(self._order), 0, conn))
        if self._task is None:
            self._task = asyncio.create_task(self._send_due())
        elif self._wake is not None:
            _wake_up(self._wake)  # its first chunk is due now
        await conn.wait_closed(timeout=None)

    async def _send_due(self) -> None:
        from websockets.exceptions import ConnectionClosed

        loop = asyncio.get_running_loop()
        due_heap = self._due
        while True:
            now = time.monotonic()
            while due_heap and due_heap[0][0] <= now:
                due, _, k, conn = heapq.heappop(due_heap)
                if not conn.is_open:
                    continue
                try:
                    await conn.send_encoded(self.audio_frame(due, k))
                    if k % 12 == 11:
                        await conn.send_encoded(self._transcription)
                    if k % 50 == 49:
                        await conn.send_encoded(self._turn_complete)
                        await conn.send_resumption_update()
                except ConnectionClosed:
                    continue
                heapq.heappush(due_heap, (due + MODEL_CHUNK_S, next(self._order), k + 1, conn))
            self._wake = wake = loop.create_future()
            timer = None
            if due_heap:
                delay = due_heap[0][0] - time.monotonic()
                timer = loop.call_later(delay, _wake_up, wake)
            try:
                await wake
            finally:
                if timer is not None:
                    timer.cancel()


def _wake_up(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _serve_fake(pipe: Any) -> None:
    import logging

    from voicefsm.testing import FakeLiveServer

    logging.disable(logging.WARNING)
    # Nothing here reads what the clients sent: count it, no records (memory stays flat).
    server = FakeLiveServer(
        script=ModelAudioSchedule().script,
        enforce_resumption_handles=False,
        raise_script_errors=False,
        record_payloads=False,
        parse_client_messages=False,
    )
    async with server:
        pipe.send({"base_url": server.base_url, "ca_pem": server.ca_pem.decode()})
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(
    kind: str,
    port: int,
    base_url: str,
    ca_file: str,
    cpu: int | None,
    profile: Path | None,
    max_sessions: int = 100,
    compare_root: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Any:
    """Start one server process; return the Popen.

    With a ``profile`` path the server profiles its measured windows into ``PATH.KIND``
    (:func:`profile_windows`). :data:`BEFORE` runs ``voicefsm serve`` with ``compare_root``
    first on ``PYTHONPATH``; ``extra_args`` go to that kind's ``voicefsm serve``.
    """
    root = compare_root if kind == BEFORE and compare_root is not None else ROOT
    env = {**os.environ, "VOICEFSM_JWT_SECRET": SECRET, "PYTHONPATH": str(root)}
    if profile is not None:
        env["BENCH_SERVE_PROFILE"] = f"{profile}.{kind}"
    env.pop("GOOGLE_API_KEY", None)
    if kind in VOICEFSM_KINDS:
        serve_args = [
            "serve",
            "--port",
            str(port),
            "--upstream",
            "genai",
            "--live-base-url",
            base_url,
            "--live-ca-file",
            ca_file,
            "--store",
            "memory://",
            "--max-loop-lag-ms",
            "0",
            "--max-sessions",
            str(max_sessions),
            *extra_args,
        ]
        if profile is None:
            argv = [sys.executable, "-m", "voicefsm.cli", *serve_args]
        else:
            code = (
                f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_serve; "
                f"bench_serve.serve_main({serve_args!r})"
            )
            argv = [sys.executable, "-c", code]
    else:
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_serve; "
            f"bench_serve.relay_main({port}, {base_url!r}, {ca_file!r})"
        )
        argv = [sys.executable, "-c", code]

    def pin() -> None:  # not the clients' affinity, which this process may have
        os.sched_setaffinity(0, {cpu} if cpu is not None else range(os.cpu_count() or 1))

    log = open(f"/tmp/bench-serve-{kind}.log", "w")  # noqa: SIM115 - lives as long as the process
    # From its own root: ``python -m`` / ``-c`` put the working directory first on sys.path, so
    # run from another checkout the server would import that checkout's voicefsm instead.
    return subprocess.Popen(
        argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
    )


async def wait_listening(port: int, process: Any, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not listen within {within:g} s")


# --------------------------------------------------------------------------- clients


def masked_frame(opcode: int, payload: bytes, key: bytes, compressed: bool = False) -> bytes:
    """One complete client frame (FIN set, masked with ``key``), built once and re-sent.

    ``compressed``: ``payload`` is a permessage-deflate message (RSV1 set).
    """
    length = len(payload)
    first = 0x80 | opcode | (0x40 if compressed else 0)
    if length < 126:
        head = struct.pack(">BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack(">BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack(">BBQ", first, 0x80 | 127, length)
    mask = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
    return head + key + masked


def deflated(payload: bytes) -> bytes:
    """``payload`` as one permessage-deflate message from a fresh compressor (RFC 7692 7.2.1).

    With no reference to earlier messages it may be re-sent as is, whatever the context
    takeover: the server's inflater decodes it the same each time.
    """
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


CLIENT_PCM = speech_like_pcm(1.0, 16000, seed=2)


class RawClient(asyncio.Protocol):
    """One interview's client speaking RFC 6455 itself: the cheap load generator.

    The audio frame is built (and masked) once; a received server frame costs a header parse
    and, for interviewer audio, one ``unpack_from`` of its stamp. Server frames are read as
    they come (``data_received``), all frames of one read stamped with one arrival time.

    With ``offer_deflate`` it offers permessage-deflate as a browser does; if the server takes
    it, the audio frame is sent compressed (as a browser sends it) and compressed server
    messages are inflated (one inflater, the server's context kept across messages).
    """

    def __init__(self, kind: str, token: str, offer_deflate: bool = False, index: int = 0) -> None:
        self.kind = kind
        self.token = token
        self.offer_deflate = offer_deflate
        self.deflate = False
        """Whether the server took permessage-deflate."""
        self._inflater: Any = None
        self._reset_inflater = False
        self.ready = asyncio.Event()
        self.latencies: list[float] = []
        self.received = 0
        self.window = (float("inf"), float("inf"))
        self.key = os.urandom(4)
        at = (index * CHUNK_BYTES) % (len(CLIENT_PCM) - CHUNK_BYTES)
        self.audio = CLIENT_PCM[at : at + CHUNK_BYTES]
        self.audio_frame = masked_frame(0x2, self.audio, self.key)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._opened = asyncio.get_running_loop().create_future()
        self._accept = ""
        self._buffer = bytearray()
        self._upgraded = False

    async def connect(self, host: str, port: int, path: str) -> None:
        """Open the TCP connection and complete the websocket handshake."""
        import base64
        import hashlib

        key = base64.b64encode(os.urandom(16)).decode()
        magic = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        self._accept = base64.b64encode(hashlib.sha1((key + magic).encode()).digest()).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if self.kind in VOICEFSM_KINDS:
            lines.append(f"Sec-WebSocket-Protocol: voicefsm.v1, bearer.{self.token}")
        if self.offer_deflate:
            lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, host, port)
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(30):
            await self._opened

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Mark the client closed."""
        if not self._opened.done():
            self._opened.set_exception(ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Parse every complete server frame in the buffer."""
        now = time.monotonic()
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(buffer[:head_end]).decode("latin-1")
            del buffer[: head_end + 4]
            if not head.startswith("HTTP/1.1 101") or self._accept not in head:
                self._opened.set_exception(ConnectionError(head.split("\r\n", 1)[0]))
                assert self.transport is not None
                self.transport.close()
                return
            self._upgraded = True
            accepted = [
                line.split(":", 1)[1].lower()
                for line in head.split("\r\n")
                if line.lower().startswith("sec-websocket-extensions:")
            ]
            if any("permessage-deflate" in value for value in accepted):
                self.deflate = True
                self._inflater = zlib.decompressobj(-15)
                self._reset_inflater = any("server_no_context_takeover" in v for v in accepted)
                self.audio_frame = masked_frame(0x2, deflated(self.audio), self.key, True)
            self._opened.set_result(None)
        start, end = self.window
        at = 0
        size = len(buffer)
        while size - at >= 2:
            compressed = buffer[at] & 0x40
            opcode = buffer[at] & 0x0F
            length = buffer[at + 1] & 0x7F
            offset = at + 2
            if length == 126:
                if size - at < 4:
                    break
                length = (buffer[at + 2] << 8) | buffer[at + 3]
                offset = at + 4
            elif length == 127:
                if size - at < 10:
                    break
                (length,) = struct.unpack_from(">Q", buffer, at + 2)
                offset = at + 10
            if size - offset < length:
                break
            if compressed:  # a data message (the server sends each in one frame)
                payload = self._inflate(bytes(buffer[offset : offset + length]))
                if opcode == 0x2 and len(payload) >= 8:
                    self._arrived(struct.unpack_from(">d", payload)[0], now, start, end)
            elif opcode == 0x2 and length >= 8:
                self._arrived(struct.unpack_from(">d", buffer, offset)[0], now, start, end)
            elif opcode == 0x9:  # ping: answer with a pong carrying its payload
                self.send_frame(0xA, bytes(buffer[offset : offset + length]))
            elif opcode == 0x8:  # close: echo it and let the server end the TCP connection
                self.send_frame(0x8, bytes(buffer[offset : offset + min(length, 2)]))
            at = offset + length
        del buffer[:at]

    def _inflate(self, data: bytes) -> bytes:
        payload: bytes = self._inflater.decompress(data + b"\x00\x00\xff\xff")
        if self._reset_inflater:
            self._inflater = zlib.decompressobj(-15)
        return payload

    def _arrived(self, scheduled: float, now: float, start: float, end: float) -> None:
        if start <= scheduled < end:
            self.latencies.append(now - scheduled)
            self.received += 1
        if not self.ready.is_set():
            self.ready.set()

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Send one (small) control or text frame."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame(opcode, payload, self.key))

    def send_audio(self) -> bool:
        """Send the audio frame; False once the connection is closing."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(self.audio_frame)
        return True

    async def end(self, within: float) -> None:
        """Ask the server to close (``end_session`` for voicefsm, a close frame otherwise)."""
        if self.kind in VOICEFSM_KINDS:
            self.send_frame(0x1, b'{"end_session": true}')
        else:
            self.send_frame(0x8, struct.pack(">H", 1000))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.closed
        if self.transport is not None:
            self.transport.close()


async def feed_all(clients: Sequence[RawClient], begin: float, stop_at: float) -> None:
    """Every client's audio on its absolute 20 ms schedule, staggered by ``CHUNK_S / N``.

    One task for all clients: each wake-up sends every frame that has come due since the last.
    """
    n = len(clients)
    step = CHUNK_S / n
    k = 0
    while True:
        now = time.monotonic()
        while begin + k * step <= now:
            due = begin + k * step
            if due >= stop_at:
                return
            clients[k % n].send_audio()
            k += 1
        await asyncio.sleep(begin + k * step - time.monotonic())


class WebsocketsClient:
    """One interview's client on the ``websockets`` library (``--clients websockets``)."""

    def __init__(self, kind: str, token: str, offer_deflate: bool = False, index: int = 0) -> None:
        self.kind = kind
        self.token = token
        self.offer_deflate = offer_deflate
        self.deflate = False
        at = (index * CHUNK_BYTES) % (len(CLIENT_PCM) - CHUNK_BYTES)
        self.audio = CLIENT_PCM[at : at + CHUNK_BYTES]
        self.ready = asyncio.Event()
        self.latencies: list[float] = []
        self.received = 0
        self.window = (float("inf"), float("inf"))
        self.ws: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int, path: str) -> None:
        """Open the websocket; start reading."""
        from websockets.asyncio.client import connect

        protocols = ["voicefsm.v1", f"bearer.{self.token}"] if self.kind in VOICEFSM_KINDS else []
        self.ws = await connect(
            f"ws://{host}:{port}{path}",
            subprotocols=protocols or None,  # type: ignore[arg-type]
            open_timeout=30,
            max_queue=None,
            compression="deflate" if self.offer_deflate else None,
        )
        self.deflate = any(
            "permessage-deflate" in value.lower()
            for value in self.ws.response.headers.get_all("Sec-WebSocket-Extensions")
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes) and len(frame) >= 8:
                    now = time.monotonic()
                    (scheduled,) = struct.unpack_from(">d", frame)
                    self.ready.set()
                    start, end = self.window
                    if start <= scheduled < end:
                        self.latencies.append(now - scheduled)
                        self.received += 1
        except Exception:
            return

    async def feed(self, begin: float, stop_at: float) -> None:
        """This client's audio on its absolute 20 ms schedule."""
        payload = self.audio
        for seq in itertools.count():
            due = begin + seq * CHUNK_S
            if due >= stop_at:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self.ws.send(payload)
            except Exception:
                return

    async def end(self, within: float) -> None:
        """Ask the server to close, wait for it, stop reading."""
        if self.kind in VOICEFSM_KINDS:
            with contextlib.suppress(Exception):
                await self.ws.send('{"end_session": true}')
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self.ws.wait_closed()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader})


@dataclass
class ServeResult:
    """One server at one N, one repeat."""

    server: str
    n: int
    cpu_ms_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    jitter_p99_ms: float
    received: int
    expected: int
    client_cpu_ms_per_s: float = float("nan")
    """This process (the N clients) over the window, ms per second: its share of a core x 1000."""
    fake_cpu_ms_per_s: float = float("nan")
    """The fake Live server's process over the window, ms per second."""
    offered_deflate: bool = False
    """Whether the clients offered permessage-deflate (``server`` then ends in +deflate)."""
    deflate_share: float = 0.0
    """Share of the clients whose server took permessage-deflate."""


async def run_once(
    kind: str,
    port: int,
    pid: int,
    n: int,
    warmup: float,
    window: float,
    fake_pid: int,
    client_impl: str = "raw",
    profile: bool = False,
    offer_deflate: bool = False,
) -> ServeResult:
    """One server at one N: connect N clients, feed them, measure over the window."""
    from voicefsm.auth import JWTAuthenticator

    auth = JWTAuthenticator(SECRET)
    factory = RawClient if client_impl == "raw" else WebsocketsClient
    clients = [factory(kind, auth.issue(f"user-{i}"), offer_deflate, i) for i in range(n)]
    for client in clients:
        await client.connect("127.0.0.1", port, "/interview")
    window_start = time.monotonic() + 2.0 + warmup  # after every client got its first audio
    window_end = window_start + window
    for client in clients:
        client.window = (window_start, window_end)
    async with asyncio.timeout(60):
        await asyncio.gather(*(c.ready.wait() for c in clients))
    begin = time.monotonic() + 0.05
    if client_impl == "raw":
        raw = [c for c in clients if isinstance(c, RawClient)]
        feeders = [asyncio.create_task(feed_all(raw, begin, window_end + 0.5))]
    else:
        feeders = [
            asyncio.create_task(c.feed(begin + (i / n) * CHUNK_S, window_end + 0.5))
            for i, c in enumerate(clients)
            if isinstance(c, WebsocketsClient)
        ]
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    if profile:
        os.kill(pid, signal.SIGUSR1)
    cpu_before = cpu_seconds(pid)
    client_before = cpu_seconds(os.getpid())
    fake_before = cpu_seconds(fake_pid)
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    cpu = cpu_seconds(pid) - cpu_before
    client_cpu = cpu_seconds(os.getpid()) - client_before
    fake_cpu = cpu_seconds(fake_pid) - fake_before
    if profile:
        os.kill(pid, signal.SIGUSR2)
    await asyncio.wait(feeders)
    await asyncio.sleep(1.0)
    # End each interview (voicefsm would otherwise keep it, and its upstream, for the client's
    # reconnect grace; the server closes each with 1000 once ended), then close; the relay ends
    # its session when the socket closes.
    await asyncio.gather(*(c.end(15) for c in clients))
    latencies = [lat for c in clients for lat in c.latencies]
    jitter = [lat - min(c.latencies) for c in clients if c.latencies for lat in c.latencies]
    await asyncio.sleep(1.0)  # let the server tear the sessions down before the next run
    return ServeResult(
        server=kind + (DEFLATE_SUFFIX if offer_deflate else ""),
        n=n,
        cpu_ms_per_s=cpu / (n * window) * 1000,
        latency_p50_ms=pct(latencies, 0.5) * 1000,
        latency_p99_ms=pct(latencies, 0.99) * 1000,
        jitter_p99_ms=pct(jitter, 0.99) * 1000,
        received=sum(c.received for c in clients),
        expected=round(n * window / MODEL_CHUNK_S),
        client_cpu_ms_per_s=client_cpu / window * 1000,
        fake_cpu_ms_per_s=fake_cpu / window * 1000,
        offered_deflate=offer_deflate,
        deflate_share=sum(c.deflate for c in clients) / n,
    )


# --------------------------------------------------------------------------- report


def build_report(results: list[ServeResult], args: argparse.Namespace, command: str) -> str:
    """The markdown section."""
    sizes = sorted({r.n for r in results})
    lines = [
        "<!-- serve:begin -->",
        "## The whole server: `voicefsm serve` against a bare Starlette relay",
        "",
        f"`{command}` — {datetime.date.today().isoformat()}; servers "
        f"{'pinned to CPU ' + str(args.cpu) if args.cpu is not None else 'not pinned'}, "
        f"fake on CPU {args.fake_cpu}, clients on CPU {args.clients_cpu}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared).",
        "",
        f"Medians of {args.repeats} interleaved repeat(s); window {args.window:g} s. Server CPU "
        "per interview in ms per second; latency is the fake's scheduled send time of an "
        "interviewer chunk to its arrival at the client; jitter is a chunk's latency minus its "
        "client's lowest. Clients CPU is this process (all N clients), fake CPU the fake Live "
        "server's process, each over the window, in % of one core. Audio both ways is "
        "speech-like PCM (tones and noise). Deflate: whether the clients offered "
        f"permessage-deflate as browsers do (`{DEFLATE_OFFER}`; a +deflate server) and "
        "whether the server took it.",
        "",
        "| N | server | deflate | CPU ms/s | latency p50 / p99 ms | jitter p99 ms "
        "| model chunks received | clients CPU | fake CPU |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = list(dict.fromkeys(r.server for r in results))
    held: dict[str, list[int]] = {label: [] for label in labels}
    for n in sizes:
        for server in labels:
            runs = [r for r in results if r.server == server and r.n == n]
            if not runs:
                continue

            def med(name: str, runs: list[ServeResult] = runs) -> float:
                return median_of(runs, name)

            got = min(r.received / max(1, r.expected) for r in runs)
            taken = min(r.deflate_share for r in runs)
            deflate = (
                "not offered"
                if not runs[0].offered_deflate
                else "taken"
                if taken == 1
                else "refused"
                if max(r.deflate_share for r in runs) == 0
                else f"taken by {taken:.0%}"
            )
            lines.append(
                f"| {n} | {server} | {deflate} | {med('cpu_ms_per_s'):.2f} "
                f"| {med('latency_p50_ms'):.1f} / {med('latency_p99_ms'):.1f} "
                f"| {med('jitter_p99_ms'):.1f} | {got:.1%} "
                f"| {med('client_cpu_ms_per_s') / 10:.0f} % "
                f"| {med('fake_cpu_ms_per_s') / 10:.0f} % |"
            )
            if med("jitter_p99_ms") <= 50 and got >= 0.99:
                held[server].append(n)
    voicefsm, relay = SERVERS
    pairs = [  # the servers with the same clients, then each server with and without deflate
        (voicefsm, relay),
        (voicefsm, BEFORE),
        (voicefsm + DEFLATE_SUFFIX, BEFORE + DEFLATE_SUFFIX),
        (voicefsm + DEFLATE_SUFFIX, relay + DEFLATE_SUFFIX),
        (voicefsm + DEFLATE_SUFFIX, voicefsm),
        (relay + DEFLATE_SUFFIX, relay),
    ]
    for mine_label, theirs_label in pairs:
        rows = []
        for n in sizes:
            mine = [r for r in results if r.server == mine_label and r.n == n]
            theirs = [r for r in results if r.server == theirs_label and r.n == n]
            ratio = paired_ratio(mine, theirs, "cpu_ms_per_s")
            if not math.isnan(ratio):
                rows.append(f"* N = {n}: {ratio:.2f}x")
        if rows:
            lines += [
                "",
                f"Server CPU per interview, {mine_label} / {theirs_label}, paired by repeat:",
                "",
                *rows,
            ]
    lines += ["", "Largest N measured at jitter p99 <= 50 ms with all audio received:", ""]
    for server in labels:
        lines.append(f"* {server}: {max(held[server]) if held[server] else f'< {sizes[0]}'}")
    lines += ["", "<!-- serve:end -->"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, warmup_s=1.0)
    parser.add_argument("--cpu", type=int, default=None, help="pin both servers to this CPU")
    parser.add_argument("--fake-cpu", type=int, default=None)
    parser.add_argument(
        "--clients-cpu",
        type=int,
        default=None,
        help="pin the clients (this process) to this CPU (default: the fake's, if pinned)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--clients",
        choices=("raw", "websockets"),
        default="raw",
        help="the load generator: raw RFC 6455 frames over asyncio protocols (default), or one "
        "websockets-library connection and task pair per client",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="which servers to run (comma-separated; default both)",
    )
    parser.add_argument(
        "--offer-deflate",
        choices=("yes", "no", "both"),
        default="yes",
        help=f"whether the clients offer permessage-deflate as browsers do ({DEFLATE_OFFER}); "
        "both: every run twice, paired (default yes)",
    )
    parser.add_argument(
        "--compare-root",
        type=Path,
        help=f"also run `voicefsm serve` from this checkout as {BEFORE!r}, interleaved, with "
        "paired CPU ratios (a before/after of a change)",
    )
    parser.add_argument(
        "--serve-args",
        default="",
        help="extra `voicefsm serve` arguments for voicefsm-serve (shell words)",
    )
    parser.add_argument(
        "--before-args",
        default="",
        help=f"extra `voicefsm serve` arguments for {BEFORE} (shell words)",
    )
    parser.add_argument("--markdown", type=Path)
    parser.add_argument(
        "--profile-server",
        type=Path,
        help="profile both servers over the measured windows, stats to PATH.voicefsm-serve "
        "and PATH.starlette-relay",
    )
    parser.add_argument("--profile-fake", type=Path, help="run the fake under cProfile")
    parser.add_argument("--profile-clients", type=Path, help="run the clients under cProfile")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.window = "10,30", 1, 3.0
    args.sizes = parse_sizes(args.sizes)
    args.servers = [kind for kind in SERVERS if kind in str(args.servers).split(",")]
    if args.compare_root is not None:
        args.servers.append(BEFORE)
    if args.clients_cpu is None:
        args.clients_cpu = args.fake_cpu
    return args


async def amain(args: argparse.Namespace, pipe: Any, fake_pid: int) -> list[ServeResult]:
    """Start both servers, run every (N, repeat, server), interleaved."""
    hello = pipe.recv()
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as ca:
        ca.write(hello["ca_pem"])
    ports = {kind: free_port() for kind in args.servers}
    processes = {
        kind: start_server(
            kind,
            ports[kind],
            hello["base_url"],
            ca.name,
            args.cpu,
            args.profile_server,
            max(100, *args.sizes),
            args.compare_root,
            shlex.split(args.before_args if kind == BEFORE else args.serve_args),
        )
        for kind in args.servers
    }
    results: list[ServeResult] = []
    offers = {"yes": [True], "no": [False], "both": [True, False]}[args.offer_deflate]
    try:
        for kind in args.servers:
            await wait_listening(ports[kind], processes[kind])
        for kind in args.servers:  # one discarded warm-up run each
            await run_once(
                kind, ports[kind], processes[kind].pid, 2, 0.2, 0.5, fake_pid, args.clients
            )
        for n in args.sizes:
            for repeat in range(args.repeats):
                order = list(args.servers) if repeat % 2 == 0 else list(reversed(args.servers))
                for kind, offer in [(k, o) for k in order for o in offers]:
                    pid = processes[kind].pid
                    result = await run_once(
                        kind,
                        ports[kind],
                        pid,
                        n,
                        args.warmup,
                        args.window,
                        fake_pid,
                        args.clients,
                        args.profile_server is not None,
                        offer,
                    )
                    results.append(result)
                    print(
                        f"N={n:4d} #{repeat + 1} {result.server:24s} deflate "
                        f"{result.deflate_share:4.0%} cpu {result.cpu_ms_per_s:6.2f} ms/s"
                        f"  latency p99 {result.latency_p99_ms:7.1f} ms  jitter p99 "
                        f"{result.jitter_p99_ms:7.1f} ms  received {result.received}/"
                        f"{result.expected}  clients cpu {result.client_cpu_ms_per_s / 10:4.0f} %"
                        f"  fake cpu {result.fake_cpu_ms_per_s / 10:4.0f} %",
                        flush=True,
                    )
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        os.unlink(ca.name)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print (and optionally write) the report."""
    args = parse_args(argv)
    fake_profile = None if args.profile_fake is None else str(args.profile_fake)
    with spawned(fake_main, args.fake_cpu, fake_profile) as (parent, fake):
        assert fake.pid is not None
        pin(args.clients_cpu)  # after the fake started: it sets its own affinity
        results = run_profiled(amain(args, parent, fake.pid), args.profile_clients)
    command = command_line("bench_serve.py", argv)
    publish(build_report(results, args, command), args.markdown, "serve")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
