"""The Protobuf codec and the batch answer: same model and same rules as the JSON codec."""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import struct
import typing
from typing import Any, Callable

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.common import batch
from pipeline.common.batch import MAX_BATCH_CHUNKS, ChunkRejection
from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    MissingField,
    PayloadTooLarge,
    PipelineError,
    ProtocolError,
    SequenceConflict,
    StoreError,
    Throttled,
    UnsupportedSchemaVersion,
)
from pipeline.common.messages import (
    BODY_TYPES,
    MAX_CHUNK_COUNT,
    Chunk,
    ChunkAck,
    ChunkRequest,
    Command,
    CommandResponse,
    Envelope,
    Heartbeat,
    IngestResult,
    decode_chunk,
    decode_envelope,
    encode_chunk,
    encode_envelope,
    ingest_result_to_json,
)
from pipeline.common.proto_codec import (
    decode_batch_proto,
    decode_batch_proto_lenient,
    decode_batch_result_proto,
    decode_chunk_proto,
    decode_envelope_proto,
    encode_batch_proto,
    encode_batch_result_proto,
    encode_chunk_proto,
    encode_envelope_proto,
)
from pipeline.proto import control_pb2, data_pb2
from pipeline.tests import wire_strategies as ws
from pipeline.tests.test_messages import GOLDEN_CHUNK, GOLDEN_ENVELOPES, golden_chunk_doc
from pipeline.version import PIPELINE_SCHEMA_VERSION, SUPPORTED_SCHEMA_MAJOR

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------
# Versions and the .proto files stay in step with the dataclasses


def test_schema_version_major_is_the_one_both_codecs_accept() -> None:
    major = int(PIPELINE_SCHEMA_VERSION.split(".")[0])
    assert major == SUPPORTED_SCHEMA_MAJOR
    env, chunk = GOLDEN_ENVELOPES[0][1], GOLDEN_CHUNK
    assert env.schema_version == chunk.schema_version == PIPELINE_SCHEMA_VERSION
    same_major = f"{major}.42.7"
    for version in (same_major, PIPELINE_SCHEMA_VERSION):
        e, c = dataclasses.replace(env, schema_version=version), \
            dataclasses.replace(chunk, schema_version=version)
        assert decode_envelope(encode_envelope(e)) == decode_envelope_proto(
            encode_envelope_proto(e)) == e
        assert decode_chunk(encode_chunk(c)) == decode_chunk_proto(encode_chunk_proto(c)) == c
    for version in (f"{major + 1}.0.0", f"{major - 1}.9.9"):
        e, c = dataclasses.replace(env, schema_version=version), \
            dataclasses.replace(chunk, schema_version=version)
        for decode, data in ((decode_envelope, encode_envelope(e)),
                             (decode_envelope_proto, encode_envelope_proto(e)),
                             (decode_chunk, encode_chunk(c)),
                             (decode_chunk_proto, encode_chunk_proto(c))):
            with pytest.raises(UnsupportedSchemaVersion) as info:
                decode(data)
            assert info.value.field == "schema_version"


_SCALARS = {int: FieldDescriptor.TYPE_INT64, str: FieldDescriptor.TYPE_STRING,
            float: FieldDescriptor.TYPE_DOUBLE, bool: FieldDescriptor.TYPE_BOOL,
            bytes: FieldDescriptor.TYPE_BYTES}
# Proto-only presence: a rejected chunk's answer may not know its sequence.
_EXTRA_PRESENCE = {("IngestResult", "sequence")}

PAIRS: list[tuple[type, Any, set[str]]] = [
    (Heartbeat, control_pb2.Heartbeat, set()),
    (ChunkRequest, control_pb2.ChunkRequest, set()),
    (ChunkAck, control_pb2.ChunkAck, set()),
    (CommandResponse, control_pb2.CommandResponse, set()),
    (Command, control_pb2.Command, set()),
    (Chunk, data_pb2.Chunk, set()),
    (IngestResult, data_pb2.IngestResult, {"error_code", "error_message", "error_field"}),
]


