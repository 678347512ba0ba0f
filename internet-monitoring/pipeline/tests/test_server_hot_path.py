"""The ingest hot path's per-batch shortcuts give the same answers as the per-chunk work.

- Snapshot gauges: ``SnapshotPaths.may_match`` skips the JSON parse only when a result
  cannot hold an allow-listed field; skipping never changes a gauge (checked against the
  plain parse on generated documents, escaped keys and UTF-16 included).
- Ingest metrics aggregated per sensor and batch equal the per-chunk updates.
- Logs: one ``events_completed`` INFO line per committed batch; every event id stays on a
  DEBUG ``event_completed`` line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.common.config import DEFAULT_SNAPSHOT_FIELDS
from pipeline.common.tracing import Tracing
from pipeline.server.metrics import ServerMetrics, SnapshotPaths, snapshot_numbers
from pipeline.server.read.snapshot_cache import decode_json_payload
from pipeline.tests.server_support import TOKENS, chunk_docs, running_server, server_config, urls

FIELDS = (*DEFAULT_SNAPSHOT_FIELDS, "nested.loss_pct", "results.0.mbps")
ROOT_INDEX = "0"  # a path of list indexes only names no key: every result may match it
KEYS = st.sampled_from(["download_mbps", "rtt_ms", "nested", "loss_pct", "results", "mbps",
                        "0", "other", "rtt", "ms", "rtt_ms2", "x\"rtt_ms"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from(["rtt_ms", "download_mbps", "\"rtt_ms\":", "é"]))
DOCS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)), max_leaves=12)


def encodings(doc: Any) -> list[bytes]:
    """The ways a sensor might write the same document."""
    plain = json.dumps(doc).encode()
    return [plain, json.dumps(doc, indent=1, separators=(" ,", " : ")).encode(),
            json.dumps(doc, ensure_ascii=False).encode("utf-8"),
            b"\xef\xbb\xbf" + plain, plain.decode().encode("utf-16")]


def parsed_numbers(data: bytes) -> dict[str, float]:
    return snapshot_numbers(decode_json_payload(data), FIELDS)


@settings(max_examples=300, deadline=None)
@given(DOCS)
def test_a_skipped_parse_never_loses_a_gauge(doc: Any) -> None:
    paths = SnapshotPaths(FIELDS)
    for data in encodings(doc):
        expected = parsed_numbers(data)
        if not paths.may_match(data):
            assert expected == {}, data
        metrics = ServerMetrics(CollectorRegistry(), snapshot_fields=FIELDS)
        assert metrics.on_snapshot_payload("pi-01", data) == expected


def gauge_values(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["field"]: s.value for m in registry.collect()
            if m.name == "pipeline_snapshot_value" for s in m.samples}


# Results that overlap in their listed fields with different values (which one wins is
# the point), mixed with arbitrary documents.
RESULTS = st.one_of(st.dictionaries(st.sampled_from(["download_mbps", "rtt_ms", "lookup_ms"]),
                                    st.integers(0, 100), max_size=3), DOCS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(RESULTS, st.integers(0, 4)), min_size=1, max_size=6))
def test_a_batch_of_results_ends_with_the_gauges_of_one_by_one(docs: list) -> None:
    """Newest-first with per-field early stop == every result in turn, on any mix of
    fields, encodings and results that carry none."""
    payloads = [encodings(doc)[how] for doc, how in docs]
    one_by_one = CollectorRegistry()
    single = ServerMetrics(one_by_one, snapshot_fields=FIELDS)
    for data in payloads:
        single.on_snapshot(DEFAULT_SENSOR, decode_json_payload(data))
    batched = CollectorRegistry()
    ServerMetrics(batched, snapshot_fields=FIELDS).on_snapshot_payloads(DEFAULT_SENSOR,
                                                                       payloads)
    assert gauge_values(batched) == gauge_values(one_by_one)


def test_results_sharing_their_fields_are_parsed_once_per_batch(monkeypatch) -> None:
    import pipeline.server.metrics as metrics_mod

    parsed = []
    real = metrics_mod.decode_json_payload

    def counting(data):
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(metrics_mod, "decode_json_payload", counting)
    metrics = ServerMetrics(CollectorRegistry(), snapshot_fields=FIELDS)
    speed = [json.dumps({"download_mbps": i, "rtt_ms": i / 10}).encode() for i in range(50)]
    dns = json.dumps({"dns_ms": 3}).encode()  # carries no listed field
    values = metrics.on_snapshot_payloads(DEFAULT_SENSOR, [*speed, dns])
    assert values == {"download_mbps": 49.0, "rtt_ms": 4.9}
    assert parsed == [speed[-1]]


DEFAULT_SENSOR = "pi-01"


@pytest.mark.parametrize("data,expected", [
    (b'{"rtt\\u005fms": 4.5}', {"rtt_ms": 4.5}),                    # escaped key
    ('{"rtt_ms": 4.5}'.encode("utf-16"), {"rtt_ms": 4.5}),           # UTF-16 with BOM
    ('{"rtt_ms": 4.5}'.encode("utf-32-le"), {"rtt_ms": 4.5}),        # UTF-32 without BOM
    (b'{"rtt_ms"\n\t :\r 4.5}', {"rtt_ms": 4.5}),                     # JSON whitespace
    (b'{"nested": {"loss_pct": 0.5}}', {"nested.loss_pct": 0.5}),
    (b'{"results": [{"mbps": 93}]}', {"results.0.mbps": 93.0}),
])
def test_results_that_carry_a_field_are_parsed(data: bytes, expected: dict[str, float]) -> None:
    assert SnapshotPaths(FIELDS).may_match(data)
    assert ServerMetrics(CollectorRegistry(), snapshot_fields=FIELDS).on_snapshot_payload(
        "pi-01", data) == expected


@pytest.mark.parametrize("data", [
    b'{"test": "dns", "names": ["rtt_ms", "download_mbps"]}',   # names only as values
    b'{"nested": 1, "test": "traceroute"}',                       # half of a dotted path
    b"not json at all",
    b"",
])
def test_results_without_any_field_are_not_parsed(data: bytes) -> None:
    assert not SnapshotPaths(FIELDS).may_match(data)
    assert SnapshotPaths((*FIELDS, ROOT_INDEX)).may_match(data)


def test_a_path_of_indexes_reads_a_list_result() -> None:
    metrics = ServerMetrics(CollectorRegistry(), snapshot_fields=(*FIELDS, ROOT_INDEX))
    assert metrics.on_snapshot_payload("pi-01", b"[7, 2]") == {"0": 7.0}


def test_no_fields_means_no_parse_and_a_missing_field_keeps_its_gauge() -> None:
    assert not SnapshotPaths(()).may_match(b'{"rtt_ms": 1}')
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, snapshot_fields=("rtt_ms", "download_mbps"))
    metrics.on_snapshot_payload("pi-01", b'{"rtt_ms": 3, "download_mbps": 90}')
    metrics.on_snapshot_payload("pi-01", b'{"rtt_ms": 5}')
    metrics.on_snapshot_payload("pi-01", b'{"test": "dns"}')
    value = registry.get_sample_value
    assert value("pipeline_snapshot_value", {"sensor_id": "pi-01", "field": "rtt_ms"}) == 5
    assert value("pipeline_snapshot_value",
                 {"sensor_id": "pi-01", "field": "download_mbps"}) == 90


def test_batch_metrics_equal_the_per_chunk_updates() -> None:
    chunks = [("pi-01", 100, False, 3.0), ("pi-01", 50, True, 3.0), ("pi-02", 7, False, 900.0),
              ("pi-01", 20, False, 12.0), ("pi-02", 7, True, 0.5)]
    one, batched = CollectorRegistry(), CollectorRegistry()
    per_chunk = ServerMetrics(one)
    for sensor_id, nbytes, duplicate, latency in chunks:
        per_chunk.on_stored(sensor_id, nbytes, duplicate, latency)
    per_batch = ServerMetrics(batched)
    for sid in ("pi-01", "pi-02"):
        mine = [c for c in chunks if c[0] == sid]
        per_batch.on_stored_batch(sid, stored=sum(1 for c in mine if not c[2]),
                                  stored_bytes=sum(c[1] for c in mine if not c[2]),
                                  duplicates=sum(1 for c in mine if c[2]),
                                  latencies_ms=[c[3] for c in mine])

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in registry.collect() for s in metric.samples
                if not s.name.endswith("_created")}

    assert samples(one) == samples(batched)
    value = batched.get_sample_value
    one_, two = {"sensor_id": "pi-01"}, {"sensor_id": "pi-02"}
    assert value("pipeline_chunks_ingested_total") == 3
    assert value("pipeline_bytes_ingested_total") == 127
    assert value("server_ingest_duplicate_total", one_) == 1
    assert value("server_ingest_duplicate_total", two) == 1
    assert value("server_ingest_latency_ms_count", one_) == 3
    assert value("server_ingest_latency_ms_sum", one_) == 18.0
    assert value("server_ingest_latency_ms_bucket", {**two, "le": "1.0"}) == 1
    assert value("server_ingest_latency_ms_bucket", {**two, "le": "1000.0"}) == 2


def test_the_disabled_tracer_re_raises_and_validates_lazily() -> None:
    tracing = Tracing()
    with pytest.raises(KeyError), tracing.span("x", parent="garbage") as span:
        assert span.traceparent is None
        raise KeyError("body")
    with tracing.span("y") as span:
        span.set_attribute("k", 1)
        assert span.traceparent is None


async def test_one_info_line_per_batch_and_event_ids_at_debug(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = server_config(tmp_path)
    caplog.set_level(logging.DEBUG, logger="pipeline.server.app")
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        docs = []
        for seq in range(1, 21):
            _, (doc,) = chunk_docs("pi-01", json.dumps({"rtt_ms": seq}).encode(), seq)
            doc["attributes"] = {"window_id": "w-log"}
            docs.append(doc)

        async def post(doc: dict[str, Any]) -> int:
            async with http.post(urls(server)["ingest"] + "/v1/ingest/chunk", json=doc,
                                 headers={"Authorization": f"Bearer {TOKENS['pi-01']}"}
                                 ) as resp:
                return resp.status

        assert await asyncio.gather(*(post(d) for d in docs)) == [200] * 20
        event_ids = {d["event_id"] for d in docs}
        batches = server.committer.batches
        assert server.registry.get_sample_value(
            "pipeline_snapshot_value", {"sensor_id": "pi-01", "field": "rtt_ms"}) is not None
    mine = [r for r in caplog.records if r.name == "pipeline.server.app"]
    debug = [r for r in mine if r.getMessage().startswith("event_completed ")]
    assert all(r.levelno == logging.DEBUG for r in debug)
    assert {r.args[1] for r in debug} == event_ids  # type: ignore[index]
    summaries = [r for r in mine if r.getMessage().startswith("events_completed ")]
    assert all(r.levelno == logging.INFO for r in summaries)
    assert len(summaries) == batches < 20
    assert sum(r.args[0] for r in summaries) == 20  # type: ignore[index,misc]
    assert all(r.args[1] == 1 for r in summaries)  # type: ignore[index]
