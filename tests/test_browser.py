"""The `voicefsm serve` page in a real browser: Debian's chromium, headless, with a fake microphone.

The app runs in-process under uvicorn on a loopback port, in demo mode (the fake Gemini Live
server with its scripted interviewer). Chromium is driven by Playwright with the system
executable (Playwright's own browser download does not work here) and a fake microphone that
plays a WAV this module writes.

* ``test_interview_in_chromium`` clicks Start and checks, end to end: the page says it is a
  scripted fake interviewer, not Gemini; microphone audio reaches the fake Live server as 16 kHz
  PCM in 20 ms chunks, and it is the tone the fake microphone plays; interviewer audio (24 kHz)
  is received and played, and ``interrupted`` drops what is queued; heartbeats are answered; the
  countdown runs down; a dropped socket and a page refresh both continue the same session; the
  warning shows; End interview ends it with ``user_ended``, on the page and in ``/metrics``.
* ``test_capture_worklet_resamples_to_16khz`` renders tones offline through the capture
  AudioWorklet alone and checks its resampling exactly (frequency, level, chunking, and that
  what 16 kHz cannot carry is filtered out rather than aliased).
* ``test_tokens_without_demo_tokens``: a refused token (4401, no retry loop), ``?token=`` in the
  page URL, and a stale stored session (4404).
* ``test_new_interview_instead_ends_the_old_one``: after a refresh, "Start a new interview
  instead" ends the old session (and its upstream) before starting another.
* ``test_restart_says_the_interview_cannot_be_resumed``: after a demo server restarts, the page
  says in words why the interview cannot be resumed, and does not go on showing "live".
* ``test_busy_retries_and_replaced_is_final``: against a scripted websocket, 1013 (busy) is
  retried and 4409 (opened elsewhere) is final, each explained.
* ``test_a_busy_server_is_retried_for_a_new_interview``: 1013 before ``session_created`` (the
  server refused to start one while overloaded) is retried, not a failure.

Screenshots go to ``test-artifacts/`` (git-ignored): ``browser-interview.png`` (live, with the
warning) and ``browser-interview-ended.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import urllib.request
import wave
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from chromium import ARTIFACTS, CHROMIUM, require_browser
from loopback import uvicorn_serving

import voicefsm.serve as serve_module
import voicefsm.testing as testing_module
import voicefsm.web
from voicefsm.auth import JWTAuthenticator
from voicefsm.model import SessionConfig
from voicefsm.protocol import TurnStatus
from voicefsm.serve import ServeSettings, create_app
from voicefsm.service import InterviewService

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

STATIC = Path(voicefsm.web.__file__).resolve().parent / "static"
TONE_HZ = 440.0
TIME_LIMIT_S = 40.0
WARNING_BEFORE_S = 29.0  # the warning comes 11 s into the interview
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _write_tone_wav(path: Path, seconds: float = 3.0, rate: int = 16_000) -> None:
    """A 16 kHz mono WAV of 440 Hz beeps (0.4 s on, 0.1 s off): what the fake microphone plays.

    Beeps, like syllables, rather than a steady hum that noise suppression may fade out.
    """
    samples = array("h")
    for i in range(round(seconds * rate)):
        t = i / rate
        on = (t % 0.5) < 0.4
        samples.append(round(0.5 * 32767 * math.sin(2 * math.pi * TONE_HZ * t)) if on else 0)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


def _rms(samples: array[int]) -> float:
    """Root mean square of 16-bit samples, as a fraction of full scale."""
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples))) / 32767


def _dominant_frequency(pcm: bytes, rate: int) -> float:
    """Estimate a tone's frequency from the spacing of zero crossings in its loud 20 ms windows.

    Measuring from the first to the last crossing of each window, rather than counting
    crossings per window, keeps windows that straddle a beep's edge from biasing the result.
    """
    samples = array("h", pcm)
    window = rate // 50
    half_periods = 0
    span = 0
    for start in range(0, len(samples) - window, window):
        part = samples[start : start + window]
        if math.sqrt(sum(s * s for s in part) / window) < 1000:
            continue
        crossings = [i for i in range(1, window) if (part[i - 1] < 0) != (part[i] < 0)]
        if len(crossings) >= 4:
            half_periods += len(crossings) - 1
            span += crossings[-1] - crossings[0]
    assert half_periods >= 200, f"only {half_periods} half periods of loud audio reached upstream"
    return rate * half_periods / (2 * span)


async def _eventually(check: Callable[[], bool], what: str, within: float = 15.0) -> None:
    """Poll ``check`` until it is true, or fail saying ``what`` did not happen ``within`` s."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _serving(app: Any, port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a loopback port (0: a free one) in this loop; yield its URL."""
    async with uvicorn_serving(app, port, within=20) as bound:
        yield f"http://127.0.0.1:{bound}"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@contextlib.asynccontextmanager
