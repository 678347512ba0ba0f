"""The sensor's send side: planned chunks to POSTs, confirmations to deletes.

``ChunkSender`` answers a ``chunk_request`` by POSTing the planned chunks (one per POST, or
as batches with capability ``batch``), applies ``chunk_ack``s and HTTP confirmations
(``http_ack``) by deleting from the queue, and counts what happened. What to do after each
POST attempt is decided by the sans-I/O ``pipeline.sensor.delivery.Delivery``; which
chunks to send and when a window is done by ``pipeline.sensor.dispatch.Dispatcher``. Queue
work always goes through ``asyncio.to_thread`` (SQLite blocks).

Runbook name: ``ChunkSender.send_chunk_with_backoff`` is the successor of
``SensorAgent._send_chunk_with_backoff`` (one send loop for single and batch POSTs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from pipeline.common.aio import wait_event
from pipeline.common.errors import QueueError
from pipeline.common.messages import (
    CAP_BATCH,
    CAP_EPOCH,
    CAP_HTTP_ACK,
    CAP_PROTO,
    Chunk,
    ChunkAck,
    ChunkRequest,
)
from pipeline.common.tracing import Tracing, traceparent_of, with_traceparent
from pipeline.sensor.batching import RecentlyDeleted, split_batches
from pipeline.sensor.delivery import (
    CAUSE_NETWORK,
    CAUSE_REFUSED,
    CAUSE_STATUS,
    Action,
    Answered,
    AttemptAnswer,
    Delivery,
    DeliveryPolicy,
    FallBackToSingles,
    Quarantined,
    Retry,
    Split,
)
from pipeline.sensor.dispatch import Dispatcher
from pipeline.sensor.refusals import RefusalLog
from pipeline.sensor.time_sync import ClockSkewEstimator
from pipeline.sensor.transports import IngestTransport

if TYPE_CHECKING:
    from pipeline.sensor.queue import DurableQueue, QueuedChunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentLinks:
    """What the sender asks of the agent around it."""

    #: Whether a capability is in use (announced by both sides on this connection).
    both: Callable[[str], bool]
    #: Ask for a heartbeat soon (the window is done, or it was reset).
    request_heartbeat: Callable[[], None]
    #: Report a refused credential: (channel, status, reason, retry delay).
    log_refusal: Callable[[str, int, str, float], None]


class ChunkSender:
    """POSTs planned chunks and deletes confirmed ones, for one agent.

    Counters (read by the agent's stats and metrics): ``posted`` (chunks answered 2xx),
    ``acked`` (sequences confirmed durable), ``deleted`` (rows removed), ``retries`` (chunk
    POSTs repeated), ``quarantined``, ``abandoned`` (given back to the queue on shutdown),
    ``last_committed_sequence``.
    """

    def __init__(self, queue: DurableQueue, ingest: IngestTransport, dispatcher: Dispatcher,
                 *, sensor_id: str, policy: DeliveryPolicy, max_parallel: int,
                 tracing: Tracing, skew: ClockSkewEstimator, refusals: RefusalLog,
                 stop: asyncio.Event, links: AgentLinks,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.dispatcher = dispatcher
        self._ingest = ingest
        self._sensor_id = sensor_id
        self._policy = policy
        self._semaphore = asyncio.Semaphore(max(1, max_parallel))
        #: Sends holding their chunks in memory: a window's batches load their payloads
        #: only when one of these is free, not all at once while waiting for a POST slot.
        self._holding = asyncio.Semaphore(max(1, max_parallel))
        self._tracing = tracing
        self._skew = skew
        self._refusals = refusals
        self._stop = stop
        self._links = links
        self._clock = clock
        self._plan_lock = asyncio.Lock()
        self._send_tasks: set[asyncio.Task[Any]] = set()
        self._deleting: set[int] = set()
        self._http_deleted = RecentlyDeleted()
        self.last_committed_sequence = 0
        self.posted = 0
        self.acked = 0
        self.deleted = 0
        self.retries = 0
        self.quarantined = 0
        self.abandoned = 0

    # ------------------------------------------------------------------ windows and acks

    async def handle_request(self, request: ChunkRequest) -> None:
        async with self._plan_lock:
            limit = self.dispatcher.candidate_limit(request)
            try:
                candidates = await asyncio.to_thread(self.queue.list_after,
                                                     request.since_sequence, limit)
            except QueueError as exc:
                log.error("chunk_request_failed window_id=%s error=%s", request.window_id, exc)
                return
            if self._deleting:
                # Confirmed and being deleted right now: not worth sending again.
                candidates = [c for c in candidates if c.sequence not in self._deleting]
            plan = self.dispatcher.on_request(request, candidates, self._clock())
        log.debug("chunk_request window_id=%s since_sequence=%d max_chunks=%d planned=%d",
                  request.window_id, request.since_sequence, request.max_chunks,
                  len(plan.sequences))
        if self._links.both(CAP_BATCH) and plan.sequences:
            sizes = {c.sequence: c.nbytes for c in candidates}
            for group in split_batches(plan.sequences, sizes):
                self._spawn(self.send_chunk_with_backoff(group, plan.window_id, batch=True),
                            name=f"send-batch-{group[0]}")
            return
        for sequence in plan.sequences:
            self._spawn(self.send_chunk_with_backoff((sequence,), plan.window_id),
                        name=f"send-{sequence}")

    async def handle_ack(self, ack: ChunkAck) -> None:
        sequences = self.dispatcher.on_ack(ack, self._clock())
        log.debug("chunk_ack window_id=%s committed=%d reset_window=%s", ack.window_id,
                  len(sequences), ack.reset_window)
        # Already deleted on their HTTP answer (http_ack): no second transaction for them.
        sequences = tuple(s for s in sequences if s not in self._http_deleted)
        if sequences:
            try:
                await self._delete_confirmed(sequences)
            except QueueError as exc:
                log.error("queue_operation_failed error=%s", exc)
        if ack.reset_window:
            self._links.request_heartbeat()

    async def _delete_confirmed(self, sequences: Iterable[int], *, http: bool = False) -> None:
        """Delete chunks the server holds durably (``http``: confirmed by the HTTP answer)."""
        seqs = sorted(set(sequences))
        self._deleting.update(seqs)
        try:
            deleted = await asyncio.to_thread(self.queue.delete, seqs)
        finally:
            self._deleting.difference_update(seqs)
        if http:
            self._http_deleted.add(seqs)
        self.acked += len(seqs)
        self.deleted += deleted
        self.last_committed_sequence = max(self.last_committed_sequence, seqs[-1])

    # ------------------------------------------------------------------ sending

    async def send_chunk_with_backoff(self, sequences: tuple[int, ...], window_id: str, *,
                                      batch: bool = False) -> str:
        """POST planned chunks until each is delivered, rejected for good, acked meanwhile,
        or the agent stops: one chunk per POST, or together as batches (capability
        ``batch``). The rules (retry, Retry-After, quarantine, halving, fallback to single
        POSTs) are ``pipeline.sensor.delivery.Delivery``'s; this loop carries them out.
        Returns how the send ended: ``done``, ``gone`` (no longer queued) or ``abandoned``.

        Runbook name: operators grep logs and tracebacks for it.
        """
        try:
            await self._holding.acquire()
        except asyncio.CancelledError:
            self._abandon_all(sequences)
            raise
        try:
            return await self._load_and_send(sequences, window_id, batch=batch)
        finally:
            self._holding.release()

    async def _load_and_send(self, sequences: tuple[int, ...], window_id: str, *,
                             batch: bool) -> str:
        chunks = await self._load_chunks(sequences, window_id)
        if chunks is None:
            return "abandoned"
        if not chunks:
            return "gone"
        delivery = Delivery(tuple(chunks), self._policy, batch=batch)
        try:
            while delivery.keep_only(self.dispatcher.in_flight):
                if self._stop.is_set():
                    break
                posting = [chunks[s] for s in delivery.pending]
                try:
                    answer = await self._post(posting, batch=batch)
                except (ConnectionError, TimeoutError, OSError) as exc:
                    actions = delivery.on_network_error()
                    failure: str | None = str(exc)
                else:
                    actions = delivery.on_answer(answer)
                    failure = None
                delay = await self._carry_out(actions, posting, window_id, batch=batch,
                                              failure=failure)
                if delay is None:
                    return "done"
                if not await self._sleep_or_stop(delay):
                    break
        except asyncio.CancelledError:
            self._abandon_all(delivery.pending)
            raise
        self._abandon_all(delivery.pending)
        return "abandoned" if delivery.pending else "done"

    async def _load_chunks(self, sequences: tuple[int, ...], window_id: str
                           ) -> dict[int, Chunk] | None:
        """The planned chunks still queued, by sequence; None if the queue failed."""
        try:
            rows = await asyncio.to_thread(self.queue.get, list(sequences))
        except QueueError as exc:
            log.error("chunk_load_failed sequences=%s error=%s", list(sequences)[:10], exc)
            self._abandon_all(sequences)
            return None
        found = {row.sequence for row in rows}
        gone = [s for s in sequences if s not in found]
        if gone:
            self.dispatcher.on_deleted_elsewhere(gone)
        return {row.sequence: self._build_chunk(row, window_id) for row in rows}

    async def _post(self, chunks: list[Chunk], *, batch: bool) -> AttemptAnswer:
        """One POST attempt (bounded by the POST semaphore, one span per attempt)."""
        proto = self._links.both(CAP_PROTO)
        async with self._semaphore:
            if batch:
                with self._tracing.span("sensor.post_batch",
                                        parent=traceparent_of(chunks[0].attributes),
                                        attributes={"sensor_id": self._sensor_id,
                                                    "window_id": chunks[0].window_id,
                                                    "chunks": len(chunks)}) as span:
                    answer = await self._ingest.post_batch(chunks, proto=proto)
                    span.set_attribute("http.status", answer.status)
                return AttemptAnswer(answer.status, answer.outcomes, answer.retry_after,
                                     answer.error_code, answer.error_message)
            chunk = chunks[0]
            # The chunk carries this attempt's span as its traceparent.
            with self._tracing.span("sensor.post_chunk",
                                    parent=traceparent_of(chunk.attributes),
                                    attributes=_span_attributes(chunk)) as span:
                traced = with_traceparent(chunk, span.traceparent)
                if proto:
                    single = await self._ingest.post_chunk(traced, proto=True)
                else:
                    single = await self._ingest.post_chunk(traced)
                span.set_attribute("http.status", single.status)
            return AttemptAnswer(single.status, (single.result,), single.retry_after,
                                 single.error_code, single.error_message)

    async def _carry_out(self, actions: list[Action], posted: list[Chunk], window_id: str, *,
                         batch: bool, failure: str | None) -> float | None:
        """Apply the core's actions; the delay before the next attempt, None when done."""
        for action in actions:
            if isinstance(action, Answered):
                await self._on_answered(action, window_id)
            elif isinstance(action, Split):
                self._spawn(self.send_chunk_with_backoff(action.rest, window_id, batch=True),
                            name=f"send-batch-{action.rest[0]}")
            elif isinstance(action, FallBackToSingles):
                log.warning("batch_refused chunks=%d window_id=%s status=%d error=%s "
                            "action=one_post_per_chunk", len(posted), window_id,
                            action.status, action.error_code or "-")
                for sequence in action.sequences:
                    self._spawn(self.send_chunk_with_backoff((sequence,), window_id),
                                name=f"send-{sequence}")
            elif isinstance(action, Retry):
                self._log_retry(action, posted, window_id, batch=batch, failure=failure)
                self.retries += action.count
                return action.delay
        return None

    async def _on_answered(self, answered: Answered, window_id: str) -> None:
        """Quarantine the rejected chunks, count and delete the delivered ones."""
        if answered.accepted:
            self._refusals.clear("ingest")
        now = self._clock()
        http_ack = self._links.both(CAP_HTTP_ACK)
        to_delete: list[int] = []
        for verdict in answered.verdicts:
            if isinstance(verdict, Quarantined):
                await self._quarantine(verdict, window_id)
                continue
            self.posted += 1
            to_delete.extend(self.dispatcher.on_post_delivered(
                verdict.sequence, now, http_ack=verdict.confirmed and http_ack))
        if to_delete:
            try:
                await self._delete_confirmed(to_delete, http=True)
            except QueueError as exc:
                log.error("queue_delete_failed sequences=%d error=%s", len(to_delete), exc)
        self._after_post(window_id)

    def _log_retry(self, retry: Retry, posted: list[Chunk], window_id: str, *,
                   batch: bool, failure: str | None) -> None:
        kind, subject = ("batch", f"chunks={len(posted)}") if batch else (
            "chunk", f"sequence={posted[0].sequence}")
        if retry.cause == CAUSE_NETWORK:
            log.info("%s_post_failed %s window_id=%s attempt=%d error=%s retry_in_s=%.2f",
                     kind, subject, window_id, retry.attempt, failure, retry.delay)
        elif retry.cause == CAUSE_REFUSED:
            self._links.log_refusal("ingest", retry.status, retry.error_message, retry.delay)
        elif retry.cause == CAUSE_STATUS:
            log.info("%s_post_retry %s window_id=%s attempt=%d status=%d error=%s "
                     "retry_in_s=%.2f", kind, subject, window_id, retry.attempt,
                     retry.status, retry.error_code or "-", retry.delay)

    async def _quarantine(self, verdict: Quarantined, window_id: str) -> None:
        try:
            moved = await asyncio.to_thread(self.queue.quarantine, verdict.sequence,
                                            verdict.reason)
        except QueueError as exc:
            log.error("quarantine_failed sequence=%d error=%s", verdict.sequence, exc)
            moved = False
        self.dispatcher.on_post_rejected(verdict.sequence)
        if moved:
            self.quarantined += 1
        log.warning("chunk_quarantined sequence=%d window_id=%s status=%d error=%s message=%r",
                    verdict.sequence, window_id, verdict.status, verdict.code or "-",
                    verdict.message[:200])

    def _build_chunk(self, row: QueuedChunk, window_id: str) -> Chunk:
        return row.to_wire(self._sensor_id, window_id,
                           queue_epoch=self.queue.epoch if self._links.both(CAP_EPOCH) else "",
                           clock_skew_ms=round(self._skew.skew_ms, 3))

    def _after_post(self, window_id: str) -> None:
        """When the window has nothing left posting, ask for the next one now (the
        heartbeat goes out only if unsent chunks remain)."""
        if not any(item.window_id == window_id and item.posting
                   for item in self.dispatcher.in_flight.values()):
            self._links.request_heartbeat()

    def _abandon_all(self, sequences: Iterable[int]) -> None:
        """Give chunks back to the queue (offered again in a later window)."""
        for sequence in sequences:
            if sequence in self.dispatcher.in_flight:
                self.abandoned += 1
            self.dispatcher.on_post_abandoned(sequence)

    async def finish(self, grace_s: float) -> None:
        """Let running POSTs finish for ``shutdown_grace_s``, then cancel them (their
        chunks stay queued and are offered again after the restart)."""
        pending = {t for t in self._send_tasks if not t.done()}
        if pending:
            log.info("sensor_agent_draining in_flight_posts=%d grace_s=%.1f", len(pending),
                     grace_s)
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._send_tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], *, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._send_tasks.add(task)
        task.add_done_callback(self._send_tasks.discard)
        task.add_done_callback(log_task_failure)

    async def _sleep_or_stop(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False if the agent was asked to stop meanwhile."""
        return not await wait_event(self._stop, delay)


def _span_attributes(chunk: Chunk) -> dict[str, str | int]:
    return {"sensor_id": chunk.sensor_id, "event_id": chunk.event_id,
            "sequence": chunk.sequence, "window_id": chunk.window_id}


def log_task_failure(task: asyncio.Task[Any]) -> None:
    """Done callback: log a task's unexpected exception (cancellation is not one)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("sensor_task_failed task=%s error=%r", task.get_name(), error,
                  exc_info=error)
