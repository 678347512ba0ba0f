"""PipelineServer: one asyncio process, three aiohttp listeners.

::

    control  (8765)  WebSocket /control          control.control_server
    ingest   (8081)  POST /v1/ingest/chunk, read API, dashboard, /metrics, /healthz, /readyz
    stream   (8766)  WebSocket /                  stream.stream_server

Each listener is its own ``web.Application`` + ``AppRunner`` + ``TCPSite`` (own TLS context,
own body limits). Port 0 binds an ephemeral port; the bound ports are the attributes
``control_port``, ``ingest_port``, ``stream_port`` after ``start()``.

Threads: the store is synchronous. Ingest batches run on ONE dedicated store thread (a
single writer, batches in order); window persistence, reads, readiness checks and
retention pruning use the default thread pool and interleave with ingest through the
store's own lock (one short transaction at a time), so none of them queues ingest behind
a long run of small writes.

Shutdown (``stop()``, also on SIGTERM/SIGINT in ``run_forever``): every listener stops
accepting first; then the ingest listener waits for in-flight requests (their commits
finish and are answered); the group committer drains what is queued; control and stream
sockets are closed with 1001; the last window changes are written; the store closes.
A request whose body is still arriving when shutdown starts cannot finish (aiohttp stops
reading from closing connections): it is neither committed nor answered, and is cut after
``SHUTDOWN_TIMEOUT_S``; the sensor retries it, which is safe because nothing was acked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from pipeline.common.config import ServerConfig, TlsConfig
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.common.runtime_metrics import register_task_gauge
from pipeline.common.tracing import Tracing, setup_tracing, traceparent_of
from pipeline.server.security.auth import TokenAuthenticator, hash_token
from pipeline.server.cluster.identity import ReplicaId
from pipeline.server.cluster.replica import ClusterReplica
from pipeline.server.control.channel import ControlManager
from pipeline.server.control.listener import control_server
from pipeline.server.read.dashboard_feed import DashboardFeed, load_sample
from pipeline.server.read.dashboard_kpis import Thresholds
from pipeline.server.read.readers import Reader, open_reader
from pipeline.server.read.dashboard import DashboardPage, add_dashboard_routes
from pipeline.server.security.gate import GATE_KEY, LISTENER_KEY, security_middleware
from pipeline.server.ingest.sensor_batch import SensorBatch
from pipeline.server.ingest.group_commit import CommitRecord, GroupCommitter
from pipeline.server.ingest.context import IngestContext
from pipeline.server.ingest.listener import error_middleware, ingest_server
from pipeline.server.security.listeners import GuardedSite, reload_ssl_context
from pipeline.server.metrics import ServerMetrics, StoreHealthCollector
from pipeline.server.read.read_api import ReadContext, add_read_routes, build_dashboard
from pipeline.server.control.scheduler import RequestScheduler
from pipeline.server.security.manager import SecurityManager, add_security_routes
from pipeline.server.control.session import WindowPolicy
from pipeline.server.read.snapshot_cache import SnapshotCache, StreamMessage
from pipeline.server.read.rw_snapshot import SeriesBook, field_name
from pipeline.server.forward.forwarder import Forwarder
from pipeline.server.forward.plan import is_remote_write
from pipeline.server.store import ChunkStore, check_engine, open_store
from pipeline.server.read.stream import StreamHub, stream_server

log = logging.getLogger(__name__)

TICK_S = 0.25
METRICS_REFRESH_S = 5.0
# Results bigger than this are not decoded for the snapshot gauges: parsing a 512 KiB JSON
# result took ~6 ms of the loop per event, more than storing it (bench: 128 KiB chunks).
SNAPSHOT_GAUGE_MAX_BYTES = 64 * 1024
PRUNE_INTERVAL_S = 300.0
PRUNE_BATCH = 1000
SHUTDOWN_TIMEOUT_S = 5.0
LINGER_S = 1.0


def ssl_context_for(tls: TlsConfig, at: str) -> ssl.SSLContext | None:
    """A server TLS context for one listener; ``client_ca`` makes client certificates
    mandatory (the peer certificate is then ``request.transport.get_extra_info("peercert")``)."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    reload_ssl_context(ctx, tls, at)
    if tls.client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def window_policy(config: ServerConfig, id_tag: str = "") -> WindowPolicy:
    s = config.scheduler
    return WindowPolicy(id_tag=id_tag, max_chunks=s.max_chunks, max_bytes=s.max_bytes,
                        max_in_flight=s.max_in_flight, windows_per_sensor=s.windows_per_sensor,
                        window_timeout_s=s.window_timeout_s, quiet_s=s.quiet_s,
                        ack_ledger_sequences=config.memory.ack_ledger_sequences)


