"""The operators' dashboard page, served on the ingest listener (docs/dashboard.md).

``GET /`` and ``GET /dashboard`` return one self-contained HTML page (inline CSS and JS, no
CDN, hand-written SVG charts: it works offline): a fleet table with each sensor's pipeline
health, an alerts panel, the UXI KPIs, and per-sensor pages (``#/sensor/<id>``) with the
latest result of every test type and charts over an hour, a day or a week. The page is
served from the ingest port while the stream listens on its own port, so it first reads
``GET /v1/dashboard/config`` (stream scheme, port, path, subprotocol, whether a token is
needed, thresholds). The stream token is asked once per browser session and kept in
``sessionStorage``; it travels as the ``bearer.<token>`` WebSocket subprotocol and as an
``Authorization`` header on read-API calls, never in a URL. Stable hooks for browser tests:
``#stream-status[data-state]``, ``tr.sensor-row[data-sensor-id][data-status]``,
``#alerts li[data-alert-id]``, ``.test-card[data-test]``, ``svg.chart[data-field]
[data-points]``.

Inline code runs under a per-response CSP nonce, so injected markup cannot run scripts; all
payload values are inserted as text, never as HTML.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from aiohttp import web

from pipeline.server.read.stream import STREAM_SUBPROTOCOL


@dataclass
class DashboardPage:
    """What the page needs to find the stream; ``stream_port`` is read when asked, so an
    ephemeral port bound after the app was built is reported correctly."""

    stream_scheme: str
    token_required: bool
    stream_path: str = "/"
    stream_port: int = 0
    # dashboard.* thresholds (not secrets): the page's legend and its colours' meaning.
    thresholds: dict[str, float] = field(default_factory=dict)


DASHBOARD_KEY: web.AppKey[DashboardPage] = web.AppKey("dashboard", DashboardPage)


@lru_cache(maxsize=1)
def page_template() -> str:
    return resources.files("pipeline.server.read").joinpath("static/dashboard.html").read_text(
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
                              "token_required": cfg.token_required,
                              "thresholds": cfg.thresholds})


def add_dashboard_routes(app: web.Application, config: DashboardPage) -> None:
    app[DASHBOARD_KEY] = config
    app.router.add_get("/", dashboard_page)
    app.router.add_get("/dashboard", dashboard_page)
    app.router.add_get("/v1/dashboard/config", dashboard_config)
