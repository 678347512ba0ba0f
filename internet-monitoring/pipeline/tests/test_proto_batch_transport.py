"""Capabilities proto, batch and http_ack over real sockets, against the real server.

Server side: Protobuf chunk bodies and answers on ``/v1/ingest/chunk`` (Accept
negotiation, errors stay JSON), ``/v1/ingest/batch`` answered per chunk in JSON and
Protobuf with bad chunks among good ones, one transaction per batch, and a server that
does not announce the capabilities refusing them. Sensor side: the real agent draining
through proto + batch + http_ack next to a protocol 1.0 sensor on the same server, an agent
falling back to JSON against a server without the capabilities, and a corrupted chunk
quarantined while its batch neighbours are delivered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp
import pytest

from pipeline.common.batch import ChunkRejection, decode_batch_result
from pipeline.common.config import sensor_config_from_dict
from pipeline.common.messages import (
    Envelope,
    Heartbeat,
    IngestResult,
    chunk_from_json,
    ingest_result_from_json,
)
from pipeline.common.proto_codec import (
    PROTO_CONTENT_TYPE,
    decode_batch_result_proto,
    decode_ingest_result_proto,
    encode_batch_proto,
    encode_chunk_proto,
    encode_envelope_proto,
)
from pipeline.proto import data_pb2
from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.transports import IngestClient
from pipeline.common import capabilities
from pipeline.tests.server_support import (
    TOKENS,
    MiniSensor,
    chunk_docs,
    eventually,
    running_server,
    server_config,
    urls,
)

NEW_CAPS = ["chunks", "heartbeats", "epoch", "proto", "batch", "http_ack"]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def auth(sensor_id: str = "pi-01") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[sensor_id]}"}


def docs_for(sensor_id: str, first: int, count: int) -> list[dict[str, Any]]:
    """``count`` one-chunk events with sequences ``first..``."""
    out = []
    for seq in range(first, first + count):
        _, (doc,) = chunk_docs(sensor_id, json.dumps({"seq": seq}).encode(), seq)
        doc["attributes"] = {"window_id": "w-test"}
        out.append(doc)
    return out


def bad_hash(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc, chunk_sha256=base64.b64encode(hashlib.sha256(b"x").digest()).decode())


async def post(http: aiohttp.ClientSession, server: Any, path: str, body: bytes,
               content_type: str, **headers: str) -> tuple[int, str, bytes]:
    async with http.post(urls(server)["ingest"] + path, data=body,
                         headers={"Content-Type": content_type, **auth(), **headers}) as resp:
        return resp.status, resp.content_type, await resp.read()


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    await eventually(predicate, timeout)


# ---------------------------------------------------------------------------------------
# Server side


async def test_protobuf_chunk_gets_a_protobuf_answer_and_json_errors(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        (doc,) = docs_for("pi-01", 1, 1)
        body = encode_chunk_proto(chunk_from_json(doc))
        status, kind, raw = await post(http, server, "/v1/ingest/chunk", body,
                                       PROTO_CONTENT_TYPE)
        assert (status, kind) == (200, PROTO_CONTENT_TYPE)
        result = decode_ingest_result_proto(raw)
        assert result.stored and result.event_complete and result.sequence == 1
        # The same chunk again, asking for JSON: a duplicate, answered in JSON.
        status, kind, raw = await post(http, server, "/v1/ingest/chunk", body,
                                       PROTO_CONTENT_TYPE, Accept="application/json")
        assert (status, kind) == (200, "application/json")
        assert ingest_result_from_json(json.loads(raw)).duplicate
        # A JSON chunk may ask for a Protobuf answer.
        (doc2,) = docs_for("pi-01", 2, 1)
        status, kind, raw = await post(http, server, "/v1/ingest/chunk",
                                       json.dumps(doc2).encode(), "application/json",
                                       Accept=PROTO_CONTENT_TYPE)
        assert (status, kind) == (200, PROTO_CONTENT_TYPE)
        assert decode_ingest_result_proto(raw).stored
        # Errors are the JSON error body whatever the request encoding.
        status, kind, raw = await post(http, server, "/v1/ingest/chunk", b"\xff\xff not proto",
                                       PROTO_CONTENT_TYPE)
        assert (status, kind) == (400, "application/json")
        assert json.loads(raw)["error"] == "malformed"
        bad = encode_chunk_proto(chunk_from_json(bad_hash(docs_for("pi-01", 3, 1)[0])))
        status, kind, raw = await post(http, server, "/v1/ingest/chunk", bad,
                                       PROTO_CONTENT_TYPE)
        assert (status, json.loads(raw)["error"]) == (422, "chunk_hash_mismatch")
        assert server.store.chunk_count() == 2


async def test_json_batch_answers_each_chunk_and_a_bad_one_spoils_nothing(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        docs = docs_for("pi-01", 1, 5)
        docs[2] = bad_hash(docs[2])
        other = docs_for("pi-02", 1, 1)[0]  # not this token's sensor
        body = json.dumps({"chunks": [*docs, "not a chunk", other]}).encode()
        before = server.committer.batches
        status, kind, raw = await post(http, server, "/v1/ingest/batch", body,
                                       "application/json")
        assert (status, kind) == (200, "application/json")
        results = decode_batch_result(raw)
        assert len(results) == 7
        for index in (0, 1, 3, 4):
            assert isinstance(results[index], IngestResult) and results[index].stored
        assert isinstance(results[2], ChunkRejection)
        assert (results[2].code, results[2].sequence) == ("chunk_hash_mismatch", 3)
        assert results[2].http_status == 422
        assert isinstance(results[5], ChunkRejection) and results[5].sequence is None
        assert results[5].code == "bad_type"
        assert isinstance(results[6], ChunkRejection) and results[6].code == "forbidden"
        assert server.committer.batches == before + 1  # one transaction for the batch
        assert server.store.chunk_count() == 4
        # The watermark stops below the refused sequence 3.
        assert results[4].last_committed_sequence == 2
        # Sent again: duplicates, and the bad chunk is refused again.
        status, _, raw = await post(http, server, "/v1/ingest/batch", body, "application/json")
        again = decode_batch_result(raw)
        assert [r.duplicate for i, r in enumerate(again) if i in (0, 1, 3, 4)] == [True] * 4
        assert isinstance(again[2], ChunkRejection)
        assert server.store.chunk_count() == 4


async def test_protobuf_batch_with_an_unparsable_chunk_among_good_ones(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        chunks = [chunk_from_json(d) for d in docs_for("pi-01", 1, 3)]
        frames = data_pb2.ChunkBatchFrames()
        frames.ParseFromString(encode_batch_proto(chunks))
        broken = data_pb2.ChunkBatchFrames()
        broken.chunks.append(frames.chunks[0])
        broken.chunks.append(b"\x12\x02\xff\xfe")  # field sensor_id: invalid UTF-8
        broken.chunks.append(frames.chunks[1])
        broken.chunks.append(frames.chunks[2])
        status, kind, raw = await post(http, server, "/v1/ingest/batch",
                                       broken.SerializeToString(), PROTO_CONTENT_TYPE)
        assert (status, kind) == (200, PROTO_CONTENT_TYPE)
        results = decode_batch_result_proto(raw)
        assert [type(r).__name__ for r in results] == ["IngestResult", "ChunkRejection",
                                                       "IngestResult", "IngestResult"]
        assert results[1].code == "malformed" and results[1].sequence is None
        assert [r.sequence for r in results if isinstance(r, IngestResult)] == [1, 2, 3]
        assert server.store.event_count("pi-01") == 3
        # Bodies that are no batch at all are refused as a whole.
        for body in (b"\xff\xff", b""):
            status, _, raw = await post(http, server, "/v1/ingest/batch", body,
                                        PROTO_CONTENT_TYPE)
            assert status == 400, raw
        status, _, raw = await post(http, server, "/v1/ingest/batch",
                                    json.dumps({"chunks": []}).encode(), "application/json")
        assert (status, json.loads(raw)["field"]) == (400, "chunks")


async def test_a_server_without_the_capabilities_refuses_them(tmp_path, http, monkeypatch):
    kept = tuple(c for c in capabilities.SERVER_CAPABILITIES
                 if c not in ("proto", "batch", "http_ack"))
    monkeypatch.setattr(capabilities, "SERVER_CAPABILITIES", kept)
    async with running_server(server_config(tmp_path)) as server:
        (doc,) = docs_for("pi-01", 1, 1)
        status, _, raw = await post(http, server, "/v1/ingest/chunk",
                                    encode_chunk_proto(chunk_from_json(doc)),
                                    PROTO_CONTENT_TYPE)
        assert (status, json.loads(raw)["error"]) == (415, "unsupported_media_type")
        status, _, _ = await post(http, server, "/v1/ingest/batch",
                                  json.dumps({"chunks": [doc]}).encode(), "application/json")
        assert status == 404
        ws = await http.ws_connect(urls(server)["control"],
                                   headers={"X-Sensor-ID": "pi-01", **auth()})
        await ws.send_str(json.dumps({
            "schema_version": "1.0.0", "sensor_id": "pi-01", "sent_at": "2026-01-01T00:00:00Z",
            "capabilities": NEW_CAPS, "body_type": "heartbeat",
            "body": {"software_version": "t", "last_committed_sequence": 0, "queue_depth": 0,
                     "clock_skew_ms": 0.0}}))
        await ws.send_bytes(encode_envelope_proto(Envelope(
            sensor_id="pi-01", sent_at="2026-01-01T00:00:00Z", capabilities=tuple(NEW_CAPS),
            body=Heartbeat(software_version="t", last_committed_sequence=0, queue_depth=0,
                           clock_skew_ms=0.0))))
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1003
        assert server.store.chunk_count() == 0


# ---------------------------------------------------------------------------------------
# Sensor side


class RecordingIngest(IngestClient):
    """The real client, noting which way each POST went."""

    calls: list[tuple[str, bool, int]]

    async def post_chunk(self, chunk, *, proto: bool = False):
        self.calls.append(("chunk", proto, 1))
        return await super().post_chunk(chunk, proto=proto)

    async def post_batch(self, chunks: Sequence[Any], *, proto: bool = True):
        self.calls.append(("batch", proto, len(chunks)))
        return await super().post_batch(chunks, proto=proto)


def agent_for(server: Any, tmp_path: Path, sensor_id: str, capabilities: list[str]
              ) -> tuple[SensorAgent, DurableQueue, RecordingIngest]:
    config = sensor_config_from_dict({
        "sensor_id": sensor_id, "token": TOKENS[sensor_id], "heartbeat_interval": 30,
        "capabilities": capabilities,
        "queue": {"path": str(tmp_path / f"{sensor_id}.db"), "max_bytes": None},
        "control": {"url": urls(server)["control"], "ping_interval": 5, "ping_timeout": 5},
        "ingest": {"url": urls(server)["ingest"], "timeout": 10, "max_parallel": 4},
        "backoff": {"initial_s": 0.05, "max_s": 0.2, "jitter": 0.1}})
    queue = DurableQueue(config.queue.path, max_bytes=None)
    ingest = RecordingIngest.from_config(config)
    ingest.calls = []
    return SensorAgent(config, queue, ingest=ingest), queue, ingest


async def test_proto_batch_agent_and_1_0_sensor_drain_into_the_same_server(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        agent, queue, ingest = agent_for(server, tmp_path, "pi-01", NEW_CAPS)
        sizes = [200, 300 * 1024, 50, 70_000, 1]  # one-chunk and multi-chunk events
        expected = {queue.enqueue(bytes([i % 251]) * size).event_id for i, size in
                    enumerate(sizes * 20)}
        legacy = MiniSensor(http, server, "pi-02", TOKENS["pi-02"])
        for i in range(30):
            legacy.enqueue(json.dumps({"legacy": i}).encode())
        task = asyncio.ensure_future(agent.run())
        try:
            await legacy.connect()
            await legacy.drained(timeout=20)
            await wait_for(lambda: queue.queue_depth() == 0, timeout=30)
            announced = {sid: set(server.manager.info[sid].capabilities)
                         for sid in ("pi-01", "pi-02")}
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
            await legacy.close()
            queue.close()
        assert {e.event_id for e in server.store.events("pi-01", limit=500)} == expected
        assert server.store.event_count("pi-02") == 30
        # The new agent used Protobuf batches only, several chunks per POST...
        assert ingest.calls and all(kind == "batch" and proto for kind, proto, _ in ingest.calls)
        assert max(n for _, _, n in ingest.calls) > 1
        # ...deleted on the HTTP answers, with proto negotiated on the control channel...
        assert agent.acked >= len(expected) and agent.quarantined == 0
        assert set(NEW_CAPS) <= set(agent.server_capabilities)
        assert "proto" in announced["pi-01"] and "proto" not in announced["pi-02"]
        # ...and the 1.0 sensor, which reads text frames only and deletes only on ChunkAck,
        # got every request and ack as JSON and a 1.0 answer to every POST.
        assert legacy.frames and all(f["schema_version"] == "1.0.0" for f in legacy.frames)
        posts = [r.data for r in legacy.records if r.kind == "post"]
        assert len(posts) >= 30 and all(status == 200 for _, status, _ in posts)
        assert all(set(answer) == {"stored", "duplicate", "sequence", "event_id", "sensor_id",
                                   "event_complete", "last_committed_sequence"}
                   for _, _, answer in posts)


async def drain_forty_events(server, agent, queue) -> tuple[set[str], set[str]]:
    """Queue 40 small events, run the agent until its queue is empty, stop it (it must
    stop within 15 s); returns (event ids queued, event ids the server stored)."""
    expected = {queue.enqueue(json.dumps({"i": i}).encode()).event_id for i in range(40)}
    task = asyncio.ensure_future(agent.run())
    try:
        await wait_for(lambda: queue.queue_depth() == 0, timeout=30)
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)
        queue.close()
    return expected, {e.event_id for e in server.store.events("pi-01", limit=100)}


async def test_agent_speaks_json_to_a_server_without_proto(tmp_path, monkeypatch):
    kept = tuple(c for c in capabilities.SERVER_CAPABILITIES
                 if c not in ("proto", "batch", "http_ack"))
    monkeypatch.setattr(capabilities, "SERVER_CAPABILITIES", kept)
    async with running_server(server_config(tmp_path)) as server:
        agent, queue, ingest = agent_for(server, tmp_path, "pi-01", NEW_CAPS)
        expected, stored = await drain_forty_events(server, agent, queue)
    # Had the agent sent a Protobuf body, a batch or a binary frame, this server would
    # have refused it (415 / 404 / close 1003, see above) and the chunk would be stuck,
    # quarantined or the socket reconnected.
    assert stored == expected
    assert ingest.calls and all(c == ("chunk", False, 1) for c in ingest.calls)
    assert agent.quarantined == 0 and agent.connects == 1
    assert "proto" not in agent.server_capabilities


async def test_a_corrupted_chunk_is_quarantined_and_its_batch_neighbours_delivered(tmp_path):
    async with running_server(server_config(tmp_path)) as server:
        agent, queue, ingest = agent_for(server, tmp_path, "pi-01", NEW_CAPS)
        events = [queue.enqueue(json.dumps({"i": i}).encode()) for i in range(12)]
        victim = events[5].sequences[0]
        # Corrupt one payload behind the queue's back (after its open-time check).
        with sqlite3.connect(queue.path) as conn:
            conn.execute("UPDATE chunks SET payload = ? WHERE sequence = ?",
                         (b"\x1f\x8b garbage", victim))
        task = asyncio.ensure_future(agent.run())
        try:
            await wait_for(lambda: queue.queue_depth() == 0, timeout=30)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
            quarantined = queue.quarantined()
            queue.close()
        stored = {e.event_id for e in server.store.events("pi-01", limit=100)}
    assert [chunk.sequence for chunk, _ in quarantined] == [victim], \
        (quarantined, agent.stats(), ingest.calls)
    assert "chunk_hash_mismatch" in quarantined[0][1]
    assert stored == {e.event_id for e in events} - {events[5].event_id}
    assert agent.quarantined == 1, agent.stats()
    assert any(kind == "batch" and n > 1 for kind, _, n in ingest.calls), ingest.calls


async def test_snapshot_gauges_skip_results_too_big_to_parse_on_the_ingest_path(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        small = json.dumps({"download_mbps": 10.5}).encode()
        big = json.dumps({"download_mbps": 99.0, "pad": "x" * 70_000}).encode()
        docs = []
        for seq, data in ((1, small), (2, big)):
            _, (doc,) = chunk_docs("pi-01", data, seq, logical_timestamp_ms=seq)
            docs.append(doc)
        status, _, raw = await post(http, server, "/v1/ingest/batch",
                                    json.dumps({"chunks": docs}).encode(), "application/json")
        assert status == 200 and all(r.stored for r in decode_batch_result(raw))
        value = server.registry.get_sample_value(
            "pipeline_snapshot_value", {"sensor_id": "pi-01", "field": "download_mbps"})
        assert value == 10.5  # the 70 KiB result is stored and streamed, not parsed for gauges
        assert server.snapshots.get("pi-01").logical_timestamp_ms == 2


class CuttingIngest(RecordingIngest):
    """A link that resets every POST carrying more than ``limit`` chunks."""

    limit = 10

    async def post_batch(self, chunks: Sequence[Any], *, proto: bool = True):
        if len(chunks) > self.limit:
            self.calls.append(("cut", proto, len(chunks)))
            raise ConnectionError("connection reset by peer")
        return await super().post_batch(chunks, proto=proto)


async def test_a_batch_that_keeps_failing_on_the_network_is_split_until_it_passes(tmp_path):
    from pipeline.common import backoff

    backoff.set_testing(True)
    try:
        async with running_server(server_config(tmp_path)) as server:
            agent, queue, _ = agent_for(server, tmp_path, "pi-01", NEW_CAPS)
            ingest = CuttingIngest.from_config(agent.config)
            ingest.calls = []
            agent = SensorAgent(agent.config, queue, ingest=ingest)
            expected, stored = await drain_forty_events(server, agent, queue)
    finally:
        backoff.set_testing(False)
    assert stored == expected
    sizes = [n for kind, _, n in ingest.calls if kind == "batch"]
    assert any(kind == "cut" for kind, _, _ in ingest.calls)
    assert sizes and max(sizes) <= CuttingIngest.limit and sum(sizes) >= 40
