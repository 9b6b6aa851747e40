"""One interview as a picture: a self-contained HTML page with an inline SVG time axis.

:func:`build_timeline` reads a stored :class:`~voicefsm.SessionRecord` (its bounded event log
and usage sums) and the session's transcript into a :class:`Timeline`: state bands, rotation and
GoAway markers, client-away spans, the warning, the end, transcript turns and a usage/cost
summary. :func:`render_html` draws it as one HTML document with no external assets and no
scripts (no fonts, no images, nothing fetched), readable on screen and on paper.

The page shows the transcript: it is for operators, rendered server-side (``voicefsm timeline``,
the operator route of ``voicefsm serve``), and never sent to a candidate's client.

Every drawn element carries ``data-kind``, ``data-start`` and ``data-end`` (seconds since the
session started) so tests and tools can check the picture against the record.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from voicefsm.model import (
    EndReason,
    LogEntry,
    LogKind,
    SessionRecord,
    SessionUsage,
    State,
    TranscriptLine,
)
from voicefsm.pricing import (
    CostEstimate,
    Direction,
    TokenPrices,
    estimate_cost,
    format_money,
    usage_tokens,
)

# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True, slots=True)
class Band:
    """The session was in ``state`` from ``start`` to ``end`` (epoch seconds), because ``why``."""

    state: State
    start: float
    end: float
    why: str = ""


@dataclass(frozen=True, slots=True)
class Marker:
    """Something that happened at ``at`` (and lasted until ``end``, for a rotation's gap).

    ``kind`` is one of :data:`MARKER_KINDS`; ``label`` is the short text drawn beside it,
    ``detail`` the longer text shown on hover and in the event table.
    """

    kind: str
    at: float
    label: str
    detail: str = ""
    end: float | None = None


@dataclass(frozen=True, slots=True)
class Span:
    """The client was away from ``start`` to ``end`` (``returned``: it came back)."""

    start: float
    end: float
    returned: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """A session's summed usage: tokens by direction and modality, audio seconds each way."""

    tokens: Mapping[tuple[Direction, str], int] = field(default_factory=dict)
    """Tokens keyed by (``"input"``/``"output"``, modality)."""
    audio_in_s: float = 0.0
    """Candidate audio sent to the model, in seconds."""
    audio_out_s: float = 0.0
    """Interviewer audio received from the model, in seconds."""
    reports: int = 0
    """How many usage reports the upstream sent."""
    cached_tokens: int = 0
    """Prompt tokens served from the cache (part of the prompt count, not priced apart)."""

    @property
    def total_tokens(self) -> int:
        """Every token counted, both directions."""
        return sum(self.tokens.values())


MARKER_KINDS = (
    "rotation",
    "goaway",
    "close",
    "warning",
    "end",
    "heartbeat_timeout",
    "overflow",
    "unsent",
    "restored",
)
"""The kinds of :class:`Marker` a timeline draws. A ``rotation`` marker is any wait for a new
upstream connection once the first was up: after a planned rotation, a drop, or a take-over."""


@dataclass(frozen=True, slots=True)
class Timeline:
    """Everything the picture shows, in epoch seconds; build it with :func:`build_timeline`."""

    session_id: str
    owner: str | None
    started_at: float
    deadline: float
    state: State
    ended_at: float | None
    end_reason: EndReason | None
    end_detail: str | None
    bands: tuple[Band, ...]
    markers: tuple[Marker, ...]
    away: tuple[Span, ...]
    turns: tuple[TranscriptLine, ...]
    usage: UsageSummary | None = None
    cost: CostEstimate | None = None
    stats: Mapping[str, int] = field(default_factory=dict)
    log_dropped: int = 0
    """Log entries the record's bound dropped (from between its first half and its newest)."""

    @property
    def axis_end(self) -> float:
        """Where the time axis ends: the deadline, or later if the session outlived it."""
        last = max((b.end for b in self.bands), default=self.deadline)
        return max(self.deadline, self.ended_at or self.deadline, last)


# ------------------------------------------------------------------------------------ drawing

STATE_COLOURS: Mapping[State, str] = {
    State.CONNECTING: "#8d99ae",
    State.LIVE: "#2b9348",
    State.WARNING: "#f4a300",
    State.RESUMING: "#d62828",
    State.ENDED: "#3d405b",
}
"""The fill of each state band (distinct in colour and in lightness, so greyscale prints too)."""

ROLE_COLOURS = {"interviewer": "#1d4e89", "user": "#7b2cbf"}

_DASH = "\u2013"
_WIDTH = 1200.0
_LEFT = 110.0  # lane labels
_RIGHT = 24.0
_PLOT = _WIDTH - _LEFT - _RIGHT
_Y_AXIS = 30.0
_LANES = {  # y, height
    "state": (40.0, 40.0),
    "upstream": (96.0, 34.0),
    "client": (146.0, 22.0),
    "interviewer": (184.0, 18.0),
    "user": (208.0, 18.0),
}
_HEIGHT = 290.0
_MIN_BAND_PX = 3.0  # a narrower resuming band gets a mark this wide on top
_TIP_WIDTH = 360.0  # the hover box of a transcript turn
_MIN_SPAN_PX = 4.0  # a 60 ms gap on a 45-minute axis is far below a pixel; draw it visibly


def clock(seconds: float) -> str:
    """``mm:ss`` (or ``h:mm:ss``) of a duration in seconds."""
    seconds = max(0.0, seconds)
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return clock(seconds)


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else "0"


class _Axis:
    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.span = max(end - start, 1e-9)

    def x(self, at: float) -> float:
        return _LEFT + _PLOT * min(max((at - self.start) / self.span, 0.0), 1.0)

    def rel(self, at: float) -> str:
        return _num(at - self.start)


def _data(kind: str, axis: _Axis, start: float, end: float | None = None, **extra: str) -> str:
    attrs = [f'data-kind="{kind}"', f'data-start="{axis.rel(start)}"']
    attrs.append(f'data-end="{axis.rel(end if end is not None else start)}"')
    attrs += [f'data-{name.replace("_", "-")}="{_esc(value)}"' for name, value in extra.items()]
    return " ".join(attrs)


def _ticks(axis: _Axis) -> list[str]:
    minutes = axis.span / 60
    step = next((s for s in (1, 2, 5, 10, 15, 30, 60) if minutes / s <= 12), 120) * 60
    parts = []
    n = 0
    while n * step <= axis.span + 1e-6:
        x = axis.x(axis.start + n * step)
        parts.append(
            f'<line class="tick" x1="{x:.2f}" y1="{_Y_AXIS}" x2="{x:.2f}" y2="{_HEIGHT - 40}"/>'
            f'<text class="tick-label" x="{x:.2f}" y="{_Y_AXIS - 6}">{clock(n * step)}</text>'
        )
        n += 1
    return parts


def _lane_labels() -> list[str]:
    names = {
        "state": "state",
        "upstream": "upstream",
        "client": "client",
        "interviewer": "interviewer",
        "user": "candidate",
    }
    out = []
    for lane, (y, height) in _LANES.items():
        out.append(
            f'<text class="lane-label" x="{_LEFT - 8}" y="{y + height / 2 + 4:.1f}">'
            f"{names[lane]}</text>"
            f'<line class="lane-rule" x1="{_LEFT}" y1="{y + height:.1f}" x2="{_LEFT + _PLOT}" '
            f'y2="{y + height:.1f}"/>'
        )
    return out


def _bands(timeline: Timeline, axis: _Axis) -> list[str]:
    y, height = _LANES["state"]
    out = []
    for band in timeline.bands:
        x0, x1 = axis.x(band.start), axis.x(band.end)
        tip = f"{band.state} {clock(band.start - axis.start)}{_DASH}{clock(band.end - axis.start)}"
        tip += f" ({_duration(band.end - band.start)})" + (f": {band.why}" if band.why else "")
        data = _data("band", axis, band.start, band.end, state=band.state)
        out.append(
            f'<rect class="band band-{band.state}" {data} x="{x0:.3f}" y="{y}" '
            f'width="{max(x1 - x0, 0.0):.3f}" height="{height}" '
            f'fill="{STATE_COLOURS[band.state]}"><title>{_esc(tip)}</title></rect>'
        )
    # Resuming usually lasts far below a pixel: mark it, on top of its neighbours, visibly.
    out += [
        f'<rect class="resume-mark" x="{axis.x(band.start):.3f}" y="{y}" '
        f'width="{_MIN_BAND_PX}" height="{height}" fill="{STATE_COLOURS[State.RESUMING]}"/>'
        for band in timeline.bands
        if band.state is State.RESUMING and axis.x(band.end) - axis.x(band.start) < _MIN_BAND_PX
    ]
    return out


def _label_anchor(x: float) -> str:
    """Keep a centred label inside the plot near its edges."""
    if x > _LEFT + 0.85 * _PLOT:
        return "end"
    return "start" if x < _LEFT + 0.15 * _PLOT else "middle"


def _marker(marker: Marker, axis: _Axis) -> str:
    kind = marker.kind
    x = axis.x(marker.at)
    tip = f"{clock(marker.at - axis.start)} {marker.label}" + (
        f": {marker.detail}" if marker.detail else ""
    )
    title = f"<title>{_esc(tip)}</title>"
    attrs = _data(kind, axis, marker.at, marker.end)
    if kind in ("warning", "end"):
        y_label = _HEIGHT - 24 if kind == "end" else _HEIGHT - 10
        return (
            f'<g class="marker marker-{kind}" {attrs}>{title}'
            f'<line class="anchor" x1="{x:.3f}" y1="{_Y_AXIS}" x2="{x:.3f}" y2="{_HEIGHT - 40}"/>'
            f'<text class="marker-label" x="{x:.3f}" y="{y_label}" '
            f'text-anchor="{_label_anchor(x)}">{_esc(marker.label)}</text></g>'
        )
    y, height = _LANES["client" if kind == "heartbeat_timeout" else "upstream"]
    if kind == "rotation":
        end = marker.end if marker.end is not None else marker.at
        width = max(axis.x(end) - x, _MIN_SPAN_PX)
        return (
            f'<g class="marker marker-rotation" {attrs}>{title}'
            f'<rect class="anchor gap" x="{x:.3f}" y="{y}" width="{width:.3f}" height="{height}"/>'
            f'<text class="marker-label" x="{x + width + 2:.3f}" y="{y + 12}">'
            f"{_esc(marker.label)}</text></g>"
        )
    shape = {
        "goaway": f'<path class="anchor" d="M{x:.3f},{y + height} l-5,-9 h10 z"/>',
        "close": f'<circle class="anchor" cx="{x:.3f}" cy="{y + height - 5}" r="4"/>',
        "heartbeat_timeout": f'<circle class="anchor" cx="{x:.3f}" cy="{y + height / 2}" r="4"/>',
        "overflow": _square(x, y + height - 8),
        "unsent": _square(x, y + height - 8),
        "restored": _square(x, y + 4),
    }[kind]
    return f'<g class="marker marker-{kind}" {attrs}>{title}{shape}</g>'


def _square(x: float, y: float) -> str:
    return f'<rect class="anchor" x="{x - 3:.3f}" y="{y}" width="6" height="6"/>'


def _away(timeline: Timeline, axis: _Axis) -> list[str]:
    y, height = _LANES["client"]
    out = []
    for span in timeline.away:
        x0 = axis.x(span.start)
        width = max(axis.x(span.end) - x0, _MIN_SPAN_PX)
        what = "away, came back" if span.returned else "away, never came back"
        tip = f"client {what} after {_duration(span.end - span.start)}" + (
            f": {span.detail}" if span.detail else ""
        )
        data = _data("away", axis, span.start, span.end, returned=str(span.returned).lower())
        label = f"away {_duration(span.end - span.start)}" + ("" if span.returned else ", gone")
        out.append(
            f'<rect class="away" {data} x="{x0:.3f}" y="{y}" width="{width:.3f}" height="{height}">'
            f"<title>{_esc(tip)}</title></rect>"
            f'<text class="marker-label" x="{x0 + width + 3:.3f}" y="{y + height / 2 + 4:.1f}">'
            f"{_esc(label)}</text>"
        )
    return out


def _turns(timeline: Timeline, axis: _Axis) -> list[str]:
    out = []
    tip_top = _LANES["upstream"][0]
    for line in timeline.turns:
        lane = "user" if line.role == "user" else "interviewer"
        y, height = _LANES[lane]
        x = axis.x(line.at)
        who = "candidate" if line.role == "user" else "interviewer"
        when = clock(line.at - axis.start)
        tip_x = min(max(x - 12, _LEFT), _LEFT + _PLOT - _TIP_WIDTH)
        data = _data("turn", axis, line.at, seq=str(line.seq), role=line.role)
        out.append(
            f'<g class="turn turn-{lane}" {data}>'
            f"<title>{_esc(f'[{line.seq}] {when} {who}: {line.text}')}</title>"
            f'<circle class="hit" cx="{x:.3f}" cy="{y + height / 2}" r="7"/>'
            f'<circle class="dot" cx="{x:.3f}" cy="{y + height / 2}" r="4" '
            f'fill="{ROLE_COLOURS[lane]}"/>'
            f'<foreignObject class="tip" x="{tip_x:.3f}" y="{tip_top}" width="{_TIP_WIDTH}" '
            f'height="{y - tip_top - 4:.0f}"><div xmlns="http://www.w3.org/1999/xhtml" '
            f'class="tip-box"><b>[{line.seq}] {when} {who}</b> {_esc(line.text)}</div>'
            "</foreignObject></g>"
        )
    return out


def _svg(timeline: Timeline) -> str:
    axis = _Axis(timeline.started_at, timeline.axis_end)
    deadline_x = axis.x(timeline.deadline)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH:.0f} {_HEIGHT:.0f}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="timeline of session {_esc(timeline.session_id)}">',
        f'<rect class="plot" {_data("axis", axis, timeline.started_at, axis.start + axis.span)} '
        f'x="{_LEFT}" y="{_Y_AXIS}" width="{_PLOT}" height="{_HEIGHT - 40 - _Y_AXIS}"/>',
        *_ticks(axis),
        *_lane_labels(),
        *_bands(timeline, axis),
        *_away(timeline, axis),
        *(_marker(m, axis) for m in timeline.markers if m.kind not in ("warning", "end")),
        *(_marker(m, axis) for m in timeline.markers if m.kind in ("warning", "end")),
        f'<g class="deadline" {_data("deadline", axis, timeline.deadline)}>'
        f'<line x1="{deadline_x:.3f}" y1="{_Y_AXIS}" x2="{deadline_x:.3f}" y2="{_HEIGHT - 40}"/>'
        f'<text class="marker-label deadline-label" x="{deadline_x:.3f}" y="{_Y_AXIS - 18}" '
        f'text-anchor="{_label_anchor(deadline_x)}">deadline</text></g>',
        *_turns(timeline, axis),  # last: a hovered turn's text box covers everything else
        "</svg>",
    ]
    return "\n".join(parts)


