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


def _documented_literal_defaults(table: str, literal: str = r"-?[0-9.]+|None") -> dict[str, str]:
    """``name -> default`` for the rows of an options table whose first cell names one option
    and whose default cell is one backquoted ``literal`` (a number or ``None``), or on/off."""
    defaults = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split(" | ")]
        if len(cells) < 3 or not (names := re.fullmatch(r"`(--?[a-z_-]+|[a-z_]+)`", cells[0])):
            continue
        value = re.fullmatch(rf"`({literal})`|(on|off)", cells[1])
        if value:
            defaults[names.group(1)] = value.group(1) or value.group(2)
    return defaults


def _as_documented(value: object) -> str:
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, int | float):
        return f"{value:g}"
    return str(value)


def test_the_defaults_in_the_options_tables_are_the_codes() -> None:
    """A literal or switch in a table's default column is the default the code has."""
    from voicefsm.cli import build_parser

    text = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    table = text.split("| option | default | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = _documented_literal_defaults(table, literal=r"[\w.:-]+")  # names too
    subcommands = next(action for action in build_parser()._actions if action.dest == "command")
    serve = subcommands.choices["serve"]  # type: ignore[attr-defined]
    taken = {
        flag: action.default
        for action in serve._actions
        for flag in action.option_strings
        if flag.startswith("--")
    }
    # --max-sessions parses to None, which means ServiceLimits' own default
    from voicefsm.limits import ServiceLimits

    taken["--max-sessions"] = ServiceLimits().max_sessions
    assert {name: _as_documented(taken[name]) for name in documented} == documented
    assert len(documented) >= 10  # the table still has its literal defaults to check

    section = (ROOT / "docs" / "embedding.md").read_text(encoding="utf-8")
    table = section.split("## `InterviewService` options", 1)[1].split("\n## ", 1)[0]
    documented = _documented_literal_defaults(table)
    parameters = inspect.signature(InterviewService).parameters
    code = {name: _as_documented(parameters[name].default) for name in documented}
    assert code == documented
    assert len(documented) >= 4