def _check_field_type(cls: type, name: str, hint: Any, fd: FieldDescriptor) -> None:
    args = typing.get_args(hint)
    optional = type(None) in args and typing.get_origin(hint) is not tuple
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint)
    where = f"{cls.__name__}.{name}"
    if origin is tuple:
        assert fd.is_repeated and fd.type == _SCALARS[typing.get_args(hint)[0]], where
    elif origin in (collections.abc.Mapping, dict):
        assert fd.message_type is not None and fd.message_type.GetOptions().map_entry, where
        key_fd, value_fd = fd.message_type.fields
        assert key_fd.type == value_fd.type == FieldDescriptor.TYPE_STRING, where
    else:
        assert not fd.is_repeated and fd.type == _SCALARS[hint], where
        if (cls.__name__, name) not in _EXTRA_PRESENCE:
            assert fd.has_presence == optional, where


@pytest.mark.parametrize("cls, message, extra", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_every_dataclass_field_exists_in_the_proto(cls: type, message: Any,
                                                   extra: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    proto_fields = message.DESCRIPTOR.fields_by_name
    names = {f.name for f in dataclasses.fields(cls)}
    assert names <= set(proto_fields), names - set(proto_fields)
    assert set(proto_fields) - names == extra
    for name in names:
        _check_field_type(cls, name, hints[name], proto_fields[name])


def test_envelope_proto_matches_dataclass_and_body_types() -> None:
    descriptor = control_pb2.Envelope.DESCRIPTOR
    oneof = descriptor.oneofs_by_name["body"]
    members = {fd.name: fd.message_type.name for fd in oneof.fields}
    assert members == {name: cls.__name__ for name, cls in BODY_TYPES.items()}
    plain = {fd.name for fd in descriptor.fields if fd.containing_oneof is None
             or fd.containing_oneof.name != "body"}
    # proto3 `optional` fields sit in synthetic oneofs named after them.
    names = {f.name for f in dataclasses.fields(Envelope)} - {"body"}
    assert plain == names
    hints = typing.get_type_hints(Envelope)
    for name in names:
        _check_field_type(Envelope, name, hints[name], descriptor.fields_by_name[name])


# ---------------------------------------------------------------------------------------
# Golden wire bytes, assembled by hand from the field numbers of control.proto


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, raw: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _vi(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _dbl(field: int, x: float) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<d", x)


def _envelope_head() -> bytes:
    return (_ld(1, b"1.0.0") + _ld(2, b"pi-01") + _ld(3, b"2026-11-27T05:00:00+00:00")
            + _ld(4, b"chunks") + _ld(4, b"heartbeats"))


def test_golden_heartbeat_envelope_bytes() -> None:
    body = _ld(1, b"1.4.2") + _vi(2, 41) + _vi(3, 7) + _dbl(4, -12.5)
    wire = _envelope_head() + _ld(10, body)
    model = GOLDEN_ENVELOPES[0][1]
    assert encode_envelope_proto(model) == wire
    assert decode_envelope_proto(wire) == model


def test_golden_chunk_ack_envelope_bytes() -> None:
    packed = b"".join(_varint(s) for s in (42, 43, 45))
    body = _ld(1, b"pi-01-1795755600000") + _ld(2, packed)
    wire = _envelope_head() + _ld(12, body)
    assert decode_envelope_proto(wire) == GOLDEN_ENVELOPES[2][1]
    # reset_window=True is field 3.
    wire_reset = _envelope_head() + _ld(12, body + _vi(3, 1))
    assert decode_envelope_proto(wire_reset).body.reset_window is True


def test_golden_chunk_decodes_the_same_from_both_encodings() -> None:
    from_json = decode_chunk(json.dumps(golden_chunk_doc()))
    from_proto = decode_chunk_proto(encode_chunk_proto(from_json))
    assert from_json == from_proto == GOLDEN_CHUNK
    message = data_pb2.Chunk.FromString(encode_chunk_proto(GOLDEN_CHUNK))
    assert message.payload == GOLDEN_CHUNK.payload  # raw bytes, no base64 on this wire
    assert len(message.chunk_sha256) == 32


@pytest.mark.parametrize("doc, model", GOLDEN_ENVELOPES,
                         ids=[d["body_type"] for d, _ in GOLDEN_ENVELOPES])
def test_golden_envelopes_decode_the_same_from_both_encodings(doc: dict[str, Any],
                                                              model: Envelope) -> None:
    from_json = decode_envelope(json.dumps(doc))
    assert decode_envelope_proto(encode_envelope_proto(from_json)) == from_json == model


def test_presence_of_extensions_round_trips() -> None:
    hb = Heartbeat("2.0", 1, 2, 0.0, retry_total=0, dropped_total=None, quarantined_total=5)
    env = Envelope(sensor_id="pi-01", sent_at="t", body=hb, queue_epoch="00000000",
                   server_time="")
    decoded = decode_envelope_proto(encode_envelope_proto(env))
    assert decoded == env
    assert decoded.body.retry_total == 0 and decoded.body.dropped_total is None
    assert decoded.server_time == ""
    bare = Envelope(sensor_id="pi-01", sent_at="t", body=Heartbeat("2.0", 1, 2, 0.0))
    assert decode_envelope_proto(encode_envelope_proto(bare)) == bare


def test_all_default_body_still_selects_its_type() -> None:
    env = Envelope(sensor_id="pi-01", sent_at="", body=CommandResponse("", False, ""))
    assert decode_envelope_proto(encode_envelope_proto(env)) == env


def test_unknown_proto_fields_are_ignored() -> None:
    wire = encode_chunk_proto(GOLDEN_CHUNK) + _ld(99, b"from the future") + _vi(100, 7)
    assert decode_chunk_proto(wire) == GOLDEN_CHUNK


# ---------------------------------------------------------------------------------------
# Proto-specific failures


@pytest.mark.parametrize("decode", [decode_envelope_proto, decode_chunk_proto])
@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x0a\xff\xff\xff\xff\x0f",
                                 b"\x12\x02\xc3\x28"])
def test_garbage_bytes_are_protocol_errors(decode: Callable[[bytes], Any], raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(raw)
    assert type(info.value) is ProtocolError
    assert isinstance(info.value.__cause__, DecodeError)
    assert info.value.http_status == 400


def test_envelope_without_body_names_the_body() -> None:
    for wire in (_envelope_head(), _envelope_head() + _ld(20, b"")):  # none / unknown type
        with pytest.raises(MissingField) as info:
            decode_envelope_proto(wire)
        assert info.value.field == "body"


def test_empty_bytes_are_an_invalid_chunk_not_a_crash() -> None:
    with pytest.raises(FieldValueError) as info:
        decode_chunk_proto(b"")
    assert info.value.field == "schema_version"


def test_encoding_an_unrepresentable_model_raises_a_pipeline_error() -> None:
    with pytest.raises(FieldValueError) as info:
        encode_chunk_proto(dataclasses.replace(GOLDEN_CHUNK, sequence=2**64))
    assert info.value.field == "sequence"
    with pytest.raises(FieldTypeError) as type_info:
        not_bytes: Any = "text"
        encode_chunk_proto(dataclasses.replace(GOLDEN_CHUNK, payload=not_bytes))
    assert type_info.value.field == "payload"


# ---------------------------------------------------------------------------------------
# One set of rules: a bad value is refused identically by both codecs


def _both_refuse(json_data: str, proto_data: bytes, decode_json: Callable[[Any], Any],
                 decode_proto: Callable[[bytes], Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as from_json:
        decode_json(json_data)
    with pytest.raises(ProtocolError) as from_proto:
        decode_proto(proto_data)
    assert type(from_json.value) is type(from_proto.value)
    assert from_json.value.field == from_proto.value.field
    assert from_json.value.field is not None
    return from_proto.value


CHUNK_FAULTS: list[tuple[str, Callable[[Chunk], Chunk], type[ProtocolError], str]] = [
    ("negative sequence", lambda c: dataclasses.replace(c, sequence=-1), FieldValueError,
     "sequence"),
    ("negative timestamp", lambda c: dataclasses.replace(c, logical_timestamp_ms=-5),
     FieldValueError, "logical_timestamp_ms"),
    ("index == count", lambda c: dataclasses.replace(c, chunk_index=c.chunk_count),
     FieldValueError, "chunk_index"),
    ("zero count", lambda c: dataclasses.replace(c, chunk_count=0, chunk_index=0),
     FieldValueError, "chunk_count"),
    ("count too big", lambda c: dataclasses.replace(c, chunk_count=MAX_CHUNK_COUNT + 1),
     FieldValueError, "chunk_count"),
    ("path traversal", lambda c: dataclasses.replace(c, sensor_id="../etc"), FieldValueError,
     "sensor_id"),
    ("unicode sensor", lambda c: dataclasses.replace(c, sensor_id="s\u00e9nsor"),
     FieldValueError, "sensor_id"),
    ("newline sensor", lambda c: dataclasses.replace(c, sensor_id="pi-01\n"), FieldValueError,
     "sensor_id"),
    ("long sensor", lambda c: dataclasses.replace(c, sensor_id="p" * 10_000), PayloadTooLarge,
     "sensor_id"),
    ("bad event id", lambda c: dataclasses.replace(c, event_id="XYZ"), FieldValueError,
     "event_id"),
    ("hash 31 bytes", lambda c: dataclasses.replace(c, chunk_sha256=bytes(31)),
     FieldValueError, "chunk_sha256"),
    ("hash 33 bytes", lambda c: dataclasses.replace(c, event_sha256=bytes(33)),
     FieldValueError, "event_sha256"),
    ("hash empty", lambda c: dataclasses.replace(c, event_sha256=b""), FieldValueError,
     "event_sha256"),
    ("hash 100 bytes", lambda c: dataclasses.replace(c, chunk_sha256=bytes(100)),
     PayloadTooLarge, "chunk_sha256"),
    ("schema 2.0.0", lambda c: dataclasses.replace(c, schema_version="2.0.0"),
     UnsupportedSchemaVersion, "schema_version"),
    ("schema empty", lambda c: dataclasses.replace(c, schema_version=""), FieldValueError,
     "schema_version"),
    ("zstd", lambda c: dataclasses.replace(c, compression="zstd"), FieldValueError,
     "compression"),
    ("long created_at", lambda c: dataclasses.replace(c, created_at="x" * 65), PayloadTooLarge,
     "created_at"),
    ("nan skew", lambda c: dataclasses.replace(c, clock_skew_ms=float("nan")), FieldValueError,
     "clock_skew_ms"),
    ("inf skew", lambda c: dataclasses.replace(c, clock_skew_ms=float("-inf")),
     FieldValueError, "clock_skew_ms"),
    ("many attributes", lambda c: dataclasses.replace(
        c, attributes={f"k{i}": "v" for i in range(33)}), PayloadTooLarge, "attributes"),
    ("long attribute", lambda c: dataclasses.replace(c, attributes={"k": "v" * 1025}),
     FieldTypeError, "attributes.k"),
    ("bad epoch", lambda c: dataclasses.replace(c, queue_epoch="NOT-HEX"), FieldValueError,
     "queue_epoch"),
]


@pytest.mark.parametrize("fault, error, field", [f[1:] for f in CHUNK_FAULTS],
                         ids=[f[0] for f in CHUNK_FAULTS])
def test_chunk_faults_refused_identically(fault: Callable[[Chunk], Chunk],
                                          error: type[ProtocolError], field: str) -> None:
    bad = fault(GOLDEN_CHUNK)
    refused = _both_refuse(encode_chunk(bad), encode_chunk_proto(bad), decode_chunk,
                           decode_chunk_proto)
    assert type(refused) is error and refused.field == field


def test_oversized_payload_refused_identically() -> None:
    bad = dataclasses.replace(GOLDEN_CHUNK, payload=bytes(2 * 1024 * 1024))
    refused = _both_refuse(encode_chunk(bad), encode_chunk_proto(bad), decode_chunk,
                           decode_chunk_proto)
    assert type(refused) is PayloadTooLarge and refused.http_status == 413
    at_limit = dataclasses.replace(GOLDEN_CHUNK, payload=bytes(1024 * 1024))
    assert decode_chunk_proto(encode_chunk_proto(at_limit)) == at_limit
    assert decode_chunk(encode_chunk(at_limit)) == at_limit
    just_over = dataclasses.replace(GOLDEN_CHUNK, payload=bytes(1024 * 1024 + 1))
    _both_refuse(encode_chunk(just_over), encode_chunk_proto(just_over), decode_chunk,
                 decode_chunk_proto)


@FAST
@given(ws.chunks(max_payload=64), st.sampled_from(CHUNK_FAULTS))
def test_any_chunk_with_one_fault_is_refused_identically(chunk: Chunk, fault: Any) -> None:
    _, apply, error, field = fault
    bad = apply(chunk)
    refused = _both_refuse(encode_chunk(bad), encode_chunk_proto(bad), decode_chunk,
                           decode_chunk_proto)
    assert type(refused) is error and refused.field == field


ENVELOPE_FAULTS: list[tuple[str, int, Callable[[Envelope], Envelope], type[ProtocolError], str]] = [
    ("bad sensor", 0, lambda e: dataclasses.replace(e, sensor_id="a/b"), FieldValueError,
     "sensor_id"),
    ("schema 3.1.4", 1, lambda e: dataclasses.replace(e, schema_version="3.1.4"),
     UnsupportedSchemaVersion, "schema_version"),
    ("empty epoch", 2, lambda e: dataclasses.replace(e, queue_epoch=""), FieldValueError,
     "queue_epoch"),
    ("long capability", 3, lambda e: dataclasses.replace(e, capabilities=("c" * 65,)),
     FieldTypeError, "capabilities"),
    ("long sent_at", 0, lambda e: dataclasses.replace(e, sent_at="t" * 65), PayloadTooLarge,
     "sent_at"),
    ("negative depth", 0, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, queue_depth=-1)), FieldValueError,
     "body.queue_depth"),
    ("negative stats", 0, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, dropped_total=-1)), FieldValueError,
     "body.dropped_total"),
    ("nan skew", 0, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, clock_skew_ms=float("nan"))), FieldValueError,
     "body.clock_skew_ms"),
    ("zero max_chunks", 1, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, max_chunks=0)), FieldValueError, "body.max_chunks"),
    ("long window id", 1, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, window_id="w" * 257)), PayloadTooLarge,
     "body.window_id"),
    ("negative ack", 2, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, committed_sequences=(1, 2, -3))),
     FieldValueError, "body.committed_sequences[2]"),
    ("long message", 3, lambda e: dataclasses.replace(
        e, body=dataclasses.replace(e.body, message="m" * 4097)), PayloadTooLarge,
     "body.message"),
]


