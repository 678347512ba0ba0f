"""The memory section's limits take effect (issue 12, bounded memory), and ``/readyz``
answers 503 -- never 507 -- when the store cannot take a durable write. Real server over
real sockets; the caches' own limits through their constructors."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import aiohttp
import pytest

from pipeline.common.errors import StorageFull
from pipeline.sensor.queue import DurableQueue
from pipeline.server.read.snapshot_cache import SnapshotCache
from pipeline.server.store import SQLiteChunkStore
from pipeline.tests.server_support import TOKENS, chunk_docs, running_server, server_config, urls


def _chunk(sequence: int, data: bytes) -> dict:
    _, docs = chunk_docs("pi-01", data, sequence)
    assert len(docs) == 1
    docs[0]["attributes"] = {"window_id": "w-test"}
    return docs[0]


async def _post(http: aiohttp.ClientSession, base: str, doc: dict) -> int:
    async with http.post(base + "/v1/ingest/chunk", data=json.dumps(doc),
                         headers={"Content-Type": "application/json",
                                  "Authorization": f"Bearer {TOKENS['pi-01']}"}) as resp:
        return resp.status


async def test_read_pages_are_capped_by_event_bytes_and_still_reach_every_event(
        tmp_path: Path) -> None:
    config = server_config(tmp_path, memory={"read_page_max_kib": 64})
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        base = urls(server)["ingest"]
        sent = [os.urandom(40 * 1024) for _ in range(5)]
        for seq, data in enumerate(sent, start=1):
            assert await _post(http, base, _chunk(seq, data)) == 200
        pages, seen, after = [], [], 0
        while after is not None:
            async with http.get(f"{base}/v1/sensors/pi-01/events",
                                params={"after": str(after), "limit": "500"}) as resp:
                assert resp.status == 200
                page = await resp.json()
            pages.append(len(page["events"]))
            seen.extend(page["events"])
            after = page["next_after"]
        # 40 KiB events under a 64 KiB cap: one per page (a second would pass the cap),
        # the cursor says there is more although the page is shorter than the limit.
        assert pages[:5] == [1, 1, 1, 1, 1]
        assert sorted(base64.b64decode(e["payload_base64"]) for e in seen) == sorted(sent)


async def test_an_event_larger_than_the_page_cap_is_still_served(tmp_path: Path) -> None:
    config = server_config(tmp_path, memory={"read_page_max_kib": 16})
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        base = urls(server)["ingest"]
        assert await _post(http, base, _chunk(1, os.urandom(40 * 1024))) == 200
        async with http.get(f"{base}/v1/sensors/pi-01/events") as resp:
            page = await resp.json()
        assert len(page["events"]) == 1


def test_snapshot_payloads_above_the_limit_are_not_kept() -> None:
    cache = SnapshotCache(max_payload_bytes=100)

    class Event:
        sensor_id = "pi-01"
        event_id = "a" * 32
        logical_timestamp_ms = 1
        data = b"x" * 101

    big = cache.update(Event(), now=1.0)
    assert big.payload == b"" and big.payload_omitted
    doc = big.to_json()
    assert doc["payload_omitted"] is True and doc["payload_base64"] == ""
    Event.data = b'{"rtt_ms": 12.5}'
    Event.logical_timestamp_ms = 2
    small = cache.update(Event(), now=2.0)
    assert small.payload == Event.data and "payload_omitted" not in small.to_json()


def test_sqlite_page_caches_follow_their_settings(tmp_path: Path) -> None:
    store = SQLiteChunkStore(tmp_path / "server.db", cache_kib=1234, slice_cache_bytes=0)
    try:
        assert store._conn.execute("PRAGMA cache_size").fetchone()[0] == -1234
        assert store._conn.execute("PRAGMA mmap_size").fetchone()[0] == 0
    finally:
        store.close()
    queue = DurableQueue(tmp_path / "queue.db", cache_kib=321)
    try:
        assert queue._conn.execute("PRAGMA cache_size").fetchone()[0] == -321
    finally:
        queue.close()


async def test_readyz_is_503_on_a_full_store_and_metrics_count_tasks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_server(server_config(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        base = urls(server)["ingest"]

        def full() -> None:
            raise StorageFull("database or disk is full")

        monkeypatch.setattr(server.store, "check_writable", full)
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "storage_full"
        monkeypatch.undo()
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 200
        async with http.get(base + "/metrics") as resp:
            text = await resp.text()
        tasks = [line for line in text.splitlines() if line.startswith("pipeline_asyncio_tasks ")]
        assert tasks and float(tasks[0].split()[1]) >= 1