def _legend() -> str:
    items = [
        f'<span class="key"><i style="background:{STATE_COLOURS[state]}"></i>{state}</span>'
        for state in State
    ]
    items += [
        '<span class="key"><i class="k-gap"></i>rotation gap</span>',
        '<span class="key"><i class="k-goaway"></i>GoAway</span>',
        '<span class="key"><i class="k-close"></i>upstream closed</span>',
        '<span class="key"><i class="k-away"></i>client away</span>',
        f'<span class="key"><i style="background:{ROLE_COLOURS["interviewer"]}"></i>'
        "interviewer turn</span>",
        f'<span class="key"><i style="background:{ROLE_COLOURS["user"]}"></i>candidate turn</span>',
    ]
    return '<p class="legend">' + "".join(items) + "</p>"


def _usage_section(timeline: Timeline) -> str:
    usage, cost = timeline.usage, timeline.cost
    if usage is None:
        return (
            "<section><h2>Usage and cost</h2><p>This record has no usage sums "
            "(it was stored by an older voicefsm).</p></section>"
        )
    rows = []
    priced = {(line.direction, line.modality): line for line in cost.lines} if cost else {}
    for (direction, modality), tokens in sorted(usage.tokens.items()):
        line = priced.get((direction, modality))
        price = (
            f"{format_money(line.per_million, cost.currency)}/M → "
            f"{format_money(line.cost, cost.currency)}"
            if line is not None and cost is not None
            else _DASH
        )
        rows.append(
            f'<tr data-kind="usage" data-direction="{direction}" data-modality="{_esc(modality)}">'
            f"<td>{direction}</td><td>{_esc(modality)}</td>"
            f'<td class="n">{tokens:,}</td><td class="n">{price}</td></tr>'
        )
    if not rows:
        rows.append('<tr><td colspan="4">no usage reported</td></tr>')
    total = ""
    if cost is not None:
        total = (
            f'<p class="cost" data-kind="cost" data-total="{cost.total:.6f}">'
            f"Estimated cost: <strong>{format_money(cost.total, cost.currency)}</strong> "
            f'<span class="estimate">estimate — prices as of {_esc(cost.as_of)}, '
            f"{_esc(cost.source)}; not an invoice</span></p>"
        )
    cached = f" ({usage.cached_tokens:,} of the prompt cached)" if usage.cached_tokens else ""
    return (
        "<section><h2>Usage and cost</h2>"
        f"<p>{usage.total_tokens:,} tokens in {usage.reports} usage reports{cached}; "
        f"candidate audio {_duration(usage.audio_in_s)} sent, "
        f"interviewer audio {_duration(usage.audio_out_s)} received.</p>"
        '<table class="usage"><thead><tr><th>direction</th><th>modality</th>'
        '<th class="n">tokens</th><th class="n">price</th></tr></thead><tbody>'
        + "".join(rows)
        + f"</tbody></table>{total}</section>"
    )


