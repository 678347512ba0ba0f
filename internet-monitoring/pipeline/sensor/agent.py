"""The sensor agent: the asyncio shell around the durable queue and the dispatcher.

It keeps the control channel up, reports the backlog in heartbeats, answers each
``chunk_request`` by POSTing the planned chunks, and deletes a chunk only on a durable
confirmation (a ``chunk_ack``, or the HTTP answer when both sides negotiated ``http_ack``).
Decisions live in ``pipeline.sensor.dispatch.Dispatcher``; this module only moves bytes
between it, the queue (always through ``asyncio.to_thread``: SQLite blocks) and the
transports.

Nothing the agent holds in memory is needed after a restart: whatever was not deleted is
still in the queue and is offered again when the server asks.

Tasks while running::

    run()
    ├── _control_loop     connect (backoff, reset on success) -> _serve -> reconnect
    │   └── _serve        _heartbeat_loop + _receive_loop for one connection
    ├── _tick_loop        every second: dispatcher.on_tick, new-data detection, pruning
    ├── SubmitServer      optional local ``POST /v1/submit``
    ├── SensorSources     optional remote-write receiver and scrapes (sensor/sources.py)
    └── ChunkSender (sensor/sender.py): one task per planned chunk or batch,
        send_chunk_with_backoff (POSTs bounded by a semaphore; what to do after each
        attempt is decided by sensor.delivery.Delivery)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from prometheus_client import CollectorRegistry

from pipeline.common.backoff import Backoff
from pipeline.common.heap_trim import HeapTrimmer
from pipeline.common.errors import AuthError, PipelineError, ProtocolError, QueueError
from pipeline.common.messages import (
    CAP_EPOCH,
    CAP_HEARTBEAT_STATS,
    CAP_PROTO,
    CAP_ROTATION,
    CAP_SERVER_TIME,
    ChunkAck,
    ChunkRequest,
    Command,
    CommandResponse,
    Envelope,
    Heartbeat,
)
from pipeline.common.aio import wait_event
from pipeline.common.logs import bind_log_context, reset_log_context
from pipeline.common.runtime_metrics import register_task_gauge
from pipeline.common.tracing import Tracing, setup_tracing
from pipeline.sensor.capabilities import effective_capabilities
from pipeline.sensor.credentials import ROTATE_COMMAND, apply_rotation
from pipeline.sensor.delivery import DeliveryPolicy
from pipeline.sensor.dispatch import Dispatcher
from pipeline.sensor.metrics import AgentCollector, SensorMetricsServer
from pipeline.sensor.refusals import RefusalLog
from pipeline.sensor.reload import credential_only_changes
from pipeline.sensor.sender import AgentLinks, ChunkSender, log_task_failure
from pipeline.sensor.sources import SensorSources
from pipeline.sensor.time_sync import ClockSkewEstimator
from pipeline.sensor.transports import (
    ControlChannel,
    ControlClient,
    ControlTransport,
    IngestClient,
    IngestTransport,
)
from pipeline.version import SOFTWARE_VERSION

if TYPE_CHECKING:
    from pipeline.common.config import SensorConfig
    from pipeline.sensor.queue import DurableQueue
    from pipeline.sensor.submit import SubmitServer

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008  # the server closed the control channel for a policy reason

TICK_S = 1.0
EXTRA_HEARTBEAT_MIN_INTERVAL_S = 0.5
PRUNE_INTERVAL_S = 300.0
SHUTDOWN_GRACE_S = 5.0


def iso_utc(timestamp: float) -> str:
    """``sent_at`` in the 1.0 format: ``2026-11-27T05:00:00+00:00``."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


