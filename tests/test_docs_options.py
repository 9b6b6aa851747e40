"""The options tables in the guides name every option the code takes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from voicefsm.service import InterviewService

ROOT = Path(__file__).resolve().parent.parent


def _table_options(page: str, heading: str) -> list[str]:
    """The first column (backquoted names) of the table under ``heading`` in ``page``."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def test_the_embedding_guide_lists_every_interview_service_option() -> None:
    documented = _table_options("embedding.md", "## `InterviewService` options")
    taken = [name for name in inspect.signature(InterviewService).parameters]
    assert documented == taken


def test_the_serve_guide_lists_every_serve_option() -> None:
    from voicefsm.cli import build_parser

    text = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    table = text.split("| option | default | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(--[a-z-]+)`", row.split(" | ", 1)[0])
    }
    subcommands = next(action for action in build_parser()._actions if action.dest == "command")
    serve = subcommands.choices["serve"]  # type: ignore[attr-defined]
    taken = {
        flag
        for action in serve._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }
    assert documented == taken
