"""The control channel over real sockets: handshake, envelopes, windows, replacement."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import aiohttp
import pytest

from pipeline.common.capabilities import SERVER_CAPABILITIES
from pipeline.tests.server_support import (
    TOKENS,
    MiniSensor,
    chunk_docs,
    envelope,
    running_server,
    server_config,
    urls,
)

HEARTBEAT_KEYS = {"software_version", "last_committed_sequence", "queue_depth", "clock_skew_ms"}
REQUEST_KEYS = {"since_sequence", "max_chunks", "max_bytes", "window_id", "max_in_flight"}
ACK_KEYS = {"window_id", "committed_sequences", "reset_window"}


def upgrade_headers(**extra: str) -> dict[str, str]:
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), **extra}


async def next_frame(ws: aiohttp.ClientWebSocketResponse, body_type: str,
                     timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        assert msg.type is aiohttp.WSMsgType.TEXT, f"got {msg.type} {msg.data!r} {msg.extra!r}"
        doc = json.loads(msg.data)
        if doc["body_type"] == body_type:
            return doc


@pytest.fixture
async def server(tmp_path):
    async with running_server(server_config(tmp_path)) as s:
        yield s


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize("headers,status,code", [
    ({"Authorization": "Bearer test-token-pi-01"}, 400, "missing_field"),
    ({"X-Sensor-ID": "", "Authorization": "Bearer test-token-pi-01"}, 400, "missing_field"),
    ({"X-Sensor-ID": "bad id/..", "Authorization": "Bearer test-token-pi-01"}, 400, "bad_value"),
    ({"X-Sensor-ID": "pi-01"}, 401, "unauthenticated"),
    ({"X-Sensor-ID": "pi-01", "Authorization": "Bearer wrong"}, 401, "unauthenticated"),
    ({"X-Sensor-ID": "pi-99", "Authorization": "Bearer wrong"}, 401, "unauthenticated"),
    ({"X-Sensor-ID": "pi-01", "Authorization": "Bearer test-token-pi-02"}, 403, "forbidden"),
])
async def test_handshake_is_refused_before_the_upgrade(server, http, headers, status, code):
    url = urls(server)["control"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(url, headers=headers)
    assert info.value.status == status
    async with http.get(url.replace("ws://", "http://"), headers=upgrade_headers(**headers)) as r:
        assert r.status == status
        doc = await r.json()
    assert doc["error"] == code and doc["message"]
    assert "test-token" not in json.dumps(doc)
    assert not server.manager.connections
    if status in (401, 403):
        assert server.registry.get_sample_value("pipeline_auth_failures_total") == 2


async def test_heartbeat_gets_a_1_0_chunk_request_and_state_is_visible(server, http):
    ws = await http.ws_connect(urls(server)["control"],
                               headers={"X-Sensor-ID": "pi-01",
                                        "Authorization": f"Bearer {TOKENS['pi-01']}"})
    await ws.send_str(envelope("pi-01", "heartbeat", {
        "software_version": "fw-9", "last_committed_sequence": 0, "queue_depth": 5,
        "clock_skew_ms": -3.5}))
    doc = await next_frame(ws, "chunk_request")
    assert set(doc["body"]) == REQUEST_KEYS  # exactly the 1.0 body
    assert doc["sensor_id"] == "pi-01" and doc["schema_version"].startswith("1.")
    assert doc["capabilities"] == list(SERVER_CAPABILITIES)
    assert "server_time" not in doc  # the sensor did not announce server_time
    body = doc["body"]
    assert body["since_sequence"] == 0 and body["max_chunks"] == 64
    sid = {"sensor_id": "pi-01"}
    assert server.registry.get_sample_value("sensor_queue_depth", sid) == 5
    assert server.registry.get_sample_value("pipeline_clock_skew_ms", sid) == -3.5
    assert server.registry.get_sample_value("control_channel_connected", sid) == 1
    async with http.get(urls(server)["ingest"] + "/v1/sensors") as r:
        sensors = {s["sensor_id"]: s for s in (await r.json())["sensors"]}
    assert sensors["pi-01"]["connected"] is True
    assert sensors["pi-01"]["queue_depth"] == 5
    assert sensors["pi-01"]["clock_skew_ms"] == -3.5
    assert sensors["pi-01"]["software_version"] == "fw-9"
    assert sensors["pi-01"]["last_heartbeat_at"] is not None
    assert sensors["pi-02"]["connected"] is False and sensors["pi-02"]["queue_depth"] is None
    await ws.close()
    for _ in range(100):
        if server.registry.get_sample_value("control_channel_connected", sid) == 0:
            break
        await asyncio.sleep(0.02)
    assert server.registry.get_sample_value("control_channel_connected", sid) == 0


async def test_server_time_only_for_sensors_that_announce_it(server, http):
    ws = await http.ws_connect(urls(server)["control"],
                               headers={"X-Sensor-ID": "pi-02",
                                        "Authorization": f"Bearer {TOKENS['pi-02']}"})
    env = json.loads(envelope("pi-02", "heartbeat", {
        "software_version": "x", "last_committed_sequence": 0, "queue_depth": 1,
        "clock_skew_ms": 0.0}))
    env["capabilities"] = ["chunks", "heartbeats", "server_time"]
    await ws.send_str(json.dumps(env))
    doc = await next_frame(ws, "chunk_request")
    assert "server_time" in doc and doc["server_time"].endswith("+00:00")
    assert set(doc["body"]) == REQUEST_KEYS
    await ws.close()


@pytest.mark.parametrize("frame,code,reason_part", [
    ("not json", 1002, "malformed"),
    (json.dumps({"schema_version": "1.0.0"}), 1002, "missing_field"),
    (envelope("pi-01", "heartbeat", {"software_version": "x"}), 1002, "body.last_committed"),
    (envelope("pi-01", "heartbeat", {}).replace('"1.0.0"', '"2.0.0"'), 1002,
     "schema major 2"),
    (envelope("pi-02", "heartbeat", {"software_version": "x", "last_committed_sequence": 0,
                                     "queue_depth": 0, "clock_skew_ms": 0.0}), 1008,
     "sensor_id"),
])
async def test_bad_envelopes_close_with_a_clear_code(server, http, frame, code, reason_part):
    ws = await http.ws_connect(urls(server)["control"],
                               headers={"X-Sensor-ID": "pi-01",
                                        "Authorization": f"Bearer {TOKENS['pi-01']}"})
    await ws.send_str(frame)
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == code
    assert reason_part in msg.extra
    await ws.close()
    # ... and the server keeps serving.
    async with http.get(urls(server)["ingest"] + "/healthz") as r:
        assert r.status == 200


async def test_a_second_connection_replaces_the_first_and_gets_the_acks(server, http):
    headers = {"X-Sensor-ID": "pi-01", "Authorization": f"Bearer {TOKENS['pi-01']}"}
    first = MiniSensor(http, server, "pi-01", TOKENS["pi-01"])
    first.enqueue(b'{"x": 1}')
    old = await http.ws_connect(urls(server)["control"], headers=headers)
    for _ in range(100):
        if server.manager.connection("pi-01") is not None:
            break
        await asyncio.sleep(0.02)
    await first.connect()  # the MiniSensor's socket replaces `old`
    msg = await old.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008 and msg.extra == "replaced"
    await first.drained()
    assert [r.kind for r in first.records].count("ack") == 1
    assert server.manager.connection("pi-01") is not None
    await first.close()


async def test_withheld_post_is_re_requested_with_the_same_window_id(server, http):
    sensor = MiniSensor(http, server, "pi-01", TOKENS["pi-01"])
    for i in range(3):
        sensor.enqueue(json.dumps({"i": i}).encode())
    sensor.drop_once = {2}  # the POST of sequence 2 is lost on the way
    await sensor.connect()
    sensor.start_heartbeats(0.2)
    await sensor.drained(timeout=15)
    requests = [r.data for r in sensor.records if r.kind == "request"]
    dropped = [r for r in sensor.records if r.kind == "dropped"]
    assert len(dropped) == 1
    first_window = requests[0]["window_id"]
    # Sequence 2 was in flight under the first window: only a same-id request re-sends it.
    later_ids = [r["window_id"] for r in requests[1:]]
    assert first_window in later_ids
    posts_of_2 = [r.data for r in sensor.records if r.kind == "post" and r.data[0] == 2]
    assert len(posts_of_2) == 1 and posts_of_2[0][1] == 200
    assert server.store.event_count("pi-01") == 3
    assert server.store.missing_sequences("pi-01", "") == []
    await sensor.close()


async def test_silent_sensor_is_marked_disconnected(tmp_path, http):
    config = server_config(tmp_path, heartbeat={"interval_s": 0.2, "missed_before_disconnect": 2})
    async with running_server(config) as server:
        ws = await http.ws_connect(urls(server)["control"],
                                   headers={"X-Sensor-ID": "pi-01",
                                            "Authorization": f"Bearer {TOKENS['pi-01']}"})
        msg = await ws.receive(timeout=5)  # no heartbeat from us: the server gives up
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        assert server.registry.get_sample_value("control_channel_connected",
                                                {"sensor_id": "pi-01"}) == 0
        assert not server.manager.is_connected("pi-01")
        await ws.close()


async def test_windows_survive_a_restart(tmp_path, http):
    config = server_config(tmp_path, scheduler={"window_timeout_s": 30.0})
    async with running_server(config) as server:
        ws = await http.ws_connect(urls(server)["control"],
                                   headers={"X-Sensor-ID": "pi-01",
                                            "Authorization": f"Bearer {TOKENS['pi-01']}"})
        await ws.send_str(envelope("pi-01", "heartbeat", {
            "software_version": "x", "last_committed_sequence": 0, "queue_depth": 4,
            "clock_skew_ms": 0.0}))
        issued = {(await next_frame(ws, "chunk_request"))["body"]["window_id"]}
        await ws.close()
    async with running_server(config) as again:
        restored = set(again.scheduler.session("pi-01").windows)
    assert issued <= restored


async def test_minimal_1_0_client_drains_a_100_event_backlog_with_a_dropped_post(server, http):
    """Acceptance: a client written from protocol.md alone (JSON 1.0, no capabilities,
    deletes only on ChunkAck, never re-sends an in-flight chunk under another window id)
    drains a 100-event backlog although one POST in the middle is lost."""
    sensor = MiniSensor(http, server, "pi-01", TOKENS["pi-01"])
    submitted = {sensor.enqueue(json.dumps({"i": i, "rtt_ms": i / 3}).encode()): i
                 for i in range(100)}
    sensor.drop_once = {37}
    await sensor.connect()
    sensor.start_heartbeats(0.2)
    await sensor.drained(timeout=30)
    assert len([r for r in sensor.records if r.kind == "dropped"]) == 1
    stored = server.store.events("pi-01", limit=1000)
    assert sorted(e.event_id for e in stored) == sorted(submitted)
    assert server.store.missing_sequences("pi-01", "") == []
    await sensor.close()


async def test_window_is_durable_before_its_request_reaches_the_sensor(server, http):
    """Invariant 6: a 1.0 sensor re-sends a stuck chunk only under its window id, so the
    server must still know every window it issued after a crash."""
    ws = await http.ws_connect(urls(server)["control"],
                               headers={"X-Sensor-ID": "pi-01",
                                        "Authorization": f"Bearer {TOKENS['pi-01']}"})
    await ws.send_str(envelope("pi-01", "heartbeat", {
        "software_version": "fw", "last_committed_sequence": 0, "queue_depth": 3,
        "clock_skew_ms": 0.0}))
    doc = await next_frame(ws, "chunk_request")
    assert doc["body"]["window_id"] in server.store.load_windows("pi-01")
    await ws.close()


async def test_ack_for_a_commit_made_while_offline_reaches_the_next_connection(server, http):
    """A retried POST can commit while the control socket is down (the server restarted,
    the sensor's HTTP retry won the race): its ack waits for the sensor's next socket."""
    _, (chunk,) = chunk_docs("pi-01", b'{"rtt_ms": 3}', 1)
    chunk["attributes"] = {"window_id": "w-before-restart"}
    async with http.post(urls(server)["ingest"] + "/v1/ingest/chunk", json=chunk,
                         headers={"Authorization": f"Bearer {TOKENS['pi-01']}"}) as r:
        assert r.status == 200 and (await r.json())["stored"] is True
    ws = await http.ws_connect(urls(server)["control"],
                               headers={"X-Sensor-ID": "pi-01",
                                        "Authorization": f"Bearer {TOKENS['pi-01']}"})
    ack = await next_frame(ws, "chunk_ack")
    assert ack["body"] == {"window_id": "w-before-restart", "committed_sequences": [1],
                           "reset_window": False}
    await ws.close()