async def _chromium(*extra_args: str) -> AsyncIterator[Browser]:
    """Debian's chromium, headless, with a fake microphone, through Playwright."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=[*CHROMIUM_ARGS, *extra_args]
        )
        try:
            yield browser
        finally:
            await browser.close()


def _watch(page: Page) -> list[str]:
    """Collect the page's uncaught errors and console errors and warnings."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "warning")
            else None
        ),
    )
    return problems


def _debug(page: Page) -> Callable[[str], Awaitable[Any]]:
    """Read ``window.voicefsm.<expression>``, the page's read-only debug view."""

    async def read(expression: str) -> Any:
        return await page.evaluate(f"() => window.voicefsm.{expression}")

    return read


WORKLET_PAGE = """<!doctype html><meta charset="utf-8"><title>worklet</title><script>
window.render = async (rate, frequency, seconds) => {
  const context = new OfflineAudioContext(1, Math.round(rate * seconds), rate);
  // Playwright does not route worklet fetches: load the module through a (routed) fetch.
  const source = await (await fetch("/capture-worklet.js")).text();
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  await context.audioWorklet.addModule(url);
  const tone = new OscillatorNode(context, { frequency });
  const level = new GainNode(context, { gain: 0.5 });
  const node = new AudioWorkletNode(context, "voicefsm-capture", {
    processorOptions: { targetRate: 16000, chunkSamples: 320 },
  });
  const chunks = [];
  node.port.onmessage = (event) => chunks.push(Array.from(new Int16Array(event.data.pcm)));
  tone.connect(level).connect(node).connect(context.destination);
  tone.start();
  await context.startRendering();
  for (let seen = -1; seen !== chunks.length; ) {  // let the last messages arrive
    seen = chunks.length;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return chunks;
};
</script>"""
RENDER = "([rate, frequency, seconds]) => window.render(rate, frequency, seconds)"


async def test_capture_worklet_resamples_to_16khz() -> None:
    """The capture worklet turns any context rate into clean 16 kHz PCM in 320-sample chunks."""
    require_browser()
    from playwright.async_api import Route

    async def serve(route: Route) -> None:  # http://localhost is a secure context
        name = route.request.url.split("localhost/", 1)[1].split("?")[0]
        if name == "test.html":
            await route.fulfill(body=WORKLET_PAGE, content_type="text/html")
        else:
            await route.fulfill(path=STATIC / name, content_type="text/javascript")

    async with _chromium() as browser:
        page = await browser.new_page()
        await page.route("http://localhost/**", serve)
        await page.goto("http://localhost/test.html")
        expected_rms = 0.5 / math.sqrt(2)
        for rate in (44_100, 48_000, 96_000, 22_050):
            chunks = await page.evaluate(RENDER, [rate, TONE_HZ, 1.0])
            assert {len(chunk) for chunk in chunks} == {320}, rate
            assert len(chunks) in (49, 50), (rate, len(chunks))  # one second at 16 kHz
            body = array("h", [s for chunk in chunks[2:] for s in chunk])
            assert abs(_rms(body) - expected_rms) < 0.02 * expected_rms, (rate, _rms(body))
            frequency = _dominant_frequency(body.tobytes(), 16_000)
            assert abs(frequency - TONE_HZ) < 0.005 * TONE_HZ, (rate, frequency)
            # 10 kHz cannot be kept at 16 kHz: it must be filtered out, not folded to 6 kHz.
            alias = await page.evaluate(RENDER, [rate, 10_000, 0.5])
            body = array("h", [s for chunk in alias[2:] for s in chunk])
            assert _rms(body) < 0.03 * expected_rms, (rate, _rms(body))  # >= 30 dB down


