"""Real ``voicefsm serve`` worker processes for the failover tests.

A :class:`WorkerProcess` runs ``voicefsm serve`` on a loopback port with its output in a log file,
waits (bounded) until ``/healthz`` says the service is up, and can be stopped with SIGTERM or
SIGKILL — always by its own pid, never by name. A :class:`WorkerPool` starts them for one test and
kills whatever is still running when the test ends, then prints every worker's log (pytest shows
it only for a failed test).

The methods block (``subprocess``, ``urllib``); async tests call them through
``asyncio.to_thread`` so the test's event loop (which runs the fake Live server the workers talk
to) keeps going.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

READY_TIMEOUT_S = 60.0
"""Importing ADK and starting uvicorn takes a few seconds; much longer on a loaded machine."""
EXIT_TIMEOUT_S = 30.0


def voicefsm_command() -> list[str]:
    """The ``voicefsm`` console script of this interpreter (``python -m voicefsm.cli`` if none)."""
    script = Path(sys.executable).with_name("voicefsm")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "voicefsm.cli"]


def worker_env(jwt_secret: str) -> dict[str, str]:
    """The environment of a worker: the shared JWT secret, unbuffered output, no real API key."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_API_KEY", "VOICEFSM_STORE")}
    env["VOICEFSM_JWT_SECRET"] = jwt_secret
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """One ``voicefsm serve`` process (restartable: each :meth:`start` appends to the log)."""

    def __init__(
        self,
        name: str,
        port: int,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str],
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.command = list(command) if command is not None else None
        """The whole command line; ``None``: ``voicefsm serve --host 127.0.0.1 --port PORT``
        followed by ``args``."""
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<worker {self.name} port={self.port} pid={pid}>"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        """The interview websocket URL."""
        return f"ws://127.0.0.1:{self.port}/interview"

    def start(self) -> None:
        """Start ``voicefsm serve`` (without waiting for it to answer)."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.starts += 1
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"===== {self.name}: start #{self.starts} =====\n".encode())
        self._log.flush()
        command = self.command or [
            *voicefsm_command(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll ``/healthz`` (bounded) until the service is up; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/healthz"
        while True:
            process = self.process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise RuntimeError(
                    f"{self!r} exited with {code} while starting:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if json.load(reply).get("ok"):
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self!r} did not answer {url} within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the process (a crash: nothing runs on the way out) and reap it."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(EXIT_TIMEOUT_S)
        self._close_log()

    def terminate(
        self, timeout: float = EXIT_TIMEOUT_S, sig: signal.Signals = signal.SIGTERM
    ) -> int:
        """Send ``sig`` (SIGTERM: a graceful stop; SIGINT: Ctrl+C) and wait for the process to
        exit; return its exit code.

        Raises ``subprocess.TimeoutExpired`` if it does not exit in time (the pool kills it).
        """
        process = self.process
        if process is None:
            raise RuntimeError(f"{self!r} was never started")
        if process.poll() is None:
            process.send_signal(sig)
        code = process.wait(timeout)
        self._close_log()
        return code

    def log_text(self) -> str:
        """Everything the process wrote so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the log."""
        return self.log_text()[-chars:]

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()


class WorkerPool:
    """The worker processes of one test; :meth:`close` kills them all and prints their logs."""

    def __init__(self, log_dir: Path, jwt_secret: str) -> None:
        self.log_dir = log_dir
        self.env = worker_env(jwt_secret)
        self.workers: list[WorkerProcess] = []

    def add(
        self,
        name: str,
        port: int,
        args: Sequence[str],
        *,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> WorkerProcess:
        """A new worker (not started yet); its log is ``<log_dir>/worker-<name>.log``.

        ``command`` replaces ``voicefsm serve`` (e.g. uvicorn running an example app); ``env``
        is added to the pool's environment.
        """
        worker = WorkerProcess(
            name,
            port,
            args,
            self.log_dir / f"worker-{name}.log",
            {**self.env, **(env or {})},
            command=command,
            cwd=cwd,
        )
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        """Kill every worker still running (by pid), then print the logs."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.kill()
        for worker in self.workers:
            print(f"\n----- log of worker {worker.name} ({worker.log_path}) -----")
            print(worker.log_text()[-30_000:])
