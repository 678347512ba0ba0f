"""The 1.0 JSON wire model: golden documents from protocol.md, strict decoding, fuzzing."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    MissingField,
    PayloadTooLarge,
    ProtocolError,
    UnsupportedSchemaVersion,
)
from pipeline.common.messages import (
    Chunk,
    ChunkAck,
    ChunkRequest,
    Command,
    CommandResponse,
    Envelope,
    Heartbeat,
    IngestResult,
    chunk_from_json,
    decode_chunk,
    decode_envelope,
    encode_chunk,
    encode_envelope,
    envelope_from_json,
    ingest_result_from_json,
    ingest_result_to_json,
)
from pipeline.tests import wire_strategies as ws

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------
# Golden documents, written from protocol.md


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


SENT_AT = "2026-11-27T05:00:00+00:00"
EVENT = b'{"probe": "dns", "target": "example.org", "latency_ms": 12.5}\n' * 3
SLICE = EVENT[:64]
PAYLOAD = gzip.compress(SLICE, mtime=0)
CHUNK_SHA = hashlib.sha256(PAYLOAD).digest()
EVENT_SHA = hashlib.sha256(EVENT).digest()
EVENT_ID = "9f0c2a7e41b35d6c8e90f1a2b3c4d5e6"
WINDOW_ID = "pi-01-1795755600000"

BODY_KEYS_1_0 = {
    "heartbeat": {"software_version", "last_committed_sequence", "queue_depth",
                  "clock_skew_ms"},
    "chunk_request": {"since_sequence", "max_chunks", "max_bytes", "window_id",
                      "max_in_flight"},
    "chunk_ack": {"window_id", "committed_sequences", "reset_window"},
    "command_response": {"command_id", "success", "message"},
}
CHUNK_KEYS_1_0 = {"schema_version", "sensor_id", "event_id", "sequence", "chunk_index",
                  "chunk_count", "compression", "payload", "chunk_sha256", "event_sha256",
                  "created_at", "logical_timestamp_ms", "clock_skew_ms", "attributes"}


def envelope_doc(body_type: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": "1.0.0", "sensor_id": "pi-01", "sent_at": SENT_AT,
            "capabilities": ["chunks", "heartbeats"], "body_type": body_type, "body": body}


GOLDEN_ENVELOPES: list[tuple[dict[str, Any], Envelope]] = [
    (envelope_doc("heartbeat", {"software_version": "1.4.2", "last_committed_sequence": 41,
                                "queue_depth": 7, "clock_skew_ms": -12.5}),
     Envelope(sensor_id="pi-01", sent_at=SENT_AT,
              body=Heartbeat(software_version="1.4.2", last_committed_sequence=41,
                             queue_depth=7, clock_skew_ms=-12.5))),
    (envelope_doc("chunk_request", {"since_sequence": 41, "max_chunks": 50,
                                    "max_bytes": 1048576, "window_id": WINDOW_ID,
                                    "max_in_flight": 8}),
     Envelope(sensor_id="pi-01", sent_at=SENT_AT,
              body=ChunkRequest(since_sequence=41, max_chunks=50, max_bytes=1048576,
                                window_id=WINDOW_ID, max_in_flight=8))),
    (envelope_doc("chunk_ack", {"window_id": WINDOW_ID, "committed_sequences": [42, 43, 45],
                                "reset_window": False}),
     Envelope(sensor_id="pi-01", sent_at=SENT_AT,
              body=ChunkAck(window_id=WINDOW_ID, committed_sequences=(42, 43, 45),
                            reset_window=False))),
    (envelope_doc("command_response", {"command_id": "cmd-7", "success": True,
                                       "message": "ok"}),
     Envelope(sensor_id="pi-01", sent_at=SENT_AT,
              body=CommandResponse(command_id="cmd-7", success=True, message="ok"))),
]


def golden_chunk_doc() -> dict[str, Any]:
    return {"schema_version": "1.0.0", "sensor_id": "pi-01", "event_id": EVENT_ID,
            "sequence": 42, "chunk_index": 0, "chunk_count": 3, "compression": "gzip",
            "payload": _b64(PAYLOAD), "chunk_sha256": _b64(CHUNK_SHA),
            "event_sha256": _b64(EVENT_SHA), "created_at": "2026-11-27T05:00:00Z",
            "logical_timestamp_ms": 1795755600000, "clock_skew_ms": 0.0,
            "attributes": {"window_id": WINDOW_ID}}


GOLDEN_CHUNK = Chunk(
    sensor_id="pi-01", event_id=EVENT_ID, sequence=42, chunk_index=0, chunk_count=3,
    payload=PAYLOAD, chunk_sha256=CHUNK_SHA, event_sha256=EVENT_SHA,
    created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=1795755600000,
    clock_skew_ms=0.0, attributes={"window_id": WINDOW_ID})


@pytest.mark.parametrize("doc, expected", GOLDEN_ENVELOPES,
                         ids=[d["body_type"] for d, _ in GOLDEN_ENVELOPES])
def test_golden_envelope_decodes_to_dataclass(doc: dict[str, Any], expected: Envelope) -> None:
    decoded = decode_envelope(json.dumps(doc).encode("utf-8"))
    assert decoded == expected
    assert decoded.body_type == doc["body_type"]


@pytest.mark.parametrize("doc, model", GOLDEN_ENVELOPES,
                         ids=[d["body_type"] for d, _ in GOLDEN_ENVELOPES])
def test_golden_envelope_encodes_to_exact_1_0_document(doc: dict[str, Any],
                                                       model: Envelope) -> None:
    encoded = json.loads(encode_envelope(model))
    assert encoded == doc
    assert set(encoded["body"]) == BODY_KEYS_1_0[doc["body_type"]]
    assert set(encoded) == {"schema_version", "sensor_id", "sent_at", "capabilities",
                            "body_type", "body"}


def test_heartbeat_frame_is_byte_for_byte_the_documented_layout() -> None:
    model = GOLDEN_ENVELOPES[0][1]
    assert encode_envelope(model) == (
        '{"schema_version": "1.0.0", "sensor_id": "pi-01", '
        '"sent_at": "2026-11-27T05:00:00+00:00", "capabilities": ["chunks", "heartbeats"], '
        '"body_type": "heartbeat", "body": {"software_version": "1.4.2", '
        '"last_committed_sequence": 41, "queue_depth": 7, "clock_skew_ms": -12.5}}')


def test_golden_chunk_decodes_to_dataclass() -> None:
    chunk = decode_chunk(json.dumps(golden_chunk_doc()))
    assert chunk == GOLDEN_CHUNK
    assert gzip.decompress(chunk.payload) == SLICE
    assert chunk.window_id == WINDOW_ID
    assert chunk.queue_epoch == ""


def test_golden_chunk_encodes_to_exact_1_0_document() -> None:
    encoded = json.loads(encode_chunk(GOLDEN_CHUNK))
    assert encoded == golden_chunk_doc()
    assert set(encoded) == CHUNK_KEYS_1_0


def test_ingest_result_golden() -> None:
    doc = {"stored": True, "duplicate": False, "sequence": 42, "event_id": EVENT_ID,
           "sensor_id": "pi-01", "event_complete": False, "last_committed_sequence": 42}
    result = IngestResult(stored=True, duplicate=False, sequence=42, event_id=EVENT_ID,
                          sensor_id="pi-01", event_complete=False, last_committed_sequence=42)
    assert ingest_result_from_json(doc) == result
    assert ingest_result_to_json(result) == doc


def test_envelope_extensions_go_top_level_and_only_when_set() -> None:
    base = GOLDEN_ENVELOPES[0][1]
    extended = Envelope(sensor_id="pi-01", sent_at=SENT_AT, body=base.body,
                        capabilities=("chunks", "heartbeats", "epoch", "server_time"),
                        queue_epoch="0123abcd", server_time="2026-11-27T05:00:01+00:00")
    doc = json.loads(encode_envelope(extended))
    assert doc["queue_epoch"] == "0123abcd"
    assert doc["server_time"] == "2026-11-27T05:00:01+00:00"
    assert set(doc["body"]) == BODY_KEYS_1_0["heartbeat"]
    assert decode_envelope(encode_envelope(extended)) == extended


def test_heartbeat_stats_appear_in_body_only_when_set() -> None:
    body = Heartbeat(software_version="2.0.0", last_committed_sequence=1, queue_depth=0,
                     clock_skew_ms=0.0, retry_total=3, dropped_total=None, quarantined_total=0)
    env = Envelope(sensor_id="pi-01", sent_at=SENT_AT, body=body)
    doc = json.loads(encode_envelope(env))
    assert set(doc["body"]) == BODY_KEYS_1_0["heartbeat"] | {"retry_total", "quarantined_total"}
    assert doc["body"]["retry_total"] == 3 and doc["body"]["quarantined_total"] == 0
    assert decode_envelope(encode_envelope(env)) == env


def test_chunk_queue_epoch_appears_only_when_set() -> None:
    with_epoch = Chunk(**{**GOLDEN_CHUNK.__dict__, "queue_epoch": "feedf00d"})
    doc = json.loads(encode_chunk(with_epoch))
    assert set(doc) == CHUNK_KEYS_1_0 | {"queue_epoch"}
    assert decode_chunk(encode_chunk(with_epoch)) == with_epoch


def test_command_round_trips() -> None:
    env = Envelope(sensor_id="pi-01", sent_at=SENT_AT,
                   body=Command(command_id="c1", name="rotate_token",
                                args={"token": "t0k", "not_after": "2027-01-01T00:00:00Z"}))
    doc = json.loads(encode_envelope(env))
    assert doc["body_type"] == "command"
    assert doc["body"] == {"command_id": "c1", "name": "rotate_token",
                           "args": {"token": "t0k", "not_after": "2027-01-01T00:00:00Z"}}
    assert decode_envelope(encode_envelope(env)) == env


def test_receivers_ignore_unknown_fields() -> None:
    doc = envelope_doc("heartbeat", {"software_version": "9.0", "last_committed_sequence": 1,
                                     "queue_depth": 2, "clock_skew_ms": 0, "future": [1]})
    doc["future_top_level"] = {"x": 1}
    assert decode_envelope(json.dumps(doc)).body == Heartbeat("9.0", 1, 2, 0.0)
    chunk_doc = {**golden_chunk_doc(), "future": True}
    assert decode_chunk(json.dumps(chunk_doc)) == GOLDEN_CHUNK


def test_minor_and_patch_versions_of_the_same_major_are_accepted() -> None:
    chunk_doc = {**golden_chunk_doc(), "schema_version": "1.7.3"}
    assert decode_chunk(json.dumps(chunk_doc)).schema_version == "1.7.3"
    env_doc = {**GOLDEN_ENVELOPES[1][0], "schema_version": "1.7.3"}
    assert decode_envelope(json.dumps(env_doc)).schema_version == "1.7.3"


# ---------------------------------------------------------------------------------------
# Strict decoding: each case names the exception class, the field and the HTTP status

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for name in parents:
            target = target[name]
        target[last] = value
    return apply


def _drop(path: str) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for name in parents:
            target = target[name]
        del target[last]
    return apply


CHUNK_CASES: list[tuple[str, Mutation, type[ProtocolError], str, int]] = [
    ("missing sequence", _drop("sequence"), MissingField, "sequence", 400),
    ("missing payload", _drop("payload"), MissingField, "payload", 400),
    ("missing schema", _drop("schema_version"), MissingField, "schema_version", 400),
    ("sequence as string", _set("sequence", "42"), FieldTypeError, "sequence", 400),
    ("sequence as bool", _set("sequence", True), FieldTypeError, "sequence", 400),
    ("sequence as float", _set("sequence", 42.0), FieldTypeError, "sequence", 400),
    ("sequence as null", _set("sequence", None), FieldTypeError, "sequence", 400),
    ("chunk_count as bool", _set("chunk_count", True), FieldTypeError, "chunk_count", 400),
    ("negative sequence", _set("sequence", -1), FieldValueError, "sequence", 400),
    ("sequence beyond int64", _set("sequence", 2**63), FieldValueError, "sequence", 400),
    ("index == count", _set("chunk_index", 3), FieldValueError, "chunk_index", 400),
    ("index > count", _set("chunk_index", 7), FieldValueError, "chunk_index", 400),
    ("zero count", _set("chunk_count", 0), FieldValueError, "chunk_count", 400),
    ("huge count", _set("chunk_count", 10**6), FieldValueError, "chunk_count", 400),
    ("payload not base64", _set("payload", "not base64!!"), FieldValueError, "payload", 400),
    ("payload with newline", _set("payload", _b64(PAYLOAD) + "\n"), FieldValueError,
     "payload", 400),
    ("payload bad padding", _set("payload", "YWJjZA="), FieldValueError, "payload", 400),
    ("payload non-ascii", _set("payload", "YWJj\u00e9"), FieldValueError, "payload", 400),
    ("payload as list", _set("payload", [1, 2]), FieldTypeError, "payload", 400),
    ("chunk hash 31 bytes", _set("chunk_sha256", _b64(bytes(31))), FieldValueError,
     "chunk_sha256", 400),
    ("event hash 33 bytes", _set("event_sha256", _b64(bytes(33))), FieldValueError,
     "event_sha256", 400),
    ("event hash empty", _set("event_sha256", ""), FieldValueError, "event_sha256", 400),
    ("payload 2 MB", _set("payload", _b64(bytes(2 * 1024 * 1024))), PayloadTooLarge,
     "payload", 413),
    ("payload just over 1 MiB", _set("payload", _b64(bytes(1024 * 1024 + 2))),
     PayloadTooLarge, "payload", 413),
    ("10k-char sensor id", _set("sensor_id", "p" * 10_000), PayloadTooLarge, "sensor_id", 413),
    ("long created_at", _set("created_at", "2" * 65), PayloadTooLarge, "created_at", 413),
    ("schema 2.0.0", _set("schema_version", "2.0.0"), UnsupportedSchemaVersion,
     "schema_version", 400),
    ("schema 0.9.0", _set("schema_version", "0.9.0"), UnsupportedSchemaVersion,
     "schema_version", 400),
    ("schema not semver", _set("schema_version", "1.0"), FieldValueError,
     "schema_version", 400),
    ("schema unicode digit", _set("schema_version", "\u0661.0.0"), FieldValueError,
     "schema_version", 400),
    ("schema superscript", _set("schema_version", "\u00b2.0.0"), FieldValueError,
     "schema_version", 400),
    ("schema as int", _set("schema_version", 1), FieldTypeError, "schema_version", 400),
    ("sensor path traversal", _set("sensor_id", "../../etc/passwd"), FieldValueError,
     "sensor_id", 400),
    ("sensor with slash", _set("sensor_id", "pi/01"), FieldValueError, "sensor_id", 400),
    ("sensor trailing newline", _set("sensor_id", "pi-01\n"), FieldValueError,
     "sensor_id", 400),
    ("sensor with NUL", _set("sensor_id", "pi-01\x00"), FieldValueError, "sensor_id", 400),
    ("sensor cyrillic i", _set("sensor_id", "p\u0456-01"), FieldValueError, "sensor_id", 400),
    ("sensor fullwidth", _set("sensor_id", "\uff50\uff49-01"), FieldValueError,
     "sensor_id", 400),
    ("sensor empty", _set("sensor_id", ""), FieldValueError, "sensor_id", 400),
    ("sensor lone surrogate", _set("sensor_id", "pi\ud800"), FieldValueError, "sensor_id", 400),
    ("event id uppercase", _set("event_id", EVENT_ID.upper()), FieldValueError, "event_id", 400),
    ("event id short", _set("event_id", EVENT_ID[:31]), FieldValueError, "event_id", 400),
    ("event id long", _set("event_id", EVENT_ID + "0"), PayloadTooLarge, "event_id", 413),
    ("compression zstd", _set("compression", "zstd"), FieldValueError, "compression", 400),
    ("attributes list", _set("attributes", ["window_id"]), FieldTypeError, "attributes", 400),
    ("attribute int", _set("attributes", {"window_id": 1}), FieldTypeError,
     "attributes.window_id", 400),
    ("too many attributes", _set("attributes", {f"k{i}": "v" for i in range(33)}),
     PayloadTooLarge, "attributes", 413),
    ("attribute lone surrogate", _set("attributes", {"w": "\udc00"}), FieldValueError,
     "attributes", 400),
    ("queue epoch not hex", _set("queue_epoch", "not-hex!"), FieldValueError,
     "queue_epoch", 400),
    ("queue epoch empty", _set("queue_epoch", ""), FieldValueError, "queue_epoch", 400),
    ("skew as string", _set("clock_skew_ms", "0"), FieldTypeError, "clock_skew_ms", 400),
    ("skew as bool", _set("clock_skew_ms", False), FieldTypeError, "clock_skew_ms", 400),
    ("skew overflows float", _set("clock_skew_ms", 10**400), FieldValueError,
     "clock_skew_ms", 400),
    ("created_at lone surrogate", _set("created_at", "\ud800"), FieldValueError,
     "created_at", 400),
]


@pytest.mark.parametrize("mutate, error, field, status",
                         [c[1:] for c in CHUNK_CASES], ids=[c[0] for c in CHUNK_CASES])
def test_chunk_strict_decoding(mutate: Mutation, error: type[ProtocolError], field: str,
                               status: int) -> None:
    doc = golden_chunk_doc()
    mutate(doc)
    with pytest.raises(error) as info:
        decode_chunk(json.dumps(doc))
    assert type(info.value) is error
    assert info.value.field == field
    assert info.value.http_status == status
    assert info.value.to_json()["field"] == field
    assert info.value.to_json()["error"] == error.code


def test_infinite_float_from_json_is_refused() -> None:
    text = json.dumps(golden_chunk_doc()).replace('"clock_skew_ms": 0.0', '"clock_skew_ms": 1e999')
    with pytest.raises(FieldValueError) as info:
        decode_chunk(text)
    assert info.value.field == "clock_skew_ms"
    nan_text = text.replace("1e999", "NaN")
    with pytest.raises(FieldValueError):
        decode_chunk(nan_text)


def heartbeat_doc() -> dict[str, Any]:
    return copy.deepcopy(GOLDEN_ENVELOPES[0][0])


def ack_doc() -> dict[str, Any]:
    return copy.deepcopy(GOLDEN_ENVELOPES[2][0])


ENVELOPE_CASES: list[tuple[str, Callable[[], dict[str, Any]], Mutation,
                           type[ProtocolError], str, int]] = [
    ("unknown body_type", heartbeat_doc, _set("body_type", "reboot"), FieldValueError,
     "body_type", 400),
    ("body_type missing", heartbeat_doc, _drop("body_type"), MissingField, "body_type", 400),
    ("body missing", heartbeat_doc, _drop("body"), MissingField, "body", 400),
    ("body is a list", heartbeat_doc, _set("body", [1]), FieldTypeError, "body", 400),
    ("body field missing", heartbeat_doc, _drop("body.queue_depth"), MissingField,
     "body.queue_depth", 400),
    ("body int as bool", heartbeat_doc, _set("body.queue_depth", True), FieldTypeError,
     "body.queue_depth", 400),
    ("body int as string", heartbeat_doc, _set("body.last_committed_sequence", "41"),
     FieldTypeError, "body.last_committed_sequence", 400),
    ("body negative", heartbeat_doc, _set("body.queue_depth", -3), FieldValueError,
     "body.queue_depth", 400),
    ("skew as string", heartbeat_doc, _set("body.clock_skew_ms", "1.5"), FieldTypeError,
     "body.clock_skew_ms", 400),
    ("stats as string", heartbeat_doc, _set("body.retry_total", "3"), FieldTypeError,
     "body.retry_total", 400),
    ("version long", heartbeat_doc, _set("body.software_version", "v" * 300), PayloadTooLarge,
     "body.software_version", 413),
    ("schema 2.0.0", heartbeat_doc, _set("schema_version", "2.0.0"), UnsupportedSchemaVersion,
     "schema_version", 400),
    ("schema missing", heartbeat_doc, _drop("schema_version"), MissingField,
     "schema_version", 400),
    ("sensor traversal", heartbeat_doc, _set("sensor_id", "..\\..\\x"), FieldValueError,
     "sensor_id", 400),
    ("sensor unicode", heartbeat_doc, _set("sensor_id", "\u00e9t\u00e9"), FieldValueError,
     "sensor_id", 400),
    ("sensor huge", heartbeat_doc, _set("sensor_id", "s" * 10_000), PayloadTooLarge,
     "sensor_id", 413),
    ("capabilities string", heartbeat_doc, _set("capabilities", "chunks"), FieldTypeError,
     "capabilities", 400),
    ("capabilities of ints", heartbeat_doc, _set("capabilities", [1]), FieldTypeError,
     "capabilities", 400),
    ("sent_at long", heartbeat_doc, _set("sent_at", "x" * 65), PayloadTooLarge, "sent_at", 413),
    ("epoch not hex", heartbeat_doc, _set("queue_epoch", "zz"), FieldValueError,
     "queue_epoch", 400),
    ("acks not a list", ack_doc, _set("body.committed_sequences", "42,43"), FieldTypeError,
     "body.committed_sequences", 400),
    ("ack negative", ack_doc, _set("body.committed_sequences", [42, -1]), FieldValueError,
     "body.committed_sequences[1]", 400),
    ("ack as bool", ack_doc, _set("body.committed_sequences", [True]), FieldTypeError,
     "body.committed_sequences[0]", 400),
    ("reset_window as int", ack_doc, _set("body.reset_window", 0), FieldTypeError,
     "body.reset_window", 400),
    ("reset_window missing", ack_doc, _drop("body.reset_window"), MissingField,
     "body.reset_window", 400),
]


@pytest.mark.parametrize("make, mutate, error, field, status", [c[1:] for c in ENVELOPE_CASES],
                         ids=[c[0] for c in ENVELOPE_CASES])
def test_envelope_strict_decoding(make: Callable[[], dict[str, Any]], mutate: Mutation,
                                  error: type[ProtocolError], field: str, status: int) -> None:
    doc = make()
    mutate(doc)
    with pytest.raises(error) as info:
        decode_envelope(json.dumps(doc))
    assert type(info.value) is error
    assert info.value.field == field
    assert info.value.http_status == status


def test_unknown_major_is_refused_before_the_rest_is_read() -> None:
    doc = {"schema_version": "2.0.0", "body_type": "something_new", "body": "anything"}
    with pytest.raises(UnsupportedSchemaVersion) as info:
        decode_envelope(json.dumps(doc))
    assert info.value.field == "schema_version"
    with pytest.raises(UnsupportedSchemaVersion):
        decode_chunk(json.dumps({"schema_version": "2.0.0", "payload": 17}))


@pytest.mark.parametrize("decode", [decode_envelope, decode_chunk])
@pytest.mark.parametrize("raw, error", [
    (b"[1, 2]", FieldTypeError), (b'"pi-01"', FieldTypeError), (b"42", FieldTypeError),
    (b"null", FieldTypeError), (b"{", ProtocolError), (b"", ProtocolError),
    (b"\xff\xfe{}", ProtocolError), (b"{'a': 1}", ProtocolError), ("[" * 100_000, ProtocolError),
])
def test_not_an_object(decode: Callable[[Any], Any], raw: Any, error: type[ProtocolError]) -> None:
    with pytest.raises(error) as info:
        decode(raw)
    assert type(info.value) is error
    assert info.value.http_status == 400
    assert info.value.field is None


# ---------------------------------------------------------------------------------------
# Properties


@FAST
@given(ws.envelopes)
def test_envelope_json_round_trip(env: Envelope) -> None:
    assert decode_envelope(encode_envelope(env)) == env
    assert decode_envelope(encode_envelope(env).encode("utf-8")) == env


@FAST
@given(ws.chunks())
def test_chunk_json_round_trip(chunk: Chunk) -> None:
    assert decode_chunk(encode_chunk(chunk)) == chunk


@FAST
@given(ws.envelopes)
def test_one_point_zero_bodies_carry_no_extra_keys(env: Envelope) -> None:
    doc = json.loads(encode_envelope(env))
    if env.body_type in BODY_KEYS_1_0 and env.body_type != "heartbeat":
        assert set(doc["body"]) == BODY_KEYS_1_0[env.body_type]
    if isinstance(env.body, Heartbeat):
        stats = {n for n in ("retry_total", "dropped_total", "quarantined_total")
                 if getattr(env.body, n) is not None}
        assert set(doc["body"]) == BODY_KEYS_1_0["heartbeat"] | stats
    assert ("queue_epoch" in doc) == (env.queue_epoch is not None)
    assert ("server_time" in doc) == (env.server_time is not None)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_only_protocol_errors(raw: bytes) -> None:
    for decode in (decode_envelope, decode_chunk):
        try:
            decode(raw)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(ws.json_values)
def test_fuzz_json_values_only_protocol_errors(value: Any) -> None:
    text = json.dumps(value)
    for decode in (decode_envelope, decode_chunk):
        try:
            decode(text)
        except ProtocolError:
            pass


def _mutated(doc: dict[str, Any], key: str, value: Any, drop: bool) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    if drop:
        doc.pop(key, None)
    else:
        doc[key] = value
    return doc


# A mutated key may surface as an error on a field checked against it.
RELATED = {"chunk_count": {"chunk_index"}, "body_type": {"body"}, "body": {"body"}}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(CHUNK_KEYS_1_0 | {"queue_epoch"})), ws.json_values, st.booleans())
def test_fuzz_one_chunk_field_names_that_field(key: str, value: Any, drop: bool) -> None:
    doc = _mutated(golden_chunk_doc(), key, value, drop)
    try:
        chunk_from_json(json.loads(json.dumps(doc)))
    except ProtocolError as exc:
        assert exc.field is not None
        assert exc.field.split(".")[0] in {key} | RELATED.get(key, set())


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(range(len(GOLDEN_ENVELOPES))), st.booleans(), st.data())
def test_fuzz_one_envelope_field_names_that_field(index: int, in_body: bool,
                                                  data: st.DataObject) -> None:
    doc = copy.deepcopy(GOLDEN_ENVELOPES[index][0])
    target = doc["body"] if in_body else doc
    key = data.draw(st.sampled_from(sorted(target)))
    value, drop = data.draw(ws.json_values), data.draw(st.booleans())
    if drop:
        del target[key]
    else:
        target[key] = value
    try:
        envelope_from_json(json.loads(json.dumps(doc)))
    except ProtocolError as exc:
        assert exc.field is not None
        name = exc.field.split("[")[0]
        expected = f"body.{key}" if in_body else key
        assert name == expected or name.split(".")[0] in RELATED.get(key, set())

