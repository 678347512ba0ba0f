"""The Protobuf codec follows the JSON codec's rules: a bad value is refused identically by
both, models round-trip through both, and only ProtocolError escapes a decoder."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.common import batch
from pipeline.common.batch import ChunkRejection
from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    PayloadTooLarge,
    ProtocolError,
    UnsupportedSchemaVersion,
)
from pipeline.common.messages import (
    MAX_CHUNK_COUNT,
    Chunk,
    Envelope,
    decode_chunk,
    decode_envelope,
    encode_chunk,
    encode_envelope,
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
from pipeline.tests import wire_strategies as ws
from pipeline.tests.test_messages import GOLDEN_CHUNK, GOLDEN_ENVELOPES


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


def _with_body(envelope: Envelope, **changes: Any) -> Envelope:
    """The envelope with fields of its body changed (any body type)."""
    body: Any = envelope.body
    return dataclasses.replace(envelope, body=dataclasses.replace(body, **changes))


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
    ("negative depth", 0, lambda e: _with_body(e, queue_depth=-1), FieldValueError,
     "body.queue_depth"),
    ("negative stats", 0, lambda e: _with_body(e, dropped_total=-1), FieldValueError,
     "body.dropped_total"),
    ("nan skew", 0, lambda e: _with_body(e, clock_skew_ms=float("nan")), FieldValueError,
     "body.clock_skew_ms"),
    ("zero max_chunks", 1, lambda e: _with_body(e, max_chunks=0), FieldValueError,
     "body.max_chunks"),
    ("long window id", 1, lambda e: _with_body(e, window_id="w" * 257), PayloadTooLarge,
     "body.window_id"),
    ("negative ack", 2, lambda e: _with_body(e, committed_sequences=(1, 2, -3)),
     FieldValueError, "body.committed_sequences[2]"),
    ("long message", 3, lambda e: _with_body(e, message="m" * 4097), PayloadTooLarge,
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
