"""``voicefsm serve`` on the direct google-genai upstream: the whole app, no ADK in the path.

Runs the FastAPI app under uvicorn on loopback with its built-in fake interviewer, and talks to
it as a client would. Imports no ADK (CI also runs it with google-genai 3.x and no ADK).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from loopback import pretend_adk_is_missing, uvicorn_serving
from websockets.asyncio.client import connect

from voicefsm.admission import OverloadGuard
from voicefsm.auth import JWTAuthenticator
from voicefsm.genai_live import GenaiUpstream
from voicefsm.model import SessionConfig
from voicefsm.serve import ServeSettings, create_app, upstream_kind

SECRET = "test-secret-that-is-long-enough-for-hs256"


async def test_serve_with_the_genai_upstream_runs_an_interview_with_the_fake() -> None:
    settings = ServeSettings(
        config=SessionConfig(time_limit_s=60, warning_before_s=10),
        fake=True,
        fake_time_scale=20,
        jwt_secret=SECRET,
        demo_tokens=False,
        store_url="memory://",
        upstream="genai",
    )
    app = create_app(settings)
    token = JWTAuthenticator(SECRET).issue("alice")
    async with uvicorn_serving(app, within=20) as port:
        assert isinstance(app.state.service.upstream, GenaiUpstream)
        url = f"ws://127.0.0.1:{port}/interview?token={token}"
        async with connect(url) as ws:
            created = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert created["type"] == "session_created"
            async with asyncio.timeout(20):
                while not isinstance(await ws.recv(), bytes):  # the interviewer speaks
                    pass
            await ws.send(json.dumps({"end_session": True}))
            async with asyncio.timeout(10):
                while True:
                    frame = await ws.recv()
                    if isinstance(frame, str) and json.loads(frame)["type"] == "session_ended":
                        break
            assert json.loads(frame)["reason"] == "user_ended"


def test_upstream_kind_picks_adk_only_when_it_is_installed() -> None:
    import importlib.util

    has_adk = importlib.util.find_spec("google.adk") is not None
    assert upstream_kind("auto") == ("adk" if has_adk else "genai")
    assert upstream_kind("genai") == "genai"
    with pytest.raises(ValueError, match="unknown upstream"):
        upstream_kind("openai")


def test_the_adk_upstream_without_google_adk_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pretend_adk_is_missing(monkeypatch)
    assert upstream_kind("auto") == "genai"
    with pytest.raises(ValueError, match=r"pip install 'voicefsm\[adk\]'"):
        ServeSettings(upstream="adk")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store", "postgres://db/voicefsm"], "unknown store URL 'postgres://db/voicefsm'"),
        (["--store", "sqlite://"], "names no database file"),
        (["--live-ca-file", "/nonexistent/ca.pem"], "--live-ca-file): no such file"),
        (["--fake-time-scale", "0"], "--fake-time-scale) must be positive"),
        (["--lease-ttl", "0"], "--lease-ttl) must be positive"),
        (["--minutes", "0"], "--minutes must be a positive number"),
        (["--minutes", "0.001"], "--minutes (time_limit_s=0.06): Input should be greater"),
        (["--client-grace", "-1"], "--client-grace (client_grace_s=-1.0): Input should be"),
    ],
)
def test_serve_refuses_a_bad_option_before_it_starts(argv: list[str], message: str) -> None:
    """A ``ValueError`` while the settings are built (the command line makes it a usage error,
    exit 2, as for ``--max-busy 2``), not a traceback once the app starts."""
    from voicefsm.cli import _serve_settings, build_parser

    with pytest.raises(ValueError, match=re.escape(message)):
        _serve_settings(build_parser().parse_args(["serve", *argv]))


def test_serve_admission_flags_reach_the_guard_and_zero_turns_a_rule_off() -> None:
    from voicefsm.cli import build_parser

    def guard_of(*argv: str) -> OverloadGuard | None:
        args = build_parser().parse_args(["serve", *argv])
        return ServeSettings(
            max_loop_lag_ms=args.max_loop_lag_ms,
            max_busy=args.max_busy,
            max_starting=args.max_starting,
        ).overload_guard()

    default = guard_of()
    assert default is not None
    assert (default.max_lag_s, default.max_busy, default.max_starting) == (0.025, 0.7, 8)
    tuned = guard_of("--max-busy", "0.85", "--max-starting", "3", "--max-loop-lag-ms", "40")
    assert tuned is not None
    assert (tuned.max_lag_s, tuned.max_busy, tuned.max_starting) == (0.04, 0.85, 3)
    rules_off = guard_of("--max-busy", "0", "--max-starting", "0")
    assert rules_off is not None
    assert (rules_off.max_busy, rules_off.max_starting) == (None, None)
    assert guard_of("--max-loop-lag-ms", "0") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-busy", "1.5"], "--max-busy"),
        (["--max-busy", "-0.1"], "--max-busy"),
        (["--max-starting", "-1"], "--max-starting"),
        (["--max-loop-lag-ms", "-5"], "--max-loop-lag-ms"),
    ],
)
def test_serve_refuses_admission_flags_out_of_range_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from voicefsm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--store", "memory://", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("freeze", [True, False])
async def test_serve_freezes_the_start_up_heap_while_it_runs_and_only_then(freeze: bool) -> None:
    import gc

    from voicefsm.cli import build_parser

    flag = [] if freeze else ["--no-freeze-gc"]
    assert build_parser().parse_args(["serve", *flag]).freeze_gc is freeze
    settings = ServeSettings(
        fake=True, jwt_secret=SECRET, store_url="memory://", upstream="genai", freeze_gc=freeze
    )
    app = create_app(settings)
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        frozen = gc.get_freeze_count()
    assert (frozen > 10_000) is freeze and (frozen == 0) is not freeze
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(("argv", "deflate"), [([], False), (["--model-deflate"], True)])
def test_serve_offers_deflate_to_the_model_only_with_model_deflate(
    argv: list[str], deflate: bool
) -> None:
    from dataclasses import replace

    from google import genai

    from voicefsm.cli import _serve_settings, build_parser
    from voicefsm.serve import _make_upstream

    settings = _serve_settings(build_parser().parse_args(["serve", *argv]))
    assert settings.model_deflate is deflate
    client = genai.Client(api_key="fake-key")
    upstream = _make_upstream(replace(settings, upstream="genai"), client)
    assert isinstance(upstream, GenaiUpstream)
    assert upstream.model_deflate is deflate
    assert client._api_client._websocket_ssl_ctx["compression"] == ("deflate" if deflate else None)
