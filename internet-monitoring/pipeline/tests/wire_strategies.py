"""Hypothesis strategies for the wire model: every message type, valid within the limits
the decoders enforce (so a decoded value can always be re-encoded), plus JSON-ish junk."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from pipeline.common.batch import ChunkRejection
from pipeline.common.messages import (
    EPOCH_RE,
    EVENT_ID_RE,
    MAX_ATTRIBUTE_VALUE,
    MAX_CHUNK_COUNT,
    MAX_LIST,
    MAX_MESSAGE,
    MAX_SEQUENCE,
    MAX_STRING,
    SENSOR_ID_RE,
    SHA256_LEN,
    Chunk,
    ChunkAck,
    ChunkRequest,
    Command,
    CommandResponse,
    Envelope,
    Heartbeat,
    IngestResult,
)
from pipeline.version import SUPPORTED_SCHEMA_MAJOR

# Any unicode scalar value: lone surrogates are not valid text on either encoding.
_chars = st.characters(exclude_categories=["Cs"])


def text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(_chars, max_size=max_size)


sensor_ids = st.from_regex(SENSOR_ID_RE, fullmatch=True)
event_ids = st.from_regex(EVENT_ID_RE, fullmatch=True)
epochs = st.from_regex(EPOCH_RE, fullmatch=True)
counters = st.integers(min_value=0, max_value=MAX_SEQUENCE)
small_counters = st.integers(min_value=0, max_value=10_000)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
sha256s = st.binary(min_size=SHA256_LEN, max_size=SHA256_LEN)
schema_versions = st.tuples(st.integers(0, 999_999), st.integers(0, 999_999)).map(
    lambda mp: f"{SUPPORTED_SCHEMA_MAJOR}.{mp[0]}.{mp[1]}")
capabilities = st.lists(text(64), max_size=8).map(tuple)
timestamps = text(64)

heartbeats = st.builds(
    Heartbeat, software_version=text(), last_committed_sequence=counters,
    queue_depth=counters, clock_skew_ms=finite_floats,
    retry_total=st.none() | counters, dropped_total=st.none() | counters,
    quarantined_total=st.none() | counters)
chunk_requests = st.builds(
    ChunkRequest, since_sequence=counters, max_chunks=st.integers(1, MAX_LIST),
    max_bytes=st.integers(1, MAX_SEQUENCE), window_id=text(),
    max_in_flight=st.integers(1, MAX_LIST))
chunk_acks = st.builds(
    ChunkAck, window_id=text(), committed_sequences=st.lists(counters, max_size=20).map(tuple),
    reset_window=st.booleans())
command_responses = st.builds(
    CommandResponse, command_id=text(), success=st.booleans(), message=text(200))
commands = st.builds(
    Command, command_id=text(), name=text(),
    args=st.dictionaries(text(20), text(40), max_size=4))
bodies = st.one_of(heartbeats, chunk_requests, chunk_acks, command_responses, commands)

envelopes = st.builds(
    Envelope, sensor_id=sensor_ids, sent_at=timestamps, body=bodies,
    capabilities=capabilities, schema_version=schema_versions,
    queue_epoch=st.none() | epochs, server_time=st.none() | text(MAX_STRING))


@st.composite
def chunks(draw: st.DrawFn, max_payload: int = 512) -> Chunk:
    chunk_count = draw(st.integers(1, MAX_CHUNK_COUNT))
    return Chunk(
        sensor_id=draw(sensor_ids),
        event_id=draw(event_ids),
        sequence=draw(counters),
        chunk_index=draw(st.integers(0, chunk_count - 1)),
        chunk_count=chunk_count,
        payload=draw(st.binary(max_size=max_payload)),
        chunk_sha256=draw(sha256s),
        event_sha256=draw(sha256s),
        created_at=draw(timestamps),
        logical_timestamp_ms=draw(counters),
        clock_skew_ms=draw(finite_floats),
        attributes=draw(st.dictionaries(text(MAX_STRING), text(MAX_ATTRIBUTE_VALUE), max_size=4)),
        schema_version=draw(schema_versions),
        queue_epoch=draw(st.just("") | epochs),
    )


ingest_results = st.builds(
    IngestResult, stored=st.booleans(), duplicate=st.booleans(), sequence=counters,
    event_id=text(32), sensor_id=sensor_ids, event_complete=st.booleans(),
    last_committed_sequence=counters)
error_codes = st.sampled_from(["missing_field", "bad_type", "bad_value", "too_large",
                               "chunk_hash_mismatch", "sequence_conflict", "throttled",
                               "store_unavailable", "some_future_code"])
rejections = st.builds(
    ChunkRejection, code=error_codes, message=text(MAX_MESSAGE // 16),
    field=st.none() | st.text(_chars, min_size=1, max_size=40),
    sequence=st.none() | counters)
outcomes = st.one_of(ingest_results, rejections)

# Arbitrary JSON values: what a hostile or broken peer can put anywhere in a document.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**320),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=10), children, max_size=4),
    max_leaves=12)
