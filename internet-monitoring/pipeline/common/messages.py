"""Wire model of protocol 1.0: frozen dataclasses and the JSON codec.

The JSON produced here is byte-for-byte the 1.0 format of ``docs/protocol.md``;
extensions live at the top level of envelopes and chunks and are emitted only when set
(``queue_epoch``, ``server_time``, ``server_capabilities``), because 1.0 sensors drop the
connection on an unknown field inside ``body``. Decoding is strict: every problem raises a
``ProtocolError`` subclass naming the offending field. The Protobuf codec lives in
``pipeline.common.proto_codec`` and maps the same dataclasses; limits and capability names
are in ``pipeline.common.wire_limits``, the field readers in ``pipeline.common.wire_fields``
(both re-exported here).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    PayloadTooLarge,
)
from pipeline.common.wire_fields import (  # re-exported: callers import them here
    b64,
    check_schema_version,
    check_text,
    dumps,
    load_json_object,
    optional_str,
    read_b64,
    read_bool,
    read_capabilities,
    read_float,
    read_int,
    read_str,
    require,
)
from pipeline.common.wire_limits import (  # noqa: F401 - re-exported: callers import them here
    BASE_CAPABILITIES,
    CAP_BATCH,
    CAP_CHUNKS,
    CAP_EPOCH,
    CAP_HEARTBEATS,
    CAP_HEARTBEAT_STATS,
    CAP_HTTP_ACK,
    CAP_PROTO,
    CAP_ROTATION,
    CAP_SERVER_TIME,
    EPOCH_RE,
    EVENT_ID_RE,
    MAX_ATTRIBUTES,
    MAX_ATTRIBUTE_VALUE,
    MAX_CHUNK_COUNT,
    MAX_LIST,
    MAX_MESSAGE,
    MAX_PAYLOAD_BYTES,
    MAX_SEQUENCE,
    MAX_STRING,
    SENSOR_ID_RE,
    SHA256_LEN,
)
from pipeline.version import PIPELINE_SCHEMA_VERSION

#: Kept for callers that import it by this name (common/batch.py).
_load_json_object = load_json_object


# ---------------------------------------------------------------------------------------
# Control-channel bodies


@dataclass(frozen=True)
class Heartbeat:
    software_version: str
    last_committed_sequence: int
    queue_depth: int
    clock_skew_ms: float
    # Capability `heartbeat_stats` only (sensor -> server): counters the sensor keeps.
    retry_total: int | None = None
    dropped_total: int | None = None
    quarantined_total: int | None = None

    BODY_TYPE = "heartbeat"


@dataclass(frozen=True)
class ChunkRequest:
    since_sequence: int
    max_chunks: int
    max_bytes: int
    window_id: str
    max_in_flight: int

    BODY_TYPE = "chunk_request"


@dataclass(frozen=True)
class ChunkAck:
    window_id: str
    committed_sequences: tuple[int, ...]
    reset_window: bool = False

    BODY_TYPE = "chunk_ack"


@dataclass(frozen=True)
class CommandResponse:
    command_id: str
    success: bool
    message: str

    BODY_TYPE = "command_response"


@dataclass(frozen=True)
class Command:
    """Server -> sensor command; only for sensors announcing the matching capability.

    Used for credential rotation (capability ``rotation``): ``name="rotate_token"`` with
    ``args={"token": ..., "not_after": ...}``.
    """

    command_id: str
    name: str
    args: Mapping[str, str] = field(default_factory=dict)

    BODY_TYPE = "command"


Body = Heartbeat | ChunkRequest | ChunkAck | CommandResponse | Command
BODY_TYPES: dict[str, type] = {
    cls.BODY_TYPE: cls for cls in (Heartbeat, ChunkRequest, ChunkAck, CommandResponse, Command)
}


@dataclass(frozen=True)
class Envelope:
    sensor_id: str
    sent_at: str
    body: Body
    capabilities: tuple[str, ...] = BASE_CAPABILITIES
    schema_version: str = PIPELINE_SCHEMA_VERSION
    # Top-level extensions (ignored by 1.0 peers): emitted only when set.
    queue_epoch: str | None = None
    server_time: str | None = None

    @property
    def body_type(self) -> str:
        return self.body.BODY_TYPE


# ---------------------------------------------------------------------------------------
# Data channel


@dataclass(frozen=True)
class Chunk:
    sensor_id: str
    event_id: str
    sequence: int
    chunk_index: int
    chunk_count: int
    payload: bytes
    chunk_sha256: bytes
    event_sha256: bytes
    created_at: str
    logical_timestamp_ms: int
    clock_skew_ms: float = 0.0
    attributes: Mapping[str, str] = field(default_factory=dict)
    compression: str = "gzip"
    schema_version: str = PIPELINE_SCHEMA_VERSION
    # Capability `epoch`: the sensor queue's epoch; "" for 1.0 sensors.
    queue_epoch: str = ""

    @property
    def window_id(self) -> str:
        return self.attributes.get("window_id", "")


@dataclass(frozen=True)
class IngestResult:
    """The HTTP 200 answer to one chunk (protocol.md section 2)."""

    stored: bool
    duplicate: bool
    sequence: int
    event_id: str
    sensor_id: str
    event_complete: bool
    last_committed_sequence: int




# ---------------------------------------------------------------------------------------
# Bodies <-> JSON


def body_to_json(body: Body) -> dict[str, Any]:
    if isinstance(body, Heartbeat):
        doc: dict[str, Any] = {
            "software_version": body.software_version,
            "last_committed_sequence": body.last_committed_sequence,
            "queue_depth": body.queue_depth,
            "clock_skew_ms": body.clock_skew_ms,
        }
        for name in ("retry_total", "dropped_total", "quarantined_total"):
            if getattr(body, name) is not None:
                doc[name] = getattr(body, name)
        return doc
    if isinstance(body, ChunkRequest):
        return {"since_sequence": body.since_sequence, "max_chunks": body.max_chunks,
                "max_bytes": body.max_bytes, "window_id": body.window_id,
                "max_in_flight": body.max_in_flight}
    if isinstance(body, ChunkAck):
        return {"window_id": body.window_id,
                "committed_sequences": list(body.committed_sequences),
                "reset_window": body.reset_window}
    if isinstance(body, CommandResponse):
        return {"command_id": body.command_id, "success": body.success, "message": body.message}
    if isinstance(body, Command):
        return {"command_id": body.command_id, "name": body.name, "args": dict(body.args)}
    raise TypeError(f"not a body: {type(body).__name__}")


def _optional_int(doc: Mapping[str, Any], name: str, prefix: str) -> int | None:
    return None if doc.get(name) is None else read_int(doc, name, prefix)


def body_from_json(body_type: str, doc: Any) -> Body:
    p = "body."
    if not isinstance(doc, dict):
        raise FieldTypeError("field body must be an object", field="body")
    if body_type == Heartbeat.BODY_TYPE:
        return Heartbeat(
            software_version=read_str(doc, "software_version", p),
            last_committed_sequence=read_int(doc, "last_committed_sequence", p),
            queue_depth=read_int(doc, "queue_depth", p),
            clock_skew_ms=read_float(doc, "clock_skew_ms", p),
            retry_total=_optional_int(doc, "retry_total", p),
            dropped_total=_optional_int(doc, "dropped_total", p),
            quarantined_total=_optional_int(doc, "quarantined_total", p),
        )
    if body_type == ChunkRequest.BODY_TYPE:
        return ChunkRequest(
            since_sequence=read_int(doc, "since_sequence", p),
            max_chunks=read_int(doc, "max_chunks", p, minimum=1, maximum=MAX_LIST),
            max_bytes=read_int(doc, "max_bytes", p, minimum=1),
            window_id=read_str(doc, "window_id", p),
            max_in_flight=read_int(doc, "max_in_flight", p, minimum=1, maximum=MAX_LIST),
        )
    if body_type == ChunkAck.BODY_TYPE:
        seqs = require(doc, "committed_sequences", p)
        if not isinstance(seqs, list) or len(seqs) > MAX_LIST:
            raise FieldTypeError("field body.committed_sequences must be a list of integers",
                                 field="body.committed_sequences")
        checked = tuple(read_int({f"[{i}]": s}, f"[{i}]", "body.committed_sequences")
                        for i, s in enumerate(seqs))
        return ChunkAck(window_id=read_str(doc, "window_id", p), committed_sequences=checked,
                        reset_window=read_bool(doc, "reset_window", p))
    if body_type == CommandResponse.BODY_TYPE:
        return CommandResponse(command_id=read_str(doc, "command_id", p),
                               success=read_bool(doc, "success", p),
                               message=read_str(doc, "message", p, max_len=MAX_MESSAGE))
    if body_type == Command.BODY_TYPE:
        args = doc.get("args", {})
        if not isinstance(args, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in args.items()):
            raise FieldTypeError("field body.args must map strings to strings", field="body.args")
        for key, value in args.items():
            check_text(key + value, "body.args")
        return Command(command_id=read_str(doc, "command_id", p), name=read_str(doc, "name", p),
                       args=args)
    raise FieldValueError(f"unknown body_type {body_type[:64]!r}", field="body_type")


# ---------------------------------------------------------------------------------------
# Envelope <-> JSON


def envelope_to_json(env: Envelope) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": env.schema_version,
        "sensor_id": env.sensor_id,
        "sent_at": env.sent_at,
        "capabilities": list(env.capabilities),
        "body_type": env.body_type,
        "body": body_to_json(env.body),
    }
    if env.queue_epoch is not None:
        doc["queue_epoch"] = env.queue_epoch
    if env.server_time is not None:
        doc["server_time"] = env.server_time
    return doc


def encode_envelope(env: Envelope) -> str:
    return dumps(envelope_to_json(env))


def envelope_from_json(doc: Mapping[str, Any]) -> Envelope:
    check_schema_version(read_str(doc, "schema_version"))
    body_type = read_str(doc, "body_type", max_len=64)
    return Envelope(
        schema_version=doc["schema_version"],
        sensor_id=read_str(doc, "sensor_id", pattern=SENSOR_ID_RE),
        sent_at=read_str(doc, "sent_at", max_len=64),
        capabilities=read_capabilities(doc),
        body=body_from_json(body_type, require(doc, "body", "")),
        queue_epoch=optional_str(doc, "queue_epoch", EPOCH_RE),
        server_time=optional_str(doc, "server_time"),
    )


def decode_envelope(data: bytes | str) -> Envelope:
    return envelope_from_json(load_json_object(data))


# ---------------------------------------------------------------------------------------
# Chunk <-> JSON


def chunk_to_json(chunk: Chunk) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": chunk.schema_version,
        "sensor_id": chunk.sensor_id,
        "event_id": chunk.event_id,
        "sequence": chunk.sequence,
        "chunk_index": chunk.chunk_index,
        "chunk_count": chunk.chunk_count,
        "compression": chunk.compression,
        "payload": b64(chunk.payload),
        "chunk_sha256": b64(chunk.chunk_sha256),
        "event_sha256": b64(chunk.event_sha256),
        "created_at": chunk.created_at,
        "logical_timestamp_ms": chunk.logical_timestamp_ms,
        "clock_skew_ms": chunk.clock_skew_ms,
        "attributes": dict(chunk.attributes),
    }
    if chunk.queue_epoch:
        doc["queue_epoch"] = chunk.queue_epoch
    return doc


def encode_chunk(chunk: Chunk) -> str:
    return dumps(chunk_to_json(chunk))


def _read_attributes(doc: Mapping[str, Any]) -> dict[str, str]:
    attrs = doc.get("attributes", {})
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise FieldTypeError("field attributes must be an object", field="attributes")
    if len(attrs) > MAX_ATTRIBUTES:
        raise PayloadTooLarge("field attributes has too many entries", field="attributes")
    for key, value in attrs.items():
        if not isinstance(value, str) or len(key) > MAX_STRING or len(value) > MAX_ATTRIBUTE_VALUE:
            raise FieldTypeError("field attributes must map short strings to short strings",
                                 field=f"attributes.{key[:64]}")
        check_text(key + value, "attributes")
    return attrs


def chunk_from_json(doc: Mapping[str, Any]) -> Chunk:
    """The chunk in ``doc``, validated; a ``ProtocolError`` names the first bad field."""
    fast = _chunk_fast(doc)
    return fast if fast is not None else chunk_from_json_strict(doc)


# -- the fast path ----------------------------------------------------------------------
# Ingest decodes every chunk, so the common case (a well-formed ASCII chunk of the current
# schema) is checked with plain comparisons instead of one reader call per field. It
# accepts a subset of what ``chunk_from_json_strict`` accepts, with equal results (a
# property test holds them to that); anything unusual, including every error, goes to the
# strict reader, which decides and names the field.

_FAST_SCHEMA_VERSIONS = frozenset({PIPELINE_SCHEMA_VERSION})
_MAX_B64_TEXT = (MAX_PAYLOAD_BYTES * 4) // 3 + 4
_SENSOR_ID_MATCH = SENSOR_ID_RE.fullmatch
_EVENT_ID_MATCH = EVENT_ID_RE.fullmatch
_EPOCH_MATCH = EPOCH_RE.fullmatch


def _fast_text(value: Any, max_len: int) -> bool:
    return type(value) is str and len(value) <= max_len and value.isascii()


def _fast_int(value: Any, minimum: int = 0, maximum: int = MAX_SEQUENCE) -> bool:
    return type(value) is int and minimum <= value <= maximum


def _fast_b64(value: Any, max_text: int) -> bytes | None:
    if type(value) is not str or len(value) > max_text or not value.isascii():
        return None
    try:
        # Strict mode accepts only canonical base64, a subset of what b64decode(validate=True)
        # accepts, and decodes it identically.
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _fast_attributes(value: Any) -> bool:
    if type(value) is not dict or len(value) > MAX_ATTRIBUTES:
        return False
    for key, item in value.items():
        if type(key) is not str or type(item) is not str or len(key) > MAX_STRING \
                or len(item) > MAX_ATTRIBUTE_VALUE or not key.isascii() or not item.isascii():
            return False
    return True


def chunk_if_plain(schema_version: Any, sensor_id: Any, event_id: Any, sequence: Any,
                   chunk_index: Any, chunk_count: Any, compression: Any, payload: bytes,
                   chunk_sha256: Any, event_sha256: Any, created_at: Any,
                   logical_timestamp_ms: Any, clock_skew_ms: Any, attributes: Any,
                   queue_epoch: Any) -> Chunk | None:
    """A ``Chunk`` when every field is plainly valid, else None (shared with the Protobuf
    codec: bytes fields arrive decoded, ``queue_epoch`` "" means absent)."""
    if not (type(schema_version) is str and schema_version in _FAST_SCHEMA_VERSIONS
            and _fast_text(sensor_id, MAX_STRING) and _SENSOR_ID_MATCH(sensor_id)
            and type(event_id) is str and len(event_id) == 32 and _EVENT_ID_MATCH(event_id)
            and _fast_int(sequence)
            and _fast_int(chunk_count, 1, MAX_CHUNK_COUNT)
            and _fast_int(chunk_index, 0, chunk_count - 1)
            and compression == "gzip"
            and len(payload) <= MAX_PAYLOAD_BYTES
            and type(chunk_sha256) is bytes and len(chunk_sha256) == SHA256_LEN
            and type(event_sha256) is bytes and len(event_sha256) == SHA256_LEN
            and _fast_text(created_at, 64)
            and _fast_int(logical_timestamp_ms)
            and _fast_number(clock_skew_ms)
            and _fast_attributes(attributes)
            and (queue_epoch == "" or (_fast_text(queue_epoch, MAX_STRING)
                                       and _EPOCH_MATCH(queue_epoch)))):
        return None
    return Chunk(schema_version=schema_version, sensor_id=sensor_id, event_id=event_id,
                 sequence=sequence, chunk_index=chunk_index, chunk_count=chunk_count,
                 compression=compression, payload=payload, chunk_sha256=chunk_sha256,
                 event_sha256=event_sha256, created_at=created_at,
                 logical_timestamp_ms=logical_timestamp_ms, clock_skew_ms=float(clock_skew_ms),
                 attributes=attributes, queue_epoch=queue_epoch)


_INF = float("inf")
_FLOAT_MAX = 1e308  # any int strictly inside converts to a finite float


def _fast_number(value: Any) -> bool:
    kind = type(value)
    return (kind is float and -_INF < value < _INF) or \
        (kind is int and -_FLOAT_MAX < value < _FLOAT_MAX)


def _chunk_fast(doc: Mapping[str, Any]) -> Chunk | None:
    get = doc.get
    payload = _fast_b64(get("payload"), _MAX_B64_TEXT)
    if payload is None:
        return None
    chunk_sha256 = _fast_b64(get("chunk_sha256"), 88)
    event_sha256 = _fast_b64(get("event_sha256"), 88)
    attributes = get("attributes", {})
    queue_epoch = get("queue_epoch")
    if chunk_sha256 is None or event_sha256 is None or queue_epoch == "":
        return None
    return chunk_if_plain(
        get("schema_version"), get("sensor_id"), get("event_id"), get("sequence"),
        get("chunk_index"), get("chunk_count"), get("compression"), payload, chunk_sha256,
        event_sha256, get("created_at"), get("logical_timestamp_ms"), get("clock_skew_ms", 0.0),
        {} if attributes is None else attributes, "" if queue_epoch is None else queue_epoch)


def chunk_from_json_strict(doc: Mapping[str, Any]) -> Chunk:
    """The reference reader: one checked read per field, errors name the field."""
    schema_version = check_schema_version(read_str(doc, "schema_version"))
    chunk_count = read_int(doc, "chunk_count", minimum=1, maximum=MAX_CHUNK_COUNT)
    chunk_index = read_int(doc, "chunk_index", maximum=MAX_CHUNK_COUNT)
    if chunk_index >= chunk_count:
        raise FieldValueError("field chunk_index must be below chunk_count", field="chunk_index")
    compression = read_str(doc, "compression", max_len=16)
    if compression != "gzip":
        raise FieldValueError("field compression must be 'gzip'", field="compression")
    return Chunk(
        schema_version=schema_version,
        sensor_id=read_str(doc, "sensor_id", pattern=SENSOR_ID_RE),
        event_id=read_str(doc, "event_id", max_len=32, pattern=EVENT_ID_RE),
        sequence=read_int(doc, "sequence"),
        chunk_index=chunk_index,
        chunk_count=chunk_count,
        compression=compression,
        payload=read_b64(doc, "payload", max_bytes=MAX_PAYLOAD_BYTES),
        chunk_sha256=read_b64(doc, "chunk_sha256", max_bytes=64, exact_len=SHA256_LEN),
        event_sha256=read_b64(doc, "event_sha256", max_bytes=64, exact_len=SHA256_LEN),
        created_at=read_str(doc, "created_at", max_len=64),
        logical_timestamp_ms=read_int(doc, "logical_timestamp_ms"),
        clock_skew_ms=read_float(doc, "clock_skew_ms") if "clock_skew_ms" in doc else 0.0,
        attributes=_read_attributes(doc),
        queue_epoch=optional_str(doc, "queue_epoch", EPOCH_RE) or "",
    )


def decode_chunk(data: bytes | str) -> Chunk:
    return chunk_from_json(load_json_object(data))


# ---------------------------------------------------------------------------------------
# Ingest answer <-> JSON


def ingest_result_to_json(result: IngestResult) -> dict[str, Any]:
    return {"stored": result.stored, "duplicate": result.duplicate, "sequence": result.sequence,
            "event_id": result.event_id, "sensor_id": result.sensor_id,
            "event_complete": result.event_complete,
            "last_committed_sequence": result.last_committed_sequence}


def ingest_result_from_json(doc: Mapping[str, Any]) -> IngestResult:
    return IngestResult(
        stored=read_bool(doc, "stored"), duplicate=read_bool(doc, "duplicate"),
        sequence=read_int(doc, "sequence"), event_id=read_str(doc, "event_id"),
        sensor_id=read_str(doc, "sensor_id"), event_complete=read_bool(doc, "event_complete"),
        last_committed_sequence=read_int(doc, "last_committed_sequence"))
