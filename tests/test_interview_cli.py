"""``voicefsm interview``: the terminal interview, run for real against the fake Live server.

The command runs in a subprocess (its own event loop, signal handlers and exit status, as a
person starts it), with the real ADK runner and genai client talking to the loopback fake.
"""

from __future__ import annotations

import importlib.util
import math
import os
import select
import signal
import subprocess
import sys
import time
import wave
from array import array
from pathlib import Path

import pytest
from loopback import pretend_adk_is_missing

from voicefsm.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "voicefsm.cli", "interview", *args]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("GOOGLE_API_KEY", None)
    env.pop("GEMINI_API_KEY", None)
    return env


def _write_stereo_wav(path: Path, seconds: float = 2.0, rate: int = 44_100) -> None:
    samples = array("h")
    for i in range(round(seconds * rate)):
        value = round(8000 * math.sin(2 * math.pi * 330 * i / rate))
        samples.extend((value, value))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


HAS_ADK = importlib.util.find_spec("google.adk") is not None


@pytest.mark.parametrize(
    ("upstream", "through"),
    [
        pytest.param(
            "adk",
            "ADK",
            marks=pytest.mark.skipif(not HAS_ADK, reason="google-adk is not installed"),
        ),
        ("genai", "direct google-genai"),
    ],
)
def test_a_fake_interview_runs_to_its_time_limit(
    tmp_path: Path, upstream: str, through: str
) -> None:
    """Six seconds of a "45-minute" policy: GoAways rotate it, the warning comes, time runs out.

    On either upstream (CI also runs this file where google-adk is not installed, so the
    default ``auto`` upstream is ``genai`` there: the other tests cover that).
    """
    wav = tmp_path / "answer.wav"
    _write_stereo_wav(wav)
    done = subprocess.run(
        # GoAways at about 2 s and 4.5 s, the rotations 0.5 s later: none close to the end.
        _command(
            "--fake",
            "--upstream",
            upstream,
            "--minutes",
            "0.1",
            "--time-scale",
            "20",
            "--go-away-every",
            "2",
            "--go-away-time-left",
            "0.5",
            "--wav",
            str(wav),
        ),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"GoAway every 2 s), through {through}" in out
    assert "44100 Hz, 2 channels, 2.0 s (mixed to mono, resampled to 16000 Hz)" in out
    assert "the WAV file ended after" in out
    assert "-> RESUMING" in out  # a GoAway rotated the connection
    assert "WARNING:" in out
    assert "end reason     time_limit" in out
    resumes = next(line for line in out.splitlines() if line.startswith("  resumes"))
    assert int(resumes.split()[1]) >= 1, resumes
    assert "Traceback" not in done.stderr


def _read_until(fd: int, text: str, within: float) -> str:
    """Read the child's stdout until ``text`` shows up; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    seen = b""
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            pytest.fail(f"{text!r} not printed within {within:g} s; got:\n{seen.decode()}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"the command exited before printing {text!r}:\n{seen.decode()}")
        seen += chunk
    return seen.decode()


def test_ctrl_c_ends_the_interview_as_user_ended() -> None:
    """The first Ctrl-C asks the session to end; the summary says ``user_ended``; exit 0."""
    with subprocess.Popen(
        _command("--fake", "--minutes", "5", "--go-away-every", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    ) as process:
        assert process.stdout is not None
        try:
            seen = _read_until(process.stdout.fileno(), "-> LIVE", within=60)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        out = seen + out
    assert process.returncode == 0, out + err
    assert "Ctrl-C: ending the interview" in out
    assert "end reason     user_ended" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "GOOGLE_API_KEY is not set"),
        (["--fake", "--wav", "/nonexistent.wav"], "--wav: no such file"),
        (["--fake", "--minutes", "0"], "--minutes must be a positive number"),
        (["--time-scale", "2"], "--time-scale only applies to --fake"),
    ],
)
def test_usage_problems_exit_2_with_a_reason(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    assert main(["interview", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_wav_that_is_not_16_bit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "8bit.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(16_000)
        out.writeframes(bytes(1600))
    assert main(["interview", "--fake", "--wav", str(path)]) == 2
    err = capsys.readouterr().err
    assert "8-bit samples; only 16-bit PCM is supported" in err
    assert "ffmpeg" in err


def test_the_adk_upstream_without_google_adk_is_a_usage_problem(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--upstream adk`` where google-adk is missing says how to install it, and exits 2."""
    pretend_adk_is_missing(monkeypatch)
    assert main(["interview", "--fake", "--upstream", "adk"]) == 2
    assert "pip install 'voicefsm[adk]'" in capsys.readouterr().err
