"""The chunk decoders' fast paths agree with the strict reference readers.

``chunk_from_json`` tries a plain-comparison fast path before the strict reader, and the
Protobuf chunk decoder does the same. These properties hold them to "same chunk or same
error" on valid chunks and on chunks with one field broken in many ways.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common import proto_codec
from pipeline.common.errors import ProtocolError
from pipeline.common.messages import (
    MAX_CHUNK_COUNT,
    Chunk,
    chunk_from_json,
    chunk_from_json_strict,
    chunk_to_json,
)
from pipeline.proto import data_pb2
from pipeline.tests.wire_strategies import chunks

ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**63, 2**64, 10**400, 1.5, float("nan"), float("inf"),
    "", "x", "1.0.0", "2.0.0", "gzip", "\u00e9", "\ud800", "a" * 300, "0" * 32, "AAAA",
    "A===", "=", "QUJD\n", [], {}, {"k": 1}, {"k": "v"}, {"k": "\u00e9"},
    {str(i): "v" for i in range(40)},
]
FIELDS = ["schema_version", "sensor_id", "event_id", "sequence", "chunk_index", "chunk_count",
          "compression", "payload", "chunk_sha256", "event_sha256", "created_at",
          "logical_timestamp_ms", "clock_skew_ms", "attributes", "queue_epoch"]


ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@st.composite
def plain_chunks(draw: st.DrawFn) -> Chunk:
    """What a current sensor sends: the shape the fast paths are built for."""
    chunk_count = draw(st.integers(1, 8) | st.integers(1, MAX_CHUNK_COUNT))
    return Chunk(
        sensor_id=draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)),
        event_id=draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
        sequence=draw(st.integers(1, 2**63 - 1)),
        chunk_index=draw(st.integers(0, chunk_count - 1)), chunk_count=chunk_count,
        payload=draw(st.binary(max_size=64)), chunk_sha256=draw(st.binary(min_size=32,
                                                                          max_size=32)),
        event_sha256=draw(st.binary(min_size=32, max_size=32)),
        created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=draw(st.integers(0, 2**50)),
        clock_skew_ms=draw(st.floats(-1e6, 1e6)),
        attributes=draw(st.dictionaries(ascii_text, ascii_text, max_size=3)),
        queue_epoch=draw(st.just("") | st.from_regex(r"[0-9a-f]{8,64}", fullmatch=True)))


any_chunks = st.one_of(plain_chunks(), chunks())


def outcome(fn: Any, arg: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(arg)
    except ProtocolError as exc:
        return "error", (type(exc), exc.field)


@settings(max_examples=150, deadline=None)
@given(any_chunks)
def test_valid_chunks_decode_identically(chunk: Chunk) -> None:
    doc = json.loads(json.dumps(chunk_to_json(chunk)))
    assert outcome(chunk_from_json, doc) == outcome(chunk_from_json_strict, doc) \
        == ("ok", chunk)


def boundary_ints(chunk: Chunk) -> list[int]:
    """Integers at the edges of every integer rule, relative to this chunk."""
    count = chunk.chunk_count
    return [-1, 0, 1, count - 1, count, count + 1, MAX_CHUNK_COUNT - 1, MAX_CHUNK_COUNT,
            MAX_CHUNK_COUNT + 1, 2**63 - 1, 2**63]


@settings(max_examples=400, deadline=None)
@given(any_chunks, st.sampled_from(FIELDS), st.data(), st.booleans())
def test_one_broken_field_gives_the_same_answer(chunk: Chunk, name: str, data: st.DataObject,
                                                drop: bool) -> None:
    doc = json.loads(json.dumps(chunk_to_json(chunk)))
    if drop:
        doc.pop(name, None)
    else:
        doc[name] = data.draw(st.one_of(
            st.sampled_from(ODD_VALUES), st.sampled_from(boundary_ints(chunk)),
            st.text(max_size=12), st.integers(), st.floats(),
            st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())))
    assert outcome(chunk_from_json, doc) == outcome(chunk_from_json_strict, doc)


MISSING = object()
SAMPLE_CHUNKS = [
    Chunk(sensor_id="pi-01", event_id="0123456789abcdef" * 2, sequence=seq, chunk_index=index,
          chunk_count=count, payload=b"\x1f\x8b" + bytes(range(40)), chunk_sha256=bytes(32),
          event_sha256=bytes(range(32)), created_at="2026-11-27T05:00:00Z",
          logical_timestamp_ms=1795755600000, clock_skew_ms=skew, attributes=attrs,
          queue_epoch=epoch)
    for seq, index, count, skew, attrs, epoch in [
        (1, 0, 1, 0.0, {}, ""), (42, 2, 3, -12.5, {"window_id": "w-1"}, "ab" * 8),
        (2**63 - 1, 65535, 65536, 3, {"a": "b", "traceparent": "x"}, "f" * 64)]]


def test_every_field_at_every_edge_gives_the_same_answer() -> None:
    """Exhaustive over fields x edge values for a few realistic chunks."""
    checked = 0
    for chunk in SAMPLE_CHUNKS:
        base = json.loads(json.dumps(chunk_to_json(chunk)))
        assert outcome(chunk_from_json, base) == ("ok", chunk)
        for name in FIELDS:
            for value in [MISSING, *ODD_VALUES, *boundary_ints(chunk)]:
                doc = dict(base)
                if value is MISSING:
                    doc.pop(name, None)
                else:
                    doc[name] = value
                assert outcome(chunk_from_json, doc) == outcome(chunk_from_json_strict, doc), \
                    (name, value)
                checked += 1
    assert checked > 1500


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDabcd0123+/=\n -_", max_size=16))
def test_strict_base64_never_accepts_what_validate_refuses(text: str) -> None:
    """The fast path decodes with ``a2b_base64(strict_mode=True)``; whatever it accepts,
    the reference ``b64decode(validate=True)`` accepts with the same bytes."""
    try:
        fast = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        return
    assert base64.b64decode(text.encode("ascii"), validate=True) == fast


@settings(max_examples=150, deadline=None)
@given(any_chunks, st.sampled_from(FIELDS), st.data())
def test_protobuf_fast_path_matches_the_strict_path(chunk: Chunk, name: str,
                                                    data: st.DataObject) -> None:
    message = data_pb2.Chunk()
    message.ParseFromString(proto_codec.encode_chunk_proto(chunk))
    descriptor = message.DESCRIPTOR.fields_by_name[name]
    if name == "attributes":
        message.attributes.clear()
        message.attributes.update(data.draw(st.dictionaries(
            st.text(max_size=300), st.text(max_size=1100), max_size=40)))
    elif descriptor.type == descriptor.TYPE_STRING:
        setattr(message, name, data.draw(st.one_of(st.sampled_from(
            ["", "1.0.0", "2.0.0", "gzip", "0" * 32, "a" * 300, "pi-01"]), st.text(max_size=70))))
    elif descriptor.type == descriptor.TYPE_BYTES:
        setattr(message, name, data.draw(st.binary(max_size=40)))
    elif descriptor.type == descriptor.TYPE_DOUBLE:
        setattr(message, name, data.draw(st.floats()))
    else:
        setattr(message, name, data.draw(st.one_of(
            st.sampled_from(boundary_ints(chunk)[:-1]), st.integers(-2**63, 2**63 - 1))))
    assert outcome(proto_codec._chunk_from_message, message) == \
        outcome(proto_codec._chunk_from_message_strict, message)
