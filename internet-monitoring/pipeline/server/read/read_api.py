"""The read API of the ingest listener: sensors, their events, chart series, the dashboard.

::

    GET /v1/sensors                       every known sensor, its state and pipeline health
    GET /v1/sensors/{id}/events           ?since=&until=&order=asc|desc&limit=&after=|before=
    GET /v1/sensors/{id}/series           ?field=&test=&since=&until=&step=
    GET /v1/sensors/{id}/latest           the latest result of every test type
    GET /v1/dashboard                     the UXI payload (platform.md, docs/dashboard.md)

All of them need the stream token when one is configured (``require_reader``). A sensor
is known when it is configured, has connected, or has stored results; any other id is a
404 on every ``/v1/sensors/{id}/...`` route. Reads go through ``EventReader`` (its own
SQLite connection) and are bounded: ``limit`` at most 500 events, a series at most
``series.MAX_POINTS`` points decoded from about ``MAX_SERIES_EVENTS`` results at most: a
longer range is read as an evenly spread sample (``sampled`` is the share read, 1 = all).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

from aiohttp import web

from pipeline.common.errors import FieldValueError, NotFound
from pipeline.server.read.dashboard_feed import DashboardFeed, sensor_states
from pipeline.server.read.dashboard_kpis import sensor_health
from pipeline.server.read.event_pages import MAX_TS_MS, EventQuery
from pipeline.server.read.readers import Reader
from pipeline.server.ingest.context import IngestContext
from pipeline.server.ingest.listener import (
    DEFAULT_PAGE,
    MAX_PAGE,
    _ctx,
    _int_param,
    _sensor_id,
    event_to_json,
    known_in_memory,
    require_reader,
)
from pipeline.server.read.series import MAX_POINTS, bucket, field_value
from pipeline.server.read.snapshot_cache import SnapshotCache, decode_json_payload, iso_utc

MAX_SERIES_EVENTS = 5_000
DEFAULT_SERIES_RANGE_S = 3600
_FIELD_MAX = 200


@dataclass
class ReadContext:
    reader: Reader
    feed: DashboardFeed
    allow_origins: tuple[str, ...] = ("*",)
    sample: dict[str, Any] | None = None
    # memory.read_page_max_kib: event bytes in one page of events (at least one event)
    page_max_bytes: int | None = None


READ_KEY: web.AppKey[ReadContext] = web.AppKey("read_context", ReadContext)


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _time_param(request: web.Request, name: str, default_ms: int) -> int:
    """``name`` as Unix milliseconds: an ISO 8601 time with an offset, or an integer of ms."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default_ms
    if raw.isascii() and raw.isdigit() and len(raw) <= 16:
        return int(raw)
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is None:
            raise ValueError("no UTC offset")
        return max(0, int(moment.timestamp() * 1000))
    except (ValueError, OverflowError, OSError) as exc:
        raise FieldValueError(f"query parameter {name} must be an ISO 8601 time with a UTC "
                              "offset (2026-12-05T03:00:00Z) or Unix milliseconds",
                              field=name) from exc


async def known_sensor(request: web.Request) -> str:
    """The path's sensor id, or 404 when the server has never heard of it."""
    sensor_id = _sensor_id(request)
    if known_in_memory(_ctx(request), sensor_id):
        return sensor_id
    if await _in_thread(request.app[READ_KEY].reader.has_events, sensor_id):
        return sensor_id
    raise NotFound(f"unknown sensor {sensor_id}", field="sensor_id")


def _all_sensor_ids(ctx: IngestContext) -> set[str]:
    return (set(ctx.manager.scheduler.sessions) | set(ctx.authenticator.sensor_ids)
            | {s.sensor_id for s in ctx.snapshots.all()})


# ---------------------------------------------------------------------------------------
# Handlers


