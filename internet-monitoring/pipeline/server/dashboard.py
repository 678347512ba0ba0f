"""The operators' dashboard page, served on the ingest listener.

``GET /`` and ``GET /dashboard`` return one self-contained HTML page (inline CSS and JS, no
CDN) that shows one card per sensor with its latest snapshot and keeps it live from the UI
stream. The page is served from the ingest port while the stream listens on its own port,
so the page first reads ``GET /v1/dashboard/config`` (stream scheme, port, path,
subprotocol, whether a token is needed). When a stream token is needed the page asks for it
in a password field and offers it as the ``bearer.<token>`` subprotocol: it never goes into a
URL. Stable hooks for headless-browser tests: ``#stream-status[data-state]``,
``.sensor-card[data-sensor-id][data-event-id]``, ``.age``, ``.event-id``,
``.field[data-field] .value``.

Inline code runs under a per-response CSP nonce, so injected markup cannot run scripts; all
payload values are inserted as text, never as HTML.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from aiohttp import web

from pipeline.server.stream import STREAM_SUBPROTOCOL


@dataclass
class DashboardPage:
    """What the page needs to find the stream; ``stream_port`` is read when asked, so an
    ephemeral port bound after the app was built is reported correctly."""

    stream_scheme: str
    token_required: bool
    stream_path: str = "/"
    stream_port: int = 0


DASHBOARD_KEY: web.AppKey[DashboardPage] = web.AppKey("dashboard", DashboardPage)


@lru_cache(maxsize=1)
def page_template() -> str:
    return resources.files("pipeline.server").joinpath("static/dashboard.html").read_text(
        encoding="utf-8")


async def dashboard_page(request: web.Request) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    html = page_template().replace("__NONCE__", nonce)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; "
           "form-action 'none'; frame-ancestors 'none'")
    return web.Response(text=html, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": csp,
                                 "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-store"})


async def dashboard_config(request: web.Request) -> web.Response:
    cfg = request.app[DASHBOARD_KEY]
    return web.json_response({"stream_scheme": cfg.stream_scheme,
                              "stream_port": cfg.stream_port,
                              "stream_path": cfg.stream_path,
                              "subprotocol": STREAM_SUBPROTOCOL,
                              "token_required": cfg.token_required})


def add_dashboard_routes(app: web.Application, config: DashboardPage) -> None:
    app[DASHBOARD_KEY] = config
    app.router.add_get("/", dashboard_page)
    app.router.add_get("/dashboard", dashboard_page)
    app.router.add_get("/v1/dashboard/config", dashboard_config)
