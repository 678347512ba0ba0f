"""End to end over real sockets: a minimal 1.0 sensor, the read API, the UI stream, the
dashboard, graceful shutdown, restart, and the ``pipeline-server`` command."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from pipeline.tests.store_support import open_test_store
from pipeline.tests.server_support import (
    STREAM_TOKEN,
    TOKENS,
    MiniSensor,
    chunk_docs,
    running_server,
    server_config,
    urls,
)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)


def speed_test(i: int) -> bytes:
    return json.dumps({"download_mbps": 90.0 + i, "upload_mbps": 20.5, "latency_ms": 12 + i,
                       "dns": {"lookup_ms": 4.5}}).encode()


async def test_a_minimal_1_0_sensor_end_to_end(tmp_path, http):
    async with running_server(server_config(tmp_path)) as server:
        stream = await http.ws_connect(urls(server)["stream"])
        assert await receive_json(stream) == {"type": "snapshot_batch", "snapshots": []}

        sensor = MiniSensor(http, server, "pi-01", TOKENS["pi-01"])
        big = json.dumps({"samples": [i % 97 for i in range(120_000)],
                          "download_mbps": 1.0}).encode()   # several chunks
        big_id = sensor.enqueue(big, logical_timestamp_ms=1_000)
        small_id = sensor.enqueue(speed_test(1), logical_timestamp_ms=2_000)
        await sensor.connect()
        await sensor.drained()

        # Every chunk was acked only after its POST had been committed, and only then deleted.
        oks = {r.data[0]: r.at for r in sensor.records if r.kind == "post" and r.data[1] == 200}
        for rec in (r for r in sensor.records if r.kind == "ack"):
            for seq in rec.data["committed_sequences"]:
                assert seq in oks
        assert sensor.next_sequence - 1 == len(oks) >= 3

        pushed = [await receive_json(stream), await receive_json(stream)]
        assert [p["type"] for p in pushed] == ["snapshot", "snapshot"]
        assert {p["snapshot"]["event_id"] for p in pushed} == {big_id, small_id}

        base = urls(server)["ingest"]
        async with http.get(base + "/v1/sensors/pi-01/events") as r:
            events = (await r.json())["events"]
        by_id = {e["event_id"]: e for e in events}
        assert base64.b64decode(by_id[big_id]["payload_base64"]) == big
        assert by_id[small_id]["payload_json"] == json.loads(speed_test(1))
        async with http.get(base + "/v1/snapshots") as r:
            snaps = (await r.json())["snapshots"]
        assert [s["event_id"] for s in snaps] == [small_id]
        assert snaps[0]["payload_json"]["download_mbps"] == 91.0
        async with http.get(base + "/v1/snapshots/pi-01") as r:
            assert (await r.json()) == snaps[0]
        async with http.get(base + "/v1/sensors") as r:
            pi01 = {s["sensor_id"]: s for s in (await r.json())["sensors"]}["pi-01"]
        assert pi01["committed_offset"] == len(oks) and pi01["connected"] is True

        # A new UI client starts from the batch.
        late = await http.ws_connect(urls(server)["stream"])
        batch = await receive_json(late)
        assert batch["type"] == "snapshot_batch"
        assert [s["event_id"] for s in batch["snapshots"]] == [small_id]
        assert server.registry.get_sample_value("pipeline_events_completed_total") == 2
        await late.close()
        await stream.close()
        await sensor.close()


async def test_stream_credentials_and_origins(tmp_path, http):
    config = server_config(tmp_path, stream={"token": STREAM_TOKEN,
                                             "allowed_origins": ["http://dash.example"]})
    async with running_server(config) as server:
        url = urls(server)["stream"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url)
        assert info.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url, headers={"Authorization": f"Bearer {TOKENS['pi-01']}"})
        assert info.value.status == 401  # a sensor token cannot read
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url, protocols=("openuxi.stream.v1", f"bearer.{STREAM_TOKEN}"),
                                  origin="http://evil.example")
        assert info.value.status == 403
        # Programs: a header. Browsers: the subprotocol; the answer never echoes the token.
        ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {STREAM_TOKEN}"})
        assert (await receive_json(ws))["type"] == "snapshot_batch"
        await ws.close()
        ws = await http.ws_connect(url, protocols=("openuxi.stream.v1", f"bearer.{STREAM_TOKEN}"),
                                   origin="http://dash.example")
        assert ws.protocol == "openuxi.stream.v1"
        assert (await receive_json(ws))["type"] == "snapshot_batch"
        await ws.close()


async def test_dashboard_page_and_config(tmp_path, http):
    config = server_config(tmp_path, stream={"token": STREAM_TOKEN})
    async with running_server(config) as server:
        base = urls(server)["ingest"]
        async with http.get(base + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            html = await r.text()
            csp = r.headers["Content-Security-Policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
        assert f'<script nonce="{nonce}">' in html
        assert 'id="fleet"' in html and 'id="stream-token"' in html
        assert not re.search(r"(src|href)=\"https?://", html)  # self-contained
        async with http.get(base + "/dashboard") as r:
            assert r.status == 200
        async with http.get(base + "/v1/dashboard/config") as r:
            doc = await r.json()
        thresholds = doc.pop("thresholds")
        assert doc == {"stream_scheme": "ws", "stream_port": server.stream_port,
                       "stream_path": "/", "subprotocol": "openuxi.stream.v1",
                       "token_required": True}
        assert thresholds["queue_critical"] == config.dashboard.queue_critical


async def test_graceful_stop_answers_in_flight_posts_and_closes_sockets(tmp_path, http):
    config = server_config(tmp_path)
    server_ctx = running_server(config)
    server = await server_ctx.__aenter__()
    # Another connection holds SQLite's write lock: the server's commits wait behind it, so
    # the POSTs below are in flight (received, not yet committed) when stop() begins.
    blocker = sqlite3.connect(config.store.path, isolation_level=None)
    try:
        control = await http.ws_connect(urls(server)["control"],
                                        headers={"X-Sensor-ID": "pi-02",
                                                 "Authorization": f"Bearer {TOKENS['pi-02']}"})
        stream = await http.ws_connect(urls(server)["stream"])
        await receive_json(stream)
        ingest = urls(server)["ingest"] + "/v1/ingest/chunk"

        async def send(seq: int) -> tuple[int, int]:
            _, (doc,) = chunk_docs("pi-01", json.dumps({"seq": seq}).encode(), seq,
                                   logical_timestamp_ms=seq)
            async with http.post(ingest, json=doc, headers={
                    "Authorization": f"Bearer {TOKENS['pi-01']}"}) as resp:
                return seq, resp.status

        blocker.execute("BEGIN IMMEDIATE")
        posts = [asyncio.ensure_future(send(seq)) for seq in range(1, 11)]
        await asyncio.sleep(0.3)
        assert not any(p.done() for p in posts)
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()  # stop waits for the in-flight commits...
        with pytest.raises(aiohttp.ClientConnectionError):  # ...but accepts nothing new
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(urls(server)["ingest"] + "/healthz")
        blocker.execute("ROLLBACK")
        await asyncio.wait_for(stopping, 15)
        answers = await asyncio.gather(*posts)
        control_close = await control.receive(timeout=5)
        stream_close = await stream.receive(timeout=5)
        pushed = 0
        while stream_close.type is aiohttp.WSMsgType.TEXT:  # snapshots sent before the close
            pushed += 1
            stream_close = await stream.receive(timeout=5)
    finally:
        blocker.close()
        await server_ctx.__aexit__(None, None, None)
    assert control_close.type is aiohttp.WSMsgType.CLOSE and control_close.data == 1001
    assert stream_close.type is aiohttp.WSMsgType.CLOSE and stream_close.data == 1001
    assert sorted(answers) == [(seq, 200) for seq in range(1, 11)]
    with open_test_store(config.store.path) as store:
        stored = {e.logical_timestamp_ms for e in store.events("pi-01", limit=100)}
    assert stored == set(range(1, 11))  # every answered chunk is durable
    assert pushed <= 10


async def test_restart_keeps_events_and_warms_snapshots(tmp_path, http):
    config = server_config(tmp_path)
    async with running_server(config) as server:
        sensor = MiniSensor(http, server, "pi-02", TOKENS["pi-02"])
        first = sensor.enqueue(speed_test(1), logical_timestamp_ms=5_000)
        sensor.enqueue(speed_test(2), logical_timestamp_ms=4_000)   # older measurement
        await sensor.connect()
        await sensor.drained()
        await sensor.close()
    async with running_server(config) as again:
        async with http.get(urls(again)["ingest"] + "/v1/snapshots") as r:
            snaps = (await r.json())["snapshots"]
        assert [s["event_id"] for s in snaps] == [first]
        # The sensor's next session continues from the store's offset.
        sensor = MiniSensor(http, again, "pi-02", TOKENS["pi-02"])
        sensor.next_sequence = 3
        third = sensor.enqueue(speed_test(3), logical_timestamp_ms=6_000)
        await sensor.connect()
        await sensor.drained()
        await sensor.close()
        assert again.snapshots.get("pi-02").event_id == third
        assert again.store.event_count("pi-02") == 3


# ---------------------------------------------------------------------------------------
# The command


def server_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update({"PIPELINE_SERVER__CONTROL__PORT": "0", "PIPELINE_SERVER__INGEST__PORT": "0",
                "PIPELINE_SERVER__STREAM__PORT": "0",
                "PIPELINE_SERVER__STORE__PATH": str(tmp_path / "var" / "server.db")})
    return env


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    return line.decode()


async def test_command_prints_a_demo_token_once_and_stops_on_sigterm(tmp_path, http):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.server", cwd=tmp_path, env=server_env(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        token_line = await read_line(proc)
        match = re.fullmatch(r"demo token: (oux_demo_[A-Za-z0-9_-]{43})\n", token_line)
        assert match, token_line
        token = match.group(1)
        port = int(re.search(r":(\d+)/", await read_line(proc)).group(1))
        _, (doc,) = chunk_docs("lab-1", b'{"ping_ms": 9}', 1)
        async with http.post(f"http://127.0.0.1:{port}/v1/ingest/chunk", json=doc,
                             headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200 and (await r.json())["event_complete"] is True
        proc.send_signal(signal.SIGTERM)
        rest, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert b"demo token" not in rest  # printed once
    assert token.encode() not in err  # never logged
    assert b"server_stopped" in err
    with open_test_store(tmp_path / "var" / "server.db") as store:
        assert store.event_count("lab-1") == 1


def test_token_create_prints_a_token_and_its_config_entry(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.server", "token", "create", "pi-07"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    token = re.search(r"^token: (oux_[A-Za-z0-9_-]{43})$", out, re.M).group(1)
    digest = re.search(r"token_sha256: ([0-9a-f]{64})", out).group(1)
    assert hashlib.sha256(token.encode()).hexdigest() == digest
    assert "- id: pi-07" in out


def test_bad_config_exits_non_zero_naming_the_key(tmp_path):
    path = tmp_path / "server.yml"
    path.write_text("ingest:\n  prot: 8081\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.server", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, env=server_env(tmp_path))
    assert proc.returncode == 2
    assert "ingest.prot" in proc.stderr and "configuration error" in proc.stderr
    assert proc.stdout == ""


def test_unusable_store_exits_non_zero_with_a_message(tmp_path):
    env = server_env(tmp_path)
    env["PIPELINE_SERVER__STORE__PATH"] = str(tmp_path)  # a directory, not a database file
    proc = subprocess.run([sys.executable, "-m", "pipeline.server"], capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode == 1
    assert "pipeline-server: store_unavailable" in proc.stderr
    assert "Traceback" not in proc.stderr