class SensorAgent:
    """Runs the sensor side of the pipeline until ``stop()``.

    ``control`` / ``ingest`` default to the aiohttp transports built from ``config``; tests
    and the simulator pass wrapped ones. The agent does not own ``queue``: the caller
    closes it after ``run()`` returns.

    Counters (read by the metrics exporter): ``posted`` (POSTs answered 2xx), ``acked``
    (sequences confirmed durable, by ack or HTTP answer), ``deleted`` (rows actually
    removed), ``retries`` (POST attempts repeated), ``quarantined``, ``abandoned`` (chunks
    given back to the queue on shutdown) are the send side's (``self.sender``,
    sensor/sender.py); ``heartbeats``, ``requests``, ``connects``, ``connect_failures``,
    ``bad_frames`` are the agent's own.
    """

    def __init__(self, config: SensorConfig, queue: DurableQueue, *,
                 clock: Callable[[], float] = time.time,
                 control: ControlTransport | None = None,
                 ingest: IngestTransport | None = None,
                 dispatcher: Dispatcher | None = None,
                 registry: CollectorRegistry | None = None,
                 tracing: Tracing | None = None) -> None:
        self.config = config
        self.queue = queue
        # Metrics: an AgentCollector on this registry reads the counters below at scrape
        # time; served on ``metrics.listen`` when set.
        self.registry = registry if registry is not None else CollectorRegistry()
        self._own_tracing = tracing is None
        self.tracing = tracing if tracing is not None else setup_tracing(
            getattr(config, "tracing", None), "pipeline-sensor")
        self._metrics_server: SensorMetricsServer | None = None
        self._clock = clock
        self.capabilities = effective_capabilities(config)
        self._control: ControlTransport = control or ControlClient.from_config(config)
        self._ingest: IngestTransport = ingest or IngestClient.from_config(config)
        self.dispatcher = dispatcher or Dispatcher()
        self.skew = ClockSkewEstimator(max_skew_ms=float(config.time_sync.max_skew_ms))
        backoff = config.backoff
        self.connect_backoff = Backoff(backoff.initial_s, backoff.max_s, backoff.jitter)
        self._stop = asyncio.Event()
        self._nudge = asyncio.Event()
        self._other_tasks: set[asyncio.Task[Any]] = set()
        self._channel: ControlChannel | None = None
        self._last_heartbeat = float("-inf")  # monotonic
        self._seen_last_sequence: int | None = None
        self._submit_server: SubmitServer | None = None
        self.shutdown_grace_s = SHUTDOWN_GRACE_S
        self.server_capabilities: tuple[str, ...] = ()
        self.connected = False
        self.heartbeats = 0
        self.requests = 0
        self.connects = 0
        self.connect_failures = 0
        self.refusals = RefusalLog()
        self.bad_frames = 0
        self.sender = ChunkSender(
            queue, self._ingest, self.dispatcher, sensor_id=config.sensor_id,
            policy=DeliveryPolicy.from_backoff(config.backoff),
            max_parallel=int(config.ingest.max_parallel), tracing=self.tracing,
            skew=self.skew, refusals=self.refusals, stop=self._stop, clock=clock,
            links=AgentLinks(both=self._both, request_heartbeat=self._request_heartbeat,
                             log_refusal=self._log_refusal))
        self.registry.register(AgentCollector(self))
        self.sources = SensorSources(config, queue, registry=self.registry,
                                     on_committed=self.notify_enqueued)
        self.heap = HeapTrimmer()  # RSS back to the OS after a drain or a burst of writes

    # ------------------------------------------------------------------ public

    # The send side's counters, read by stats(), heartbeats and the metrics exporter.
    @property
    def posted(self) -> int:
        return self.sender.posted

    @property
    def acked(self) -> int:
        return self.sender.acked

    @property
    def deleted(self) -> int:
        return self.sender.deleted

    @property
    def retries(self) -> int:
        return self.sender.retries

    @property
    def quarantined(self) -> int:
        return self.sender.quarantined

    @property
    def abandoned(self) -> int:
        return self.sender.abandoned

    @property
    def last_committed_sequence(self) -> int:
        return self.sender.last_committed_sequence

    def stop(self) -> None:
        """Ask ``run()`` to finish: in-flight POSTs get ``shutdown_grace_s`` to complete,
        retries waiting on backoff are abandoned (their chunks stay queued)."""
        self._stop.set()

    def reload_credentials(self, fresh: Any) -> list[str]:
        """SIGHUP: take ``fresh``'s token and TLS files; returns the other keys that differ
        (those need a restart and are left as they are). The control channel is closed so
        the next connection authenticates with the new credentials."""
        others = credential_only_changes(self.config, fresh)
        if others:
            log.warning("sensor_reload_partial restart_needed_for=%s", ",".join(others))
        self._control.refresh_credentials(fresh)
        self._ingest.refresh_credentials(fresh)
        self.config = replace(self.config, token=fresh.token, token_file=fresh.token_file,
                              control=replace(self.config.control, tls=fresh.control.tls),
                              ingest=replace(self.config.ingest, tls=fresh.ingest.tls))
        channel = self._channel
        if channel is not None:
            task = asyncio.create_task(channel.close(), name="sensor-reload-close")
            self._other_tasks.add(task)
            task.add_done_callback(self._other_tasks.discard)
        log.info("sensor_reloaded credentials=token,tls reconnect=%s", channel is not None)
        return others

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def sensor_id(self) -> str:
        return self.config.sensor_id

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the optional ``/metrics`` endpoint, once started."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def submit_port(self) -> int | None:
        """The bound port of the local submit endpoint, once started."""
        return self._submit_server.port if self._submit_server is not None else None

    def notify_enqueued(self) -> None:
        """New data is in the queue: tell the server soon instead of at the next heartbeat."""
        self._request_heartbeat()

    def stats(self) -> dict[str, float]:
        return {"posted": self.posted, "acked": self.acked, "deleted": self.deleted,
                "retries": self.retries, "quarantined": self.quarantined,
                "abandoned": self.abandoned, "heartbeats": self.heartbeats,
                "requests": self.requests, "connects": self.connects,
                "connect_failures": self.connect_failures, "bad_frames": self.bad_frames,
                "in_flight": self.dispatcher.in_flight_count(),
                "clock_skew_ms": self.skew.skew_ms, "connected": float(self.connected)}

    async def run(self) -> None:
        # Every line logged by this agent's tasks and threads carries its sensor_id.
        log_context = bind_log_context(sensor_id=self.config.sensor_id)
        try:
            await self._run()
        finally:
            if self._own_tracing:
                self.tracing.shutdown()
            reset_log_context(log_context)

    async def _run(self) -> None:
        log.info("sensor_agent_started sensor_id=%s capabilities=%s queue=%s epoch=%s",
                 self.config.sensor_id, ",".join(self.capabilities), self.queue.path,
                 self.queue.epoch)
        ticker = asyncio.create_task(self._tick_loop(), name="sensor-tick")
        try:
            await self._start_metrics_server()
            await self._start_submit_server()
            await self.sources.start()
            await self._control_loop()
        finally:
            await self._close_quietly(self.sources.close(), "sources")
            ticker.cancel()
            for task in self._other_tasks:
                task.cancel()
            await asyncio.gather(ticker, *self._other_tasks, return_exceptions=True)
            await self.sender.finish(self.shutdown_grace_s)
            await self._close_quietly(self._control.close(), "control")
            await self._close_quietly(self._ingest.close(), "ingest")
            if self._submit_server is not None:
                await self._close_quietly(self._submit_server.close(), "submit")
            if self._metrics_server is not None:
                await self._close_quietly(self._metrics_server.close(), "metrics")
            log.info("sensor_agent_stopped sensor_id=%s posted=%d acked=%d retries=%d "
                     "quarantined=%d abandoned=%d", self.config.sensor_id, self.posted,
                     self.acked, self.retries, self.quarantined, self.abandoned)

    # ------------------------------------------------------------------ control channel

    async def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                channel = await self._connect()
            except AuthError as exc:
                self.connect_failures += 1
                delay = self.connect_backoff.next()
                self._log_refusal("control", exc.http_status, exc.message, delay)
                await self._sleep_or_stop(delay)
                continue
            except (ConnectionError, TimeoutError, OSError) as exc:
                self.connect_failures += 1
                delay = self.connect_backoff.next()
                log.info("control_connect_failed attempt=%d error=%s retry_in_s=%.2f",
                         self.connect_backoff.attempts, exc, delay)
                await self._sleep_or_stop(delay)
                continue
            if channel is None:
                return
            if self.refusals.clear("control"):
                log.info("server_accepted channel=control sensor_id=%s", self.config.sensor_id)
            self.connect_backoff.reset()
            self.connects += 1
            try:
                await self._serve(channel)
            finally:
                self.connected = False
                self._channel = None
                self.dispatcher.on_disconnect()
                await self._close_quietly(channel.close(), "control_channel")
            if not self._stop.is_set():
                delay = self.connect_backoff.next()
                reason = channel.close_reason
                if channel.close_code == CLOSE_POLICY:
                    # e.g. "credential revoked" after a reload, or replaced by a newer
                    # connection of the same sensor: say why, as for a refused handshake.
                    self._log_refusal("control", CLOSE_POLICY, reason or "policy", delay)
                else:
                    log.info("control_disconnected close_code=%s reason=%r retry_in_s=%.2f",
                             channel.close_code, reason, delay)
                await self._sleep_or_stop(delay)

    def _log_refusal(self, channel: str, status: int, reason: str, delay: float) -> None:
        """The server refused us: say why, once per reason and then every few minutes
        (``RefusalLog``), not on every retry."""
        note = self.refusals.record(channel, status, reason or "-", time.monotonic())
        if note is None:
            log.debug("server_refused channel=%s status=%d reason=%r retry_in_s=%.2f",
                      channel, status, reason, delay)
            return
        log.warning("server_refused channel=%s sensor_id=%s status=%d reason=%r "
                    "repeated=%d retry_in_s=%.2f hint=%r", channel, self.config.sensor_id,
                    status, note.reason, note.repeated, delay, note.hint)

    async def _connect(self) -> ControlChannel | None:
        """Connect, or None if ``stop()`` came first."""
        connecting = asyncio.ensure_future(self._control.connect())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if connecting.done():
            return connecting.result()
        connecting.cancel()
        try:
            channel = await connecting
        except (asyncio.CancelledError, ConnectionError, TimeoutError, OSError, AuthError):
            return None
        await self._close_quietly(channel.close(), "control_channel")
        return None

    async def _serve(self, channel: ControlChannel) -> None:
        """Run one connection until it closes or the agent stops."""
        self._channel = channel
        self.connected = True
        self.server_capabilities = ()
        self._set_frame_encoding(channel)
        self._nudge.clear()  # the heartbeat below reports whatever the nudges were about
        log.info("control_connected sensor_id=%s connects=%d", self.config.sensor_id,
                 self.connects)
        try:
            await self._send_heartbeat(channel)
        except ConnectionError as exc:
            log.info("control_send_failed error=%s", exc)
            return
        tasks = {asyncio.create_task(self._heartbeat_loop(channel), name="sensor-heartbeat"),
                 asyncio.create_task(self._receive_loop(channel), name="sensor-receive"),
                 asyncio.create_task(self._stop.wait(), name="sensor-stop-wait")}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, ConnectionError):
                log.info("control_send_failed error=%s", result)
            elif isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                log.error("control_task_failed error=%r", result, exc_info=result)

    async def _receive_loop(self, channel: ControlChannel) -> None:
        while True:
            try:
                envelope = await channel.receive()
            except ProtocolError as exc:
                self.bad_frames += 1
                log.warning("control_frame_rejected error=%s field=%s", exc.code, exc.field)
                continue
            if envelope is None:
                return
            try:
                await self._on_envelope(channel, envelope)
            except QueueError as exc:
                log.error("queue_operation_failed error=%s", exc)

    async def _on_envelope(self, channel: ControlChannel, envelope: Envelope) -> None:
        received_at = self._clock()
        if envelope.capabilities != self.server_capabilities:
            self.server_capabilities = tuple(envelope.capabilities)
            log.info("server_capabilities capabilities=%s",
                     ",".join(self.server_capabilities) or "-")
            self._set_frame_encoding(channel)
        if envelope.server_time is not None and CAP_SERVER_TIME in self.capabilities:
            self.skew.observe(envelope.server_time, received_at)
        body = envelope.body
        if isinstance(body, ChunkRequest):
            self.requests += 1
            self._spawn(self.sender.handle_request(body), name=f"request-{body.window_id}")
        elif isinstance(body, ChunkAck):
            # Its own task: deleting waits for a queue transaction, and the next frame may
            # be a chunk request that must not wait behind it.
            self._spawn(self.sender.handle_ack(body), name=f"ack-{body.window_id}")
        elif isinstance(body, Command):
            await self._answer_command(channel, body)
        elif isinstance(body, CommandResponse):
            log.info("command_response command_id=%s success=%s message=%s",
                     body.command_id, body.success, body.message[:200])
        else:
            log.info("control_body_ignored body_type=%s", envelope.body_type)

    async def _answer_command(self, channel: ControlChannel, command: Command) -> None:
        """``rotate_token`` (capability ``rotation``, sensor/credentials.py); any other
        command is answered unsupported instead of leaving the server waiting."""
        if command.name == ROTATE_COMMAND and self._both(CAP_ROTATION):
            reply = await asyncio.to_thread(apply_rotation, command,
                                            getattr(self.config, "token_file", "") or None)
            await channel.send(self._envelope(reply))
            return
        log.warning("command_unsupported command_id=%s name=%s", command.command_id,
                    command.name[:64])
        reply = CommandResponse(command_id=command.command_id, success=False,
                                message=f"unsupported command {command.name[:64]}")
        await channel.send(self._envelope(reply))

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_body(self) -> Heartbeat:
        """Built in a worker thread: it reads the queue."""
        depth = self.queue.queue_depth()
        stats: dict[str, int] = {}
        if self._both(CAP_HEARTBEAT_STATS):
            dropped = sum(v.get("chunks", 0) for v in self.queue.dropped_counts().values())
            stats = {"retry_total": self.retries, "dropped_total": dropped,
                     "quarantined_total": self.queue.quarantined_count()}
        return Heartbeat(software_version=self.config.software_version or SOFTWARE_VERSION,
                         last_committed_sequence=self.last_committed_sequence,
                         queue_depth=depth, clock_skew_ms=round(self.skew.skew_ms, 3),
                         **stats)

    async def _send_heartbeat(self, channel: ControlChannel) -> None:
        body = await asyncio.to_thread(self._heartbeat_body)
        await channel.send(self._envelope(body))
        self._last_heartbeat = time.monotonic()
        self.heartbeats += 1
        log.debug("heartbeat_sent queue_depth=%d last_committed_sequence=%d in_flight=%d",
                  body.queue_depth, body.last_committed_sequence,
                  self.dispatcher.in_flight_count())

    async def _heartbeat_loop(self, channel: ControlChannel) -> None:
        """Every ``heartbeat_interval``, plus rate-limited extra ones when there is
        unsent data the server may not know about yet."""
        interval = float(self.config.heartbeat_interval)
        while True:
            due_in = self._last_heartbeat + interval - time.monotonic()
            nudged = await self._wait_nudge(max(0.0, due_in))
            if nudged:
                pause = self._last_heartbeat + EXTRA_HEARTBEAT_MIN_INTERVAL_S - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                self._nudge.clear()
                try:
                    if not await self._has_unsent():
                        continue
                except QueueError as exc:
                    log.warning("queue_depth_failed error=%s", exc)
                    continue
            try:
                await self._send_heartbeat(channel)
            except QueueError as exc:
                log.warning("heartbeat_skipped error=%s", exc)
                self._last_heartbeat = time.monotonic()

    async def _wait_nudge(self, timeout: float) -> bool:
        return await wait_event(self._nudge, timeout)

    async def _has_unsent(self) -> bool:
        depth = await asyncio.to_thread(self.queue.queue_depth)
        return depth > self.dispatcher.in_flight_count()

    def _request_heartbeat(self) -> None:
        self._nudge.set()

    # ------------------------------------------------------------------ timers

    async def _tick_loop(self) -> None:
        last_prune = float("-inf")
        while True:
            try:
                await self._tick()
                self.heap.tick(self.deleted + self.sources.committer.requests,
                               self.dispatcher.in_flight_count())
                if time.monotonic() - last_prune >= PRUNE_INTERVAL_S:
                    last_prune = time.monotonic()
                    await asyncio.to_thread(self.queue.prune, self._clock())
                # A full disk clears by itself once deletes made room: put the reserve back.
                await asyncio.to_thread(self._restore_headroom)
            except QueueError as exc:
                log.warning("sensor_tick_failed error=%s", exc)
            await asyncio.sleep(TICK_S)

    def _restore_headroom(self) -> None:
        restore = getattr(self.queue, "restore_headroom", None)
        if restore is not None and getattr(self.queue, "disk_full", False):
            restore()

    async def _tick(self) -> None:
        released = self.dispatcher.on_tick(self._clock())
        if released:
            log.info("windows_released window_ids=%s", ",".join(released[:10]))
            self._request_heartbeat()
        last = await asyncio.to_thread(self.queue.last_sequence)
        if self._seen_last_sequence is not None and last > self._seen_last_sequence \
                and self.dispatcher.in_flight_count() == 0:
            self._request_heartbeat()
        self._seen_last_sequence = last

    # ------------------------------------------------------------------ helpers

    def _set_frame_encoding(self, channel: ControlChannel) -> None:
        """Binary (Protobuf) control frames: accepted once this agent announced ``proto``,
        sent once the server announced it too."""
        channel.use_proto(send=self._both(CAP_PROTO), receive=CAP_PROTO in self.capabilities)

    def _both(self, capability: str) -> bool:
        """Whether a capability is in use: announced by this agent and by the server."""
        return capability in self.capabilities and capability in self.server_capabilities

    def _envelope(self, body: Any) -> Envelope:
        return Envelope(sensor_id=self.config.sensor_id, sent_at=iso_utc(self._clock()),
                        body=body, capabilities=self.capabilities,
                        queue_epoch=self.queue.epoch if CAP_EPOCH in self.capabilities else None)

    async def _sleep_or_stop(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False if ``stop()`` was called meanwhile."""
        return not await wait_event(self._stop, delay)

    def _spawn(self, coro: Awaitable[Any], *, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._other_tasks.add(task)
        task.add_done_callback(self._other_tasks.discard)
        task.add_done_callback(log_task_failure)

    async def _start_submit_server(self) -> None:
        submit = getattr(self.config, "submit", None)
        listen = getattr(submit, "listen", None) if submit is not None else None
        if not listen:
            return
        from pipeline.sensor.submit import SubmitServer

        server = SubmitServer(self.queue, listen, on_enqueued=self.notify_enqueued,
                              max_bytes=getattr(submit, "max_bytes", None),
                              tracing=self.tracing, sensor_id=self.config.sensor_id)
        await server.start()
        self._submit_server = server

    async def _start_metrics_server(self) -> None:
        metrics = getattr(self.config, "metrics", None)
        listen = getattr(metrics, "listen", None) if metrics is not None else None
        if not listen:
            return
        register_task_gauge(self.registry, asyncio.get_running_loop())
        server = SensorMetricsServer(self.registry, listen)
        await server.start()
        self._metrics_server = server

    @staticmethod
    async def _close_quietly(closing: Awaitable[Any], what: str) -> None:
        try:
            await closing
        except (PipelineError, OSError, RuntimeError) as exc:
            log.warning("close_failed what=%s error=%s", what, exc)
