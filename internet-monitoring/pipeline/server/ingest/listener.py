"""The ingest HTTP listener: chunk ingest, the read API, health and metrics.

Routes (protocol.md section 2 for the ingest route; everything else is additive)::

    POST /v1/ingest/chunk                  sensor token of chunk.sensor_id; group-committed
    POST /v1/ingest/batch                  (capability batch) the same, chunk by chunk
    GET  /v1/snapshots                     read API (stream token when one is configured)
    GET  /v1/snapshots/{sensor_id}
    GET  /v1/sensors, /v1/sensors/{id}/events|series|latest, /v1/dashboard   (read_api)
    POST /v1/sensors/{sensor_id}/request   202 {window_id} / 409 when not connected, 404 unknown
    GET  /healthz  /readyz  /metrics       open (no credentials)

The ingest routes themselves (single chunk and batch, one way through security, decode
and group commit) are ``pipeline.server.ingest.handler``.

``error_middleware`` is the ONE place where errors become responses, for all three
listeners: a ``PipelineError`` becomes its ``http_status`` with ``error.to_json()``; an
aiohttp HTTP error (404, 405, 413 from the body cap) becomes the same JSON shape; anything
unexpected is logged and answered 500 JSON, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline.common.errors import (
    AuthError,
    ConflictError,
    FieldValueError,
    Forbidden,
    NotFound,
    PipelineError,
    StorageFull,
    StoreError,
)
from pipeline.common.messages import SENSOR_ID_RE
from pipeline.server.ingest.context import CONTEXT_KEY, METRICS_KEY, IngestContext
from pipeline.server.ingest.handler import ingest_batch, ingest_chunk
from pipeline.server.ingest.wire import BATCH_PATH, INGEST_PATH
from pipeline.server.read.snapshot_cache import decode_json_payload, iso_utc
from pipeline.server.security.gate import GATE_KEY

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
MAX_PAGE = 500
_STATUS_CODES = {400: "malformed", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 408: "timeout", 413: "too_large",
                 415: "unsupported_media_type", 429: "throttled"}


# ---------------------------------------------------------------------------------------
# Errors: one place


def error_response(status: int, doc: dict[str, Any],
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(doc, status=status, headers=headers)


def www_authenticate(exc: AuthError) -> str:
    """RFC 6750 challenge carrying the refusal's reason: a WebSocket client sees only the
    status and headers of a refused handshake, never the JSON body, so a sensor learns
    why it was refused ("unknown token", "token belongs to sensor pi-01, not pi-02") from
    here. The reason is the error's own message: it never holds a token."""
    error = "insufficient_scope" if isinstance(exc, Forbidden) else "invalid_token"
    reason = "".join(c for c in exc.message if c.isprintable() and c not in '"\\')[:200]
    return f'Bearer error="{error}", error_description="{reason}"'


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    try:
        return await handler(request)
    except PipelineError as exc:
        _count_rejection(request, exc.code)
        headers = None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(min(3600, max(1, math.ceil(retry_after))))}
        if exc.http_status >= 500:
            # A full disk refuses every sensor's retry: the store says it once a minute
            # (store_disk_full) and pipeline_rejected_total{reason="storage_full"} counts.
            level = logging.DEBUG if isinstance(exc, StorageFull) else logging.WARNING
            log.log(level, "request_failed path=%s status=%d error=%s", request.path,
                    exc.http_status, exc.code)
        if isinstance(exc, AuthError):
            headers = {**(headers or {}), "WWW-Authenticate": www_authenticate(exc)}
        response = error_response(exc.http_status, exc.to_json(), headers)
        if exc.http_status in (408, 413):
            # The rest of the body is not worth reading (too big, or dribbling): close.
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "http_error")
        _count_rejection(request, code)
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return error_response(exc.status, {"error": code, "message": exc.reason}, headers)
    except asyncio.CancelledError:
        raise
    except Exception:  # the last line of defence: log, answer 500 JSON
        log.exception("request_crashed method=%s path=%s", request.method, request.path)
        return error_response(500, {"error": "internal", "message": "internal server error"})


def _count_rejection(request: web.Request, code: str) -> None:
    if request.path not in (INGEST_PATH, BATCH_PATH):
        return
    metrics = request.app.get(METRICS_KEY)
    if metrics is not None:
        metrics.on_rejected(code)


def _ctx(request: web.Request) -> IngestContext:
    return request.app[CONTEXT_KEY]


# ---------------------------------------------------------------------------------------
# Read API


def require_reader(request: web.Request) -> None:
    """With a stream token configured, the read API needs it (a sensor token cannot read)."""
    request.app[GATE_KEY].authorize_read(request)  # the stream token as reloaded


def _sensor_id(request: web.Request) -> str:
    sensor_id = request.match_info["sensor_id"]
    if not SENSOR_ID_RE.fullmatch(sensor_id):
        raise FieldValueError("invalid sensor id", field="sensor_id")
    return sensor_id


