"""Batches and their answers in both encodings: one bad chunk does not fail its neighbours."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import pytest
from google.protobuf.message import DecodeError

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
)
from pipeline.common.messages import (
    Chunk,
    IngestResult,
    ingest_result_to_json,
)
from pipeline.common.proto_codec import (
    decode_batch_proto,
    decode_batch_proto_lenient,
    decode_batch_result_proto,
    decode_chunk_proto,
    encode_batch_proto,
    encode_batch_result_proto,
    encode_chunk_proto,
)
from pipeline.proto import data_pb2
from pipeline.tests.test_messages import GOLDEN_CHUNK, golden_chunk_doc
from pipeline.tests.test_proto_codec import _ld



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
    encode: Callable[[list[Chunk]], Any] = encode_batch_proto if proto else batch.encode_batch
    decode: Callable[[Any], list[Any]] = (decode_batch_proto_lenient if proto
                                          else batch.decode_batch_lenient)
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
    assert isinstance(items[1], ProtocolError)
    doc = json.loads(batch.encode_batch_result([STORED, items[1]], items))
    assert doc == {"results": [
        {"stored": True, "duplicate": False, "sequence": 42, "event_id": GOLDEN_CHUNK.event_id,
         "sensor_id": "pi-01", "event_complete": False, "last_committed_sequence": 42},
        {"error": "bad_value", "message": "field chunk_index must be below chunk_count",
         "field": "chunk_index"},
    ]}
    # A store-side error on a decoded chunk carries that chunk's sequence.
    doc = json.loads(batch.encode_batch_result([conflict, STORED], [*items[:1], GOLDEN_CHUNK]))
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