async def test_interview_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start, talk, hear, count down, survive a drop and a refresh, get warned, end."""
    require_browser()

    # Observe the demo stack from the inside: the fake Live server the app starts (made to
    # record what it receives) and the service behind the websocket endpoint.
    fake_servers: list[testing_module.FakeLiveServer] = []
    services: list[InterviewService] = []

    class RecordingFakeLiveServer(testing_module.FakeLiveServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["record_payloads"] = True
            super().__init__(*args, **kwargs)
            fake_servers.append(self)

    real_endpoint = serve_module.interview_endpoint

    def capturing_endpoint(service: InterviewService) -> Any:
        if service not in services:
            services.append(service)
        return real_endpoint(service)

    monkeypatch.setattr(testing_module, "FakeLiveServer", RecordingFakeLiveServer)
    monkeypatch.setattr(serve_module, "interview_endpoint", capturing_endpoint)

    settings = ServeSettings(
        config=SessionConfig(
            time_limit_s=TIME_LIMIT_S,
            warning_before_s=WARNING_BEFORE_S,
            heartbeat_interval_s=2.0,
            heartbeat_timeout_s=8.0,
            client_grace_s=20.0,
            min_remaining_to_resume_s=5.0,
        ),
        fake=True,
        fake_time_scale=2.0,
        max_loop_lag_ms=0,  # the browser driver shares this loop (see _demo_settings)
        store_url="memory://",
    )
    wav = tmp_path / "microphone.wav"
    _write_tone_wav(wav)
    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(name: str) -> None:
        timings[name] = round(time.monotonic() - started, 2)

    async with (
        _serving(create_app(settings)) as base_url,
        _chromium(f"--use-file-for-fake-audio-capture={wav}") as browser,
    ):
        mark("server and browser up")
        context = await browser.new_context(viewport={"width": 900, "height": 820})
        await context.grant_permissions(["microphone"], origin=base_url)
        page = await context.new_page()
        problems = _watch(page)
        debug = _debug(page)

        await page.goto(base_url + "/")
        mode = page.locator("#mode")
        await mode.get_by_text("scripted fake interviewer, not Gemini").wait_for()
        assert "no GOOGLE_API_KEY" in await mode.inner_text()
        assert await page.locator("#demo-note").is_visible()
        assert await page.locator("#token-row").is_hidden()  # demo tokens: no token field
        assert await debug("mode") == "fake"
        mark("page loaded")

        await page.get_by_role("button", name="Start interview").click()
        await page.wait_for_function("() => window.voicefsm.sessionId !== null")
        session_id = await debug("sessionId")
        assert await page.locator("#session-id").text_content() == session_id
        await page.wait_for_function("() => window.voicefsm.state === 'live'")
        assert await page.locator("#state").inner_text() == "live"
        mark("session live")

        # Microphone audio reaches the fake Live server: 16 kHz, 20 ms chunks, our tone.
        assert len(fake_servers) == 1
        fake = fake_servers[0]
        await _eventually(lambda: len(fake.connections) >= 1, "an upstream connection")
        upstream = fake.connections[0]
        await _eventually(
            lambda: upstream.audio_chunk_count >= 75, "1.5 s of microphone audio upstream"
        )
        mark("audio upstream")
        assert await debug("counters.audioChunksSent") >= 75
        sizes = sorted(len(chunk) for chunk in upstream.audio_chunks)
        assert sizes[len(sizes) // 2] == 640, f"chunk sizes {sizes[:5]}...{sizes[-5:]}"
        assert upstream.audio_mime_type is not None
        assert "16000" in upstream.audio_mime_type
        # Chromium's fake capture device itself shifts the pitch by about 2 % (the worklet
        # alone is exact: see test_capture_worklet_resamples_to_16khz); a wrong rate
        # (44.1 kHz taken for 48 kHz: 9 %; 24 kHz for 16 kHz: 50 %) is far outside this.
        frequency = _dominant_frequency(upstream.received_audio, 16_000)
        assert abs(frequency - TONE_HZ) < 0.05 * TONE_HZ, f"{frequency:.1f} Hz arrived"

        # Interviewer audio comes back and is played out (sources that ran to their end).
        await page.wait_for_function(
            "() => window.voicefsm.counters.audioChunksPlayed >= 10", timeout=15_000
        )
        mark("interviewer audio played")

        # turn_status "interrupted" (sent through the session's own channel) drops what is
        # queued for playback.
        assert len(services) == 1
        live = services[0].sessions[session_id]
        assert live.channel is not None
        await page.wait_for_function("() => window.voicefsm.queuedPlayback >= 5")
        flushed = await debug("counters.audioChunksFlushed")
        await live.channel.send_message(TurnStatus(status="interrupted"))
        await page.wait_for_function("() => window.voicefsm.counters.interruptions === 1")
        assert await debug("counters.audioChunksFlushed") >= flushed + 5

        # The countdown runs down; heartbeats (every 2 s) are answered.
        first = await debug("remainingS")
        assert 0 < first <= TIME_LIMIT_S
        shown = await page.locator("#countdown").inner_text()
        await page.wait_for_function(
            "shown => document.querySelector('#countdown').textContent !== shown", arg=shown
        )
        assert 0 < await debug("remainingS") < first
        await page.wait_for_function("() => window.voicefsm.counters.pongsSent >= 1")

        # A dropped socket: the page reconnects to the same session on its own.
        assert live.channel is not None
        await live.channel.close(1012, "test: simulated drop")
        await page.wait_for_function("() => window.voicefsm.counters.reconnects >= 1")
        assert "reconnecting" in await debug("phaseHistory")
        assert await debug("sessionId") == session_id
        assert await debug("phase") == "connected"
        chunks_before = upstream.audio_chunk_count
        await _eventually(
            lambda: upstream.audio_chunk_count >= chunks_before + 25,
            "microphone audio after the reconnect",
        )
        mark("reconnected after a drop")

        # A refresh: the new page re-attaches by itself (sessionStorage), without audio, and
        # shows the session's real state and time left before anyone clicks Rejoin.
        await page.reload()
        await page.wait_for_function(
            "() => ['live', 'warning'].includes(window.voicefsm.state)"
            " && window.voicefsm.remainingS !== null"
        )
        assert await page.locator("#state").inner_text() in ("live", "live — wrapping up")
        server_remaining = live.host.session.deadline - time.time()
        assert abs(await debug("remainingS") - server_remaining) < 1.5
        assert await page.locator("#countdown").inner_text() not in ("0:40", "--:--")
        assert await page.locator("#paused").is_visible()
        assert await debug("counters.audioChunksSent") == 0  # no microphone until Rejoin
        await page.get_by_role("button", name="Rejoin interview").click()
        await page.locator("#paused").wait_for(state="hidden")
        assert await debug("phase") == "connected"
        assert await debug("sessionId") == session_id
        assert await debug("counters.reconnects") == 1
        assert await debug("state") in ("live", "warning")
        chunks_before = upstream.audio_chunk_count
        await _eventually(
            lambda: upstream.audio_chunk_count >= chunks_before + 25,
            "microphone audio after the refresh",
        )
        assert len(fake.connections) == 1  # the interviewer never noticed either
        mark("rejoined after a refresh")

        # The warning.
        warning = page.locator("#warning")
        await warning.wait_for(state="visible", timeout=15_000)
        assert "nearly up" in await warning.inner_text()
        assert (await debug("warning"))["remaining_s"] <= WARNING_BEFORE_S
        assert await debug("state") == "warning"
        mark("warning shown")
        await page.get_by_text("Connection details").click()  # show the counters too
        await page.screenshot(path=str(ARTIFACTS / "browser-interview.png"), full_page=True)

        # End the interview.
        await page.get_by_role("button", name="End interview").click()
        await page.locator("#ended").wait_for(state="visible")
        assert await page.locator("#end-reason").inner_text() == "user_ended"
        assert "You ended the interview" in await page.locator("#ended").inner_text()
        assert (await debug("ended"))["reason"] == "user_ended"
        await page.wait_for_function("() => window.voicefsm.phase === 'closed'")
        assert await warning.is_hidden()
        assert await page.locator("#transcript").is_hidden()  # transcripts are not sent
        assert await debug("transcripts") == 0
        mark("ended")
        await page.screenshot(path=str(ARTIFACTS / "browser-interview-ended.png"), full_page=True)

        metrics = await asyncio.to_thread(_get, base_url + "/metrics")
        assert 'voicefsm_sessions_ended_total{reason="user_ended"} 1.0' in metrics
        counters = await debug("counters")
        assert counters["audioChunksReceived"] > 0
        assert counters["audioChunksPlayed"] > 0
        assert not problems, "\n".join(problems)
    mark("done")
    print("timings (s):", json.dumps(timings))


async def test_tokens_without_demo_tokens(tmp_path: Path) -> None:
    """With a real secret and no demo tokens: a refused token, ``?token=``, a stale session."""
    require_browser()
    secret = "browser-test-secret-0123456789abcdef"
    settings = ServeSettings(
        config=SessionConfig(time_limit_s=60, warning_before_s=10),
        fake=True,
        jwt_secret=secret,
        demo_tokens=False,
        store_url="memory://",
        max_loop_lag_ms=0,  # the browser driver shares this loop (see _demo_settings)
    )
    token = JWTAuthenticator(secret).issue("alice")
    async with _serving(create_app(settings)) as base_url, _chromium() as browser:
        context = await browser.new_context()
        await context.grant_permissions(["microphone"], origin=base_url)
        page = await context.new_page()
        problems = _watch(page)
        debug = _debug(page)

        # No demo tokens: the page asks for one; a bad one is refused with 4401, for good.
        await page.goto(base_url + "/")
        token_field = page.get_by_label("Access token (JWT)")
        await token_field.wait_for()
        await token_field.fill("not-a-jwt")
        await page.get_by_role("button", name="Start interview").click()
        await page.wait_for_function("() => window.voicefsm.phase === 'failed'")
        assert (await debug("closes"))[-1]["code"] == 4401
        assert "did not accept the access token" in await page.locator("#errors").inner_text()
        await asyncio.sleep(1.0)
        assert await debug("counters.connects") == 1  # no reconnect loop

        # ?token= in the URL is used, and removed from the address bar.
        await page.goto(f"{base_url}/?token={token}")
        await page.wait_for_function("() => window.voicefsm.mode === 'fake'")
        assert "token=" not in page.url
        assert await token_field.is_hidden()
        await page.get_by_role("button", name="Start interview").click()
        await page.wait_for_function("() => window.voicefsm.state === 'live'")
        assert await debug("phase") == "connected"
        await page.get_by_role("button", name="End interview").click()
        await page.wait_for_function("() => window.voicefsm.ended !== null")
        assert (await debug("ended"))["reason"] == "user_ended"

        # A stored session the server no longer runs: 4404, forgotten, back to Start.
        await page.evaluate(
            """(token) => sessionStorage.setItem("voicefsm.session",
                JSON.stringify({ sessionId: "0123456789abcdef", token }))""",
            token,
        )
        await page.reload()  # the page checks on the stored session by itself
        await page.wait_for_function("() => window.voicefsm.phase === 'failed'")
        assert (await debug("closes"))[-1]["code"] == 4404
        assert await page.locator("#state").inner_text() == "cannot be resumed"
        assert "the server no longer has it" in await page.locator("#errors").inner_text()
        assert await page.evaluate("() => sessionStorage.getItem('voicefsm.session')") is None
        assert await page.get_by_role("button", name="Start interview").is_visible()
        assert not problems, "\n".join(problems)


def _capture_services(monkeypatch: pytest.MonkeyPatch) -> list[InterviewService]:
    """Collect the services behind ``create_app``'s websocket endpoint as it is used."""
    services: list[InterviewService] = []
    real_endpoint = serve_module.interview_endpoint

    def capturing_endpoint(service: InterviewService) -> Any:
        if service not in services:
            services.append(service)
        return real_endpoint(service)

    monkeypatch.setattr(serve_module, "interview_endpoint", capturing_endpoint)
    return services


