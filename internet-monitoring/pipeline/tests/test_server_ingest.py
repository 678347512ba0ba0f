"""HTTP ingest and the read API over real sockets, against a real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sqlite3

import aiohttp
import pytest

from pipeline.common.messages import ingest_result_from_json
from pipeline.tests.server_support import (
    STREAM_TOKEN,
    TOKENS,
    MiniSensor,
    chunk_docs,
    running_server,
    server_config,
    urls,
)

MAX_BODY = 512 * 1024


@pytest.fixture
async def server(tmp_path):
    async with running_server(server_config(tmp_path, ingest={"max_body_bytes": MAX_BODY})) as s:
        yield s


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def auth(sensor_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[sensor_id]}"}


async def post(http, server, body, headers, content_type="application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with http.post(urls(server)["ingest"] + "/v1/ingest/chunk", data=data,
                         headers={"Content-Type": content_type, **headers}) as resp:
        return resp.status, await resp.json()


def one_chunk(sequence: int = 1, sensor_id: str = "pi-01", data: bytes = b'{"v": 1}') -> dict:
    _, docs = chunk_docs(sensor_id, data, sequence)
    docs[0]["attributes"] = {"window_id": "w-test"}
    return docs[0]


def counts(server) -> tuple[int, int]:
    return server.store.chunk_count(), server.store.event_count()


async def test_success_is_exactly_the_1_0_answer(server, http):
    status, doc = await post(http, server, one_chunk(), auth("pi-01"))
    assert status == 200
    assert set(doc) == {"stored", "duplicate", "sequence", "event_id", "sensor_id",
                        "event_complete", "last_committed_sequence"}
    result = ingest_result_from_json(doc)
    assert result.stored and not result.duplicate and result.event_complete
    assert result.sequence == 1 and result.last_committed_sequence == 1
    assert counts(server) == (1, 1)


def _bad_base64(doc):
    doc["payload"] = "@@not base64@@"
    return doc


def _hash_mismatch(doc):
    doc["chunk_sha256"] = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    return doc


def _missing_sequence(doc):
    del doc["sequence"]
    return doc


@pytest.mark.parametrize("mutate,status,code,field", [
    (_bad_base64, 400, "bad_value", "payload"),
    (_missing_sequence, 400, "missing_field", "sequence"),
    (_hash_mismatch, 422, "chunk_hash_mismatch", "chunk_sha256"),
])
async def test_bad_chunks_get_json_errors_and_write_nothing(server, http, mutate, status, code,
                                                            field):
    before = counts(server)
    got, doc = await post(http, server, mutate(one_chunk()), auth("pi-01"))
    assert got == status
    assert doc["error"] == code and doc["field"] == field and doc["message"]
    assert counts(server) == before
    assert server.registry.get_sample_value("pipeline_rejected_total", {"reason": code}) == 1
    # The server keeps serving.
    assert (await post(http, server, one_chunk(), auth("pi-01")))[0] == 200


async def test_malformed_json_is_400(server, http):
    status, doc = await post(http, server, b'{"schema_version": "1.0.0", ', auth("pi-01"))
    assert status == 400 and doc["error"] == "malformed"
    status, doc = await post(http, server, b"[1, 2]", auth("pi-01"))
    assert status == 400 and doc["error"] == "bad_type"
    assert counts(server) == (0, 0)


async def test_oversized_body_is_413(server, http):
    big = one_chunk()
    big["payload"] = base64.b64encode(os.urandom(MAX_BODY)).decode()
    status, doc = await post(http, server, big, auth("pi-01"))
    assert status == 413 and doc["error"] == "too_large"
    assert counts(server) == (0, 0)
    assert (await post(http, server, one_chunk(), auth("pi-01")))[0] == 200


async def test_wrong_media_type_is_415(server, http):
    status, doc = await post(http, server, json.dumps(one_chunk()), auth("pi-01"),
                             content_type="text/plain")
    assert status == 415 and doc["error"] == "unsupported_media_type"


@pytest.mark.parametrize("headers,status,code", [
    ({}, 401, "unauthenticated"),
    ({"Authorization": "Bearer wrong"}, 401, "unauthenticated"),
    ({"Authorization": f"Basic {TOKENS['pi-01']}"}, 401, "unauthenticated"),
    ({"Authorization": f"Bearer {TOKENS['pi-02']}"}, 403, "forbidden"),
])
async def test_tokens_must_belong_to_the_chunks_sensor(server, http, headers, status, code):
    got, doc = await post(http, server, one_chunk(), headers)
    assert got == status and doc["error"] == code
    assert counts(server) == (0, 0)
    assert server.registry.get_sample_value("pipeline_auth_failures_total") == 1
    assert (await post(http, server, one_chunk(), auth("pi-01")))[0] == 200


async def test_sequence_conflict_is_409_and_duplicate_is_200(server, http):
    first = one_chunk(1, data=b'{"first": true}')
    assert (await post(http, server, first, auth("pi-01")))[0] == 200
    status, doc = await post(http, server, first, auth("pi-01"))
    assert status == 200 and doc["duplicate"] is True and doc["stored"] is False
    assert doc["event_complete"] is True
    assert server.registry.get_sample_value("server_ingest_duplicate_total",
                                            {"sensor_id": "pi-01"}) == 1
    other = one_chunk(1, data=b'{"other": true}')  # same sequence, other content
    status, doc = await post(http, server, other, auth("pi-01"))
    assert status == 409 and doc["error"] == "sequence_conflict" and doc["field"] == "sequence"
    assert counts(server) == (1, 1)
    assert server.registry.get_sample_value("pipeline_events_completed_total") == 1
    assert len(server.snapshots.all()) == 1


async def test_concurrent_posts_are_group_committed(server, http):
    docs = [one_chunk(seq, data=json.dumps({"seq": seq}).encode()) for seq in range(1, 41)]
    results = await asyncio.gather(*(post(http, server, d, auth("pi-01")) for d in docs))
    assert all(status == 200 for status, _ in results)
    assert server.committer.batches < 40
    assert counts(server) == (40, 40)
    assert server.registry.get_sample_value("server_ingest_latency_ms_count",
                                            {"sensor_id": "pi-01"}) == 40


async def test_acks_follow_the_commit_and_reach_the_sensor(server, http):
    db = server.config.store.path
    missing_at_ack: list[int] = []

    def check_rows(seqs: list[int]) -> None:
        with sqlite3.connect(db) as other:
            have = {r[0] for r in other.execute(
                "SELECT sequence FROM chunks WHERE sensor_id = 'pi-01'")}
        missing_at_ack.extend(s for s in seqs if s not in have)

    sensor = MiniSensor(http, server, "pi-01", TOKENS["pi-01"], on_ack=check_rows)
    sensor.enqueue(os.urandom(200 * 1024))  # two chunks
    sensor.enqueue(b'{"small": 1}')
    await sensor.connect()
    await sensor.drained()
    assert missing_at_ack == []
    acked = sorted(s for r in sensor.records if r.kind == "ack"
                   for s in r.data["committed_sequences"])
    assert acked == [1, 2, 3]
    for ack in (r.data for r in sensor.records if r.kind == "ack"):
        assert set(ack) == {"window_id", "committed_sequences", "reset_window"}
    await sensor.close()


async def test_read_api_requires_the_stream_token_when_configured(tmp_path, http):
    config = server_config(tmp_path, stream={"token": STREAM_TOKEN})
    async with running_server(config) as server:
        base = urls(server)["ingest"]
        for path in ("/v1/snapshots", "/v1/sensors", "/v1/sensors/pi-01/events",
                     "/v1/snapshots/pi-01"):
            for headers in ({}, auth("pi-01"), {"Authorization": "Bearer nope"}):
                async with http.get(base + path, headers=headers) as r:
                    assert r.status == 401, path
                    assert (await r.json())["error"] == "unauthenticated"
        reader = {"Authorization": f"Bearer {STREAM_TOKEN}"}
        async with http.get(base + "/v1/snapshots", headers=reader) as r:
            assert r.status == 200 and await r.json() == {"snapshots": []}
        async with http.get(base + "/v1/snapshots/pi-01", headers=reader) as r:
            assert r.status == 404 and (await r.json())["error"] == "not_found"
        async with http.post(base + "/v1/sensors/pi-01/request", headers=reader) as r:
            assert r.status == 409 and (await r.json())["error"] == "conflict"
        # The stream token cannot ingest.
        assert (await post(http, server, one_chunk(), reader))[0] == 401
        async with http.get(base + "/healthz") as r:
            assert r.status == 200


async def test_events_are_paged_with_a_cursor(server, http):
    for seq in range(1, 6):
        doc = one_chunk(seq, data=json.dumps({"n": seq}).encode())
        assert (await post(http, server, doc, auth("pi-01")))[0] == 200
    binary = one_chunk(6, data=b"\x00\x01 not json")
    assert (await post(http, server, binary, auth("pi-01")))[0] == 200
    seen, after, pages = [], 0, 0
    while after is not None:
        async with http.get(urls(server)["ingest"] + "/v1/sensors/pi-01/events",
                            params={"after": str(after), "limit": "2"}) as r:
            assert r.status == 200
            page = await r.json()
        seen.extend(page["events"])
        after = page["next_after"]
        pages += 1
    assert pages == 4  # 2 + 2 + 2 + an empty last page
    assert [e["payload_json"] for e in seen[:5]] == [{"n": n} for n in range(1, 6)]
    assert seen[5]["payload_json"] is None
    assert base64.b64decode(seen[5]["payload_base64"]) == b"\x00\x01 not json"
    async with http.get(urls(server)["ingest"] + "/v1/sensors/pi-01/events",
                        params={"limit": "0"}) as r:
        assert r.status == 400 and (await r.json())["field"] == "limit"
    async with http.get(urls(server)["ingest"] + "/v1/sensors/pi-01/events",
                        params={"after": "-1"}) as r:
        assert r.status == 400 and (await r.json())["field"] == "after"


async def test_request_endpoint_opens_a_window_for_a_connected_sensor(server, http):
    base = urls(server)["ingest"]
    async with http.post(base + "/v1/sensors/pi-01/request") as r:
        assert r.status == 409
    sensor = MiniSensor(http, server, "pi-01", TOKENS["pi-01"])
    await sensor.connect()  # heartbeat with an empty queue: no window yet
    for _ in range(100):
        if server.manager.is_connected("pi-01"):
            break
        await asyncio.sleep(0.02)
    async with http.post(base + "/v1/sensors/pi-01/request") as r:
        assert r.status == 202
        doc = await r.json()
    for _ in range(100):
        if any(rec.kind == "request" for rec in sensor.records):
            break
        await asyncio.sleep(0.02)
    sent = [rec.data["window_id"] for rec in sensor.records if rec.kind == "request"]
    assert sent == [doc["window_id"]]
    await sensor.close()


async def test_unknown_routes_and_methods_are_json(server, http):
    base = urls(server)["ingest"]
    async with http.get(base + "/nope") as r:
        assert r.status == 404 and (await r.json())["error"] == "not_found"
    async with http.get(base + "/v1/ingest/chunk") as r:
        assert r.status == 405 and (await r.json())["error"] == "method_not_allowed"


async def test_health_readiness_and_metrics(server, http):
    base = urls(server)["ingest"]
    async with http.get(base + "/healthz") as r:
        assert r.status == 200
    async with http.get(base + "/readyz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ready"
    assert (await post(http, server, one_chunk(), auth("pi-01")))[0] == 200
    async with http.get(base + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert "pipeline_chunks_ingested_total 1.0" in text
    assert 'server_snapshot_age_seconds{sensor_id="pi-01"}' in text
    server.store.close()  # the store goes away: not ready any more
    async with http.get(base + "/readyz") as r:
        assert r.status == 503 and (await r.json())["error"] == "store_unavailable"
    async with http.get(base + "/healthz") as r:
        assert r.status == 200