async def list_sensors(request: web.Request) -> web.Response:
    require_reader(request)
    ctx = _ctx(request)
    feed = request.app[READ_KEY].feed
    manager = ctx.manager
    sessions = manager.scheduler.sessions
    ids = sorted(_all_sensor_ids(ctx))
    epochs = {sid: sessions[sid].epoch if sid in sessions else "" for sid in ids}

    def offsets() -> dict[str, int]:
        return {sid: ctx.store.committed_offset(sid, epochs[sid]) for sid in ids}

    committed = await ctx.in_store_thread(offsets)
    last_results = ctx.snapshots.updated_at()
    now = time.time()
    out = []
    for state in sensor_states(manager, ids, last_results):
        sid = state.sensor_id
        session = sessions.get(sid)
        info = manager.info.get(sid)
        hb = session.last_heartbeat if session is not None else None
        health = sensor_health(state, feed.thresholds, now)
        label = feed.config.sensors.get(sid)
        out.append({
            "sensor_id": sid,
            "name": label.name if label is not None and label.name else sid,
            "site": label.site if label is not None else "",
            "connected": state.connected,  # on any replica (docs/scaling.md)
            "last_heartbeat_at": iso_utc(state.last_heartbeat_at)
            if state.last_heartbeat_at else None,
            "queue_depth": state.queue_depth,
            "clock_skew_ms": state.clock_skew_ms,
            "committed_offset": committed[sid],
            "backlog": state.backlog,
            "software_version": (hb.software_version if hb is not None
                                 else (info.software_version or None) if info else None),
            "epoch": epochs[sid],
            "windows_open": session.active_windows() if session is not None else 0,
            "retry_total": hb.retry_total if hb is not None else None,
            "dropped_total": hb.dropped_total if hb is not None else None,
            "last_result_at": iso_utc(last_results[sid]) if sid in last_results else None,
            "status": health.status,
            "conditions": [c.to_json() for c in health.conditions],
        })
    return web.json_response({"sensors": out, "generated_at": iso_utc(now)})


def _order(request: web.Request) -> str:
    order = request.query.get("order", "asc") or "asc"
    if order not in ("asc", "desc"):
        raise FieldValueError("query parameter order must be asc or desc", field="order")
    return order


async def list_events(request: web.Request) -> web.Response:
    require_reader(request)
    sensor_id = await known_sensor(request)
    order = _order(request)
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    query = EventQuery(
        sensor_id=sensor_id, since_ms=_time_param(request, "since", 0),
        until_ms=_time_param(request, "until", MAX_TS_MS), order=order,  # type: ignore[arg-type]
        after=_int_param(request, "after", 0, 0, 2**63 - 1),
        before=_int_param(request, "before", MAX_TS_MS, 1, MAX_TS_MS), limit=limit)
    read = request.app[READ_KEY]
    # Bounded by bytes too: a page of 500 large events would otherwise be read, decoded
    # and encoded in memory all at once.
    events, cut = await _in_thread(read.reader.events_capped, query, read.page_max_bytes)
    docs = [event_to_json(e) for e in events]
    full = len(docs) == limit or (cut and bool(docs))
    next_cursor = docs[-1]["cursor"] if full else None
    return web.json_response({
        "sensor_id": sensor_id, "order": order, "events": docs,
        "next_after": next_cursor if order == "asc" else None,
        "next_before": next_cursor if order == "desc" else None})


def _field(request: web.Request) -> str:
    name = request.query.get("field", "")
    parts = name.split(".")
    if not name or len(name) > _FIELD_MAX or not all(
            p and p.isascii() and all(c.isalnum() or c in "_-" for c in p) for p in parts):
        raise FieldValueError("query parameter field must be a result field name or dotted "
                              "path (letters, digits, _ and -)", field="field")
    return name


