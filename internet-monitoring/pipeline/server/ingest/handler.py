"""``POST /v1/ingest/chunk`` and ``POST /v1/ingest/batch``: one handler, one way through.

A single chunk is a batch of one. Every request goes the same way, never back::

    security: the gate admits the request once (token known, 401/403) before the body
    -> body within limits (413/408), its encoding (415)
    -> wire: decode (400; in a batch, a chunk that does not decode is refused in its place)
    -> the admission checks each decoded chunk's sensor (401/403) and charges its rate (429)
    -> group commit: ONE submission, durable on return -> the store's verdict (422/409)
    -> the answer: exactly the 1.0 ``IngestResult`` for a single chunk, ``results[i]`` for
       ``chunks[i]`` in a batch

Acks, snapshots and metrics for committed chunks come from the group committer's
post-commit hook, never before the commit. A single chunk's sender is charged before its
body is read when the token names it; a batch is charged for all its accepted chunks at
once (429 for the whole batch, nothing committed). Errors of a single chunk are raised
(the whole answer); a batch answers them in place. A 200 is sent only after the commit is
durable, so with capability ``http_ack`` the sensor deletes every chunk answered stored or
duplicate without waiting for a ``ChunkAck``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from aiohttp import web

from pipeline.common.errors import NotFound, PipelineError
from pipeline.common.messages import Chunk, IngestResult
from pipeline.common.tracing import traceparent_of, with_traceparent
from pipeline.server.ingest import wire
from pipeline.server.ingest.context import CONTEXT_KEY, IngestContext
from pipeline.server.security.gate import GATE_KEY, IngestAdmission, read_body

if TYPE_CHECKING:
    from pipeline.server.store import ChunkOutcome as CommitOutcome

log = logging.getLogger(__name__)


async def ingest_chunk(request: web.Request) -> web.Response:
    return await _ingest(request, batch=False)


async def ingest_batch(request: web.Request) -> web.Response:
    if not wire.batch_enabled():
        raise NotFound("batched ingest is not enabled on this server", field="path")
    return await _ingest(request, batch=True)


async def _ingest(request: web.Request, *, batch: bool) -> web.Response:
    received = time.time()
    ctx = request.app[CONTEXT_KEY]
    gate = request.app[GATE_KEY]
    admission = gate.admit_ingest(request)
    if not batch and admission.owner is not None:
        admission.charge(admission.owner)  # over-rate senders are refused before the body
    proto_allowed = wire.proto_enabled()
    request_proto = wire.request_is_proto(request, proto_allowed)
    body = await read_body(request, ctx.max_body_bytes, gate.body_timeout_s)
    answer_proto = wire.answer_in_proto(request, request_proto, proto_allowed)
    if not batch:
        chunk = wire.decode_one(body, request_proto)
        result = await _commit_one(ctx, admission, chunk, received)
        return wire.result_response(result, answer_proto)
    items = wire.decode_many(body, request_proto)
    results = await _commit_many(ctx, admission, items, received)
    return wire.batch_response(results, items, answer_proto)


def chunk_span_attributes(chunk: Chunk) -> dict[str, str | int]:
    return {"sensor_id": chunk.sensor_id, "event_id": chunk.event_id,
            "sequence": chunk.sequence, "window_id": chunk.window_id or ""}


def _result(outcome: CommitOutcome) -> IngestResult:
    return IngestResult(stored=outcome.stored, duplicate=outcome.duplicate,
                        sequence=outcome.sequence, event_id=outcome.event_id,
                        sensor_id=outcome.sensor_id, event_complete=outcome.event_complete,
                        last_committed_sequence=outcome.last_committed_sequence)


async def _commit_one(ctx: IngestContext, admission: IngestAdmission, chunk: Chunk,
                      received: float) -> IngestResult:
    """The batch of one: its errors are the whole answer."""
    tracing = ctx.tracing
    if tracing.enabled:
        with tracing.span("server.ingest", parent=traceparent_of(chunk.attributes),
                          attributes=chunk_span_attributes(chunk)):
            with tracing.span("server.verify"):
                _admit_one(admission, chunk)
            with tracing.span("server.commit") as commit_span:
                # The post-commit hook (ack, snapshot) continues the trace under this span.
                chunk = with_traceparent(chunk, commit_span.traceparent)
                (outcome,) = await ctx.committer.submit([chunk], received_at=received)
                _raise_refusal(chunk, outcome)
    else:
        _admit_one(admission, chunk)
        (outcome,) = await ctx.committer.submit([chunk], received_at=received)
        _raise_refusal(chunk, outcome)
    return _result(outcome)


def _admit_one(admission: IngestAdmission, chunk: Chunk) -> None:
    admission.authorize(chunk.sensor_id)
    if admission.owner is None:
        admission.charge(chunk.sensor_id)


def _raise_refusal(chunk: Chunk, outcome: CommitOutcome) -> None:
    if outcome.error is None:
        return
    log.info("chunk_rejected sensor_id=%s window_id=%s sequence=%d event_id=%s error=%s",
             chunk.sensor_id, chunk.window_id, chunk.sequence, chunk.event_id,
             outcome.error.code)
    raise outcome.error


async def _commit_many(ctx: IngestContext, admission: IngestAdmission,
                       items: Sequence[Chunk | PipelineError], received: float
                       ) -> list[wire.BatchItem]:
    """Each chunk answered in its place: decode errors, refused sensors, store verdicts."""
    results: list[wire.BatchItem | None] = [
        item if isinstance(item, PipelineError) else None for item in items]
    accepted = _authorized(admission, items, results)
    if accepted:
        charged = Counter(admission.owner or chunk.sensor_id for _, chunk in accepted)
        for sensor_id, count in charged.items():
            admission.charge(sensor_id, count)
        chunks = [chunk for _, chunk in accepted]
        first = chunks[0]
        # One span per batch; each chunk keeps its own traceparent, so the post-commit
        # spans (ack, snapshot) join the sensor's trace of that chunk.
        with ctx.tracing.span("server.ingest_batch", parent=traceparent_of(first.attributes),
                              attributes={"sensor_id": first.sensor_id,
                                          "chunks": len(chunks)}):
            outcomes = await ctx.committer.submit(chunks, received_at=received)
        for (index, _), outcome in zip(accepted, outcomes):
            results[index] = outcome.error if outcome.error is not None else _result(outcome)
    final = [r for r in results if r is not None]
    assert len(final) == len(items)
    _count_refusals(ctx, final, len(items))
    return final


def _authorized(admission: IngestAdmission, items: Sequence[Chunk | PipelineError],
                results: list[wire.BatchItem | None]) -> list[tuple[int, Chunk]]:
    """The decoded chunks whose sensor the caller may write for (each sensor checked
    once); the others get the refusal in their place."""
    accepted: list[tuple[int, Chunk]] = []
    refused: dict[str, PipelineError | None] = {}
    for index, item in enumerate(items):
        if not isinstance(item, Chunk):
            continue
        sensor_id = item.sensor_id
        if sensor_id not in refused:
            try:
                admission.authorize(sensor_id)
                refused[sensor_id] = None
            except PipelineError as exc:
                refused[sensor_id] = exc
        error = refused[sensor_id]
        if error is not None:
            results[index] = error
        else:
            accepted.append((index, item))
    return accepted


def _count_refusals(ctx: IngestContext, results: Sequence[wire.BatchItem], total: int) -> None:
    rejected = [r for r in results if isinstance(r, PipelineError)]
    for error in rejected:
        ctx.metrics.on_rejected(error.code)
    if rejected:
        log.info("batch_chunks_rejected chunks=%d rejected=%d first_error=%s", total,
                 len(rejected), rejected[0].code)
