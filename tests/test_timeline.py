"""The interview timeline page, usage and cost, the operator route and the usage metrics.

The picture is checked in Debian's chromium (Playwright, as in ``test_browser.py``): a whole
simulated 45-minute interview (GoAways, a refused reconnect, a 1011 drop, a page refresh) runs
through the real engine, its final record is drawn, and the DOM must agree with the *record*:
the expected bands, markers and spans are computed here from the record's event log (not from
the page's own data attributes), and every element must sit where the record puts it on the
time axis, within a pixel. Screenshots go to ``test-artifacts/`` (git-ignored):
``timeline.png``, ``timeline-hover.png`` and ``timeline-print.png``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chromium import ARTIFACTS, CHROMIUM, require_browser

from voicefsm.auth import JWTAuthenticator
from voicefsm.cli import main
from voicefsm.metrics import Metrics
from voicefsm.model import (
    EndReason,
    LogEntry,
    LogKind,
    SessionConfig,
    SessionRecord,
    SessionUsage,
    State,
    TranscriptLine,
)
from voicefsm.pricing import (
    DEFAULT_PRICES,
    PRICES_ENV,
    TokenPrices,
    estimate_cost,
    load_prices,
    usage_tokens,
)
from voicefsm.simulate import SCENARIOS, SimulationResult, simulate
from voicefsm.stores import MemoryStore, SQLiteStore
from voicefsm.timeline import build_timeline, render_html, render_timeline
from voicefsm.web.operator import COOKIE, operator_router

TOLERANCE_PX = 1.0
SECRET = "operator-test-secret-long-enough-for-hs256"
PRICES = TokenPrices(
    currency="USD",
    input_text_per_million=1.0,
    input_audio_per_million=10.0,
    output_text_per_million=4.0,
    output_audio_per_million=40.0,
    as_of="2026-12-01",
    source="test prices",
)


@pytest.fixture(scope="module")
def interview() -> SimulationResult:
    """The default simulated interview, with every fault the simulation has."""
    result = simulate("interview", seed=7)
    assert result.record is not None
    assert result.end_reason is EndReason.TIME_LIMIT
    return result


def _record(result: SimulationResult) -> SessionRecord:
    assert result.record is not None
    return result.record


# ------------------------------------------------------------------ what the record says


def expected_bands(record: SessionRecord) -> list[tuple[State, float, float]]:
    """State intervals straight from the log's state changes, then ``ended`` to the deadline."""
    changes = [
        e
        for e in record.log
        if e.kind in (LogKind.STATE, LogKind.RESTORED) and e.at > record.started_at
    ]
    bands = []
    state, since = State.CONNECTING, record.started_at
    for change in changes:
        assert change.state_from is state, f"log out of order at {change}"
        assert change.state_to is not None
        bands.append((state, since, change.at))
        state, since = change.state_to, change.at
    assert state is State.ENDED
    if record.ended_at is not None and record.ended_at < record.deadline:
        bands.append((State.ENDED, record.ended_at, record.deadline))
    return bands


def expected_gaps(record: SessionRecord) -> list[tuple[float, float]]:
    """(start, end) of each wait for a new connection after the first one was up."""
    ready = [e for e in record.log if e.kind is LogKind.UPSTREAM_READY and e.gap_s is not None]
    return [(e.at - (e.gap_s or 0.0), e.at) for e in ready[1:]]


def expected_away(record: SessionRecord) -> list[tuple[float, float]]:
    spans, left = [], None
    for entry in record.log:
        if entry.kind is LogKind.CLIENT_LEFT and left is None:
            left = entry.at
        elif entry.kind is LogKind.CLIENT_BACK and left is not None:
            spans.append((left, entry.at))
            left = None
    return spans


def kinds(record: SessionRecord, kind: LogKind) -> list[LogEntry]:
    return [entry for entry in record.log if entry.kind is kind]


# ------------------------------------------------------------------ pricing and usage


def test_usage_tokens_split_by_direction_and_modality_with_the_rest_unspecified() -> None:
    usage = SessionUsage(
        reports=3,
        prompt_tokens=1000,
        response_tokens=300,
        thoughts_tokens=7,
        total_tokens=1320,
        prompt_tokens_by_modality={"AUDIO": 800, "TEXT": 150},
        response_tokens_by_modality={"AUDIO": 300},
    )
    assert usage_tokens(usage) == {
        ("input", "audio"): 800,
        ("input", "text"): 150,
        ("input", "unspecified"): 50,
        ("output", "audio"): 300,
        ("output", "thoughts"): 7,
        ("output", "unspecified"): 13,
    }
    only_totals = SessionUsage(reports=1, prompt_tokens=2000, total_tokens=2100)
    assert usage_tokens(only_totals) == {
        ("input", "unspecified"): 2000,
        ("output", "unspecified"): 100,
    }


