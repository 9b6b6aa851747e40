"""The token redaction filter on its own (the adapters' logs are tested in test_web_adversarial)."""

from __future__ import annotations

import logging

from voicefsm.auth import JWTAuthenticator
from voicefsm.web.logs import REDACTED, TokenRedactingFilter, redact

TOKEN = JWTAuthenticator("a-secret-that-is-long-enough-for-hs256-x").issue("alice")


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


def test_query_tokens_subprotocol_tokens_and_bare_jwts_are_redacted() -> None:
    assert (
        redact(f"/interview?session=s1&token={TOKEN}") == f"/interview?session=s1&token={REDACTED}"
    )
    assert (
        redact(f"/interview?token={TOKEN}&session=s1") == f"/interview?token={REDACTED}&session=s1"
    )
    assert TOKEN not in redact(f"Sec-WebSocket-Protocol: voicefsm.v1, bearer.{TOKEN}")
    assert TOKEN not in redact(f'{{"type": "auth", "token": "{TOKEN}"}}')
    assert redact("lease token 3 renewed") == "lease token 3 renewed"


def test_the_filter_rewrites_args_and_extra_fields() -> None:
    line = f"GET /interview?token={TOKEN} HTTP/1.1"
    rec = record('%s - "%s"', "127.0.0.1", line, first_request_line=line, nested={"r": line})
    assert TokenRedactingFilter().filter(rec)
    assert TOKEN not in rec.getMessage()
    assert TOKEN not in rec.__dict__["first_request_line"]
    assert TOKEN not in rec.__dict__["nested"]["r"]
    assert rec.levelno == logging.INFO and rec.name == "aiohttp.access"