def _demo_settings(store_url: str = "memory://") -> ServeSettings:
    return ServeSettings(
        config=SessionConfig(time_limit_s=120, warning_before_s=10, client_grace_s=60),
        fake=True,
        store_url=store_url,
        # Chromium's driver shares this test's event loop and lags it; admission control has
        # its own tests (test_admission.py).
        max_loop_lag_ms=0,
    )


async def test_new_interview_instead_ends_the_old_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a refresh, "Start a new interview instead" ends the old session, then starts one."""
    require_browser()
    services = _capture_services(monkeypatch)
    async with _serving(create_app(_demo_settings())) as base_url, _chromium() as browser:
        context = await browser.new_context()
        await context.grant_permissions(["microphone"], origin=base_url)
        page = await context.new_page()
        problems = _watch(page)
        debug = _debug(page)
        await page.goto(base_url + "/")
        await page.get_by_role("button", name="Start interview").click()
        await page.wait_for_function("() => window.voicefsm.state === 'live'")
        old_id = await debug("sessionId")
        service = services[0]

        await page.reload()
        await page.locator("#paused").wait_for()
        assert await page.get_by_role("button", name="End interview").is_visible()
        assert await page.get_by_role("button", name="Rejoin interview").is_visible()
        await page.get_by_role("button", name="Start a new interview instead").click()
        await page.wait_for_function(
            "(old) => window.voicefsm.sessionId !== null && window.voicefsm.sessionId !== old"
            " && window.voicefsm.state === 'live'",
            arg=old_id,
        )
        # The old session is over at once (not left running for the grace window), by the
        # user's choice, and its host and upstream are gone.
        stored = await service.store.load(old_id)
        assert stored is not None
        assert stored.record.end_reason == "user_ended"
        await _eventually(lambda: old_id not in service.sessions, "the old session's host to stop")
        new_id = await debug("sessionId")
        assert set(service.sessions) == {new_id}
        assert await page.get_by_role("button", name="End interview").is_visible()
        assert await page.locator("#ended").is_hidden()
        stored_now = await page.evaluate("() => sessionStorage.getItem('voicefsm.session')")
        assert new_id in stored_now and old_id not in stored_now
        assert not problems, "\n".join(problems)


async def test_restart_says_the_interview_cannot_be_resumed(tmp_path: Path) -> None:
    """A demo server restart: the page says why the interview cannot go on, and not "live"."""
    require_browser()
    store_url = f"sqlite://{tmp_path / 'sessions.db'}"
    async with _chromium() as browser:
        async with _serving(create_app(_demo_settings(store_url))) as base_url:
            port = int(base_url.rsplit(":", 1)[1])
            context = await browser.new_context()
            await context.grant_permissions(["microphone"], origin=base_url)
            page = await context.new_page()
            problems = _watch(page)
            debug = _debug(page)
            await page.goto(base_url + "/")
            await page.get_by_role("button", name="Start interview").click()
            await page.wait_for_function("() => window.voicefsm.state === 'live'")
        # Stopped: the session is handed back to the store; the page tries to reconnect.
        await page.wait_for_function("() => window.voicefsm.phase === 'reconnecting'")
        # Restart only after one attempt was refused, so that path is always taken.
        await page.wait_for_function("() => window.voicefsm.closes.length >= 2", timeout=10_000)
        assert (await debug("closes"))[-1]["code"] == 1006
        async with _serving(create_app(_demo_settings(store_url)), port=port):
            await page.wait_for_function("() => window.voicefsm.phase === 'failed'", timeout=30_000)
            assert (await debug("closes"))[-1]["code"] == 4401
            state = await page.locator("#state").inner_text()
            assert state == "cannot be resumed", state
            assert await debug("state") == "unresumable"
            errors = await page.locator("#errors").inner_text()
            assert "This interview cannot be resumed" in errors
            assert "restarts" in errors  # why, in words
            assert await page.locator("#countdown").inner_text() == "--:--"
            assert await page.evaluate("() => sessionStorage.getItem('voicefsm.session')") is None
            assert await page.get_by_role("button", name="Start interview").is_visible()
        # Chromium logs the refused attempt itself; anything else is a fault.
        refused = ("/interview?session=", "ERR_CONNECTION_REFUSED")
        unexpected = [p for p in problems if "4401" not in p and not all(r in p for r in refused)]
        assert not unexpected, "\n".join(problems)


def _scripted_app(script: Callable[[Any, int], Awaitable[None]]) -> Any:
    """The page's own files and config, with a websocket that ``script`` plays per connection."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.websockets import WebSocket

    connections = 0

    async def interview(websocket: WebSocket) -> None:
        nonlocal connections
        connections += 1
        await websocket.accept(subprotocol="voicefsm.v1")
        await script(websocket, connections)

    async def config(request: Any) -> JSONResponse:
        return JSONResponse(
            {"mode": "fake", "label": "scripted", "time_limit_s": 600, "demo_tokens": True}
        )

    async def token(request: Any) -> JSONResponse:
        return JSONResponse({"token": "t", "user_id": "u"})

    return Starlette(
        routes=[
            Route("/", lambda request: FileResponse(STATIC / "index.html")),
            Route("/config.json", config),
            Route("/demo/token", token),
            WebSocketRoute("/interview", interview),
            Mount("/static", StaticFiles(directory=STATIC)),
        ]
    )


