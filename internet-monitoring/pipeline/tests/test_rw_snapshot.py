"""Remote-write events in the sensor's snapshot (read/rw_snapshot.py, the snapshot cache)
and in ``pipeline_snapshot_value`` for the names in ``metrics.snapshot_metrics``."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.common import remote_write as rw
from pipeline.server.read.rw_snapshot import SeriesBook, field_name
from pipeline.server.read.snapshot_cache import SnapshotCache
from pipeline.server.store.records import StoredEvent
from pipeline.tests.server_support import running_server, server_config

RW = {rw.CONTENT_TYPE_ATTRIBUTE: rw.EVENT_CONTENT_TYPE}


def data(*series: tuple[str, tuple[tuple[str, str], ...], list[tuple[int, float]]]) -> bytes:
    return rw.build([rw.Series((("__name__", name), *labels), tuple(samples))
                     for name, labels, samples in series]).SerializeToString()


def event(row: int, payload: bytes, *, ts: int = 1000, attributes: dict[str, str] | None = None
          ) -> StoredEvent:
    return StoredEvent(row_id=row, sensor_id="pi-01", epoch="", event_id=f"e{row}",
                       event_sha256=b"", data=payload, logical_timestamp_ms=ts,
                       created_at="", completed_at=100.0 + row, first_sequence=row,
                       last_sequence=row, attributes=dict(RW if attributes is None
                                                          else attributes))


def test_book_keeps_the_newest_sample_per_series_and_ignores_older_backfill() -> None:
    book = SeriesBook()
    a = (("target", "a"),)
    b = (("target", "b"),)
    changed = book.update("pi-01", data(("probe_success", a, [(10, 1.0), (20, 0.0)]),
                                        ("probe_success", b, [(20, 1.0)])))
    assert changed == {("probe_success", a): 0.0, ("probe_success", b): 1.0}
    assert book.update("pi-01", data(("probe_success", a, [(15, 1.0)]))) == {}  # backfill
    book.update("pi-01", data(("probe_success", b, [(30, math.nan)])))
    assert book.series("pi-01") == (
        {"name": "probe_success", "labels": {"target": "a"}, "value": 0.0, "timestamp_ms": 20},
        {"name": "probe_success", "labels": {"target": "b"}, "value": None,
         "timestamp_ms": 30})
    assert book.series("pi-02") == ()
    assert book.update("pi-01", b"\xff garbage") == {}


def test_book_is_bounded_per_sensor() -> None:
    book = SeriesBook(max_series=2)
    book.update("pi-01", data(*[("m", (("i", str(i)),), [(1, 1.0)]) for i in range(3)]))
    assert len(book.series("pi-01")) == 2 and book.overflow == 1


def test_field_names_keep_series_of_one_name_apart() -> None:
    assert field_name("wifi_signal_dbm", ()) == "wifi_signal_dbm"
    assert field_name("probe_success", (("instance", 'a"b'), ("job", "x"))) == \
        'probe_success{instance="a\\"b",job="x"}'


def test_cache_keeps_series_when_an_older_event_completes_later() -> None:
    cache = SnapshotCache()
    newest = event(1, b'{"x": 1}', ts=5000, attributes={})
    cache.update(newest, 1.0, ())
    series = ({"name": "m", "labels": {}, "value": 1.0, "timestamp_ms": 10},)
    older = event(2, data(("m", (), [(10, 1.0)])), ts=1000)
    cache.update(older, 2.0, series)
    snap = cache.get("pi-01")
    assert snap is not None and snap.event_id == "e1"  # still the latest event
    assert snap.to_json()["series"] == list(series)
    # A JSON result later keeps the series it does not carry.
    cache.update(event(3, b'{"x": 2}', ts=9000, attributes={}), 3.0)
    snap = cache.get("pi-01")
    assert snap is not None and snap.event_id == "e3" and snap.to_json()["series"] == \
        list(series)
    assert "series" not in SnapshotCache().update(newest, 1.0).to_json()


async def test_server_hook_fills_snapshot_and_the_followed_gauges(tmp_path: Path) -> None:
    config = server_config(tmp_path, metrics={"snapshot_metrics": ["probe_success"]})
    async with running_server(config) as server:
        payload = data(("probe_success", (("instance", "a"),), [(10, 1.0)]),
                       ("probe_success", (("instance", "b"),), [(11, 0.0)]),
                       ("node_load1", (), [(12, 0.5)]))
        server._on_event_completed(event(1, payload))
        snap = server.snapshots.get("pi-01")
        assert snap is not None
        doc = snap.to_json()
        assert doc["payload_json"] == {}
        assert [s["name"] for s in doc["series"]] == ["node_load1", "probe_success",
                                                     "probe_success"]
        value = server.registry.get_sample_value
        assert value("pipeline_snapshot_value", {"sensor_id": "pi-01",
                                                 "field": 'probe_success{instance="a"}'}) == 1.0
        assert value("pipeline_snapshot_value", {"sensor_id": "pi-01",
                                                 "field": 'probe_success{instance="b"}'}) == 0.0
        assert value("pipeline_snapshot_value", {"sensor_id": "pi-01",
                                                 "field": "node_load1"}) is None
