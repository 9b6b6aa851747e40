"""The declaration: states, reasons, transitions, and the diagram drawn from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from voicefsm import EndReason, State
from voicefsm.cli import main
from voicefsm.machine import MACHINE, TRANSITIONS, diagram

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_exactly_the_five_states_and_five_reasons() -> None:
    assert [s.value for s in State] == ["connecting", "live", "warning", "resuming", "ended"]
    assert {r.value for r in EndReason} == {
        "user_ended",
        "time_limit",
        "disconnected",
        "upstream_lost",
        "error",
    }


def test_ended_is_absorbing_and_reachable_from_every_other_state() -> None:
    sources = {
        (State(s) if isinstance(s, State) else State[s])
        for t in TRANSITIONS
        for s in (t["source"] if isinstance(t["source"], list) else [t["source"]])
    }
    assert State.ENDED not in sources
    into_ended = [t for t in TRANSITIONS if t["dest"] is State.ENDED]
    assert len(into_ended) == 1
    assert set(into_ended[0]["source"]) == set(State) - {State.ENDED}


def test_the_machine_has_no_auto_transitions_and_no_models() -> None:
    assert set(MACHINE.events) == {"ready", "warn", "lose_upstream", "end"}
    assert MACHINE.models == []


@pytest.mark.parametrize(
    ("fmt", "name"), [("mermaid", "state-diagram.mmd"), ("dot", "state-diagram.dot")]
)
def test_docs_diagram_is_not_stale(fmt: str, name: str) -> None:
    path = DOCS / name
    assert path.read_text() == diagram(fmt), (  # type: ignore[arg-type]
        f"{path} is stale: regenerate it with `voicefsm diagram --format {fmt} > docs/{name}`"
    )


def test_readme_diagram_is_not_stale() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "```mermaid\n" + diagram("mermaid") + "```" in readme, (
        "README.md's diagram is stale: paste the output of `voicefsm diagram` into it"
    )


def test_diagram_command_prints_every_transition(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("---")
    for line in ("LIVE --> WARNING: warn", "RESUMING --> LIVE: ready [!warning_given]"):
        assert line in text