@pytest.mark.parametrize("index, fault, error, field", [f[1:] for f in ENVELOPE_FAULTS],
                         ids=[f[0] for f in ENVELOPE_FAULTS])
def test_envelope_faults_refused_identically(index: int, fault: Callable[[Envelope], Envelope],
                                             error: type[ProtocolError], field: str) -> None:
    bad = fault(GOLDEN_ENVELOPES[index][1])
    refused = _both_refuse(encode_envelope(bad), encode_envelope_proto(bad), decode_envelope,
                           decode_envelope_proto)
    assert type(refused) is error and refused.field == field


# ---------------------------------------------------------------------------------------
# Round-trip properties


@FAST
@given(ws.envelopes)
def test_envelope_json_to_model_to_proto_is_unchanged(env: Envelope) -> None:
    from_json = decode_envelope(encode_envelope(env))
    from_proto = decode_envelope_proto(encode_envelope_proto(from_json))
    assert from_proto == from_json == env
    assert decode_envelope(encode_envelope(from_proto)) == env


@FAST
@given(ws.chunks())
def test_chunk_json_to_model_to_proto_is_unchanged(chunk: Chunk) -> None:
    from_json = decode_chunk(encode_chunk(chunk))
    from_proto = decode_chunk_proto(encode_chunk_proto(from_json))
    assert from_proto == from_json == chunk
    assert type(from_proto.payload) is bytes
    assert decode_chunk(encode_chunk(from_proto)) == chunk