def test_the_estimate_prices_each_row_and_says_it_is_an_estimate() -> None:
    cost = estimate_cost(
        {
            ("input", "audio"): 2_000_000,
            ("input", "unspecified"): 1_000_000,  # priced as audio by default
            ("output", "thoughts"): 1_000_000,  # priced as text output
            ("output", "audio"): 500_000,
            ("input", "text"): 0,
        },
        PRICES,
    )
    rows = [(line.direction, line.modality, line.cost) for line in cost.lines]
    assert rows == [
        ("input", "audio", 20.0),
        ("input", "unspecified", 10.0),
        ("output", "audio", 20.0),
        ("output", "thoughts", 4.0),
    ]
    assert cost.total == pytest.approx(54.0)
    assert cost.describe() == "~$54.0000 (estimate; prices as of 2026-12-01)"
    text_priced = PRICES.model_copy(update={"unspecified_as": "text"})
    assert estimate_cost({("input", "unspecified"): 1_000_000}, text_priced).total == 1.0
    with pytest.raises(ValueError, match="negative token count"):
        estimate_cost({("input", "audio"): -1}, PRICES)


def test_prices_come_from_a_file_or_the_environment_and_bad_files_are_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PRICES_ENV, raising=False)
    assert load_prices() is DEFAULT_PRICES
    assert DEFAULT_PRICES.as_of and "ai.google.dev" in DEFAULT_PRICES.source
    good = tmp_path / "prices.json"
    good.write_text(PRICES.model_dump_json())
    assert load_prices(good) == PRICES
    monkeypatch.setenv(PRICES_ENV, str(good))
    assert load_prices() == PRICES
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"input_text_per_million": 1}))
    with pytest.raises(ValueError, match=r"bad\.json is not valid"):
        load_prices(bad)
    with pytest.raises(ValueError, match="cannot read prices"):
        load_prices(tmp_path / "missing.json")
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        load_prices(bad)


# ------------------------------------------------------------------ the page, without a browser


def test_the_page_is_self_contained_and_escapes_the_transcript(
    interview: SimulationResult,
) -> None:
    record = _record(interview)
    hostile = TranscriptLine(seq=999, role="user", text='<script>alert("x")</script> & "q"', at=0)
    page = render_timeline(record, [*interview.transcript, hostile], prices=PRICES)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "@media print" in page
    assert "not an invoice" in page


def test_a_record_without_a_log_still_draws_its_start_and_end() -> None:
    start = 1_800_000_000.0
    record = SessionRecord(
        session_id="old",
        config=SessionConfig(),
        state=State.ENDED,
        started_at=start,
        deadline=start + 2700,
        ended_at=start + 600,
        end_reason=EndReason.USER_ENDED,
        end_detail="the client ended the interview",
    )
    timeline = build_timeline(record)
    assert [(b.state, b.start, b.end) for b in timeline.bands] == [
        (State.LIVE, start, start + 600),
        (State.ENDED, start + 600, start + 2700),
    ]
    assert [(m.kind, m.at) for m in timeline.markers] == [("end", start + 600)]
    assert timeline.usage is None
    assert "older voicefsm" in render_html(timeline)


def test_a_restored_session_draws_its_take_over_and_counts_its_gap_once() -> None:
    from voicefsm import events as ev
    from voicefsm.engine import Session

    start = 1_800_000_000.0
    first = Session(SessionConfig(), session_id="moved", seed=1)
    first.start(start)
    first.handle(ev.UpstreamReady(connection_id=1), start + 0.1)
    first.handle(ev.ResumptionUpdate("h-1", True), start + 5)
    first.handle(ev.Usage(prompt_tokens=100, total_tokens=100), start + 6)
    stored = first.snapshot()  # the worker dies here; another one takes over at +300 s
    metrics = Metrics()
    observer = metrics.observer()
    observer.baseline(stored)
    second = Session.restore(stored, start + 300, seed=2)
    second.start(start + 300)
    second.handle(ev.UpstreamReady(), start + 300.2)
    second.handle(ev.Usage(prompt_tokens=50, total_tokens=50), start + 310)
    second.handle(ev.ClientEnd(), start + 320)
    record = second.snapshot()
    observer.record(record)

    timeline = build_timeline(record)
    assert [(b.state, b.start, b.end) for b in timeline.bands] == expected_bands(record)
    assert [b.state for b in timeline.bands] == [
        State.CONNECTING,
        State.LIVE,
        State.RESUMING,
        State.LIVE,
        State.ENDED,
    ]
    (gap,) = [m for m in timeline.markers if m.kind == "rotation"]
    assert gap.at == start + 300 and gap.end == start + 300.2
    assert "restored from the record" in gap.detail
    assert [m.kind for m in timeline.markers if m.kind in ("restored", "end")] == [
        "restored",
        "end",
    ]
    restores = _sample(metrics, "voicefsm_upstream_gap_seconds_count", {"cause": "restore"})
    assert restores == 1
    assert _sample(metrics, "voicefsm_upstream_gap_seconds_count", {"cause": "drop"}) == 0
    labels = {"direction": "input", "modality": "unspecified"}
    assert _sample(metrics, "voicefsm_tokens_total", labels) == 50  # not the first worker's 100


