"""Classification: an ADK ``Event`` (or the ``LlmResponse`` it extends) → voicefsm events.

Pure and table-driven. It reads attributes only, so it needs no ADK import at runtime and also
accepts a raw ``LlmResponse`` seen below ADK's flow (which still carries ``go_away``). One ADK
event can carry several things (audio plus ``turn_complete``, say); they come out in the order of
:data:`FIELD_RULES`. Content voicefsm does not interpret becomes an
:class:`~voicefsm.events.Unknown` event, counted by the session, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from voicefsm import events as ev


def _transcription(
    event_type: type[ev.InputTranscript] | type[ev.OutputTranscript],
) -> Callable[[Any], list[ev.Event]]:
    def convert(value: Any) -> list[ev.Event]:
        text = getattr(value, "text", None)
        if not text:
            return []
        return [event_type(text=text, finished=bool(getattr(value, "finished", False)))]

    return convert


def _content(value: Any) -> list[ev.Event]:
    out: list[ev.Event] = []
    for part in getattr(value, "parts", None) or ():
        out.extend(_part(part))
    return out


def _part(part: Any) -> list[ev.Event]:
    inline = getattr(part, "inline_data", None)
    if inline is not None:
        mime = getattr(inline, "mime_type", None) or ""
        data = getattr(inline, "data", None)
        if mime.startswith("audio/") and data:
            return [ev.ModelAudio(data=data, mime_type=mime)]
        return [ev.Unknown(f"inline data of type {mime or 'unknown'}")]
    call = getattr(part, "function_call", None)
    if call is not None:
        return [ev.ToolActivity(name=getattr(call, "name", None) or "?", phase="call")]
    response = getattr(part, "function_response", None)
    if response is not None:
        return [ev.ToolActivity(name=getattr(response, "name", None) or "?", phase="response")]
    if getattr(part, "text", None):
        # A native-audio model speaks; text parts are thoughts or a text-modality reply.
        return [ev.Unknown("text part")]
    return [ev.Unknown("empty or unrecognised content part")]


def _flag(event: ev.Event) -> Callable[[Any], list[ev.Event]]:
    return lambda value: [event] if value else []


def _resumption(value: Any) -> list[ev.Event]:
    return [
        ev.ResumptionUpdate(
            handle=getattr(value, "new_handle", None) or None,
            resumable=bool(getattr(value, "resumable", False)),
        )
    ]


def _modality_counts(details: Any) -> tuple[tuple[str, int], ...]:
    """``[ModalityTokenCount(modality=AUDIO, token_count=12), ...]`` → ``(("AUDIO", 12), ...)``."""
    out: list[tuple[str, int]] = []
    for item in details or ():
        count = getattr(item, "token_count", None)
        if not count:
            continue
        modality = getattr(item, "modality", None)
        name = getattr(modality, "value", modality)
        out.append((str(name) if name is not None else "UNSPECIFIED", int(count)))
    return tuple(out)


def _usage(value: Any) -> list[ev.Event]:
    # ADK renames the Live API's response_* fields to candidates_*; a raw genai message keeps them.
    response_details = getattr(value, "candidates_tokens_details", None)
    if response_details is None:
        response_details = getattr(value, "response_tokens_details", None)
    return [
        ev.Usage(
            prompt_tokens=getattr(value, "prompt_token_count", None),
            response_tokens=getattr(value, "candidates_token_count", None)
            or getattr(value, "response_token_count", None),
            total_tokens=getattr(value, "total_token_count", None),
            cached_tokens=getattr(value, "cached_content_token_count", None),
            thoughts_tokens=getattr(value, "thoughts_token_count", None),
            prompt_by_modality=_modality_counts(getattr(value, "prompt_tokens_details", None)),
            response_by_modality=_modality_counts(response_details),
        )
    ]


def _go_away(value: Any) -> list[ev.Event]:
    return [ev.GoAway(time_left=getattr(value, "time_left", None))]


FIELD_RULES: Final[Sequence[tuple[str, Callable[[Any], list[ev.Event]]]]] = (
    ("input_transcription", _transcription(ev.InputTranscript)),
    ("output_transcription", _transcription(ev.OutputTranscript)),
    ("content", _content),
    ("live_session_resumption_update", _resumption),
    ("interrupted", _flag(ev.Interrupted())),
    ("turn_complete", _flag(ev.TurnComplete())),
    ("usage_metadata", _usage),
    ("go_away", _go_away),
)
"""(attribute, converter) pairs, applied in order to every event that has the attribute set."""

IGNORED_FIELDS: Final = frozenset({"live_session_id", "partial", "model_version", "author"})
"""Attributes that alone make an event uninteresting rather than unknown."""


def classify_adk_event(event: Any) -> list[ev.Event]:
    """Turn one ADK ``Event`` (or ``LlmResponse``) into zero or more voicefsm events.

    An event with an error code becomes :class:`~voicefsm.events.UpstreamError`. An event that
    carries nothing voicefsm knows (and is not just bookkeeping) becomes one
    :class:`~voicefsm.events.Unknown`.
    """
    error_code = getattr(event, "error_code", None)
    if error_code:
        return [
            ev.UpstreamError(
                code=str(error_code), message=getattr(event, "error_message", "") or ""
            )
        ]
    out: list[ev.Event] = []
    matched = False
    for field, convert in FIELD_RULES:
        value = getattr(event, field, None)
        if value is None or value is False:
            continue
        matched = True
        out.extend(convert(value))
    if not matched and not _is_bookkeeping(event):
        out.append(ev.Unknown(f"{type(event).__name__} with no recognised field"))
    return out


def _is_bookkeeping(event: Any) -> bool:
    """Events that only carry ids or metadata (for instance ADK's empty partial markers)."""
    dump = getattr(event, "model_dump", None)
    if dump is None:
        return False
    fields = dump(exclude_none=True, exclude_defaults=True)
    meaningful = set(fields) - IGNORED_FIELDS - _ADK_EVENT_FIELDS
    return not meaningful


_ADK_EVENT_FIELDS: Final = frozenset(
    {
        "invocation_id",
        "actions",
        "output",
        "node_info",
        "long_running_tool_ids",
        "branch",
        "isolation_scope",
        "id",
        "timestamp",
        "custom_metadata",
    }
)
