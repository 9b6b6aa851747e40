"""The operator view: recent sessions and each one's timeline page, for people who run interviews.

``voicefsm serve`` includes :func:`operator_router` at ``/operator``; an embedding app can
include it in its own FastAPI/Starlette app the same way. Every page needs a token whose
``roles`` claim holds ``operator`` (:data:`OPERATOR_ROLE`): without a valid token the answer is
401, with a candidate's token (no operator role) 403. The pages show transcripts, so they are
rendered here, server-side, and never reach a candidate's client.

A token arrives as ``Authorization: Bearer <token>``, or once as ``?token=<token>``: that
request answers with an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to the operator path
and a redirect to the same page without the token, so the token does not stay in the address
bar, the history or a ``Referer``. Pages are sent with ``Cache-Control: no-store`` and a
content security policy that allows no scripts and nothing from elsewhere.
"""

from __future__ import annotations

import html
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from voicefsm.auth import Authenticator, AuthError, Principal
from voicefsm.pricing import TokenPrices, estimate_cost, format_money, load_prices, usage_tokens
from voicefsm.stores import SessionStore
from voicefsm.timeline import render_timeline

OPERATOR_ROLE = "operator"
"""The role a token must carry (in its ``roles`` claim) to see the operator pages."""
COOKIE = "voicefsm_operator"
"""The cookie that carries the operator token after a ``?token=`` visit."""
_DASH = "\u2013"
RECENT_LIMIT = 100
"""How many sessions the list shows (the newest)."""

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}

StoreGetter = Callable[[], SessionStore | Awaitable[SessionStore | None] | None]
"""Returns (or returns an awaitable of) the store to read, or ``None`` while the service is not
started yet (the pages then answer 503)."""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} · voicefsm</title><style>"
        "body{font:14px/1.4 system-ui,'DejaVu Sans',sans-serif;margin:24px;color:#1b1b1b}"
        "table{border-collapse:collapse}td,th{padding:3px 12px 3px 0;text-align:left}"
        "th{color:#555;font-weight:normal}.n{text-align:right}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status, headers=_HEADERS)


def _when(at: float | None) -> str:
    if at is None:
        return _DASH
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def operator_router(
    store: StoreGetter,
    authenticator: Authenticator,
    *,
    prefix: str = "/operator",
    role: str = OPERATOR_ROLE,
    prices: TokenPrices | None = None,
    limit: int = RECENT_LIMIT,
) -> APIRouter:
    """The operator pages under ``prefix``: ``/`` lists recent sessions, ``/sessions/{id}`` draws
    one session's timeline, with a cost estimate from ``prices`` (default:
    :func:`voicefsm.pricing.load_prices`, i.e. ``$VOICEFSM_PRICES`` or the documented defaults).
    """
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix must start with '/' and not end with one, not {prefix!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    router = APIRouter(prefix=prefix)
    chosen_prices = prices if prices is not None else load_prices()

    async def principal(request: Request) -> Principal | Response:
        """The operator behind the request, or the response that refuses it."""
        query_token = request.query_params.get("token")
        header = request.headers.get("authorization", "")
        scheme, _, header_token = header.partition(" ")
        token = (
            query_token
            or (header_token.strip() if scheme.lower() == "bearer" else None)
            or request.cookies.get(COOKIE)
        )
        try:
            who = await authenticator.authenticate(token)
        except AuthError as error:
            response = _page(
                "Not signed in",
                f"<p>The operator pages need a token with the {html.escape(role)!s} role: "
                f"{html.escape(str(error))}.</p>",
                401,
            )
            response.delete_cookie(COOKIE, path=prefix)
            return response
        if role not in who.roles:
            return _page(
                "Forbidden",
                f"<p>This token is valid but does not carry the {html.escape(role)} role.</p>",
                403,
            )
        if query_token:
            rest = request.url.remove_query_params("token")
            target = rest.path + (f"?{rest.query}" if rest.query else "")
            redirect = RedirectResponse(target, 303)
            redirect.set_cookie(
                COOKIE,
                query_token,
                path=prefix,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            redirect.headers.update(_HEADERS)
            return redirect
        return who

    def guarded(
        handler: Callable[[Request, SessionStore], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = await principal(request)
            if isinstance(who, Response):
                return who
            found = store()
            current = await found if inspect.isawaitable(found) else found
            if current is None:
                return _page("Starting", "<p>The service is not started yet.</p>", 503)
            return await handler(request, current)

        return endpoint

    async def sessions(request: Request, current: SessionStore) -> Response:
        summaries = await current.list_sessions(limit=limit, newest_first=True)
        rows = []
        for s in summaries:
            cost = (
                estimate_cost(usage_tokens(s.usage), chosen_prices) if s.usage is not None else None
            )
            rows.append(
                f'<tr><td><a href="{prefix}/sessions/{quote(s.session_id, safe="")}">'
                f"{html.escape(s.session_id)}</a></td><td>{html.escape(s.owner or _DASH)}</td>"
                f"<td>{s.state}</td><td>{_when(s.started_at)}</td><td>{_when(s.deadline)}</td>"
                f"<td>{s.end_reason or _DASH}</td>"
                f'<td class="n">{s.transcript_lines}</td><td class="n">'
                f"{format_money(cost.total, cost.currency) if cost else _DASH}</td></tr>"
            )
        body = (
            f"<p>The {len(summaries)} most recent sessions (at most {limit}), newest first; times "
            f"in UTC; costs are estimates from prices as of {html.escape(chosen_prices.as_of)} "
            f"({html.escape(chosen_prices.source)}).</p><table><thead><tr><th>session</th>"
            "<th>candidate</th><th>state</th><th>started</th><th>deadline</th><th>end reason</th>"
            '<th class="n">lines</th><th class="n">est. cost</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            if summaries
            else "<p>No sessions in the store yet.</p>"
        )
        return _page("Recent interviews", body)

    async def timeline(request: Request, current: SessionStore) -> Response:
        session_id = request.path_params["session_id"]
        stored = await current.load(session_id)
        if stored is None:
            return _page(
                "No such session", f"<p>No session {html.escape(session_id)} in the store.</p>", 404
            )
        transcript = await current.read_transcript(session_id)
        record = stored.record
        # A running session's last band reaches the present (never past the deadline).
        now = None if record.ended_at is not None else min(time.time(), record.deadline)
        page = render_timeline(record, transcript, prices=chosen_prices, now=now)
        return HTMLResponse(page, headers=_HEADERS)

    router.add_api_route("/", guarded(sessions), methods=["GET"], include_in_schema=False)
    router.add_api_route(
        "/sessions/{session_id}", guarded(timeline), methods=["GET"], include_in_schema=False
    )
    return router


__all__ = ["COOKIE", "OPERATOR_ROLE", "RECENT_LIMIT", "StoreGetter", "operator_router"]