def test_a_running_session_is_drawn_up_to_now() -> None:
    from voicefsm import events as ev
    from voicefsm.engine import Session

    start = 1_800_000_000.0
    session = Session(SessionConfig(), session_id="running", seed=1)
    session.start(start)
    session.handle(ev.UpstreamReady(connection_id=1), start + 0.1)
    session.handle(ev.ClientGone("network"), start + 60)
    record = session.snapshot()
    timeline = build_timeline(record, now=start + 90)
    assert [(b.state, b.start, b.end) for b in timeline.bands] == [
        (State.CONNECTING, start, start + 0.1),
        (State.LIVE, start + 0.1, start + 90),
    ]
    assert [(s.start, s.end, s.returned) for s in timeline.away] == [
        (start + 60, start + 90, False)
    ]
    assert "still running" in render_html(timeline)
    early = build_timeline(record, now=start + 1)  # a clock behind the log never draws backwards
    assert all(band.end >= band.start for band in early.bands)


def test_heartbeat_timeouts_overflow_and_unsent_audio_are_marked_where_they_happened() -> None:
    from voicefsm import events as ev
    from voicefsm.engine import Session

    start = 1_800_000_000.0
    config = SessionConfig(
        resume_buffer_max_bytes=640 * 3,
        heartbeat_interval_s=10,
        heartbeat_timeout_s=30,
        client_grace_s=20,
        resume_backoff_base_s=5,
        resume_backoff_cap_s=5,
    )
    session = Session(config, session_id="faulty", seed=1)
    session.start(start)
    session.handle(ev.UpstreamReady(connection_id=1), start + 0.1)
    session.handle(ev.ResumptionUpdate("h-1", True), start + 1)
    session.handle(ev.UpstreamClosed(1006, "dropped", connection_id=1), start + 2)
    for n in range(5):  # the buffer holds three chunks; the fourth overflows
        session.handle(ev.ClientAudio(bytes(640)), start + 2.1 + n * 0.02)
    now = start + 2.2
    while not session.ended:  # the upstream never answers, the client goes quiet
        due = session.next_timer()
        assert due is not None and due < start + 3600
        now = due
        session.handle(ev.Tick(), now)
    record = session.snapshot()
    timeline = build_timeline(record)
    for kind, log_kind in (
        ("heartbeat_timeout", LogKind.HEARTBEAT_TIMEOUT),
        ("overflow", LogKind.AUDIO_OVERFLOW),
        ("unsent", LogKind.AUDIO_UNSENT),
        ("close", LogKind.UPSTREAM_CLOSED),
    ):
        want = [entry.at for entry in kinds(record, log_kind)]
        assert want, f"the engine logged no {log_kind}"
        assert [m.at for m in timeline.markers if m.kind == kind] == want, kind
    (away,) = timeline.away
    assert away.start == kinds(record, LogKind.CLIENT_LEFT)[0].at and not away.returned
    page = render_html(timeline)
    for kind in ("heartbeat_timeout", "overflow", "unsent", "away", "end"):
        assert f'data-kind="{kind}"' in page, kind


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_draws_its_end_and_bands_from_start_to_deadline(scenario: str) -> None:
    result = simulate(scenario, seed=3)
    record = _record(result)
    timeline = build_timeline(record, result.transcript, prices=PRICES)
    assert [(b.state, b.start, b.end) for b in timeline.bands] == expected_bands(record)
    assert timeline.bands[0].start == record.started_at
    assert timeline.bands[-1].end == record.deadline
    (end,) = [m for m in timeline.markers if m.kind == "end"]
    assert end.at == record.ended_at and end.label == f"end: {record.end_reason}"
    page = render_html(timeline)
    assert page.count('data-kind="band"') == len(timeline.bands)
    assert page.count('data-kind="turn"') == len(result.transcript)