@FAST
@given(st.lists(ws.chunks(max_payload=64), min_size=1, max_size=5))
def test_batch_round_trips_in_both_encodings(chunks: list[Chunk]) -> None:
    assert decode_batch_proto(encode_batch_proto(chunks)) == chunks
    assert batch.decode_batch(batch.encode_batch(chunks)) == chunks


@FAST
@given(st.lists(ws.outcomes, max_size=6))
def test_batch_result_round_trips_in_both_encodings(outcomes: list[Any]) -> None:
    assert decode_batch_result_proto(encode_batch_result_proto(outcomes)) == outcomes
    assert batch.decode_batch_result(batch.encode_batch_result(outcomes)) == outcomes


# ---------------------------------------------------------------------------------------
# Fuzzing: only ProtocolError may escape a decoder

PROTO_DECODERS: list[Callable[[bytes], Any]] = [
    decode_envelope_proto, decode_chunk_proto, decode_batch_proto, decode_batch_proto_lenient,
    decode_batch_result_proto]
JSON_DECODERS: list[Callable[[bytes], Any]] = [
    decode_envelope, decode_chunk, batch.decode_batch, batch.decode_batch_lenient,
    batch.decode_batch_result]


def _only_protocol_errors(decoders: list[Callable[[bytes], Any]], data: bytes) -> None:
    for decode in decoders:
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _only_protocol_errors(PROTO_DECODERS + JSON_DECODERS, raw)


