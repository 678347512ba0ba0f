"""The UI stream: ``ws[s]://<server>:8766/`` (protocol.md section 3).

On connect the server sends ``{"type": "snapshot_batch", "snapshots": [...]}``, then
``{"type": "snapshot", "snapshot": {...}}`` for every newly completed event. Additionally
(clients ignore types they do not know) ``{"type": "dashboard", ...}``: the UXI payload's
fields beside ``type``, as the original server sent them, every ``dashboard.push_interval_s``
and once on connect when one was computed (docs/dashboard.md). The stream is read-only:
whatever a client sends is ignored.

Credentials, when ``stream.token`` is configured (checked before the upgrade; 401 JSON)::

    Authorization: Bearer <stream token>                       programs
    Sec-WebSocket-Protocol: openuxi.stream.v1, bearer.<token>  browsers (cannot set headers)

The server answers the subprotocol ``openuxi.stream.v1``, never echoing the bearer entry;
the token travels in a header, so it is neither in a URL nor in the access log. With
``stream.allowed_origins`` set, a browser ``Origin`` outside the list is refused (403):
another site's page cannot read the stream through a visitor's browser.

A client that cannot keep up is disconnected (close 1013) rather than buffered without
bound (see ``SnapshotCache``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from aiohttp import WSMsgType, web

from pipeline.common.errors import Forbidden, ProtocolError, Unauthenticated
from pipeline.server.security.auth import bearer_token, check_bearer
from pipeline.server.metrics import ServerMetrics
from pipeline.server.read.snapshot_cache import SnapshotCache, Subscription

log = logging.getLogger(__name__)

STREAM_SUBPROTOCOL = "openuxi.stream.v1"
BEARER_PROTOCOL_PREFIX = "bearer."
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_LATER = 1013


def token_from_subprotocols(header: str | None) -> str | None:
    """The token offered as a ``bearer.<token>`` subprotocol entry, if any."""
    if not header:
        return None
    for item in header.split(","):
        item = item.strip()
        if item.startswith(BEARER_PROTOCOL_PREFIX) and len(item) > len(BEARER_PROTOCOL_PREFIX):
            return item[len(BEARER_PROTOCOL_PREFIX):]
    return None


@dataclass
class StreamHub:
    """The stream listener's state: the cache it reads and the sockets it must close."""

    snapshots: SnapshotCache
    metrics: ServerMetrics
    token_sha256: str | None = None
    allowed_origins: Sequence[str] = ()
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    # The token digest each socket was admitted with: a reload that changes stream.token
    # closes the sockets holding the old one (pipeline.server.security.manager).
    socket_tokens: dict[web.WebSocketResponse, str | None] = field(default_factory=dict)
    # The last ``{"type": "dashboard"}`` frame, sent to a new socket after its snapshots.
    latest_dashboard: str | None = None

    def authorize(self, request: web.Request) -> str | None:
        """Origin allow-list, then the stream token; the accepted token's digest."""
        origin = request.headers.get("Origin")
        if self.allowed_origins and origin is not None and origin not in self.allowed_origins:
            raise Forbidden("origin not allowed", field="Origin")
        if self.token_sha256 is None:
            return None
        token = bearer_token(request.headers.get("Authorization")) or token_from_subprotocols(
            request.headers.get("Sec-WebSocket-Protocol"))
        if not check_bearer(self.token_sha256, token):
            self.metrics.on_auth_failure()
            raise Unauthenticated("the stream needs the stream token")
        return self.token_sha256

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: bytes = b"server shutdown"
                        ) -> None:
        await asyncio.gather(*(ws.close(code=code, message=reason) for ws in list(self.sockets)),
                             return_exceptions=True)


HUB_KEY: web.AppKey[StreamHub] = web.AppKey("stream_hub", StreamHub)


async def stream_handler(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    admitted_with = hub.authorize(request)
    ws = web.WebSocketResponse(protocols=(STREAM_SUBPROTOCOL,), max_msg_size=64 * 1024,
                               timeout=2.0, heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise ProtocolError("expected a WebSocket upgrade", field="Upgrade")
    await ws.prepare(request)
    hub.sockets.add(ws)
    hub.socket_tokens[ws] = admitted_with
    sub, batch = hub.snapshots.subscribe()
    forwarder: asyncio.Task[None] | None = None
    try:
        await ws.send_json({"type": "snapshot_batch", "snapshots": [s.to_json() for s in batch]})
        if hub.latest_dashboard is not None:
            await ws.send_str(hub.latest_dashboard)
        forwarder = asyncio.get_running_loop().create_task(_forward(ws, sub))
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                break  # anything else a client sends is ignored
    except (ConnectionError, RuntimeError) as exc:
        log.info("stream_closed reason=%s", type(exc).__name__)
    finally:
        hub.snapshots.unsubscribe(sub)
        hub.sockets.discard(ws)
        hub.socket_tokens.pop(ws, None)
        if forwarder is not None:
            forwarder.cancel()
            try:
                await forwarder
            except asyncio.CancelledError:
                pass
        if not ws.closed:
            await ws.close()
    return ws


async def _forward(ws: web.WebSocketResponse, sub: Subscription) -> None:
    while not ws.closed:
        snapshot = await sub.get()
        if snapshot is None:
            await ws.close(code=CLOSE_TRY_LATER, message=b"client too slow")
            return
        try:
            await ws.send_str(snapshot.stream_message)
        except (ConnectionError, RuntimeError):
            return


def stream_server(hub: StreamHub, *, middlewares: Sequence[Any] = ()) -> web.Application:
    """The stream listener's application: ``GET /`` (WebSocket)."""
    app = web.Application(middlewares=list(middlewares))
    app[HUB_KEY] = hub
    app.router.add_get("/", stream_handler)

    async def _on_shutdown(_: web.Application) -> None:
        await hub.close_all()

    app.on_shutdown.append(_on_shutdown)
    return app
