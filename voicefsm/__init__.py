"""voicefsm: keep long Gemini Live interviews alive and end them exactly right.

The core is pure: :class:`Session` consumes classified events plus the current time and returns
effects. Importing this package does not import google-adk or google-genai.
"""

from voicefsm import effects, events
from voicefsm.classify import classify_adk_event
from voicefsm.engine import Session, SessionError, parse_duration
from voicefsm.machine import diagram
from voicefsm.model import (
    EndReason,
    LogEntry,
    LogKind,
    SessionConfig,
    SessionRecord,
    SessionStats,
    SessionUsage,
    State,
    TranscriptLine,
)

__version__ = "0.1.0"

__all__ = [
    "EndReason",
    "LogEntry",
    "LogKind",
    "Session",
    "SessionConfig",
    "SessionError",
    "SessionRecord",
    "SessionStats",
    "SessionUsage",
    "State",
    "TranscriptLine",
    "__version__",
    "classify_adk_event",
    "diagram",
    "effects",
    "events",
    "parse_duration",
]