@settings(max_examples=150, deadline=None)
@given(ws.json_values)
def test_fuzz_json_batches_and_results(value: Any) -> None:
    for doc in ({"chunks": value}, {"chunks": [value]}, {"results": [value]}, value):
        _only_protocol_errors(JSON_DECODERS, json.dumps(doc).encode("utf-8"))


_VALID_WIRES = [encode_envelope_proto(m) for _, m in GOLDEN_ENVELOPES] + [
    encode_chunk_proto(GOLDEN_CHUNK), encode_batch_proto([GOLDEN_CHUNK, GOLDEN_CHUNK]),
    encode_batch_result_proto([ChunkRejection("bad_value", "m", "f", 3)])]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_VALID_WIRES), st.data())
def test_fuzz_corrupted_proto_messages(wire: bytes, data: st.DataObject) -> None:
    corrupted = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(corrupted)))
    for candidate in (bytes(corrupted), bytes(corrupted[:cut])):
        _only_protocol_errors(PROTO_DECODERS, candidate)


# ---------------------------------------------------------------------------------------
# Batches: one bad chunk does not fail its neighbours


def _bad() -> Chunk:
    return dataclasses.replace(GOLDEN_CHUNK, sequence=43, chunk_index=9)


@pytest.mark.parametrize("encode, lenient, strict", [
    (encode_batch_proto, decode_batch_proto_lenient, decode_batch_proto),
    (batch.encode_batch, batch.decode_batch_lenient, batch.decode_batch),
], ids=["proto", "json"])
def test_lenient_batch_keeps_neighbours(encode: Callable[[Any], Any], lenient: Callable[[Any], Any],
                                        strict: Callable[[Any], Any]) -> None:
    good2 = dataclasses.replace(GOLDEN_CHUNK, sequence=44)
    data = encode([GOLDEN_CHUNK, _bad(), good2])
    items = lenient(data)
    assert items[0] == GOLDEN_CHUNK and items[2] == good2
    assert type(items[1]) is FieldValueError and items[1].field == "chunk_index"
    with pytest.raises(FieldValueError) as info:
        strict(data)
    assert info.value.field == "chunks[1].chunk_index"


