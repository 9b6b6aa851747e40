"""Keep bearer tokens out of logs.

A client may put its token in the websocket URL (``?token=…``), and servers log URLs: uvicorn
writes ``"WebSocket /interview?token=…" [accepted]`` at INFO on ``uvicorn.error``, aiohttp's
access log writes the request line. :class:`TokenRedactingFilter` rewrites any record whose
message holds a ``token=`` query value, a ``bearer.`` subprotocol or a JWT, replacing the secret
with ``[redacted]``. :func:`install_token_redaction` puts it on the server loggers; the adapters
call it, and an embedder with its own loggers or handlers adds the filter there too (see
``docs/protocol.md``).
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
"""What a token is replaced with."""

SERVER_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "aiohttp.access",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "websockets",
    "websockets.server",
    "voicefsm",
)
"""Loggers that may see a request URL or header (a filter on a logger covers only records
logged on that very logger, so each is named)."""

_PATTERNS = (
    # token=… in a query string (also access_token=, ?token= in a logged URL)
    (re.compile(r"((?:^|[?&;\s\"'])(?:access_)?token=)[^&\s\"';]+", re.IGNORECASE), r"\1"),
    # the bearer.<token> subprotocol, and an Authorization header value
    (re.compile(r"((?:bearer[.\s]+))[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1"),
    # anything shaped like a JWT (three base64url parts, the first a JSON object)
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), ""),
)


def redact(text: str) -> str:
    """``text`` with every token-looking secret replaced by :data:`REDACTED`."""
    for pattern, keep in _PATTERNS:
        text = pattern.sub((keep + REDACTED) if keep else REDACTED, text)
    return text


class TokenRedactingFilter(logging.Filter):
    """A logging filter that redacts tokens from a record's message (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place if its message holds a token."""
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the handler's business, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = TokenRedactingFilter()


def install_token_redaction(names: tuple[str, ...] = SERVER_LOGGERS) -> TokenRedactingFilter:
    """Add the redacting filter to each logger in ``names`` (once; safe to call again)."""
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(existing, TokenRedactingFilter) for existing in target.filters):
            target.addFilter(_FILTER)
    return _FILTER


__all__ = [
    "REDACTED",
    "SERVER_LOGGERS",
    "TokenRedactingFilter",
    "install_token_redaction",
    "redact",
]