def test_a_log_cut_at_its_bound_still_draws_a_whole_axis() -> None:
    result = simulate("interview", seed=7, config=SessionConfig(max_log_entries=20))
    record = _record(result)
    assert record.log_dropped > 0 and len(record.log) <= 20
    timeline = build_timeline(record, result.transcript)
    bands = timeline.bands
    assert bands[0].start == record.started_at and bands[-1].end == record.deadline
    assert all(a.end == b.start for a, b in itertools.pairwise(bands))
    assert [m.at for m in timeline.markers if m.kind == "end"] == [record.ended_at]
    page = render_html(timeline)
    assert f"{record.log_dropped} older ones were dropped" in page


def test_the_timeline_follows_the_log(interview: SimulationResult) -> None:
    record = _record(interview)
    timeline = build_timeline(record, interview.transcript, prices=PRICES)
    assert [(b.state, b.start, b.end) for b in timeline.bands] == expected_bands(record)
    rotations = [(m.at, m.end) for m in timeline.markers if m.kind == "rotation"]
    assert len(rotations) == len(expected_gaps(record))
    for (at, end), (want_at, want_end) in zip(rotations, expected_gaps(record), strict=True):
        assert at == pytest.approx(want_at, abs=1e-3) and end == want_end
    assert len(rotations) == record.stats.resumes
    assert sum(m.kind == "goaway" for m in timeline.markers) == record.stats.goaways
    assert [(s.start, s.end) for s in timeline.away] == expected_away(record)
    assert [m.at for m in timeline.markers if m.kind == "warning"] == [
        e.at for e in kinds(record, LogKind.WARNING)
    ]
    assert [m.at for m in timeline.markers if m.kind == "end"] == [record.ended_at]
    assert timeline.cost is not None
    assert timeline.cost.total == estimate_cost(usage_tokens(record.usage), PRICES).total > 0


# ------------------------------------------------------------------ the page in chromium


async def _boxes(page: Any, selector: str) -> list[dict[str, Any]]:
    """Bounding boxes and data attributes of every element matching ``selector``, in DOM order."""
    result: list[dict[str, Any]] = await page.eval_on_selector_all(
        selector,
        """els => els.map(e => {
            const r = e.getBoundingClientRect();
            return {left: r.left, right: r.right, cx: (r.left + r.right) / 2, width: r.width,
                    data: Object.assign({}, (e.closest('[data-kind]') || e).dataset)};
        })""",
    )
    return result