def known_in_memory(ctx: IngestContext, sensor_id: str) -> bool:
    """Configured, connected at some time, or holding a snapshot (the store is asked only
    when all of these say no: ``read_api.known_sensor``)."""
    return (sensor_id in ctx.authenticator.sensor_ids
            or sensor_id in ctx.manager.scheduler.sessions
            or ctx.snapshots.get(sensor_id) is not None)


def _int_param(request: web.Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise FieldValueError(f"query parameter {name} must be a non-negative integer",
                              field=name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise FieldValueError(f"query parameter {name} must be between {minimum} and {maximum}",
                              field=name)
    return value


async def list_snapshots(request: web.Request) -> web.Response:
    require_reader(request)
    snaps = _ctx(request).snapshots.all()
    return web.json_response({"snapshots": [s.to_json() for s in snaps]})


async def get_snapshot(request: web.Request) -> web.Response:
    require_reader(request)
    sensor_id = _sensor_id(request)
    snap = _ctx(request).snapshots.get(sensor_id)
    if snap is None:
        raise NotFound(f"no snapshot for sensor {sensor_id}", field="sensor_id")
    return web.json_response(snap.to_json())


def event_to_json(event: Any) -> dict[str, Any]:
    doc = decode_json_payload(event.data)
    is_json = bool(doc) or event.data.strip() in (b"{}", b"[]")
    return {
        "cursor": event.row_id,
        "sensor_id": event.sensor_id,
        "event_id": event.event_id,
        "epoch": event.epoch,
        "logical_timestamp_ms": event.logical_timestamp_ms,
        "created_at": event.created_at,
        "completed_at": iso_utc(event.completed_at),
        "first_sequence": event.first_sequence,
        "last_sequence": event.last_sequence,
        "size": len(event.data),
        "event_sha256": base64.b64encode(event.event_sha256).decode("ascii"),
        "attributes": dict(event.attributes),
        "payload_base64": base64.b64encode(event.data).decode("ascii"),
        "payload_json": doc if is_json else None,
    }


async def request_sensor(request: web.Request) -> web.Response:
    require_reader(request)
    ctx = _ctx(request)
    sensor_id = _sensor_id(request)
    if not known_in_memory(ctx, sensor_id):
        raise NotFound(f"unknown sensor {sensor_id}", field="sensor_id")
    if not ctx.manager.is_connected(sensor_id):
        raise ConflictError(f"sensor {sensor_id} is not connected", field="sensor_id")
    chunk_request = ctx.manager.request_sensor(sensor_id)
    if chunk_request is not None:
        return web.json_response({"sensor_id": sensor_id, "window_id": chunk_request.window_id,
                                  "already_open": False}, status=202)
    # Its windows are all open already: data is flowing; name one of them.
    session = ctx.manager.scheduler.session(sensor_id)
    open_ids = sorted(w.window_id for w in session.windows.values()
                      if w.status.value == "active")
    return web.json_response({"sensor_id": sensor_id,
                              "window_id": open_ids[0] if open_ids else None,
                              "already_open": True}, status=202)


# ---------------------------------------------------------------------------------------
# Health and metrics


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 when ready, else 503 whatever the cause: load balancers and orchestrators read
    only 503 as "not ready" (a full disk's 507 would be taken for a broken server)."""
    ctx = _ctx(request)
    try:
        if not ctx.listeners_up():
            raise StoreError("listeners are not up")
        await ctx.in_store_thread(ctx.store.check_writable)
    except StoreError as exc:
        log.warning("not_ready error=%s", exc.code)
        return error_response(503, exc.to_json())
    return web.json_response({"status": "ready"})


async def metrics_handler(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    if not ctx.metrics_enabled:
        raise NotFound("metrics are disabled")
    ctx.metrics.refresh(time.time(), heartbeats=ctx.manager.heartbeat_times(),
                        snapshots=ctx.snapshots.updated_at(),
                        windows_open=ctx.manager.windows_open(),
                        acks_pending=ctx.manager.acks_pending())
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def ingest_server(ctx: IngestContext, *, middlewares: tuple[Any, ...] = (error_middleware,)
                  ) -> web.Application:
    """The ingest listener's application (dashboard routes are added by ``dashboard``)."""
    app = web.Application(client_max_size=ctx.max_body_bytes, middlewares=list(middlewares))
    app[CONTEXT_KEY] = ctx
    app[METRICS_KEY] = ctx.metrics
    r = app.router
    r.add_post(INGEST_PATH, ingest_chunk)
    r.add_post(BATCH_PATH, ingest_batch)
    r.add_get("/v1/snapshots", list_snapshots)
    r.add_get("/v1/snapshots/{sensor_id}", get_snapshot)
    r.add_post("/v1/sensors/{sensor_id}/request", request_sensor)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    return app