async def test_busy_retries_and_replaced_is_final() -> None:
    """1013 after ``session_busy`` is retried and said so; 4409 is final and explained."""
    require_browser()
    may_attach = asyncio.Event()
    replace = asyncio.Event()

    async def script(websocket: Any, number: int) -> None:
        if number == 1:  # another worker still holds the session
            await websocket.send_json(
                {"type": "error", "code": "session_busy", "message": "driven elsewhere"}
            )
            await websocket.close(1013, "the session is driven elsewhere; retry")
            return
        await may_attach.wait()
        await websocket.send_json({"type": "session_state", "state": "live", "remaining_s": 500})
        await replace.wait()
        await websocket.close(4409, "replaced by a newer connection")

    async with _serving(_scripted_app(script)) as base_url, _chromium() as browser:
        page = await browser.new_page()
        problems = _watch(page)
        debug = _debug(page)
        # The session is stored before any of the page's scripts run: written into an open
        # page, its start-up could read the storage before or after the write.
        await page.add_init_script(
            """sessionStorage.setItem("voicefsm.session",
                JSON.stringify({ sessionId: "0123456789abcdef", token: "t" }))"""
        )
        await page.goto(base_url + "/")  # the page re-attaches to the stored session on load
        await page.wait_for_function("() => window.voicefsm.counters.connects === 2")
        assert [close["code"] for close in await debug("closes")] == [1013]
        notice = await page.locator("#reconnecting-text").inner_text()
        assert "still held by another server" in notice, notice
        assert await debug("phase") == "reconnecting"
        may_attach.set()
        await page.wait_for_function("() => window.voicefsm.state === 'live'")
        assert await debug("phase") == "connected"
        assert 495 <= await debug("remainingS") <= 500

        replace.set()
        await page.wait_for_function("() => window.voicefsm.phase === 'failed'")
        assert await page.locator("#state").inner_text() == "open in another tab"
        assert "opened in another tab" in await page.locator("#errors").inner_text()
        await asyncio.sleep(1.0)
        assert await debug("counters.connects") == 2  # final: no retry
        assert await page.evaluate("() => sessionStorage.getItem('voicefsm.session')") is None
        assert not problems, "\n".join(problems)


