"""The whole server: ``voicefsm serve`` against a bare Starlette websocket relay, N clients each.

Run from the repository root::

    python benchmarks/bench_serve.py --quick
    python benchmarks/bench_serve.py --sizes 25,50,100 --repeats 3 --cpu 0
    python benchmarks/bench_serve.py --quick --markdown docs/benchmarks.md   # write the section

Three kinds of process: the fake Gemini Live server (the one of ``bench_capacity.py``: model
audio every 40 ms on an absolute schedule, each chunk stamped with its scheduled send time); two
servers under test, both uvicorn with ``websockets-sansio`` and pinned to ``--cpu``:

* ``voicefsm-serve``: ``voicefsm serve --upstream genai`` (service, session hosts, the direct
  genai upstream; memory store, admission control off so it can be driven past saturation);
* ``starlette-relay``: a bare Starlette app that relays each client websocket to its own
  ``client.aio.live.connect`` (client audio in, model audio out, nothing else);

and this process, running N websocket clients: each sends a 640-byte binary frame every 20 ms on
an absolute schedule and receives interviewer audio. Both servers run for the whole benchmark;
the runs alternate between them (the order rotates every repeat).

Per server and N, over a ``--window`` after a ``--warmup``:

* **server CPU per interview** (utime + stime of the server's process / N / window), ms per s;
* **interviewer-audio latency** p50/p99: the fake's scheduled send time to the arrival at the
  client; **jitter p99**: per chunk, its latency minus the lowest latency of its client (how
  unevenly the audio arrives), over every chunk of every client;
* **model chunks** received against those the fake scheduled (a shortfall is audio that never
  arrived or is still queued).

"Holds N" means jitter p99 <= 50 ms with every scheduled chunk received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import multiprocessing
import os
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "bench-serve-secret-that-is-long-enough-for-hs256"
SERVERS = ("voicefsm-serve", "starlette-relay")
MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"
CHUNK_BYTES = 640
CHUNK_S = 0.02
MODEL_CHUNK_S = 0.04


def _capacity() -> Any:
    # On sys.path (not loaded from a file) so that the fake's spawned process can import it.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import bench_capacity

    return bench_capacity


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
    profile = os.environ.get("BENCH_SERVE_RELAY_PROFILE")
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(
            uvicorn.run,
            app,
            host="127.0.0.1",
            port=port,
            ws="websockets-sansio",
            log_level="warning",
        )
        profiler.dump_stats(profile)
        return
    uvicorn.run(app, host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning")


# --------------------------------------------------------------------------- servers


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
    kind: str, port: int, base_url: str, ca_file: str, cpu: int | None, profile: Path | None
) -> Any:
    """Start one server process; return the Popen (``profile``: run voicefsm under cProfile)."""
    env = {**os.environ, "VOICEFSM_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
    if profile is not None:
        env["BENCH_SERVE_RELAY_PROFILE"] = f"{profile}.relay"
    env.pop("GOOGLE_API_KEY", None)
    if kind == "voicefsm-serve":
        profiling = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        argv = [
            sys.executable,
            *profiling,
            "-m",
            "voicefsm.cli",
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
        ]
    else:
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_serve; "
            f"bench_serve.relay_main({port}, {base_url!r}, {ca_file!r})"
        )
        argv = [sys.executable, "-c", code]

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    log = open(f"/tmp/bench-serve-{kind}.log", "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)


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


class Client:
    """One interview's client: audio out on schedule, interviewer audio in."""

    def __init__(self, url: str, kind: str, token: str) -> None:
        self.url = url
        self.kind = kind
        self.token = token
        self.ready = asyncio.Event()
        self.latencies: list[float] = []
        self.received = 0
        self.ws: Any = None

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        protocols = ["voicefsm.v1", f"bearer.{self.token}"] if self.kind == "voicefsm-serve" else []
        self.ws = await connect(
            self.url,
            subprotocols=protocols or None,  # type: ignore[arg-type]
            open_timeout=30,
            max_queue=None,
            compression=None,
        )

    async def read(self, window: tuple[float, float]) -> None:
        start, end = window
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes) and len(frame) >= 8:
                    now = time.monotonic()
                    (scheduled,) = struct.unpack_from(">d", frame)
                    self.ready.set()
                    if start <= scheduled < end:
                        self.latencies.append(now - scheduled)
                        self.received += 1
        except Exception:
            return

    async def feed(self, begin: float, stop_at: float) -> None:
        payload = bytes(CHUNK_BYTES)
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


