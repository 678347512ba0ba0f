"""Body encodings of the ingest listener: JSON 1.0, Protobuf, and batches (pure helpers).

Capability ``proto``: a chunk body may be ``application/x-protobuf`` (``data.proto``
``Chunk``) on the same ``POST /v1/ingest/chunk``; the request's ``Content-Type`` says
which. Capability ``batch``: ``POST /v1/ingest/batch`` takes ``{"chunks": [...]}`` (JSON)
or a ``ChunkBatch`` (Protobuf) and answers every chunk in order (``handler.py``).

The answer's encoding follows ``Accept``: ``application/x-protobuf`` or
``application/json`` when the client names one (a ``q=0`` entry refuses it), else the
request's own encoding. A 1.0 sensor sends JSON without ``Accept`` and gets exactly the
1.0 answer. Error answers (non-2xx) are always the JSON error body, whatever the request
encoding, so every client reads them the same way.

A server that does not announce ``proto`` refuses Protobuf bodies with 415, so a peer
that sends one anyway learns it at once instead of having it half-read.
"""

from __future__ import annotations

from typing import Any, Sequence

from aiohttp import web

from pipeline.common import capabilities
from pipeline.common.batch import (
    ChunkRejection,
    batch_result_to_json,
    decode_batch_lenient,
)
from pipeline.common.errors import PipelineError, ProtocolError, UnsupportedMediaType
from pipeline.common.messages import (
    CAP_BATCH,
    CAP_PROTO,
    Chunk,
    IngestResult,
    decode_chunk,
    ingest_result_to_json,
)
from pipeline.common.proto_codec import (
    PROTO_CONTENT_TYPE,
    decode_batch_proto_lenient,
    decode_chunk_proto,
    encode_batch_result_proto,
    encode_ingest_result_proto,
)

JSON_CONTENT_TYPE = "application/json"
INGEST_PATH = "/v1/ingest/chunk"
BATCH_PATH = "/v1/ingest/batch"

BatchItem = IngestResult | ChunkRejection | PipelineError


def _announced(capability: str) -> bool:
    # Read at call time (tests narrow the list).
    return capability in capabilities.SERVER_CAPABILITIES


def proto_enabled() -> bool:
    return _announced(CAP_PROTO)


def batch_enabled() -> bool:
    return _announced(CAP_BATCH)


def request_is_proto(request: web.Request, proto_allowed: bool) -> bool:
    """Whether the body is Protobuf; a missing Content-Type means JSON (1.0 sensors)."""
    if request.headers.get("Content-Type") is None:
        return False
    kind = request.content_type
    if kind == JSON_CONTENT_TYPE:
        return False
    if kind == PROTO_CONTENT_TYPE and proto_allowed:
        return True
    accepted = JSON_CONTENT_TYPE + (f" or {PROTO_CONTENT_TYPE}" if proto_allowed else "")
    raise UnsupportedMediaType(f"Content-Type must be {accepted}", field="Content-Type")


def _accept_q(accept: str, media_type: str) -> float | None:
    """The q value ``accept`` gives ``media_type`` exactly (None when not listed)."""
    for item in accept.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() != media_type:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        return q
    return None


def answer_in_proto(request: web.Request, request_proto: bool, proto_allowed: bool) -> bool:
    """Accept negotiation for a 200 answer (see the module docstring)."""
    if not proto_allowed:
        return False
    accept = request.headers.get("Accept")
    if not accept:
        return request_proto
    proto_q = _accept_q(accept, PROTO_CONTENT_TYPE)
    json_q = _accept_q(accept, JSON_CONTENT_TYPE)
    if proto_q == 0:
        return False
    if json_q == 0:
        return True
    if proto_q is None:
        return request_proto if json_q is None else False
    if json_q is None:
        return True
    return proto_q > json_q or (proto_q == json_q and request_proto)


def decode_one(body: bytes, proto: bool) -> Chunk:
    return decode_chunk_proto(body) if proto else decode_chunk(body)


def decode_many(body: bytes, proto: bool) -> list[Chunk | ProtocolError]:
    """Each chunk decoded on its own (its error in its place); a body that is not a batch
    at all raises ``ProtocolError``."""
    return decode_batch_proto_lenient(body) if proto else decode_batch_lenient(body)


def result_response(result: IngestResult, proto: bool) -> web.Response:
    if proto:
        return web.Response(body=encode_ingest_result_proto(result),
                            content_type=PROTO_CONTENT_TYPE)
    return web.json_response(ingest_result_to_json(result))


def batch_response(results: Sequence[BatchItem], items: Sequence[Any], proto: bool
                   ) -> web.Response:
    """``results[i]`` answers ``items[i]`` (a decoded chunk or its decode error)."""
    if proto:
        return web.Response(body=encode_batch_result_proto(results, items),
                            content_type=PROTO_CONTENT_TYPE)
    return web.json_response(batch_result_to_json(results, items))