def test_proto_chunk_that_does_not_parse_spoils_only_itself() -> None:
    good = encode_chunk_proto(GOLDEN_CHUNK)
    invalid_utf8 = _ld(2, b"\xc3\x28")  # sensor_id that is not UTF-8
    frames = data_pb2.ChunkBatchFrames(chunks=[good, invalid_utf8, good]).SerializeToString()
    items = decode_batch_proto_lenient(frames)
    assert items[0] == items[2] == GOLDEN_CHUNK
    assert type(items[1]) is ProtocolError
    assert isinstance(items[1].__cause__, DecodeError)
    with pytest.raises(ProtocolError) as info:
        decode_batch_proto(frames)
    assert info.value.field == "chunks[1]"


def test_frames_and_batch_are_the_same_wire() -> None:
    wire = encode_batch_proto([GOLDEN_CHUNK, _bad()])
    frames = data_pb2.ChunkBatchFrames.FromString(wire)
    assert [decode_chunk_proto(f) for f in frames.chunks[:1]] == [GOLDEN_CHUNK]
    assert data_pb2.ChunkBatch.FromString(wire).chunks[1].chunk_index == 9


@pytest.mark.parametrize("proto", [True, False], ids=["proto", "json"])
def test_batch_size_limits(proto: bool) -> None:
    encode = encode_batch_proto if proto else batch.encode_batch
    decode = decode_batch_proto_lenient if proto else batch.decode_batch_lenient
    with pytest.raises(FieldValueError) as empty:
        decode(encode([]))
    assert empty.value.field == "chunks"
    small = dataclasses.replace(GOLDEN_CHUNK, payload=b"")
    with pytest.raises(PayloadTooLarge) as many:
        decode(encode([small] * (MAX_BATCH_CHUNKS + 1)))
    assert many.value.field == "chunks" and many.value.http_status == 413
    assert len(decode(encode([small] * MAX_BATCH_CHUNKS))) == MAX_BATCH_CHUNKS