class PipelineServer:
    def __init__(self, config: ServerConfig, *, registry: CollectorRegistry | None = None,
                 tracing: Tracing | None = None,
                 config_loader: Callable[[], ServerConfig] | None = None,
                 config_path: str | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServerMetrics(self.registry,
                                     snapshot_fields=config.metrics.snapshot_fields)
        self.metrics.set_heartbeat_interval(config.heartbeat.interval_s)
        self.registry.register(StoreHealthCollector(lambda: getattr(self, "store", None)))
        # An injected tracer (tests: in-memory exporter) is the caller's to shut down.
        self._own_tracing = tracing is None
        self.tracing = tracing if tracing is not None else setup_tracing(config.tracing,
                                                                         "pipeline-server")
        self.authenticator = TokenAuthenticator.from_config(config)
        # Reload, revocation, rotation, limits (docs/security.md); merges rotated tokens
        # into ``self.authenticator`` in place.
        self.security = SecurityManager(config, authenticator=self.authenticator,
                                        metrics=self.metrics, config_loader=config_loader,
                                        watch_paths=[config_path] if config_path else ())
        self.stream_hub: StreamHub | None = None
        # PostgreSQL: replicas may share the store (docs/scaling.md), so this process
        # joins the cluster; its tag goes into every window id it issues.
        self.replica_id = ReplicaId.new() if config.store.engine == "postgres" else None
        self.cluster: ClusterReplica | None = None
        self.scheduler = RequestScheduler(window_policy(
            config, self.replica_id.window_tag if self.replica_id else ""),
                                          global_max_windows=config.scheduler.global_max_windows)
        self.snapshots = SnapshotCache(
            max_payload_bytes=config.memory.snapshot_payload_max_kib * 1024)
        self.series_book = SeriesBook()
        self.forwarder: Forwarder | None = None
        self.store: ChunkStore | None = None
        self.reader: Reader | None = None
        self.feed: DashboardFeed | None = None
        self._sample: dict[str, Any] | None = None
        self.manager: ControlManager | None = None
        self.committer: GroupCommitter | None = None
        self.control_port: int | None = None
        self.ingest_port: int | None = None
        self.stream_port: int | None = None
        self._store_thread: ThreadPoolExecutor | None = None
        self._runners: dict[str, web.AppRunner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dashboard = DashboardPage(
            stream_scheme="wss" if config.stream.tls.enabled else "ws",
            token_required=bool(config.stream.token),
            thresholds=dataclasses.asdict(Thresholds.from_config(config.dashboard)))
        self._up = False
        self._stopping = False
        self._stopped = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        check_engine(cfg.store)
        contexts = {name: ssl_context_for(getattr(cfg, name).tls, name)
                    for name in ("control", "ingest", "stream")}
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        register_task_gauge(self.registry, loop)
        self.store = await loop.run_in_executor(self._store_thread, self._open_store)
        store = self.store
        try:
            if cfg.dashboard.sample_path:
                self._sample = load_sample(cfg.dashboard.sample_path)
            self.reader = await asyncio.to_thread(open_reader, cfg.store)
            self.feed = DashboardFeed(self.reader, cfg.dashboard)
            self.manager = ControlManager(
                self.scheduler, self.authenticator, metrics=self.metrics, store=store,
                executor=None, heartbeat_interval_s=cfg.heartbeat.interval_s,
                missed_before_disconnect=cfg.heartbeat.missed_before_disconnect)
            if self.replica_id is not None:
                # Sessions are loaded one by one as their sockets connect (ownership).
                self.cluster = ClusterReplica(
                    cfg.store.dsn, self.replica_id, self.manager, store,
                    self._on_event_completed, known_ids=self._known_sensor_ids)
                await self.cluster.start()
                self.manager.claims = self.cluster
            else:
                await self.manager.restore()
                await self._restore_watermarks()
            latest = await asyncio.to_thread(store.latest_events)
            self.snapshots.warm((e, e.completed_at) for e in latest)
            for event in latest:
                if is_remote_write(event.attributes):
                    self._on_remote_write(event, warm=True)
            if self.metrics.snapshot_fields:
                for snap in self.snapshots.all():
                    self.metrics.on_snapshot_payload(snap.sensor_id, snap.payload)
            self.committer = GroupCommitter(store, executor=self._store_thread,
                                            on_commit=self._after_commit)
            self.committer.start()
            if cfg.forward.remote_write.enabled:
                self.forwarder = Forwarder(store, cfg.forward.remote_write, self.registry)
                await self.forwarder.start()
            self.manager.start()
            await self._start_listeners(contexts)
        except BaseException:
            await self._abort()
            raise
        self._tasks = [loop.create_task(self._timer(), name="control-timer"),
                       loop.create_task(self._pruner(), name="retention-prune")]
        self._tasks.append(loop.create_task(self._warm_dashboard(), name="dashboard-warm"))
        if cfg.dashboard.push_interval_s > 0:
            self._tasks.append(loop.create_task(self._dashboard_pusher(),
                                                name="dashboard-push"))
        self._up = True
        log.info("server_started control_port=%s ingest_port=%s stream_port=%s store=%s "
                 "sensors=%d snapshots=%d", self.control_port, self.ingest_port,
                 self.stream_port, _store_name(cfg), len(self.authenticator.sensor_ids),
                 len(self.snapshots.all()))

    def _open_store(self) -> ChunkStore:
        if self.config.store.engine == "sqlite":
            path = Path(self.config.store.path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"store.path: cannot create {path.parent}: {exc.strerror}",
                                  field="store.path") from exc
        memory = self.config.memory
        return open_store(self.config.store, max_event_bytes=self.config.limits.max_event_bytes,
                          cache_kib=memory.sqlite_cache_kib,
                          slice_cache_bytes=memory.slice_cache_kib * 1024)

    async def _restore_watermarks(self) -> None:
        """The store's offsets are the truth; saved session state may lag behind them."""
        store = self.store
        assert store is not None
        sessions = dict(self.scheduler.sessions)
        marks = await asyncio.to_thread(
            lambda: {sid: store.committed_offset(sid, s.epoch) for sid, s in sessions.items()})
        for sid, mark in marks.items():
            session = self.scheduler.session(sid)
            session.watermark = max(session.watermark, mark)

    async def _start_listeners(self, contexts: dict[str, ssl.SSLContext | None]) -> None:
        cfg = self.config
        assert self.manager is not None and self.committer is not None and self.store is not None
        middlewares = (error_middleware, security_middleware)
        control_app = control_server(self.manager, middlewares=middlewares,
                                     path=cfg.control.path)
        ctx = IngestContext(
            authenticator=self.authenticator, committer=self.committer, manager=self.manager,
            snapshots=self.snapshots, metrics=self.metrics, store=self.store, executor=None,
            max_body_bytes=cfg.ingest.max_body_bytes,
            metrics_enabled=cfg.metrics.enabled, listeners_up=self.listeners_up,
            tracing=self.tracing,
            configured_sensors=self.authenticator.sensor_ids)
        ingest_app = ingest_server(ctx, middlewares=middlewares)
        add_dashboard_routes(ingest_app, self._dashboard)
        assert self.reader is not None and self.feed is not None
        add_read_routes(ingest_app, ReadContext(
            reader=self.reader, feed=self.feed,
            allow_origins=tuple(cfg.dashboard.allow_origins), sample=self._sample,
            page_max_bytes=cfg.memory.read_page_max_kib * 1024))
        hub = StreamHub(snapshots=self.snapshots, metrics=self.metrics,
                        token_sha256=hash_token(cfg.stream.token) if cfg.stream.token else None,
                        allowed_origins=tuple(cfg.stream.allowed_origins))
        stream_app = stream_server(hub, middlewares=middlewares)
        self.stream_hub = hub
        add_security_routes(ingest_app, self.security)
        for name, app in (("control", control_app), ("ingest", ingest_app),
                          ("stream", stream_app)):
            app[GATE_KEY] = self.security.gate
            app[LISTENER_KEY] = name
        plan: list[tuple[str, web.Application, Any]] = [
            ("ingest", ingest_app, cfg.ingest), ("control", control_app, cfg.control),
            ("stream", stream_app, cfg.stream)]
        for name, app, section in plan:
            # keepalive_timeout doubles as the request-header deadline (slowloris);
            # nothing here uses Content-Encoding, so no decompression before our checks.
            # lingering_time: after refusing a body (413/408) aiohttp reads and discards
            # what is still coming, so the client can see the answer; briefly, not 10 s.
            runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None,
                                   keepalive_timeout=cfg.limits.header_timeout_s,
                                   auto_decompress=False, lingering_time=LINGER_S)
            await runner.setup()
            self._runners[name] = runner
            site = GuardedSite(runner, section.bind, section.port, ssl_context=contexts[name],
                               limiter=self.security.connection_limiters[name],
                               handshake_timeout=cfg.limits.tls_handshake_timeout_s,
                               listener=name, on_refused=self.security.on_connection_refused,
                               reuse_port=cfg.server.workers > 1)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"{name}: cannot listen on {section.bind}:{section.port}: "
                                  f"{exc.strerror or exc}", field=f"{name}.port") from exc
            setattr(self, f"{name}_port", site.port)
        self._dashboard.stream_port = self.stream_port or 0
        self.security.attach(manager=self.manager, hub=hub, contexts=contexts)
        self.security.start()

    def listeners_up(self) -> bool:
        return self._up and not self._stopping and all(
            runner.sites for runner in self._runners.values())

    async def stop(self) -> None:
        """Graceful: stop accepting, finish in-flight commits, close sockets, close the store."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("server_stopping")
        for runner in self._runners.values():
            for site in list(runner.sites):
                await site.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.security.close()
        # In-flight POSTs finish (and commit) before the committer is drained.
        for name in ("ingest", "control", "stream"):
            started = self._runners.pop(name, None)
            if started is not None:
                await started.cleanup()
        await self._abort()
        self._up = False
        if self._own_tracing:
            self.tracing.shutdown()
        self._stopped.set()
        log.info("server_stopped")

    async def _abort(self) -> None:
        """Release what ``start`` acquired (also after a failed start)."""
        await self.security.close()
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()
        if self.committer is not None:
            await self.committer.close()
        if self.forwarder is not None:
            forwarder, self.forwarder = self.forwarder, None
            await forwarder.stop()
        if self.manager is not None:
            await self.manager.close()
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.close()
        if self.reader is not None:
            reader, self.reader = self.reader, None
            await asyncio.to_thread(reader.close)
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.get_running_loop().run_in_executor(self._store_thread, store.close)
        if self._store_thread is not None:
            self._store_thread.shutdown(wait=True)
            self._store_thread = None

    async def reload(self, reason: str = "sighup") -> None:
        """SIGHUP: reload sensors, tokens, limits and certificates (docs/security.md)."""
        try:
            await self.security.reload(reason)
        except ConfigError:
            pass  # logged by the security manager; the old configuration keeps serving

    async def run_forever(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):
                pass
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(self.reload("sighup"), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        try:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            installed.append(signal.SIGHUP)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
        # Announced only now: a supervisor that signals as soon as it reads the
        # announcement gets a graceful stop, not the default action of SIGTERM.
        if on_started is not None:
            on_started()
        try:
            await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    # -- post-commit --------------------------------------------------------------------

    def _after_commit(self, records: list[CommitRecord]) -> None:
        """Runs once per durable batch: metrics, snapshots (stream), acks; never before.

        Per chunk only what must be per chunk (the ack item, the latency observation, the
        snapshot of a completed event); counters, label lookups and the INFO log line are
        per sensor or per batch."""
        assert self.manager is not None
        now = time.time()
        tracing = self.tracing.enabled
        grouped: dict[str, SensorBatch] = {}
        trace_parents: dict[str, str] = {}
        gauge_payloads: dict[str, list[bytes]] = {}
        completed: list[tuple[str, str]] = []
        events = 0
        event_bytes = 0
        for rec in records:
            outcome = rec.outcome
            if outcome.error is not None:
                continue
            sensor_id = outcome.sensor_id
            nbytes = len(rec.chunk.payload)
            share = grouped.get(sensor_id)
            if share is None:
                share = grouped[sensor_id] = SensorBatch()
            share.add(outcome, rec.chunk.window_id, nbytes, (now - rec.received_at) * 1000.0)
            parent = traceparent_of(rec.chunk.attributes) if tracing else None
            if parent is not None:
                trace_parents.setdefault(sensor_id, parent)
            event = outcome.completed_event
            if event is not None:
                events += 1
                event_bytes += len(event.data)
                completed.append((event.sensor_id, event.event_id))
                with self.tracing.span("server.snapshot", parent=parent, attributes={
                        "sensor_id": event.sensor_id, "event_id": event.event_id}
                        if tracing else None):
                    if self._on_event_completed(event):
                        gauge_payloads.setdefault(sensor_id, []).append(event.data)
        for sensor_id, payloads in gauge_payloads.items():
            self.metrics.on_snapshot_payloads(sensor_id, payloads)
        if self.forwarder is not None:
            for sensor_id, share in grouped.items():
                if share.events:
                    self.forwarder.notify(sensor_id)
        for sensor_id, share in grouped.items():
            self.metrics.on_stored_batch(sensor_id, stored=share.stored,
                                         stored_bytes=share.stored_bytes,
                                         duplicates=share.duplicates,
                                         latencies_ms=share.latencies_ms)
            # One ack span per sensor and batch, in the trace of its first traced chunk.
            with self.tracing.span("server.ack", parent=trace_parents.get(sensor_id),
                                   attributes={"sensor_id": sensor_id,
                                               "chunks": len(share.items)}):
                if self.cluster is not None:  # acked where the sensor's socket is
                    self.cluster.on_commit(sensor_id, share.items, share.marks)
                else:
                    self.manager.on_committed(sensor_id, share.items, share.marks)
        if self.cluster is not None:
            self.cluster.on_events(completed)
        if events:
            # Event ids are on the DEBUG lines (``event_completed``); one INFO line per
            # batch keeps the log volume and its CPU flat under load.
            log.info("events_completed count=%d sensors=%d bytes=%d", events,
                     sum(1 for share in grouped.values() if share.events),
                     event_bytes)

    def _known_sensor_ids(self) -> set[str]:
        return (set(self.authenticator.sensor_ids) | set(self.scheduler.sessions)
                | {s.sensor_id for s in self.snapshots.all()})

    def _on_event_completed(self, event: Any) -> bool:
        """Snapshot cache and stream; True when the event is its sensor's new latest
        result and feeds the snapshot gauges (applied once per batch and sensor)."""
        series = self._on_remote_write(event) if is_remote_write(event.attributes) else None
        self.snapshots.update(event, event.completed_at, series)
        self.metrics.on_event_completed()
        log.debug("event_completed sensor_id=%s event_id=%s size=%d", event.sensor_id,
                  event.event_id, len(event.data))
        latest = self.snapshots.get(event.sensor_id)
        return bool(self.metrics.snapshot_fields) and latest is not None \
            and latest.event_id == event.event_id \
            and len(event.data) <= SNAPSHOT_GAUGE_MAX_BYTES

    def _on_remote_write(self, event: Any, warm: bool = False) -> tuple[dict[str, Any], ...]:
        """A remote-write event's samples into the series book and, for the metric names
        in ``metrics.snapshot_metrics``, into ``pipeline_snapshot_value``."""
        changed = self.series_book.update(event.sensor_id, event.data)
        follow = self.config.metrics.snapshot_metrics
        for (name, labels), value in changed.items():
            if name in follow:
                self.metrics.snapshot_value.labels(event.sensor_id,
                                                   field_name(name, labels)).set(value)
        series = self.series_book.series(event.sensor_id)
        if warm:
            self.snapshots.update(event, event.completed_at, series)
        return series

    # -- background ---------------------------------------------------------------------

    async def _timer(self) -> None:
        assert self.manager is not None
        refreshed = float("-inf")
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.manager.tick()
                # The time-derived gauges cost one label lookup per sensor: every tick is
                # too often for a fleet (a scrape refreshes them too, see metrics_handler).
                if time.monotonic() - refreshed >= METRICS_REFRESH_S:
                    refreshed = time.monotonic()
                    self.metrics.refresh(time.time(),
                                         heartbeats=self.manager.heartbeat_times(),
                                         snapshots=self.snapshots.updated_at(),
                                         windows_open=self.manager.windows_open(),
                                         acks_pending=self.manager.acks_pending())
            except Exception:  # the timer must survive one bad tick
                log.exception("timer_failed")

    async def _warm_dashboard(self) -> None:
        """Read the stored results of the reporting windows once at start, in the
        background, so the first dashboard request does not pay for it."""
        feed = self.feed
        if feed is None:
            return
        started = time.monotonic()
        try:
            count = await asyncio.to_thread(feed.refresh)
        except PipelineError as exc:
            log.warning("dashboard_warm_failed error=%s", exc.code)
            return
        log.info("dashboard_warmed events=%d seconds=%.2f", count, time.monotonic() - started)

    async def _dashboard_pusher(self) -> None:
        """``{"type": "dashboard", ...}`` on the stream every ``push_interval_s`` while
        anyone listens; the last one is also sent to each new subscriber."""
        interval = self.config.dashboard.push_interval_s
        while True:
            await asyncio.sleep(interval)
            hub, feed = self.stream_hub, self.feed
            if hub is None or feed is None or self.manager is None:
                continue
            if not self.snapshots.subscriber_count:
                continue
            try:
                await self._push_dashboard(hub, feed)
            except PipelineError as exc:
                log.warning("dashboard_push_failed error=%s", exc.code)

    async def _push_dashboard(self, hub: StreamHub, feed: DashboardFeed) -> None:
        assert self.manager is not None
        ids = set(self.manager.scheduler.sessions) | set(self.authenticator.sensor_ids)
        doc = await build_dashboard(feed, self.manager, ids, self.snapshots, self._sample)
        # Encoded off the loop: ~1 MB for 500 sensors.
        text = await asyncio.to_thread(json.dumps, {"type": "dashboard", **doc})
        hub.latest_dashboard = text
        self.snapshots.publish(StreamMessage(text))

    async def _pruner(self) -> None:
        hours = self.config.store.retention_hours
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            store = self.store
            if store is None:
                return
            cutoff = time.time() - hours * 3600.0
            try:
                removed = await asyncio.to_thread(store.prune, cutoff, batch=PRUNE_BATCH)
                log.info("retention_pruned removed=%d retention_hours=%d", removed, hours)
            except PipelineError as exc:
                log.warning("retention_prune_failed error=%s", exc.code)


def _store_name(config: ServerConfig) -> str:
    """Where the store is, for the log (a PostgreSQL DSN without its password)."""
    if config.store.engine == "postgres":
        from pipeline.server.store.pg_store import redacted

        return redacted(config.store.dsn)
    return config.store.path