async def test_the_picture_matches_the_record_in_chromium(interview: SimulationResult) -> None:
    require_browser()
    from playwright.async_api import async_playwright

    record = _record(interview)
    page_html = render_timeline(record, interview.transcript, prices=PRICES)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.set_content(page_html)
            (axis,) = await _boxes(page, '[data-kind="axis"]')
            start, end = record.started_at, record.deadline
            assert float(axis["data"]["end"]) == pytest.approx(end - start)

            def x(at: float) -> float:
                return float(axis["left"] + (at - start) / (end - start) * axis["width"])

            # state bands: count, order, both edges
            bands = await _boxes(page, '[data-kind="band"]')
            want = expected_bands(record)
            assert [b["data"]["state"] for b in bands] == [s.value for s, _, _ in want]
            for box, (state, band_start, band_end) in zip(bands, want, strict=True):
                assert box["left"] == pytest.approx(x(band_start), abs=TOLERANCE_PX), state
                assert box["right"] == pytest.approx(x(band_end), abs=TOLERANCE_PX), state
                assert float(box["data"]["start"]) == pytest.approx(band_start - start, abs=1e-3)
            colours = await page.eval_on_selector_all(
                '[data-kind="band"]', "els => els.map(e => getComputedStyle(e).fill)"
            )
            by_state = dict(zip([b["data"]["state"] for b in bands], colours, strict=True))
            assert len(set(by_state.values())) == len(by_state) == 4, by_state  # ends on time
            legend = await page.eval_on_selector_all(
                ".legend .key i[style]", "els => els.map(e => getComputedStyle(e).backgroundColor)"
            )
            assert set(by_state.values()) < set(legend[:5]) and len(set(legend[:5])) == 5
            marks = await _boxes(page, ".resume-mark")  # each short resume stays visible
            assert len(marks) == record.stats.resumes
            assert all(mark["width"] >= 3 for mark in marks)

            # rotation gaps: one per resume, starting where the upstream went
            gaps = await _boxes(page, '[data-kind="rotation"] .gap')
            assert len(gaps) == len(expected_gaps(record)) == record.stats.resumes
            for box, (gap_start, gap_end) in zip(gaps, expected_gaps(record), strict=True):
                assert box["left"] == pytest.approx(x(gap_start), abs=TOLERANCE_PX)
                assert float(box["data"]["end"]) == pytest.approx(gap_end - start, abs=1e-3)
            labels = await page.locator('[data-kind="rotation"] .marker-label').all_text_contents()
            assert all(re.fullmatch(r"gap \d+ ms|gap \d+\.\d s", label) for label in labels)

            goaways = await _boxes(page, '[data-kind="goaway"] .anchor')
            assert [g["cx"] for g in goaways] == pytest.approx(
                [x(e.at) for e in kinds(record, LogKind.GOAWAY)], abs=TOLERANCE_PX
            )
            assert len(goaways) == record.stats.goaways
            closes = await _boxes(page, '[data-kind="close"] .anchor')
            closed = kinds(record, LogKind.UPSTREAM_CLOSED)
            assert len(closes) == len(closed) == 2  # the 1011 drop, then the refused reconnect
            assert [c["cx"] for c in closes] == pytest.approx([x(e.at) for e in closed], abs=1.0)

            away = await _boxes(page, '[data-kind="away"]')
            assert len(away) == len(expected_away(record)) == 1
            for box, (left, back) in zip(away, expected_away(record), strict=True):
                assert box["left"] == pytest.approx(x(left), abs=TOLERANCE_PX)
                assert box["right"] == pytest.approx(max(x(back), x(left) + 4), abs=TOLERANCE_PX)

            (warning,) = await _boxes(page, '[data-kind="warning"] .anchor')
            (warned,) = kinds(record, LogKind.WARNING)
            assert warning["cx"] == pytest.approx(x(warned.at), abs=TOLERANCE_PX)
            assert record.ended_at is not None
            (ended,) = await _boxes(page, '[data-kind="end"] .anchor')
            assert ended["cx"] == pytest.approx(x(record.ended_at), abs=TOLERANCE_PX)
            end_label = await page.locator('[data-kind="end"] .marker-label').text_content()
            assert end_label == "end: time_limit"

            # transcript turns: one mark per line, in order, at its time; hovering shows the text
            turns = await _boxes(page, '[data-kind="turn"] .dot')
            lines = sorted(interview.transcript, key=lambda line: line.seq)
            assert [int(t["data"]["seq"]) for t in turns] == [line.seq for line in lines]
            assert len(turns) == len(lines) > 20
            for box, line in zip(turns, lines, strict=True):
                assert box["cx"] == pytest.approx(x(line.at), abs=TOLERANCE_PX)
            await page.screenshot(path=str(ARTIFACTS / "timeline.png"), full_page=True)

            probe = lines[len(lines) // 2]
            turn = page.locator(f'[data-kind="turn"][data-seq="{probe.seq}"]')
            tip = turn.locator(".tip")
            assert await tip.evaluate("e => getComputedStyle(e).visibility") == "hidden"
            await turn.locator(".dot").hover()
            assert await tip.evaluate("e => getComputedStyle(e).visibility") == "visible"
            assert probe.text in (await tip.text_content() or "")
            await page.screenshot(path=str(ARTIFACTS / "timeline-hover.png"))

            # print: colours kept, hover boxes gone, everything fits an A4 landscape page
            await page.emulate_media(media="print")
            assert await tip.evaluate("e => getComputedStyle(e).display") == "none"
            adjust = await page.eval_on_selector(
                '[data-kind="band"]', "e => getComputedStyle(e).printColorAdjust"
            )
            assert adjust == "exact"
            await page.screenshot(path=str(ARTIFACTS / "timeline-print.png"), full_page=True)
            pdf = await page.pdf(format="A4", landscape=True, print_background=True)
            assert pdf.startswith(b"%PDF")
        finally:
            await browser.close()


# ------------------------------------------------------------------ the operator route


@pytest.fixture
async def operator_client(interview: SimulationResult) -> AsyncIterator[httpx.AsyncClient]:
    from fastapi import FastAPI

    store = MemoryStore()
    record = _record(interview)
    await store.save(record)
    for line in interview.transcript:
        await store.append_transcript(record.session_id, line)
    app = FastAPI()
    app.include_router(operator_router(lambda: store, JWTAuthenticator(SECRET), prices=PRICES))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_operator_pages_need_the_operator_role(
    operator_client: httpx.AsyncClient, interview: SimulationResult
) -> None:
    auth = JWTAuthenticator(SECRET)
    operator = auth.issue("ops-1", roles=["operator"])
    candidate = auth.issue("cand-1")
    session_id = _record(interview).session_id
    for path in ("/operator/", f"/operator/sessions/{session_id}"):
        unsigned = await operator_client.get(path)
        assert unsigned.status_code == 401 and unsigned.headers["www-authenticate"].startswith(
            "Bearer"
        )
        bad = await operator_client.get(path, headers=_bearer("not-a-jwt"))
        assert bad.status_code == 401
        refused = await operator_client.get(path, headers=_bearer(candidate))
        assert refused.status_code == 403
        assert interview.transcript[0].text not in refused.text

    listing = await operator_client.get("/operator/", headers=_bearer(operator))
    assert listing.status_code == 200
    assert f'href="/operator/sessions/{session_id}"' in listing.text
    priced = estimate_cost(usage_tokens(_record(interview).usage), PRICES)
    assert f"${priced.total:.4f}" in listing.text and "test prices" in listing.text
    assert listing.headers["cache-control"] == "no-store"
    assert "script-src" not in listing.headers["content-security-policy"]
    page = await operator_client.get(f"/operator/sessions/{session_id}", headers=_bearer(operator))
    assert page.status_code == 200
    assert page.text.count('data-kind="band"') == len(expected_bands(_record(interview)))
    assert interview.transcript[0].text in page.text
    missing = await operator_client.get("/operator/sessions/nope", headers=_bearer(operator))
    assert missing.status_code == 404
    ended = await operator_client.get("/operator/?state=ended", headers=_bearer(operator))
    assert session_id in ended.text
    live = await operator_client.get("/operator/?state=live", headers=_bearer(operator))
    assert session_id not in live.text and "No sessions match" in live.text
    other = await operator_client.get("/operator/?owner=someone", headers=_bearer(operator))
    assert session_id not in other.text
    bad = await operator_client.get("/operator/?state=sleeping", headers=_bearer(operator))
    assert bad.status_code == 400


async def test_a_token_in_the_url_becomes_a_cookie_and_leaves_the_url(
    operator_client: httpx.AsyncClient,
) -> None:
    operator = JWTAuthenticator(SECRET).issue("ops-1", roles=["operator"])
    first = await operator_client.get(f"/operator/?token={operator}")
    assert first.status_code == 303
    assert first.headers["location"] == "/operator/"
    cookie = first.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/operator" in cookie
    again = await operator_client.get("/operator/")
    assert again.status_code == 200
    candidate = JWTAuthenticator(SECRET).issue("cand-1")
    assert (await operator_client.get(f"/operator/?token={candidate}")).status_code == 403


async def test_serve_includes_the_operator_route() -> None:
    from voicefsm.serve import ServeSettings, create_app

    app = create_app(
        ServeSettings(config=SessionConfig(), jwt_secret=SECRET, store_url="memory://")
    )
    operator = JWTAuthenticator(SECRET).issue("ops-1", roles=["operator"])
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        assert (await client.get("/operator/")).status_code == 401
        candidate = JWTAuthenticator(SECRET).issue("cand-1")
        assert (await client.get("/operator/", headers=_bearer(candidate))).status_code == 403
        listed = await client.get("/operator/", headers=_bearer(operator))
        assert listed.status_code == 200


# ------------------------------------------------------------------ the command line


def test_simulate_draws_its_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.html"
    assert main(["simulate", "--quiet", "--timeline", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert page.count('data-kind="rotation"') == 5
    assert f"timeline written to {out}" in capsys.readouterr().err


async def test_timeline_and_transcript_commands_read_the_store(
    tmp_path: Path, interview: SimulationResult, capsys: pytest.CaptureFixture[str]
) -> None:
    record = _record(interview)
    database = tmp_path / "sessions.db"
    async with SQLiteStore(str(database)) as store:
        await store.save(record)
        for line in interview.transcript:
            await store.append_transcript(record.session_id, line)
    url = f"sqlite://{database}"
    prices = tmp_path / "prices.json"
    prices.write_text(PRICES.model_dump_json())
    out = tmp_path / "t.html"
    args = ["timeline", record.session_id, "--store", url, "-o", str(out), "--prices", str(prices)]
    assert await _in_thread(args) == 0
    page = out.read_text()
    assert "test prices" in page and interview.transcript[-1].text in page
    assert await _in_thread(["timeline", "nope", "--store", url, "-o", str(out)]) == 1
    capsys.readouterr()
    assert await _in_thread(["transcript", record.session_id, "--store", url]) == 0
    printed = capsys.readouterr().out
    cost = estimate_cost(usage_tokens(record.usage), DEFAULT_PRICES)
    assert f"{record.usage.prompt_tokens:,} prompt" in printed
    assert f"cost {cost.describe()}" in printed
    assert await _in_thread(["sessions", "--store", url, "--prices", str(prices)]) == 0
    listed = capsys.readouterr()
    header, row = listed.out.splitlines()
    assert header.split()[-3:] == ["EST.COST", "END", "WORKER"]
    assert "prices as of 2026-12-01 (test prices)" in listed.err
    priced = estimate_cost(usage_tokens(record.usage), PRICES)
    assert row.split()[0] == record.session_id and row.split()[-3] == f"${priced.total:.4f}"


async def _in_thread(argv: list[str]) -> int:
    """Run the CLI (which calls ``asyncio.run``) outside the test's event loop."""
    import asyncio

    return await asyncio.to_thread(main, argv)


# ------------------------------------------------------------------ metrics


def _sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_usage_and_gaps_reach_prometheus_once(interview: SimulationResult) -> None:
    record = _record(interview)
    metrics = Metrics()
    observer = metrics.observer()
    for entry in record.log:
        observer.logged(entry)
    usage = record.usage
    half = usage.model_copy(
        update={
            "prompt_tokens": usage.prompt_tokens // 2,
            "total_tokens": usage.total_tokens // 2,
            "client_audio_bytes": 32_000,
        }
    )
    observer.usage(half)
    observer.usage(record.usage)
    observer.usage(record.usage)  # nothing new: nothing counted
    for (direction, modality), count in usage_tokens(record.usage).items():
        labels = {"direction": direction, "modality": modality}
        assert _sample(metrics, "voicefsm_tokens_total", labels) == count
    audio_in = _sample(metrics, "voicefsm_audio_seconds_total", {"direction": "in"})
    assert audio_in == pytest.approx(record.usage.client_audio_s)
    rotations = _sample(metrics, "voicefsm_upstream_gap_seconds_count", {"cause": "rotation"})
    drops = _sample(metrics, "voicefsm_upstream_gap_seconds_count", {"cause": "drop"})
    assert rotations == record.stats.goaways
    assert rotations + drops == record.stats.resumes

    restored = metrics.observer()
    restored.usage_baseline(record.usage)
    restored.usage(record.usage)  # what the first worker counted is not counted again
    labels = {"direction": "input", "modality": "unspecified"}
    assert _sample(metrics, "voicefsm_tokens_total", labels) == usage_tokens(record.usage).get(
        ("input", "unspecified"), 0
    )


async def test_a_served_interview_feeds_usage_and_gap_metrics_and_its_timeline() -> None:
    """Real uvicorn, websocket client, ADK and genai against the fake Live server: the metrics
    and the stored record's timeline follow what the upstream reported."""
    import asyncio
    import socket

    from google.adk.agents import LlmAgent
    from live_rig import starlette_service
    from loopback import MODEL, chunk, fast_config
    from websockets.asyncio.client import connect

    from voicefsm.adk import AdkUpstream
    from voicefsm.service import InterviewService
    from voicefsm.testing import FakeLiveConnection, FakeLiveServer

    usage = {
        "promptTokenCount": 1200,
        "responseTokenCount": 300,
        "totalTokenCount": 1500,
        "promptTokensDetails": [
            {"modality": "AUDIO", "tokenCount": 1000},
            {"modality": "TEXT", "tokenCount": 200},
        ],
        "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 300}],
    }

    async def script(conn: FakeLiveConnection) -> None:
        await conn.send_setup_complete()
        await conn.send_resumption_update(f"h-{conn.number}")
        await conn.wait_for_audio_chunks(5)
        await conn.send_model_audio(bytes(4800))  # 0.1 s at 24 kHz
        await conn.send({"usageMetadata": usage})
        await conn.send_turn_complete()
        if conn.number == 1:
            await conn.send_go_away("5s")  # between turns: rotate now
        await conn.wait_closed(timeout=None)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    auth = JWTAuthenticator(SECRET)
    async with FakeLiveServer(script=script) as fake:
        agent = LlmAgent(name="interviewer", model=MODEL, instruction="Interview.")
        service = InterviewService(
            AdkUpstream(agent, client=fake.genai_client()), auth, config=fast_config()
        )
        async with starlette_service(service, port) as url:
            token = auth.issue("cand-1")
            async with connect(url, subprotocols=[f"bearer.{token}"], open_timeout=5) as ws:  # type: ignore[list-item]
                created = json.loads(await ws.recv())
                session_id = created["session_id"]
                (live,) = service.sessions.values()
                sent = 0
                second = asyncio.create_task(fake.wait_for_connection(2, timeout=None))
                while not second.done() or fake.connections[-1].audio_chunk_count < 5:
                    await ws.send(chunk(sent))
                    sent += 1
                    await asyncio.sleep(0.02)  # a microphone's pace
                    assert sent < 2000, "the rotation never happened"
                # The second connection's turn (audio, usage, turnComplete) is on its way;
                # end only once the session handled it: its turn_complete reached the client.
                turns = 0
                async with asyncio.timeout(15):
                    while turns < 2:
                        frame = await ws.recv()
                        message = json.loads(frame) if isinstance(frame, str) else {}
                        if message.get("status") == "turn_complete":
                            turns += 1
                await ws.send(json.dumps({"end_session": True}))
                async with asyncio.timeout(15):
                    record = await live.task
            stored = await service.store.load(session_id)
            assert stored is not None
    assert record.end_reason is EndReason.USER_ENDED
    assert record.usage.reports == 2
    assert record.usage.prompt_tokens_by_modality == {"AUDIO": 2000, "TEXT": 400}
    metrics = service.metrics
    assert (
        _sample(metrics, "voicefsm_tokens_total", {"direction": "input", "modality": "audio"})
        == 2000
    )
    assert (
        _sample(metrics, "voicefsm_tokens_total", {"direction": "output", "modality": "audio"})
        == 600
    )
    audio_out = _sample(metrics, "voicefsm_audio_seconds_total", {"direction": "out"})
    assert audio_out == pytest.approx(record.usage.model_audio_s) == pytest.approx(0.2)
    audio_in = _sample(metrics, "voicefsm_audio_seconds_total", {"direction": "in"})
    assert audio_in == pytest.approx(record.usage.client_audio_s)
    assert audio_in > 0
    assert _sample(metrics, "voicefsm_upstream_gap_seconds_count", {"cause": "rotation"}) == 1
    ended = _sample(metrics, "voicefsm_sessions_ended_total", {"reason": "user_ended"})
    assert ended == 1
    timeline = build_timeline(stored.record, prices=PRICES)
    assert [m.kind for m in timeline.markers if m.kind in ("goaway", "rotation", "end")] == [
        "goaway",
        "rotation",
        "end",
    ]
    assert timeline.cost is not None
    assert timeline.cost.total == pytest.approx((2000 * 10 + 400 * 1 + 600 * 40) / 1e6)


async def test_the_store_may_come_from_a_coroutine(interview: SimulationResult) -> None:
    from fastapi import FastAPI

    store = MemoryStore()
    await store.save(_record(interview))

    async def started_store() -> MemoryStore:
        return store

    app = FastAPI()
    app.include_router(operator_router(started_store, JWTAuthenticator(SECRET)))
    import time

    import jwt

    claims = {"sub": "ops-1", "role": "operator", "exp": int(time.time()) + 60}
    operator = jwt.encode(claims, SECRET, algorithm="HS256")  # a single `role` claim works too
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        listing = await client.get("/operator/", headers=_bearer(operator))
    assert listing.status_code == 200 and _record(interview).session_id in listing.text


async def test_voicefsm_serve_shows_a_stored_interview_to_operators_only(
    tmp_path: Path, interview: SimulationResult
) -> None:
    """The real app under uvicorn, its lifespan started, reading a SQLite store over HTTP."""
    from loopback import uvicorn_serving

    from voicefsm.serve import ServeSettings, create_app

    record = _record(interview)
    database = tmp_path / "served.db"
    async with SQLiteStore(str(database)) as store:
        await store.save(record)
        for line in interview.transcript:
            await store.append_transcript(record.session_id, line)
    settings = ServeSettings(
        config=SessionConfig(), jwt_secret=SECRET, store_url=f"sqlite://{database}", fake=True
    )
    async with uvicorn_serving(create_app(settings)) as port:
        auth = JWTAuthenticator(SECRET)
        page_path = f"/operator/sessions/{record.session_id}"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert (await client.get(page_path)).status_code == 401
            candidate = _bearer(auth.issue(record.owner or "cand-1"))
            refused = await client.get(page_path, headers=candidate)
            assert refused.status_code == 403
            assert interview.transcript[0].text not in refused.text
            operator = _bearer(auth.issue("ops-1", roles=["operator"]))
            listing = await client.get("/operator/", headers=operator)
            assert listing.status_code == 200 and record.session_id in listing.text
            page = await client.get(page_path, headers=operator)
            assert page.status_code == 200
            assert page.headers["content-security-policy"].startswith("default-src 'none'")
            assert page.text.count('data-kind="rotation"') == record.stats.resumes
            assert interview.transcript[0].text in page.text
