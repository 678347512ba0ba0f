"""``POST /v1/ingest/batch`` (capability ``batch``): several chunks, answered chunk by chunk.

Order: the same admission as a single chunk (token known, 401/403, before the body) ->
body (413/408) -> the batch is decoded chunk by chunk: a body that is no batch at all is a
400 for the whole request, a chunk that does not decode is refused in its place -> every
decoded chunk's sensor must be the caller's identity (refused in its place, 403) -> the
sender's chunk rate is charged for the whole batch (429 for the whole batch, nothing
committed) -> ONE group-commit submission for all accepted chunks (one transaction, or a
share of one with concurrent requests) -> 200 with ``results[i]`` answering ``chunks[i]``:
the 1.0 ``IngestResult`` (stored / duplicate) or ``{"error", "message", "field",
"sequence"}``.

A 200 is sent only after the commit is durable, so with capability ``http_ack`` the sensor
deletes every chunk answered stored or duplicate without waiting for a ``ChunkAck``.
"""

from __future__ import annotations

import logging
from collections import Counter

from aiohttp import web

from pipeline.common.errors import NotFound, PipelineError
from pipeline.common.messages import Chunk, IngestResult
from pipeline.common.tracing import traceparent_of
from pipeline.server.ingest import wire as ingest_wire
from pipeline.server.security.gate import read_body
from pipeline.server.ingest.listener import CONTEXT_KEY, admit_ingest, authorize_chunk_sensor

log = logging.getLogger(__name__)


async def ingest_batch(request: web.Request) -> web.Response:
    if not ingest_wire.batch_enabled():
        raise NotFound("batched ingest is not enabled on this server", field="path")
    ctx = request.app[CONTEXT_KEY]
    admission = admit_ingest(request, ctx)
    gate = admission.gate
    proto_allowed = ingest_wire.proto_enabled()
    request_proto = ingest_wire.request_is_proto(request, proto_allowed)
    body = await read_body(request, ctx.max_body_bytes,
                           gate.body_timeout_s if gate is not None else None)
    items = ingest_wire.decode_many(body, request_proto)
    results: list[ingest_wire.BatchItem | None] = [
        item if isinstance(item, PipelineError) else None for item in items]
    accepted: list[tuple[int, Chunk]] = []
    refused: dict[str, PipelineError | None] = {}
    for index, item in enumerate(items):
        if not isinstance(item, Chunk):
            continue
        sensor_id = item.sensor_id
        if sensor_id not in refused:
            try:
                authorize_chunk_sensor(request, ctx, admission, sensor_id)
                refused[sensor_id] = None
            except PipelineError as exc:
                refused[sensor_id] = exc
        error = refused[sensor_id]
        if error is not None:
            results[index] = error
        else:
            accepted.append((index, item))
    if gate is not None and accepted:
        charged = Counter(admission.owner or chunk.sensor_id for _, chunk in accepted)
        for sensor_id, count in charged.items():
            gate.throttle_chunks(sensor_id, count)
    if accepted:
        chunks = [chunk for _, chunk in accepted]
        first = chunks[0]
        # One span per batch; each chunk keeps its own traceparent, so the post-commit
        # spans (ack, snapshot) join the sensor's trace of that chunk.
        with ctx.tracing.span("server.ingest_batch", parent=traceparent_of(first.attributes),
                              attributes={"sensor_id": first.sensor_id,
                                          "chunks": len(chunks)}):
            outcomes = await ctx.committer.submit(chunks, received_at=admission.received)
        for (index, chunk), outcome in zip(accepted, outcomes):
            if outcome.error is not None:
                results[index] = outcome.error
                continue
            results[index] = IngestResult(
                stored=outcome.stored, duplicate=outcome.duplicate, sequence=outcome.sequence,
                event_id=outcome.event_id, sensor_id=outcome.sensor_id,
                event_complete=outcome.event_complete,
                last_committed_sequence=outcome.last_committed_sequence)
    rejected = [r for r in results if isinstance(r, PipelineError)]
    for error in rejected:
        ctx.metrics.on_rejected(error.code)
    if rejected:
        log.info("batch_chunks_rejected chunks=%d rejected=%d first_error=%s", len(items),
                 len(rejected), rejected[0].code)
    final = [r for r in results if r is not None]
    assert len(final) == len(items)
    proto = ingest_wire.answer_in_proto(request, request_proto, proto_allowed)
    return ingest_wire.batch_response(final, items, proto)