def _events_section(timeline: Timeline) -> str:
    start = timeline.started_at
    rows: list[tuple[float, str, str]] = []
    for band in timeline.bands:
        rows.append((band.start, f"→ {band.state}", band.why))
    for marker in timeline.markers:
        rows.append((marker.at, marker.label, marker.detail))
    for span in timeline.away:
        rows.append((span.start, "client away", span.detail))
        if span.returned:
            rows.append((span.end, "client back", f"after {_duration(span.end - span.start)}"))
    rows.sort(key=lambda row: row[0])
    body = "".join(
        f'<tr><td class="n">{clock(at - start)}</td><td>{_esc(what)}</td><td>{_esc(why)}</td></tr>'
        for at, what, why in rows
    )
    dropped = (
        f'<p class="note">The record kept only the latest entries: {timeline.log_dropped} '
        "older ones were dropped at its bound.</p>"
        if timeline.log_dropped
        else ""
    )
    return (
        f'<section class="events"><h2>Events</h2>{dropped}<table><thead><tr><th>time</th>'
        f"<th>what</th><th>detail</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _transcript_section(timeline: Timeline) -> str:
    if not timeline.turns:
        return "<section><h2>Transcript</h2><p>No transcript lines.</p></section>"
    start = timeline.started_at
    rows = "".join(
        f'<tr class="line-{_esc(line.role)}"><td class="n">{line.seq}</td>'
        f'<td class="n">{clock(line.at - start)}</td>'
        f"<td>{'candidate' if line.role == 'user' else 'interviewer'}</td>"
        f"<td>{_esc(line.text)}</td></tr>"
        for line in timeline.turns
    )
    return (
        '<section class="transcript"><h2>Transcript</h2>'
        '<p class="note">Operator view only: the transcript is never sent to the candidate.</p>'
        "<table><thead><tr><th>#</th><th>time</th><th>who</th><th>text</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _summary(timeline: Timeline) -> str:
    facts = [
        ("session", timeline.session_id),
        ("candidate", timeline.owner or _DASH),
        ("started", _utc(timeline.started_at)),
        (
            "deadline",
            f"{_utc(timeline.deadline)} ({clock(timeline.deadline - timeline.started_at)})",
        ),
    ]
    if timeline.ended_at is not None:
        facts.append(
            (
                "ended",
                f"{timeline.end_reason} at {clock(timeline.ended_at - timeline.started_at)}"
                + (f": {timeline.end_detail}" if timeline.end_detail else ""),
            )
        )
    else:
        facts.append(("state", f"{timeline.state} (still running)"))
    stats = timeline.stats
    if stats:
        facts.append(
            (
                "counts",
                ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in stats.items()),
            )
        )
    if timeline.cost is not None:
        facts.append(("estimated cost", timeline.cost.describe()))
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, "DejaVu Sans", sans-serif; margin: 24px; color: #1b1b1b;
  background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 16px; margin: 24px 0 8px; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; vertical-align: top;
  text-align: left; } .n { text-align: right; font-variant-numeric: tabular-nums; }