@pytest.mark.parametrize("body, error, field", [
    (b"{}", MissingField, "chunks"),
    (b'{"chunks": {"0": {}}}', FieldTypeError, "chunks"),
    (b'[{"chunks": []}]', FieldTypeError, None),
    (b'{"chunks": [', ProtocolError, None),
])
def test_json_batch_shape_errors(body: bytes, error: type[ProtocolError],
                                field: str | None) -> None:
    with pytest.raises(error) as info:
        batch.decode_batch_lenient(body)
    assert type(info.value) is error and info.value.field == field


def test_json_batch_item_not_an_object_is_rejected_in_place() -> None:
    body = json.dumps({"chunks": [golden_chunk_doc(), 17]})
    items = batch.decode_batch_lenient(body)
    assert items[0] == GOLDEN_CHUNK and type(items[1]) is FieldTypeError
    with pytest.raises(FieldTypeError) as info:
        batch.decode_batch(body)
    assert info.value.field == "chunks[1]"


def test_proto_batch_that_does_not_parse_raises() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_batch_proto_lenient(b"\x0a\xff\xff")
    assert isinstance(info.value.__cause__, DecodeError)


# ---------------------------------------------------------------------------------------
# The batch answer


STORED = IngestResult(stored=True, duplicate=False, sequence=42, event_id=GOLDEN_CHUNK.event_id,
                      sensor_id="pi-01", event_complete=False, last_committed_sequence=42)