async def run_once(
    kind: str, url: str, pid: int, n: int, warmup: float, window: float
) -> ServeResult:
    from voicefsm.auth import JWTAuthenticator

    capacity = sys.modules["bench_capacity"]
    auth = JWTAuthenticator(SECRET)
    clients = [Client(url, kind, auth.issue(f"user-{i}")) for i in range(n)]
    for client in clients:
        await client.connect()
    window_start = time.monotonic() + 2.0 + warmup  # after every client got its first audio
    window_end = window_start + window
    readers = [asyncio.create_task(c.read((window_start, window_end))) for c in clients]
    async with asyncio.timeout(60):
        await asyncio.gather(*(c.ready.wait() for c in clients))
    begin = time.monotonic() + 0.05
    feeders = [
        asyncio.create_task(c.feed(begin + (i / n) * CHUNK_S, window_end + 0.5))
        for i, c in enumerate(clients)
    ]
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    cpu_before = cpu_seconds(pid)
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    cpu = cpu_seconds(pid) - cpu_before
    await asyncio.wait(feeders)
    await asyncio.sleep(1.0)
    # End each interview (voicefsm would otherwise keep it, and its upstream, for the client's
    # reconnect grace), then close; the relay ends its session when the socket closes.
    if kind == "voicefsm-serve":
        for client in clients:
            with contextlib.suppress(Exception):
                await client.ws.send('{"end_session": true}')
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):  # the server closes each with 1000 once ended
                await asyncio.gather(*(c.ws.wait_closed() for c in clients))
    await asyncio.gather(
        *(asyncio.wait_for(c.ws.close(), 5) for c in clients), return_exceptions=True
    )
    for reader in readers:
        reader.cancel()
    await asyncio.wait(readers)
    latencies = [lat for c in clients for lat in c.latencies]
    jitter = [lat - min(c.latencies) for c in clients if c.latencies for lat in c.latencies]
    await asyncio.sleep(1.0)  # let the server tear the sessions down before the next run
    return ServeResult(
        server=kind,
        n=n,
        cpu_ms_per_s=cpu / (n * window) * 1000,
        latency_p50_ms=capacity.pct(latencies, 0.5) * 1000,
        latency_p99_ms=capacity.pct(latencies, 0.99) * 1000,
        jitter_p99_ms=capacity.pct(jitter, 0.99) * 1000,
        received=sum(c.received for c in clients),
        expected=round(n * window / MODEL_CHUNK_S),
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
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared).",
        "",
        f"Medians of {args.repeats} interleaved repeat(s); window {args.window:g} s. Server CPU "
        "per interview in ms per second; latency is the fake's scheduled send time of an "
        "interviewer chunk to its arrival at the client; jitter is a chunk's latency minus its "
        "client's lowest.",
        "",
        "| N | server | CPU ms/s | latency p50 / p99 ms | jitter p99 ms | model chunks received |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    held: dict[str, list[int]] = {s: [] for s in SERVERS}
    for n in sizes:
        for server in SERVERS:
            runs = [r for r in results if r.server == server and r.n == n]
            if not runs:
                continue

            def med(name: str, runs: list[ServeResult] = runs) -> float:
                return statistics.median(getattr(r, name) for r in runs)

            got = min(r.received / max(1, r.expected) for r in runs)
            lines.append(
                f"| {n} | {server} | {med('cpu_ms_per_s'):.2f} "
                f"| {med('latency_p50_ms'):.1f} / {med('latency_p99_ms'):.1f} "
                f"| {med('jitter_p99_ms'):.1f} | {got:.1%} |"
            )
            if med("jitter_p99_ms") <= 50 and got >= 0.99:
                held[server].append(n)
    lines += ["", "Server CPU per interview, voicefsm / relay, paired by repeat:", ""]
    for n in sizes:
        mine = [r for r in results if r.server == "voicefsm-serve" and r.n == n]
        theirs = [r for r in results if r.server == "starlette-relay" and r.n == n]
        ratios = [a.cpu_ms_per_s / b.cpu_ms_per_s for a, b in zip(mine, theirs, strict=False)]
        if ratios:
            lines.append(f"* N = {n}: {statistics.median(ratios):.2f}x")
    lines += ["", "Largest N measured at jitter p99 <= 50 ms with all audio received:", ""]
    for server in SERVERS:
        lines.append(f"* {server}: {max(held[server]) if held[server] else f'< {sizes[0]}'}")
    lines += ["", "<!-- serve:end -->"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the serve section of ``path`` (between its markers), or append it."""
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- serve:begin -->", "<!-- serve:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25,50,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--cpu", type=int, default=None, help="pin both servers to this CPU")
    parser.add_argument("--fake-cpu", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument(
        "--profile-server", type=Path, help="run voicefsm serve under cProfile, stats to this file"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.window = "10,30", 1, 3.0
    args.sizes = [int(n) for n in str(args.sizes).split(",")]
    return args


async def amain(args: argparse.Namespace, pipe: Any) -> list[ServeResult]:
    """Start both servers, run every (N, repeat, server), interleaved."""
    hello = pipe.recv()
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as ca:
        ca.write(hello["ca_pem"])
    ports = {kind: free_port() for kind in SERVERS}
    processes = {
        kind: start_server(
            kind, ports[kind], hello["base_url"], ca.name, args.cpu, args.profile_server
        )
        for kind in SERVERS
    }
    results: list[ServeResult] = []
    try:
        for kind in SERVERS:
            await wait_listening(ports[kind], processes[kind])
        for kind in SERVERS:  # one discarded warm-up run each
            url = f"ws://127.0.0.1:{ports[kind]}/interview"
            await run_once(kind, url, processes[kind].pid, 2, 0.2, 0.5)
        for n in args.sizes:
            for repeat in range(args.repeats):
                order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
                for kind in order:
                    url = f"ws://127.0.0.1:{ports[kind]}/interview"
                    pid = processes[kind].pid
                    result = await run_once(kind, url, pid, n, args.warmup, args.window)
                    results.append(result)
                    print(
                        f"N={n:4d} #{repeat + 1} {kind:16s} cpu {result.cpu_ms_per_s:6.2f} ms/s"
                        f"  latency p99 {result.latency_p99_ms:7.1f} ms  jitter p99 "
                        f"{result.jitter_p99_ms:7.1f} ms  received {result.received}/"
                        f"{result.expected}",
                        flush=True,
                    )
    finally:
        for process in processes.values():
            process.send_signal(2)  # SIGINT: uvicorn shuts down cleanly (and cProfile writes)
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
    capacity = _capacity()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    fake = context.Process(target=capacity.fake_process, args=(child, args.fake_cpu), daemon=True)
    fake.start()
    try:
        results = asyncio.run(amain(args, parent))
    finally:
        with contextlib.suppress(Exception):
            parent.send("stop")
        fake.join(timeout=10)
        if fake.is_alive():
            fake.kill()
    command = "python benchmarks/bench_serve.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    report = build_report(results, args, command.strip())
    print()
    print(report)
    if args.markdown is not None:
        write_section(args.markdown, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