async def test_a_busy_server_is_retried_for_a_new_interview() -> None:
    """1013 before ``session_created`` means "busy, retry": the page starts the interview later."""
    require_browser()
    may_start = asyncio.Event()

    async def script(websocket: Any, number: int) -> None:
        if number == 1:  # admission control: the server is overloaded, nothing was started
            await websocket.close(1013, "server busy, retry")
            return
        await may_start.wait()
        await websocket.send_json(
            {"type": "session_created", "session_id": "feedc0de" * 4, "time_limit_s": 600}
        )
        await websocket.send_json({"type": "session_state", "state": "live", "remaining_s": 600})
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # microphone audio and pongs, until the page leaves

    async with _serving(_scripted_app(script)) as base_url, _chromium() as browser:
        page = await browser.new_page()
        problems = _watch(page)
        debug = _debug(page)
        await page.goto(base_url + "/")
        await page.get_by_role("button", name="Start interview").click()
        await page.wait_for_function("() => window.voicefsm.counters.connects === 2")
        notice = await page.locator("#reconnecting-text").inner_text()
        assert "The server is busy — trying again" in notice, notice
        assert await debug("phase") == "reconnecting"
        may_start.set()
        await page.wait_for_function("() => window.voicefsm.state === 'live'")
        assert await debug("sessionId") == "feedc0de" * 4
        assert await debug("phase") == "connected"
        assert await debug("counters.reconnects") == 0  # a retried start is not a reconnect
        assert await page.locator("#errors").is_hidden()
        assert not problems, "\n".join(problems)
