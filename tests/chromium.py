"""Where the browser tests find Debian's chromium, and where they keep screenshots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's chromium (``apt-get install chromium``); playwright never downloads its own."""
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
"""Screenshots the browser tests keep (git-ignored)."""


def require_browser() -> None:
    """Skip (or, under CI, fail) when chromium or the playwright package is missing."""
    problems = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"{CHROMIUM} is missing (Debian package 'chromium')")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        problems.append("the 'playwright' Python package is missing")
    if not problems:
        return
    reason = "browser test cannot run: " + " and ".join(problems)
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"{reason}. Under CI this test must run: .ci/run must install chromium "
            "(apt-get install -y chromium) and the playwright package.",
            pytrace=False,
        )
    pytest.skip(reason)
