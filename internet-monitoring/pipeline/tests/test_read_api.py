"""The read API and the UXI dashboard through a real server (sockets, SQLite file):
events by time and newest first, chart series, latest result per test, 404 for unknown
sensors, ``GET /v1/dashboard`` and the stream's dashboard messages computed from the
stored results, and the sample file only while nothing is stored."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest

from pipeline.server.read.dashboard_kpis import iso
from pipeline.tests.dashboard_support import ResultPoster
from pipeline.tests.server_support import (
    STREAM_TOKEN,
    eventually,
    running_server,
    server_config,
    urls,
)

READER = {"Authorization": f"Bearer {STREAM_TOKEN}"}
T0 = 1_796_000_000_000  # a fixed logical time (ms) for the events tests


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, dict]:
    async with http.get(url, params=params, headers=READER) as r:
        return r.status, await r.json()


async def test_events_by_time_and_newest_first(tmp_path, http):
    async with running_server(server_config(tmp_path, stream={"token": STREAM_TOKEN})) as server:
        post = ResultPoster(http, server)
        for n in range(6):
            await post.post("pi-01", {"test": "ping", "rtt_ms": n}, at_ms=T0 + n * 60_000)
        base = urls(server)["ingest"] + "/v1/sensors/pi-01/events"
        pages, before = [], None
        while True:
            params = {"order": "desc", "limit": "4"}
            if before is not None:
                params["before"] = str(before)
            status, page = await get(http, base, **params)
            assert status == 200 and page["order"] == "desc" and page["next_after"] is None
            pages.append([e["payload_json"]["rtt_ms"] for e in page["events"]])
            before = page["next_before"]
            if before is None:
                break
        assert pages == [[5, 4, 3, 2], [1, 0]]
        # since/until bound the results' own time, half-open; ISO 8601 or milliseconds.
        status, page = await get(http, base, since=iso((T0 + 120_000) / 1000),
                                 until=str(T0 + 240_000))
        assert status == 200 and [e["payload_json"]["rtt_ms"] for e in page["events"]] == [2, 3]
        status, page = await get(http, base, since="yesterday")
        assert status == 400 and page["field"] == "since"
        status, page = await get(http, base, order="sideways")
        assert status == 400 and page["field"] == "order"


async def test_unknown_sensors_are_404_on_every_sensor_route(tmp_path, http):
    async with running_server(server_config(tmp_path, stream={"token": STREAM_TOKEN})) as server:
        base = urls(server)["ingest"]
        for path in ("events", "series?field=rtt_ms", "latest"):
            status, doc = await get(http, f"{base}/v1/sensors/pi-99/{path}")
            assert (status, doc["error"]) == (404, "not_found"), path
        status, _ = await get(http, f"{base}/v1/snapshots/pi-99")
        assert status == 404
        async with http.post(f"{base}/v1/sensors/pi-99/request", headers=READER) as r:
            assert r.status == 404
        # A configured sensor without any data is known: an empty page, not a 404.
        status, doc = await get(http, f"{base}/v1/sensors/pi-02/events")
        assert status == 200 and doc["events"] == []


async def test_series_and_latest_per_test(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        post = ResultPoster(http, server)
        now_ms = int(time.time() * 1000) // 60_000 * 60_000 - 600_000
        for minute, mbps in ((0, 100.0), (0, 200.0), (1, 50.0), (3, 80.0)):
            await post.post("pi-01", {"test": "speed", "download_mbps": mbps},
                            at_ms=now_ms + minute * 60_000 + 1000)
            await post.post("pi-01", {"test": "dns", "lookup_ms": 4 + minute},
                            at_ms=now_ms + minute * 60_000 + 2000)
        base = urls(server)["ingest"] + "/v1/sensors/pi-01"
        status, doc = await get(http, base + "/series", field="download_mbps", test="speed",
                                since=str(now_ms), until=str(now_ms + 300_000), step="60")
        assert status == 200, doc
        assert [(p["t"] - now_ms, p["count"], p["avg"], p["min"], p["max"], p["last"])
                for p in doc["points"]] == [(0, 2, 150.0, 100.0, 200.0, 200.0),
                                            (60_000, 1, 50.0, 50.0, 50.0, 50.0),
                                            (180_000, 1, 80.0, 80.0, 80.0, 80.0)]
        assert doc["sampled"] == 1.0 and doc["step_s"] == 60
        status, doc = await get(http, base + "/series", field="lookup_ms",
                                since=str(now_ms - 7_200_000), until=str(now_ms), step="1")
        assert status == 400 and doc["field"] == "step"  # 7,200 points: too many
        status, doc = await get(http, base + "/series", field="lookup_ms",
                                since=str(now_ms), until=str(now_ms + 300_000), step="300")
        assert status == 200 and doc["points"][0]["count"] == 4  # all four in one step
        status, doc = await get(http, base + "/series", field="../etc")
        assert status == 400 and doc["field"] == "field"
        status, doc = await get(http, base + "/latest")
        assert status == 200
        latest = {r["test"]: r["payload_json"] for r in doc["results"]}
        assert latest == {"dns": {"test": "dns", "lookup_ms": 7},
                          "speed": {"test": "speed", "download_mbps": 80.0}}


async def test_dashboard_payload_and_stream_messages_from_stored_results(tmp_path, http):
    config = server_config(tmp_path, stream={"token": STREAM_TOKEN},
                           dashboard={"push_interval_s": 0.2, "reporting_window_s": 600,
                                      "timeline_points": 2,
                                      "sensors": {"pi-01": {"site": "HQ"}}})
    async with running_server(config) as server:
        post = ResultPoster(http, server)
        await post.post("pi-01", {"test": "ping", "rtt_ms": 10.0, "loss_pct": 0.0}, ago_s=30)
        await post.post("pi-01", {"test": "ping", "rtt_ms": 30.0, "loss_pct": 0.0}, ago_s=20)
        await post.post("pi-02", {"test": "dns", "lookup_ms": 50.0, "success": False},
                        ago_s=10)
        await post.post("pi-02", {"test": "web", "ttfb_ms": 70.0, "status": 200}, ago_s=900)
        status, doc = await get(http, urls(server)["ingest"] + "/v1/dashboard")
        assert status == 200
        kpis = doc["kpis"]
        assert kpis["globalAvailability"] == 66.67       # 2 of the 3 results in the window
        assert kpis["medianLatency"] == 30.0             # 10, 30, 50
        assert kpis["availabilityChange"] == -33.33      # the window before: 1 of 1 good
        assert kpis["ingestRate"] == 0.4                 # 4 stored in the last 10 minutes
        assert kpis["activeIncidents"] == 2              # both sensors never connected
        assert [(j["id"], j["successRate"], j["status"]) for j in doc["journeys"]] == [
            ("dns", 0.0, "outage"), ("ping", 100.0, "operational")]
        sensors = {x["id"]: x for x in doc["sensors"]}
        assert sensors["pi-01"]["availability"] == 100.0
        assert sensors["pi-01"]["packetLoss"] == 0.0 and sensors["pi-01"]["site"] == "HQ"
        assert sensors["pi-02"]["availability"] == 0.0 and sensors["pi-02"]["status"] == "outage"
        assert [a["id"] for a in doc["alerts"]] == ["offline:pi-01", "offline:pi-02"]
        assert [p["successRate"] for p in doc["timeline"]] == [None, 66.67]

        async with http.ws_connect(urls(server)["stream"], headers=READER) as ws:
            seen = []

            async def dashboard_message() -> bool:
                msg = json.loads((await ws.receive(timeout=5)).data)
                seen.append(msg["type"])
                return msg["type"] == "dashboard" and msg["kpis"] == kpis and msg

            await eventually(dashboard_message, timeout=10, what="a dashboard message")
        assert seen[0] == "snapshot_batch"
        # A new subscriber gets the last dashboard message right after its snapshots.
        async with http.ws_connect(urls(server)["stream"], headers=READER) as ws:
            first = json.loads((await ws.receive(timeout=5)).data)
            second = json.loads((await ws.receive(timeout=5)).data)
        assert first["type"] == "snapshot_batch" and len(first["snapshots"]) == 2
        assert second["type"] == "dashboard" and set(second) >= {
            "generatedAt", "reportingWindow", "kpis", "timeline", "journeys", "sensors",
            "alerts"}


async def test_sample_file_only_while_nothing_is_stored(tmp_path, http):
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({"generatedAt": "sample", "kpis": {}}))
    config = server_config(tmp_path, dashboard={"sample_path": str(sample),
                                                "allow_origins": ["https://ui.example"]})
    async with running_server(config) as server:
        url = urls(server)["ingest"] + "/v1/dashboard"
        async with http.get(url, headers={"Origin": "https://ui.example"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://ui.example"
            assert (await r.json())["generatedAt"] == "sample"
        async with http.options(url, headers={"Origin": "https://ui.example"}) as r:
            assert r.status == 204 and "Authorization" in r.headers[
                "Access-Control-Allow-Headers"]
        await ResultPoster(http, server).post("pi-01", {"test": "ping", "rtt_ms": 1.0})
        async with http.get(url, headers={"Origin": "https://other.example"}) as r:
            doc = await r.json()
            assert "Access-Control-Allow-Origin" not in r.headers
        assert doc["generatedAt"] != "sample" and doc["kpis"]["globalAvailability"] == 100.0


async def test_a_missing_sample_file_stops_start_up(tmp_path):
    from pipeline.common.errors import ConfigError
    config = server_config(tmp_path, dashboard={"sample_path": str(tmp_path / "nope.json")})
    with pytest.raises(ConfigError) as info:
        async with running_server(config):
            pass
    assert info.value.field == "dashboard.sample_path"


async def test_reads_answer_while_the_ingest_connection_is_busy(tmp_path, http):
    """The read API and the dashboard read through their own connection: with the store's
    ingest lock held and a write transaction open (a long ingest batch), they still answer."""
    async with running_server(server_config(tmp_path)) as server:
        await ResultPoster(http, server).post("pi-01", {"test": "ping", "rtt_ms": 2.0})
        store = server.store
        held, release = threading.Event(), threading.Event()

        def long_write() -> None:
            with store._lock:
                store._conn.execute("BEGIN IMMEDIATE")
                held.set()
                release.wait(20)
                store._conn.execute("ROLLBACK")

        writer = threading.Thread(target=long_write)
        writer.start()
        try:
            assert held.wait(5)
            base = urls(server)["ingest"]
            for path in ("/v1/sensors/pi-01/events?order=desc", "/v1/sensors/pi-01/latest",
                         "/v1/sensors/pi-01/series?field=rtt_ms", "/v1/dashboard"):
                status, doc = await asyncio.wait_for(get(http, base + path), 10)
                assert status == 200, (path, doc)
            assert writer.is_alive()  # all of it answered while the write was still open
        finally:
            release.set()
            writer.join()
