"""Putting events into the sensor's queue: a Python API and a local HTTP endpoint.

``submit_event`` opens the agent's queue file, enqueues one event and closes it. It is safe
while the agent runs in another process: the queue is SQLite in WAL mode with a busy
timeout, and the agent notices the new rows on its next tick.

``SubmitServer`` is the optional ``POST /v1/submit`` endpoint the agent starts when
``submit.listen`` is set (``127.0.0.1:8089``): the request body is the event, query
parameters become its attributes, the answer is ``202 {"event_id": ..., "chunks": n}``. It
has no authentication, so it is meant for loopback; binding elsewhere logs a warning.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from aiohttp import web

from pipeline.common.errors import (
    ConfigError,
    FieldValueError,
    PayloadTooLarge,
    PipelineError,
)
from pipeline.common.tracing import Tracing, setup_tracing

if TYPE_CHECKING:
    from pipeline.common.config import SensorConfig
    from pipeline.sensor.queue import DurableQueue

log = logging.getLogger(__name__)

SUBMIT_PATH = "/v1/submit"
DEFAULT_MAX_SUBMIT_BYTES = 16 * 1024 * 1024


def _resolve_config(config: SensorConfig | str | Path) -> SensorConfig:
    if isinstance(config, (str, Path)):
        from pipeline.common.config import load_sensor_config

        return load_sensor_config(config)
    return config


def open_queue(config: SensorConfig, *, verify_on_open: bool = True,
               open_with_reserve: bool = False) -> DurableQueue:
    """Open the queue file named by ``config.queue`` (creating its directory).
    ``open_with_reserve``: the agent may use the disk reserve to open on a full disk."""
    from pipeline.sensor.queue import DurableQueue

    settings = config.queue
    path = Path(settings.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"queue.path {path}: cannot create directory: {exc}",
                          field="queue.path") from exc
    options: dict[str, Any] = {"retention_hours": settings.retention_hours,
                               "verify_on_open": verify_on_open,
                               "open_with_reserve": open_with_reserve}
    for name in ("synchronous", "max_bytes", "slice_size", "reserve_bytes", "cache_kib"):
        value = getattr(settings, name, None)
        if value is not None:
            options[name] = value
    return DurableQueue(path, **options)


def check_attributes(attributes: Mapping[str, str] | None) -> dict[str, str]:
    """Attributes as a plain dict; the queue refuses reserved names and excess."""
    return dict(attributes or {})


def submit_event(config: SensorConfig | str | Path, data: bytes, *,
                 attributes: Mapping[str, str] | None = None,
                 tracing: Tracing | None = None) -> str:
    """Enqueue one event into the sensor's queue; returns its event id.

    ``config`` is a loaded ``SensorConfig`` or the path of its YAML file. With tracing on
    (``tracing`` given, or ``config.tracing.enabled``) the event starts a trace: the
    ``sensor.submit`` span's traceparent is stored with it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FieldValueError("data must be bytes", field="data")
    attrs = check_attributes(attributes)
    resolved = _resolve_config(config)
    own_tracing = tracing is None
    tracer = tracing if tracing is not None else setup_tracing(
        getattr(resolved, "tracing", None), "pipeline-sensor")
    try:
        queue = open_queue(resolved, verify_on_open=False)
        try:
            event = enqueue_traced(queue, tracer, resolved.sensor_id, bytes(data), attrs)
        finally:
            queue.close()
    finally:
        if own_tracing:
            tracer.shutdown()
    log.info("event_submitted sensor_id=%s event_id=%s chunks=%d bytes=%d", resolved.sensor_id,
             event.event_id, len(event.sequences), event.size)
    return event.event_id


def enqueue_traced(queue: DurableQueue, tracing: Tracing, sensor_id: str, data: bytes,
                   attributes: Mapping[str, str]) -> Any:
    """``queue.enqueue`` inside a ``sensor.submit`` span whose traceparent the event keeps
    (blocking: call it from a worker thread in async code)."""
    with tracing.span("sensor.submit", attributes={"sensor_id": sensor_id,
                                                   "event.bytes": len(data)}) as span:
        event = queue.enqueue(data, attributes=attributes, traceparent=span.traceparent)
        span.set_attribute("event_id", event.event_id)
        span.set_attribute("event.chunks", len(event.sequences))
    return event


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"submit.listen must be host:port, got {listen!r}",
                          field="submit.listen")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"submit.listen port must be an integer, got {port_text!r}",
                          field="submit.listen") from exc
    if not 0 <= port <= 65535:
        raise ConfigError(f"submit.listen port out of range: {port}", field="submit.listen")
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SubmitServer:
    """Local ``POST /v1/submit`` into the agent's own queue object."""

    def __init__(self, queue: DurableQueue, listen: str, *,
                 on_enqueued: Callable[[], None] | None = None,
                 max_bytes: int | None = None, tracing: Tracing | None = None,
                 sensor_id: str = "") -> None:
        self._queue = queue
        self._tracing = tracing or Tracing()
        self._sensor_id = sensor_id
        self._host, self._port = parse_listen(listen)
        self._on_enqueued = on_enqueued
        self._max_bytes = int(max_bytes or DEFAULT_MAX_SUBMIT_BYTES)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.accepted = 0

    @property
    def port(self) -> int | None:
        """The bound port (useful with ``:0``)."""
        if self._runner is None or self._site is None:
            return None
        addresses = self._runner.addresses
        return int(addresses[0][1]) if addresses else None

    async def start(self) -> None:
        if not _is_loopback(self._host):
            log.warning("submit_listen_not_loopback host=%s note=endpoint_has_no_authentication",
                        self._host)
        app = web.Application(client_max_size=self._max_bytes)
        app.router.add_post(SUBMIT_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(f"submit.listen {self._host}:{self._port}: cannot bind: {exc}",
                              field="submit.listen") from exc
        log.info("submit_listening host=%s port=%s path=%s", self._host, self.port, SUBMIT_PATH)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            error = PayloadTooLarge(f"event larger than {self._max_bytes} bytes", field="body")
            return web.json_response(error.to_json(), status=error.http_status)
        try:
            attrs = check_attributes(dict(request.query.items()))
            event = await asyncio.to_thread(enqueue_traced, self._queue, self._tracing,
                                            self._sensor_id, data, attrs)
        except PipelineError as exc:
            log.warning("submit_refused error=%s message=%s", exc.code, exc.message)
            return web.json_response(exc.to_json(), status=exc.http_status)
        self.accepted += 1
        if self._on_enqueued is not None:
            self._on_enqueued()
        log.info("event_submitted sensor_id=%s event_id=%s chunks=%d bytes=%d via=http",
                 self._sensor_id or "-", event.event_id, len(event.sequences), event.size)
        return web.json_response({"event_id": event.event_id, "chunks": len(event.sequences)},
                                 status=202)