async def sensor_series(request: web.Request) -> web.Response:
    require_reader(request)
    sensor_id = await known_sensor(request)
    field = _field(request)
    test = request.query.get("test") or None
    now_ms = int(time.time() * 1000)
    until = _time_param(request, "until", now_ms)
    since = _time_param(request, "since", until - DEFAULT_SERIES_RANGE_S * 1000)
    if since >= until:
        raise FieldValueError("since must be before until", field="since")
    span_s = (until - since) / 1000
    default_step = max(1, int(span_s // 120) or 1)
    step_s = _int_param(request, "step", default_step, 1, 31 * 86400)
    if span_s / step_s > MAX_POINTS:
        raise FieldValueError(f"(until - since) / step must be at most {MAX_POINTS} points",
                              field="step")
    reader = request.app[READ_KEY].reader
    stored = await _in_thread(reader.count_in_range, sensor_id, since, until)
    fraction = min(1.0, MAX_SERIES_EVENTS / stored) if stored else 1.0
    rows = await _in_thread(reader.in_range, sensor_id, since, until,
                            MAX_SERIES_EVENTS * 2, fraction)
    values = []
    for event in rows:
        doc = decode_json_payload(event.data)
        if test is not None and (not isinstance(doc, dict) or doc.get("test") != test):
            continue
        value = field_value(doc, field)
        if value is not None:
            values.append((event.logical_timestamp_ms, value))
    points = bucket(values, since, step_s * 1000)
    return web.json_response({
        "sensor_id": sensor_id, "field": field, "test": test, "since": since, "until": until,
        "step_s": step_s, "points": [p.to_json() for p in points],
        "sampled": round(fraction, 6)})


async def sensor_latest(request: web.Request) -> web.Response:
    require_reader(request)
    sensor_id = await known_sensor(request)
    feed = request.app[READ_KEY].feed
    await _in_thread(feed.refresh)
    return web.json_response({"sensor_id": sensor_id,
                              "results": [r.to_json() for r in feed.latest(sensor_id)]})


async def build_dashboard(feed: DashboardFeed, manager: Any, sensor_ids: Iterable[str],
                          snapshots: SnapshotCache, sample: dict[str, Any] | None
                          ) -> dict[str, Any]:
    """The UXI payload from the stored results (or the sample while there are none); one
    function for ``GET /v1/dashboard`` and the stream's dashboard messages."""
    await _in_thread(feed.refresh)
    if sample is not None and not feed.has_results() and not snapshots.all():
        return sample
    ids = set(sensor_ids) | {s.sensor_id for s in snapshots.all()}
    states = sensor_states(manager, ids, snapshots.updated_at())
    return await _in_thread(feed.payload, states)


def cors_headers(request: web.Request, allow: tuple[str, ...]) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if "*" in allow:
        return {"Access-Control-Allow-Origin": "*"}
    if origin is not None and origin in allow:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {"Vary": "Origin"}


async def dashboard_payload(request: web.Request) -> web.Response:
    require_reader(request)
    read = request.app[READ_KEY]
    ctx = _ctx(request)
    doc = await build_dashboard(read.feed, ctx.manager, _all_sensor_ids(ctx), ctx.snapshots,
                                read.sample)
    text = await _in_thread(json.dumps, doc)  # ~1 MB for 500 sensors: off the loop
    return web.Response(text=text, content_type="application/json",
                        headers=cors_headers(request, read.allow_origins))


async def dashboard_preflight(request: web.Request) -> web.Response:
    """CORS preflight, so another origin's UI can send the stream token."""
    headers = cors_headers(request, request.app[READ_KEY].allow_origins)
    headers.update({"Access-Control-Allow-Methods": "GET",
                    "Access-Control-Allow-Headers": "Authorization",
                    "Access-Control-Max-Age": "600"})
    return web.Response(status=204, headers=headers)


def add_read_routes(app: web.Application, read: ReadContext) -> None:
    app[READ_KEY] = read
    r = app.router
    r.add_get("/v1/sensors", list_sensors)
    r.add_get("/v1/sensors/{sensor_id}/events", list_events)
    r.add_get("/v1/sensors/{sensor_id}/series", sensor_series)
    r.add_get("/v1/sensors/{sensor_id}/latest", sensor_latest)
    r.add_get("/v1/dashboard", dashboard_payload)
    r.add_route("OPTIONS", "/v1/dashboard", dashboard_preflight)
