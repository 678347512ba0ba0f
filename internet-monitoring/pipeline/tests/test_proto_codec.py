"""The Protobuf codec: the .proto files in step with the dataclasses, golden wire bytes,
Protobuf-only failures. Same rules as the JSON codec: test_proto_codec_rules.py; batches:
test_proto_codec_batches.py."""

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

from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    MissingField,
    ProtocolError,
    UnsupportedSchemaVersion,
)
from pipeline.common.messages import (
    BODY_TYPES,
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
)
from pipeline.common.proto_codec import (
    decode_chunk_proto,
    decode_envelope_proto,
    encode_chunk_proto,
    encode_envelope_proto,
)
from pipeline.proto import control_pb2, data_pb2
from pipeline.tests.test_messages import GOLDEN_CHUNK, GOLDEN_ENVELOPES, golden_chunk_doc
from pipeline.version import PIPELINE_SCHEMA_VERSION, SUPPORTED_SCHEMA_MAJOR


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
        cases: tuple[tuple[Callable[[Any], object], Any], ...] = (
            (decode_envelope, encode_envelope(e)),
            (decode_envelope_proto, encode_envelope_proto(e)),
            (decode_chunk, encode_chunk(c)),
            (decode_chunk_proto, encode_chunk_proto(c)))
        for decode, data in cases:
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


def _check_field_type(cls: type, name: str, hint: Any, fd: Any) -> None:
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
