"""The browser interview page, for reuse in your own app.

The page is static: ``index.html`` plus ``static/`` (``app.js``, ``capture-worklet.js``,
``app.css``), with relative URLs, so it works at the root of an app or under a prefix (serve it
at ``/prefix/`` with the trailing slash). It reads ``config.json`` (:func:`page_config`), opens
the websocket ``interview`` beside it and, when ``config.json`` says ``"demo_tokens": true``,
fetches a token from ``demo/token`` (``{"token": ...}``); otherwise it asks for one, or takes
``?token=`` from its address.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from voicefsm.model import SessionConfig


def static_dir() -> Path:
    """The directory holding ``index.html`` and the page's scripts and stylesheet."""
    return Path(str(resources.files("voicefsm.web") / "static"))


def index_file() -> Path:
    """The page: serve it at ``/`` (or ``/prefix/``), and :func:`static_dir` at ``static/``."""
    return static_dir() / "index.html"


def page_config(
    config: SessionConfig, *, label: str, mode: str = "gemini", demo_tokens: bool = False
) -> dict[str, Any]:
    """What the page reads from ``config.json``.

    ``label`` says who the interviewer is (shown on the page); ``mode`` is ``"gemini"`` or
    ``"fake"``; ``demo_tokens`` makes the page fetch its token from ``demo/token``.
    """
    return {
        "mode": mode,
        "label": label,
        "time_limit_s": config.time_limit_s,
        "warning_before_s": config.warning_before_s,
        "demo_tokens": demo_tokens,
    }


__all__ = ["index_file", "page_config", "static_dir"]
