"""The remote-write forwarder's asyncio shell: reads each sensor's committed events after
its durable cursor, sends them in order through ``http.RemoteWriteClient`` and saves the
cursor after each decided send (``plan`` decides everything).

One task per sensor with events, at most ``max_parallel_sensors`` holding a slot (reading
and sending) at once, each for a bounded turn; a task wakes on ``notify`` (the post-commit
hook) or every ``poll_interval_s``. Store calls run
in the default thread pool. Delivery is at least once: a send answered 2xx whose cursor
save did not happen (SIGKILL in between) is sent again after a restart, which a Prometheus
receiver ignores (same series, timestamp and value). Retention still applies: events
pruned before they were forwarded (an outage longer than ``store.retention_hours``) are
gone, and the backlog gauge shows it coming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.common.backoff import Backoff
from pipeline.common.config import RemoteWriteForwardConfig
from pipeline.common.errors import PipelineError
from pipeline.server.forward.http import Answer, RemoteWriteClient
from pipeline.server.forward.plan import SensorOutbox
from pipeline.server.store.port import ChunkStore

log = logging.getLogger(__name__)

SINK = "remote_write"
PAGE_EVENTS = 8        # events decoded at a time per sensor (a remote-write event <= 1 MiB)
SENDS_PER_TURN = 32    # then the slot goes to the next sensor waiting
STORE_RETRY_S = 1.0


class ForwardMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.backlog = Gauge("pipeline_forward_backlog_events",
                             "Committed events the remote-write forwarder has not yet passed",
                             ["sensor_id"], registry=r)
        self.lag = Gauge("pipeline_forward_lag_seconds",
                         "Age of the oldest committed event not yet forwarded (0: caught up)",
                         ["sensor_id"], registry=r)
        self.sent = Counter("pipeline_forward_samples_sent_total",
                            "Samples the receiver accepted", ["sensor_id"], registry=r)
        self.failed = Counter("pipeline_forward_samples_failed_total",
                              "Samples the receiver rejected permanently (not retried)",
                              ["sensor_id"], registry=r)
        self.retries = Counter("pipeline_forward_retries_total",
                               "Sends answered with a retryable status or not at all",
                               ["sensor_id"], registry=r)


class Forwarder:
    def __init__(self, store: ChunkStore, config: RemoteWriteForwardConfig,
                 registry: CollectorRegistry, *,
                 client: RemoteWriteClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.metrics = ForwardMetrics(registry)
        self.client = client if client is not None else RemoteWriteClient(config)
        self._clock = clock
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(config.max_parallel_sensors)
        self._scanner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._scanner = asyncio.get_running_loop().create_task(self._scan(),
                                                               name="forward-scan")
        log.info("forward_started sink=%s url=%s", SINK, self.config.url)
        if self.config.tls.insecure_skip_verify:
            log.warning("forward_tls_unverified url=%s (forward.remote_write.tls."
                        "insecure_skip_verify is true: tests only)", self.config.url)

    def notify(self, sensor_id: str) -> None:
        """New events of ``sensor_id`` are committed (post-commit hook; loop thread)."""
        wake = self._wake.get(sensor_id)
        if wake is not None:
            wake.set()
        elif self._scanner is not None:
            self._ensure(sensor_id, 0)

    async def stop(self) -> None:
        scanner, self._scanner = self._scanner, None
        tasks = [t for t in (scanner, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self.client.close()

    async def _scan(self) -> None:
        """Start a task for every sensor with events (at start, then now and then)."""
        while True:
            try:
                cursors = await asyncio.to_thread(self.store.forward_cursors, SINK)
                sensors = await asyncio.to_thread(self.store.event_sensors)
                for sensor_id in sensors:
                    self._ensure(sensor_id, cursors.get(sensor_id, 0))
            except PipelineError as exc:
                log.warning("forward_scan_failed error=%s", exc.code)
            await asyncio.sleep(max(self.config.poll_interval_s * 10, 5.0))

    def _ensure(self, sensor_id: str, cursor: int) -> None:
        if sensor_id in self._tasks:
            return
        self._wake[sensor_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(sensor_id, cursor),
                                                      name=f"forward-{sensor_id}")
        self._tasks[sensor_id] = task
        task.add_done_callback(lambda done: self._ended(sensor_id, done))

    def _ended(self, sensor_id: str, task: asyncio.Task[None]) -> None:
        """A sensor's task that died (a bug, not a store or network error: those are
        retried inside) is forgotten, so the next scan starts it again from its cursor."""
        if self._tasks.get(sensor_id) is task:
            del self._tasks[sensor_id]
            self._wake.pop(sensor_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("forward_task_failed sensor_id=%s error=%r", sensor_id,
                      task.exception())

    async def _run(self, sensor_id: str, cursor: int) -> None:
        while cursor == 0:  # started by notify: the durable cursor may be further on
            try:
                cursor = (await asyncio.to_thread(self.store.forward_cursors, SINK)
                          ).get(sensor_id, -1)
            except PipelineError as exc:
                log.warning("forward_store_failed sensor_id=%s error=%s", sensor_id, exc.code)
                await asyncio.sleep(STORE_RETRY_S)
        cursor = max(cursor, 0)
        cfg = self.config
        outbox = SensorOutbox(sensor_id, cursor, samples_per_send=cfg.samples_per_send,
                              label=cfg.sensor_label,
                              backoff=Backoff(cfg.min_backoff_s, cfg.max_backoff_s, 0.2))
        wake = self._wake[sensor_id]
        while True:
            try:
                async with self._slots:
                    delay = await self._turn(outbox)
            except PipelineError as exc:
                log.warning("forward_store_failed sensor_id=%s error=%s", sensor_id, exc.code)
                outbox.release()
                delay = STORE_RETRY_S
            if delay is None:  # caught up: wait for new events
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), cfg.poll_interval_s)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(delay)

    async def _turn(self, outbox: SensorOutbox) -> float | None:
        """Up to ``SENDS_PER_TURN`` sends while holding a slot. None when caught up; else
        the delay before the next turn (0: others may go first). Whatever is still loaded
        at the end of a turn is released, so a sensor waiting for its turn, or for a
        receiver to come back, holds no decoded samples (memory stays bounded by
        ``max_parallel_sensors`` pages, whatever the fleet's backlog)."""
        sends = 0
        while sends < SENDS_PER_TURN or outbox.mid_event:  # a turn ends between events
            sends += 1
            if outbox.needs_events and not await self._fill(outbox):
                self._gauges(outbox, 0)
                return None
            delay = await self._send_head(outbox)
            if delay:
                outbox.release()
                return delay
        outbox.release()
        return 0.0

    async def _fill(self, outbox: SensorOutbox) -> bool:
        events = await asyncio.to_thread(self.store.events, outbox.sensor_id,
                                         after=outbox.read_after, limit=PAGE_EVENTS)
        for row_id, reason in outbox.load(events):
            log.warning("forward_event_unreadable sensor_id=%s row_id=%d reason=%s",
                        outbox.sensor_id, row_id, reason)
        if events:
            backlog = await asyncio.to_thread(self.store.events_after_count,
                                              outbox.sensor_id, outbox.cursor)
            self._gauges(outbox, backlog)
        return bool(events)

    def _gauges(self, outbox: SensorOutbox, backlog: int) -> None:
        oldest = outbox.oldest_completed_at()
        self.metrics.backlog.labels(outbox.sensor_id).set(backlog)
        self.metrics.lag.labels(outbox.sensor_id).set(
            0.0 if oldest is None else max(0.0, self._clock() - oldest))

    async def _send_head(self, outbox: SensorOutbox) -> float:
        """Send the head (an empty head is decided at once); the delay before going on."""
        send = outbox.head()
        assert send is not None
        answer = await self.client.send(send.series) if send.samples else Answer(200, "")
        decision = outbox.on_answer(answer.status)
        sensor_id = outbox.sensor_id
        if decision.retry_after is not None:
            self.metrics.retries.labels(sensor_id).inc()
            log.warning("forward_retry sensor_id=%s status=%s samples=%d delay_s=%.2f"
                        " reason=%r", sensor_id, answer.status, send.samples,
                        decision.retry_after, answer.reason[:200])
            return decision.retry_after
        if decision.sent:
            self.metrics.sent.labels(sensor_id).inc(decision.sent)
        if decision.failed:
            self.metrics.failed.labels(sensor_id).inc(decision.failed)
            log.error("forward_rejected sensor_id=%s status=%s samples=%d series=%s"
                      " reason=%r", sensor_id, answer.status, decision.failed,
                      dict(send.series[0].labels) if send.series else {},
                      answer.reason[:200])
        elif decision.rejected:
            log.info("forward_split sensor_id=%s status=%s samples=%d", sensor_id,
                     answer.status, send.samples)
        # A run of events that are not remote write saves the cursor once, at its end.
        if decision.cursor is not None and (send.samples or not _next_is_empty(outbox)):
            await asyncio.to_thread(self.store.save_forward_cursor, SINK, sensor_id,
                                    decision.cursor)
            if not outbox.pending:
                self._gauges(outbox, await asyncio.to_thread(
                    self.store.events_after_count, sensor_id, outbox.cursor))
        return 0.0


def _next_is_empty(outbox: SensorOutbox) -> bool:
    head = outbox.head()
    return head is not None and head.samples == 0
