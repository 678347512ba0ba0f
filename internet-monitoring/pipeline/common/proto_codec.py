"""Protobuf codec (capability ``proto``) for the wire dataclasses of ``messages``.

The ``.proto`` field names equal the JSON keys and the dataclass fields. Decoding turns a
parsed message into the very dict shape the JSON codec reads and hands it to the JSON
decoders, so both encodings enforce one set of rules (schema major, identifiers, ranges,
limits) and give equal dataclasses. Only bytes fields differ: they travel raw, so the
hashes are base64-encoded for the shared readers (32 bytes, cheap) and the payload, which
may be 1 MiB, bypasses base64 and is size-checked against the same limit.

Library errors are translated at the boundary: ``DecodeError`` -> ``ProtocolError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, TypeVar

from google.protobuf.message import DecodeError, Message

from pipeline.common.batch import (
    BatchOutcome,
    ChunkRejection,
    batch_outcomes,
    check_batch_size,
    check_results_size,
    first_error,
    in_batch,
    log_rejections,
    outcome_from_json,
)
from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    MissingField,
    PayloadTooLarge,
    PipelineError,
    ProtocolError,
)
from pipeline.common.messages import (
    MAX_PAYLOAD_BYTES,
    Body,
    Chunk,
    Envelope,
    IngestResult,
    b64,
    chunk_from_json,
    chunk_if_plain,
    envelope_from_json,
)
from pipeline.proto import control_pb2, data_pb2

PROTO_CONTENT_TYPE = "application/x-protobuf"

M = TypeVar("M", bound=Message)


# ---------------------------------------------------------------------------------------
# Generic helpers: dataclass -> message, message -> JSON-shaped dict


def _parse(message_cls: type[M], data: bytes, what: str) -> M:
    message = message_cls()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"{what} is not a valid Protobuf message") from exc
    return message


def _is_map(descriptor: Any) -> bool:
    return descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry


def _fill(message: Message, obj: Any) -> None:
    """Copy every dataclass field of ``obj`` into ``message``; ``None`` means absent."""
    fields_by_name = message.DESCRIPTOR.fields_by_name
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        descriptor = fields_by_name[f.name]
        try:
            if _is_map(descriptor):
                getattr(message, f.name).update(value)
            elif descriptor.is_repeated:
                getattr(message, f.name).extend(value)
            else:
                setattr(message, f.name, value)
        except TypeError as exc:
            raise FieldTypeError(f"field {f.name} cannot be encoded", field=f.name) from exc
        except ValueError as exc:  # out of range, lone surrogate
            raise FieldValueError(f"field {f.name} cannot be encoded", field=f.name) from exc


def _to_doc(message: Message) -> dict[str, Any]:
    """The JSON-shaped dict of a flat message; unset ``optional`` fields are left out."""
    doc: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        name = descriptor.name
        if descriptor.has_presence and not message.HasField(name):
            continue
        value = getattr(message, name)
        if _is_map(descriptor):
            value = dict(value)
        elif descriptor.is_repeated:
            value = list(value)
        doc[name] = value
    return doc


# ---------------------------------------------------------------------------------------
# Envelope


def _envelope_message(env: Envelope) -> control_pb2.Envelope:
    message = control_pb2.Envelope()
    try:
        message.schema_version = env.schema_version
        message.sensor_id = env.sensor_id
        message.sent_at = env.sent_at
        message.capabilities.extend(env.capabilities)
        if env.queue_epoch is not None:
            message.queue_epoch = env.queue_epoch
        if env.server_time is not None:
            message.server_time = env.server_time
    except (TypeError, ValueError) as exc:
        raise FieldValueError("envelope cannot be encoded", field="envelope") from exc
    body: Body = env.body
    body_message = getattr(message, body.BODY_TYPE)
    body_message.SetInParent()  # an all-default body must still select the oneof
    _fill(body_message, body)
    return message


def encode_envelope_proto(env: Envelope) -> bytes:
    return _envelope_message(env).SerializeToString()


def decode_envelope_proto(data: bytes) -> Envelope:
    message = _parse(control_pb2.Envelope, data, "envelope")
    doc = _to_doc(message)  # oneof members are message fields: dropped below, kept if set
    body_type = message.WhichOneof("body")
    for descriptor in message.DESCRIPTOR.oneofs_by_name["body"].fields:
        doc.pop(descriptor.name, None)
    if body_type is not None:
        doc["body_type"] = body_type
        doc["body"] = _to_doc(getattr(message, body_type))
    try:
        return envelope_from_json(doc)
    except MissingField as exc:
        if exc.field == "body_type":  # proto has no body_type: the oneof is the body
            raise MissingField("envelope has no body of a known type", field="body") from exc
        raise


# ---------------------------------------------------------------------------------------
# Chunk


def _chunk_from_message(message: data_pb2.Chunk) -> Chunk:
    m = message
    fast = chunk_if_plain(m.schema_version, m.sensor_id, m.event_id, m.sequence, m.chunk_index,
                          m.chunk_count, m.compression, m.payload, m.chunk_sha256,
                          m.event_sha256, m.created_at, m.logical_timestamp_ms,
                          m.clock_skew_ms, dict(m.attributes), m.queue_epoch)
    return fast if fast is not None else _chunk_from_message_strict(message)


def _chunk_from_message_strict(message: data_pb2.Chunk) -> Chunk:
    """Through the JSON reader, so both encodings share every rule and error."""
    doc = _to_doc(message)
    payload: bytes = doc["payload"]
    doc["payload"] = ""  # raw bytes need no base64 round trip; size checked below
    doc["chunk_sha256"] = b64(doc["chunk_sha256"])
    doc["event_sha256"] = b64(doc["event_sha256"])
    if not doc["queue_epoch"]:
        del doc["queue_epoch"]  # proto3 "" = absent, which JSON spells by leaving it out
    chunk = chunk_from_json(doc)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"field payload is larger than {MAX_PAYLOAD_BYTES} bytes",
                              field="payload")
    return dataclasses.replace(chunk, payload=payload)


def _fill_chunk(message: data_pb2.Chunk, chunk: Chunk) -> None:
    """Field by field (the generic ``_fill`` walks descriptors, three times slower); on a
    value Protobuf cannot take, the generic path runs again to name the field."""
    try:
        message.schema_version = chunk.schema_version
        message.sensor_id = chunk.sensor_id
        message.event_id = chunk.event_id
        message.sequence = chunk.sequence
        message.chunk_index = chunk.chunk_index
        message.chunk_count = chunk.chunk_count
        message.compression = chunk.compression
        message.payload = chunk.payload
        message.chunk_sha256 = chunk.chunk_sha256
        message.event_sha256 = chunk.event_sha256
        message.created_at = chunk.created_at
        message.logical_timestamp_ms = chunk.logical_timestamp_ms
        message.clock_skew_ms = chunk.clock_skew_ms
        message.attributes.update(chunk.attributes)
        message.queue_epoch = chunk.queue_epoch
    except (TypeError, ValueError):
        message.Clear()
        _fill(message, chunk)


def encode_chunk_proto(chunk: Chunk) -> bytes:
    message = data_pb2.Chunk()
    _fill_chunk(message, chunk)
    return message.SerializeToString()


def decode_chunk_proto(data: bytes) -> Chunk:
    return _chunk_from_message(_parse(data_pb2.Chunk, data, "chunk"))


# ---------------------------------------------------------------------------------------
# Batch of chunks


def encode_batch_proto(chunks: Sequence[Chunk]) -> bytes:
    batch = data_pb2.ChunkBatch()
    for chunk in chunks:
        _fill_chunk(batch.chunks.add(), chunk)
    return batch.SerializeToString()


def _frame_to_chunk(frame: bytes) -> Chunk | ProtocolError:
    try:
        return decode_chunk_proto(frame)
    except ProtocolError as exc:
        return exc


def decode_batch_proto_lenient(data: bytes) -> list[Chunk | ProtocolError]:
    """Each chunk parsed and validated on its own; its error is returned in its place.

    The body is read as ``ChunkBatchFrames`` (wire-identical to ``ChunkBatch``) so that even
    a chunk that does not parse, e.g. with invalid UTF-8, spoils only itself. A body that
    does not parse at all, or holds no chunk or too many, raises ``ProtocolError``.
    """
    frames = _parse(data_pb2.ChunkBatchFrames, data, "chunk batch")
    check_batch_size(len(frames.chunks))
    decoded = [_frame_to_chunk(frame) for frame in frames.chunks]
    log_rejections(decoded)
    return decoded


def decode_batch_proto(data: bytes) -> list[Chunk]:
    """Strict: the first bad chunk fails the batch, its field named ``chunks[i].<field>``."""
    items = decode_batch_proto_lenient(data)
    first_error(items)
    return [item for item in items if isinstance(item, Chunk)]


# ---------------------------------------------------------------------------------------
# Batch answer


def _outcome_message(message: data_pb2.IngestResult, outcome: BatchOutcome) -> None:
    if isinstance(outcome, ChunkRejection):
        if not outcome.code:  # an empty error_code is how Protobuf spells "success"
            raise FieldValueError("a rejection needs an error code", field="error_code")
        message.error_code = outcome.code
        message.error_message = outcome.message
        if outcome.field is not None:
            message.error_field = outcome.field
        if outcome.sequence is not None:
            message.sequence = outcome.sequence
    else:
        _fill(message, outcome)


def _outcome_doc(message: data_pb2.IngestResult) -> dict[str, Any]:
    """The JSON shape of one answer, so the JSON readers validate it."""
    if message.error_code:
        doc: dict[str, Any] = {"error": message.error_code, "message": message.error_message}
        if message.error_field:
            doc["field"] = message.error_field
        if message.HasField("sequence"):
            doc["sequence"] = message.sequence
        return doc
    doc = _to_doc(message)
    for name in ("error_code", "error_message", "error_field"):
        del doc[name]
    return doc


def encode_ingest_result_proto(result: IngestResult) -> bytes:
    """The answer to one Protobuf chunk POST (capability ``proto``)."""
    message = data_pb2.IngestResult()
    _outcome_message(message, result)
    return message.SerializeToString()


def decode_ingest_result_proto(data: bytes) -> IngestResult:
    """A 200 answer to one chunk; an answer carrying a rejection is a ``ProtocolError``
    (a single chunk is refused with a non-2xx JSON error, never inside a 200)."""
    outcome = outcome_from_json(_outcome_doc(_parse(data_pb2.IngestResult, data,
                                                    "ingest result")))
    if not isinstance(outcome, IngestResult):
        raise FieldValueError("a single-chunk answer cannot be a rejection", field="error_code")
    return outcome


def encode_batch_result_proto(results: Sequence[IngestResult | ChunkRejection | PipelineError],
                              chunks: Sequence[Chunk | PipelineError] | None = None) -> bytes:
    """``results[i]`` answers ``chunks[i]``; see ``batch.batch_outcomes`` for ``chunks``."""
    answer = data_pb2.IngestBatchResult()
    for outcome in batch_outcomes(results, chunks):
        _outcome_message(answer.results.add(), outcome)
    return answer.SerializeToString()


def decode_batch_result_proto(data: bytes) -> list[BatchOutcome]:
    answer = _parse(data_pb2.IngestBatchResult, data, "batch result")
    check_results_size(len(answer.results))
    outcomes: list[BatchOutcome] = []
    for index, message in enumerate(answer.results):
        try:
            outcomes.append(outcome_from_json(_outcome_doc(message)))
        except ProtocolError as exc:
            raise in_batch(exc, index, "results") from exc
    return outcomes