.facts th { color: #555; font-weight: normal; }
.chart { width: 100%; max-width: 1200px; height: auto; display: block; margin-top: 12px; }
.chart text { font: 11px "DejaVu Sans", sans-serif; fill: #222; }
.plot { fill: #fafafa; stroke: #bbb; }
.tick { stroke: #ddd; } .tick-label { text-anchor: middle; fill: #555; }
.lane-label { text-anchor: end; } .lane-rule { stroke: #eee; }
.band { stroke: none; } .resume-mark { pointer-events: none; }
.band:hover, .marker:hover .anchor, .away:hover
  { stroke: #000; stroke-width: 1.5; }
.marker-rotation .gap { fill: #d62828; } .marker-goaway .anchor { fill: #f77f00; }
.marker-close .anchor { fill: #fff; stroke: #d62828; stroke-width: 2; }
.marker-heartbeat_timeout .anchor { fill: #fff; stroke: #7b2cbf; stroke-width: 2; }
.marker-overflow .anchor, .marker-unsent .anchor { fill: #9d0208; }
.marker-warning .anchor { stroke: #f4a300; stroke-width: 2; stroke-dasharray: 5 3; }
.marker-end .anchor { stroke: #000; stroke-width: 2; }
.marker-label { fill: #222; } .marker-warning text, .marker-end text, .deadline-label
  { font-weight: bold; }
.deadline line { stroke: #000; stroke-width: 1; stroke-dasharray: 2 2; }
.away { fill: #adb5bd; stroke: #495057; stroke-dasharray: 3 2; }
.turn { cursor: help; } .turn .hit { fill: transparent; }
.turn:hover .dot { stroke: #000; stroke-width: 1.5; }
.tip { visibility: hidden; pointer-events: none; overflow: visible; }
.turn:hover .tip { visibility: visible; }
.tip-box { font: 12px/1.35 "DejaVu Sans", sans-serif; background: #fffef5; color: #111;
  border: 1px solid #999; border-radius: 4px; padding: 4px 6px; box-shadow: 0 2px 6px #0003;
  display: -webkit-box; -webkit-line-clamp: 4; -webkit-box-orient: vertical; overflow: hidden; }
.legend { font-size: 12px; } .key { margin-right: 14px; white-space: nowrap; }
.key i { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
  vertical-align: -2px; border: 1px solid #0003; }
.k-gap { background: #d62828; } .k-goaway { background: #f77f00; }
.k-close { background: #fff; border: 2px solid #d62828 !important; border-radius: 50%; }
.k-away { background: #adb5bd; }
.estimate, .note { color: #666; font-size: 12px; }
.transcript td:last-child { max-width: 70ch; }
@media print {
  body { margin: 0; font-size: 11px; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  .chart { max-width: none; page-break-inside: avoid; break-inside: avoid; }
  section { break-inside: auto; } tr { break-inside: avoid; }
  a { color: inherit; text-decoration: none; } .tip { display: none; }
  @page { size: A4 landscape; margin: 12mm; }
}
"""


def render_html(timeline: Timeline) -> str:
    """The timeline as one self-contained HTML document (inline SVG and CSS, no scripts)."""
    title = f"Interview {timeline.session_id}"
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)} · voicefsm timeline</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_esc(title)}</h1>",
            _summary(timeline),
            _svg(timeline),
            _legend(),
            _usage_section(timeline),
            _events_section(timeline),
            _transcript_section(timeline),
            "</body></html>",
        ]
    )


# ------------------------------------------------------------------------------------ building


def _usage_summary(usage: SessionUsage) -> UsageSummary:
    return UsageSummary(
        tokens=usage_tokens(usage),
        audio_in_s=usage.client_audio_s,
        audio_out_s=usage.model_audio_s,
        reports=usage.reports,
        cached_tokens=usage.cached_tokens,
    )


def _age(seconds: float | None) -> str:
    return "a fresh connection" if seconds is None else f"handle {_duration(seconds)} old"


def _entry_marker(entry: LogEntry) -> Marker | None:
    kind = entry.kind
    if kind is LogKind.GOAWAY:
        left = "?" if entry.time_left_s is None else f"{entry.time_left_s:g} s"
        return Marker(
            "goaway",
            entry.at,
            f"GoAway {left}",
            f"connection {entry.connection_id}: time_left {left}",
        )
    if kind is LogKind.UPSTREAM_CLOSED:
        code = "no close code" if entry.close_code is None else f"code {entry.close_code}"
        return Marker(
            "close",
            entry.at,
            f"closed ({code})",
            f"connection {entry.connection_id}: {entry.why or code}",
        )
    if kind is LogKind.WARNING:
        left = "" if entry.time_left_s is None else f" ({clock(entry.time_left_s)} left)"
        return Marker("warning", entry.at, f"warning{left}", entry.why or "")
    if kind is LogKind.HEARTBEAT_TIMEOUT:
        silent = "" if entry.gap_s is None else f" after {_duration(entry.gap_s)} of silence"
        return Marker("heartbeat_timeout", entry.at, "heartbeat timeout", f"client silent{silent}")
    if kind is LogKind.AUDIO_OVERFLOW:
        return Marker(
            "overflow",
            entry.at,
            "audio overflow",
            f"resume buffer full ({entry.count or 0:,} bytes held); refused audio is counted",
        )
    if kind is LogKind.AUDIO_UNSENT:
        return Marker(
            "unsent",
            entry.at,
            f"{entry.count or 0} chunks unsent",
            entry.why or "candidate audio that never reached a model",
        )
    if kind is LogKind.RESTORED:
        return Marker("restored", entry.at, "restored", entry.why or "rebuilt from its record")
    return None


def build_timeline(
    record: SessionRecord,
    transcript: Sequence[TranscriptLine] = (),
    *,
    prices: TokenPrices | None = None,
    now: float | None = None,
) -> Timeline:
    """The picture's content from a stored record, its transcript and (optionally) prices.

    ``now`` ends the last band of a session that is still running (default: the time of its
    last log entry). Without ``prices`` there is no cost estimate. A record stored before the
    event log existed draws a single band from its start to its end.
    """
    started = record.started_at
    log = sorted(record.log, key=lambda entry: entry.at)
    running_until = max([started, *(e.at for e in log), *([now] if now is not None else [])])
    end_at = record.ended_at if record.ended_at is not None else running_until

    bands: list[Band] = []
    markers: list[Marker] = []
    away: list[Span] = []
    state, since, why = State.CONNECTING, started, "session started"
    left_at: float | None = None
    left_why = ""
    last_loss: tuple[float, str] | None = None  # when and why the upstream went

    for entry in log:
        kind = entry.kind
        if kind is LogKind.RESTORED:
            last_loss = (entry.at, "restored from the record")
        if kind in (LogKind.STATE, LogKind.RESTORED) and entry.state_to is not None:
            if entry.at > since:
                bands.append(Band(state, since, entry.at, why))
            state, since, why = entry.state_to, entry.at, entry.why or ""
        elif kind is LogKind.END:
            if state is not State.ENDED:
                bands.append(Band(state, since, entry.at, why))
                state, since, why = State.ENDED, entry.at, entry.why or ""
            label = f"end: {entry.reason or record.end_reason}"
            markers.append(Marker("end", entry.at, label, entry.why or record.end_detail or ""))
        elif kind is LogKind.ROTATION:
            last_loss = (
                entry.at,
                f"rotation ({entry.why or 'GoAway'}), {_age(entry.handle_age_s)}",
            )
        elif kind is LogKind.UPSTREAM_CLOSED:
            if last_loss is None:
                code = "no close code" if entry.close_code is None else f"code {entry.close_code}"
                last_loss = (entry.at, f"upstream closed ({code})")
        elif kind is LogKind.UPSTREAM_READY and entry.gap_s is not None and last_loss:
            # The gap starts where the log says the upstream went (gap_s is rounded to 1 ms).
            gap_start, what = last_loss
            markers.append(
                Marker(
                    "rotation",
                    gap_start,
                    f"gap {_duration(entry.gap_s)}",
                    f"{what}; connection {entry.connection_id} ready after "
                    f"{_duration(entry.gap_s)}, {_age(entry.handle_age_s)}",
                    end=entry.at,
                )
            )
            last_loss = None
        elif kind is LogKind.CLIENT_LEFT and left_at is None:
            left_at, left_why = entry.at, entry.why or ""
        elif kind is LogKind.CLIENT_BACK and left_at is not None:
            away.append(Span(left_at, entry.at, True, left_why))
            left_at = None
        marker = _entry_marker(entry)
        if marker is not None:
            markers.append(marker)

    if not log:  # an old record: no log, only where it started and where it is now
        state = State.ENDED if record.ended_at is not None else record.state
        bands.append(Band(State.LIVE if state is State.ENDED else state, started, end_at, ""))
    elif state is not State.ENDED:
        bands.append(Band(state, since, end_at, why))
    if record.ended_at is not None:
        if not any(marker.kind == "end" for marker in markers):
            markers.append(
                Marker("end", record.ended_at, f"end: {record.end_reason}", record.end_detail or "")
            )
        if record.ended_at < record.deadline:
            bands.append(Band(State.ENDED, record.ended_at, record.deadline, "after the end"))
    if left_at is not None:
        away.append(Span(left_at, end_at, False, left_why))

    usage = _usage_summary(record.usage) if record.usage.reports or log else None
    cost = estimate_cost(usage_tokens(record.usage), prices) if prices is not None else None
    stats = record.stats
    counts = {
        "resumes": stats.resumes,
        "goaways": stats.goaways,
        "connect_attempts": stats.connect_attempts,
        "chunks_overflowed": stats.chunks_overflowed,
        "chunks_unsent_at_end": stats.chunks_unsent_at_end,
    }
    return Timeline(
        session_id=record.session_id,
        owner=record.owner,
        started_at=started,
        deadline=record.deadline,
        state=record.state,
        ended_at=record.ended_at,
        end_reason=record.end_reason,
        end_detail=record.end_detail,
        bands=tuple(bands),
        markers=tuple(sorted(markers, key=lambda m: m.at)),
        away=tuple(away),
        turns=tuple(sorted(transcript, key=lambda line: line.seq)),
        usage=usage,
        cost=cost,
        stats=counts,
        log_dropped=record.log_dropped,
    )


def render_timeline(
    record: SessionRecord,
    transcript: Sequence[TranscriptLine] = (),
    *,
    prices: TokenPrices | None = None,
    now: float | None = None,
) -> str:
    """:func:`build_timeline` then :func:`render_html`: the page for one stored session."""
    return render_html(build_timeline(record, transcript, prices=prices, now=now))


__all__ = [
    "MARKER_KINDS",
    "STATE_COLOURS",
    "Band",
    "Marker",
    "Span",
    "Timeline",
    "UsageSummary",
    "build_timeline",
    "clock",
    "render_html",
    "render_timeline",
]
