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
