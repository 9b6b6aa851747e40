"""A real ``redis-server`` for tests: free loopback port, temp dir, bounded start, stop, restart.

``RedisServer.start()`` runs ``redis-server --port N --bind 127.0.0.1 --save '' --appendonly no``
in a temporary directory and waits (bounded) until it answers PING; ``stop()`` shuts it down,
``start()`` again brings it back on the same port. ``stop(keep_data=True)`` shuts down with
``SHUTDOWN SAVE`` so the restarted server loads the same data, as a production Redis with
persistence would.

When the binary is missing, :func:`require_redis_server` skips the test with the reason — except
under CI (``CI=true``), where it fails: CI must run the Redis tests (``.ci/run`` installs
``redis-server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from loopback import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def require_redis_server() -> str:
    """The path of ``redis-server``; skip (or, under ``CI=true``, fail) when there is none."""
    binary = os.environ.get("VOICEFSM_REDIS_SERVER") or shutil.which("redis-server")
    if binary:
        return binary
    message = (
        "redis-server is not installed (apt-get install redis-server, or point "
        "VOICEFSM_REDIS_SERVER at the binary); the Redis store tests need a real server"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one RESP command and return the first reply line."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; restartable on the same port."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        self.binary = binary if binary is not None else require_redis_server()
        self.port = port if port is not None else free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="voicefsm-redis-")
        self.dir = Path(self._tmp.name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def ping(self) -> bool:
        """Whether the server answers PING right now."""
        try:
            return _command(self.port, "PING", timeout=0.5).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        """Start the server and wait until it answers PING (at most ``START_TIMEOUT_S``)."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        log = self.dir / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(log),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.process = None
                raise RuntimeError(
                    f"redis-server exited while starting on port {self.port}:\n{tail}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING on port {self.port} "
                    f"within {START_TIMEOUT_S:g} s"
                )
            time.sleep(0.01)

    def stop(self, *, keep_data: bool = False) -> None:
        """Shut the server down (``SHUTDOWN SAVE`` with ``keep_data``, else ``NOSAVE``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            _command(self.port, "SHUTDOWN", "SAVE" if keep_data else "NOSAVE")
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        if keep_data and not (self.dir / "dump.rdb").exists():
            raise RuntimeError(f"redis-server on port {self.port} stopped without saving")

    def restart(self, *, keep_data: bool = True) -> None:
        """Stop and start again on the same port."""
        self.stop(keep_data=keep_data)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
