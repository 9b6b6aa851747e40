"""``voicefsm simulate`` as a person meets it: a positional scenario, a complete summary, a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from voicefsm.cli import EXIT_BROKEN_PIPE, main

ROOT = Path(__file__).resolve().parent.parent


def test_scenario_is_positional(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "outage", "--quiet"]) == 0
    assert "scenario outage (seed 7)" in capsys.readouterr().out


def test_scenario_option_still_works_and_two_different_ones_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["simulate", "--scenario", "clean", "--quiet"]) == 0
    assert "scenario clean" in capsys.readouterr().out
    with pytest.raises(SystemExit) as raised:
        main(["simulate", "clean", "--scenario", "outage"])
    assert raised.value.code == 2
    assert "two scenarios given" in capsys.readouterr().err


def test_outage_summary_accounts_for_every_chunk(capsys: pytest.CaptureFixture[str]) -> None:
    """Every chunk sent is counted somewhere, including those still unsent when it ended."""
    assert main(["simulate", "outage", "--quiet"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "client audio" in x)
    numbers = {
        name: int(count)
        for count, name in re.findall(
            r"(\d+) (chunks sent|reached the upstream|overflowed|unsent at the end|lost)", line
        )
    }
    assert numbers["unsent at the end"] > 0, line  # the outage leaves buffered audio behind
    assert numbers["chunks sent"] == (
        numbers["reached the upstream"]
        + numbers["overflowed"]
        + numbers["unsent at the end"]
        + numbers["lost"]
    ), line


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_goes_away_is_not_an_error_trace(unbuffered: str) -> None:
    """``voicefsm simulate | head``: the reader closes the pipe; no BrokenPipeError trace."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line (head -0; deterministic)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": unbuffered}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "voicefsm.cli", "simulate"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert done.returncode == EXIT_BROKEN_PIPE, stderr
