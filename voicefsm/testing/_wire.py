"""Wire helpers for the fake Gemini Live server: key lookup, base64, durations, builders.

The Live API speaks protobuf JSON. Protobuf's JSON parser accepts both the ``lowerCamelCase``
name and the original ``snake_case`` name of every field, and google-genai really sends a mix of
both (camelCase at the top of the setup frame, snake_case in ``realtime_input``,
``client_content``, ``mime_type`` ...). The fake server therefore looks every field up under
both spellings. Server messages are always written in camelCase, as the real server does.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_OUTPUT_MIME_TYPE",
    "decode_base64",
    "encode_base64",
    "format_duration",
    "get_field",
    "get_mapping",
    "has_field",
    "parse_duration",
    "to_camel",
]

#: MIME type of the model audio the real Live API sends (16-bit PCM, 24 kHz, mono).
DEFAULT_OUTPUT_MIME_TYPE = "audio/pcm;rate=24000"

_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)s\s*$")


def to_camel(snake: str) -> str:
    """Return the lowerCamelCase spelling of a snake_case field name."""
    camel = _CAMEL.get(snake)
    if camel is None:
        head, *rest = snake.split("_")
        camel = head + "".join(part[:1].upper() + part[1:] for part in rest)
        if len(_CAMEL) < _CAMEL_CACHE_SIZE:
            _CAMEL[snake] = camel
    return camel


# Every frame looks several fields up under both spellings; the names come from this package's
# code (a few dozen), so the spellings are kept rather than rebuilt per lookup.
_CAMEL: dict[str, str] = {}
_CAMEL_CACHE_SIZE = 1024


def has_field(obj: Mapping[str, Any], snake: str) -> bool:
    """Return True if ``obj`` has the field under its snake_case or camelCase name."""
    return snake in obj or to_camel(snake) in obj


def get_field(obj: Mapping[str, Any], snake: str, default: Any = None) -> Any:
    """Return the field ``snake`` of ``obj`` under either spelling, or ``default``."""
    if snake in obj:
        return obj[snake]
    camel = to_camel(snake)
    if camel in obj:
        return obj[camel]
    return default


def get_mapping(obj: Mapping[str, Any], snake: str) -> Mapping[str, Any] | None:
    """Return the field ``snake`` of ``obj`` if it is a JSON object, else None."""
    value = get_field(obj, snake)
    return value if isinstance(value, Mapping) else None


def decode_base64(data: str) -> bytes:
    """Decode standard or URL-safe base64, with or without padding.

    Raises:
        ValueError: ``data`` is not base64.
    """
    text = data.strip().translate(_URLSAFE_TO_STANDARD)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 payload: {exc}") from exc


def encode_base64(data: bytes) -> str:
    """Encode bytes as standard base64 text (the protobuf JSON encoding of ``bytes``)."""
    return base64.b64encode(data).decode("ascii")


def format_duration(seconds: float | str) -> str:
    """Format a duration as protobuf Duration JSON (``50`` -> ``"50s"``, ``0.5`` -> ``"0.5s"``).

    A string is validated and returned unchanged.

    Raises:
        ValueError: the value is negative, not finite, or not a Duration string.
    """
    if isinstance(seconds, str):
        parse_duration(seconds)
        return seconds
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a finite number >= 0, got {seconds!r}")
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def parse_duration(value: str) -> float:
    """Parse protobuf Duration JSON such as ``"50s"`` or ``"0.25s"`` into seconds.

    Raises:
        ValueError: ``value`` is not a Duration string.
    """
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"not a protobuf Duration string (like '50s'): {value!r}")
    return float(match.group(1))