def test_batch_answer_json_shape() -> None:
    items = batch.decode_batch_lenient(batch.encode_batch([GOLDEN_CHUNK, _bad()]))
    conflict = SequenceConflict("sequence 44 already holds another chunk")
    doc = json.loads(batch.encode_batch_result([STORED, items[1]], items))
    assert doc == {"results": [
        {"stored": True, "duplicate": False, "sequence": 42, "event_id": GOLDEN_CHUNK.event_id,
         "sensor_id": "pi-01", "event_complete": False, "last_committed_sequence": 42},
        {"error": "bad_value", "message": "field chunk_index must be below chunk_count",
         "field": "chunk_index"},
    ]}
    # A store-side error on a decoded chunk carries that chunk's sequence.
    doc = json.loads(batch.encode_batch_result([conflict, STORED], items[:1] + [GOLDEN_CHUNK]))
    assert doc["results"][0] == {"error": "sequence_conflict", "sequence": 42,
                                 "message": "sequence 44 already holds another chunk"}


def test_batch_answer_is_the_same_in_both_encodings() -> None:
    items: list[Any] = [GOLDEN_CHUNK, ProtocolError("chunk is not a valid Protobuf message"),
                        GOLDEN_CHUNK]
    results: list[Any] = [STORED, items[1], StoreError("database is locked")]
    from_proto = decode_batch_result_proto(encode_batch_result_proto(results, items))
    from_json = batch.decode_batch_result(batch.encode_batch_result(results, items))
    assert from_proto == from_json == [
        STORED, ChunkRejection("malformed", "chunk is not a valid Protobuf message", None, None),
        ChunkRejection("store_unavailable", "database is locked", None, 42)]


def test_rejection_rebuilds_the_error_and_its_status() -> None:
    cases: list[tuple[PipelineError, int]] = [
        (FieldValueError("bad", field="chunk_index"), 400), (PayloadTooLarge("big"), 413),
        (SequenceConflict("taken"), 409), (StoreError("down"), 503), (Throttled("slow"), 429)]
    for error, status in cases:
        rejection = ChunkRejection.from_error(error, sequence=7)
        assert rejection.http_status == status
        rebuilt = rejection.to_error()
        assert type(rebuilt) is type(error)
        assert rebuilt.field == error.field and rebuilt.message == error.message
    future = ChunkRejection("from_a_newer_server", "?").to_error()
    assert type(future) is PipelineError and future.code == "from_a_newer_server"


def test_rejection_quoting_peer_input_stays_encodable() -> None:
    error = FieldTypeError("field attributes must map short strings to short strings",
                           field="attributes.\ud800")
    rejection = ChunkRejection.from_error(error)
    assert decode_batch_result_proto(encode_batch_result_proto([rejection])) == [rejection]
    assert batch.decode_batch_result(batch.encode_batch_result([rejection]).encode()) == [rejection]


def test_results_and_chunks_must_line_up() -> None:
    with pytest.raises(PipelineError):
        encode_batch_result_proto([STORED], [GOLDEN_CHUNK, GOLDEN_CHUNK])


@pytest.mark.parametrize("doc, error, field", [
    ({"results": [{"error": "", "message": "m"}]}, FieldValueError, "results[0].error"),
    ({"results": [{"error": "bad_value"}]}, MissingField, "results[0].message"),
    ({"results": [{"stored": True}]}, MissingField, "results[0].duplicate"),
    ({"results": [{**ingest_result_to_json(STORED), "sequence": -1}]}, FieldValueError,
     "results[0].sequence"),
    ({"results": [STORED.__dict__, 3]}, FieldTypeError, "results[1]"),
    ({"results": "all good"}, FieldTypeError, "results"),
])
def test_batch_answer_strict_decoding(doc: dict[str, Any], error: type[ProtocolError],
                                      field: str) -> None:
    with pytest.raises(error) as info:
        batch.decode_batch_result(json.dumps(doc))
    assert type(info.value) is error and info.value.field == field


def test_proto_answer_without_sequence_is_refused() -> None:
    answer = data_pb2.IngestBatchResult()
    answer.results.add(stored=True, event_id="e", sensor_id="pi-01")
    with pytest.raises(MissingField) as info:
        decode_batch_result_proto(answer.SerializeToString())
    assert info.value.field == "results[0].sequence"
    with pytest.raises(FieldValueError):
        encode_batch_result_proto([ChunkRejection("", "no code")])
