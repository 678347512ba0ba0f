"""Tokens over real sockets: the refusal matrix on HTTP and on the WebSocket handshake,
revocation by reload (open connections closed, others untouched), expiry while connected,
read-only and admin credentials, address bans, and rotation over the control channel end
to end with the real sensor agent."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from pipeline.common.config import ServerConfig, server_config_from_dict
from pipeline.server.app import PipelineServer
from pipeline.server.security.auth import hash_token
from pipeline.tests.security_support import (
    enqueue,
    running_agent,
    sensor_config,
    stored_events,
)
from pipeline.tests.server_support import chunk_docs, envelope, eventually

ADMIN = "test-admin-token-0123456789"
STREAM = "test-stream-token-0123456789"
TOK = {"pi-01": "tok-pi-01-current-0123456789", "pi-02": "tok-pi-02-0123456789",
       "expired": "tok-pi-01-expired-0123456789", "doomed": "tok-pi-01-doomed-0123456789"}


def iso(delta_s: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=delta_s)).isoformat()


def config_doc(tmp_path, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "store": {"path": str(tmp_path / "server.db")},
        "control": {"port": 0}, "ingest": {"port": 0}, "stream": {"port": 0, "token": STREAM},
        "auth": {"sensors": [
            {"id": "pi-01", "tokens": [{"token": TOK["pi-01"]},
                                       {"token": TOK["expired"], "not_after": iso(-60)},
                                       {"token": TOK["doomed"]}]},
            {"id": "pi-02", "token": TOK["pi-02"]}],
            "admin_token": ADMIN, "reload_watch_s": 0},
        "limits": {"auth_failures_before_ban": 0},
        "heartbeat": {"interval_s": 5.0},
        "scheduler": {"window_timeout_s": 0.6, "quiet_s": 0.2},
    }
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value}
    return doc


@asynccontextmanager
async def serving(doc: dict[str, Any]) -> AsyncIterator[tuple[PipelineServer, dict[str, Any]]]:
    """A server whose reload re-reads ``holder["doc"]`` (what SIGHUP does with the file)."""
    holder = {"doc": doc}

    def loader() -> ServerConfig:
        return server_config_from_dict(holder["doc"])

    server = PipelineServer(loader(), registry=CollectorRegistry(), config_loader=loader)
    await server.start()
    try:
        yield server, holder
    finally:
        await server.stop()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def chunk(sensor_id: str, sequence: int, data: bytes = b'{"v": 1}') -> dict[str, Any]:
    _, docs = chunk_docs(sensor_id, data + str(sequence).encode(), sequence)
    docs[0]["attributes"] = {"window_id": "w-sec"}
    return docs[0]


async def post(http, server, doc, token) -> tuple[int, dict[str, Any]]:
    async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk", json=doc,
                         headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def handshake_status(http, server, sensor_id: str, token: str | None) -> int:
    """The HTTP status of a refused control handshake (the upgrade never happens)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"ws://127.0.0.1:{server.control_port}/control",
                              headers={"X-Sensor-ID": sensor_id, **bearer(token)})
    return info.value.status


async def connect(http, server, sensor_id: str, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"ws://127.0.0.1:{server.control_port}/control",
                               headers={"X-Sensor-ID": sensor_id, **bearer(token)})
    await ws.send_str(envelope(sensor_id, "heartbeat", {
        "software_version": "t", "last_committed_sequence": 0, "queue_depth": 0,
        "clock_skew_ms": 0.0}))
    await eventually(lambda: server.manager.is_connected(sensor_id), what=f"{sensor_id} up")
    return ws


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await ws.receive(timeout=max(0.05, deadline - time.monotonic()))
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return msg.data  # the code the server sent (ws.close_code may say 1006 later)
        if msg.type is aiohttp.WSMsgType.CLOSED:
            return ws.close_code
    return None


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


# ---------------------------------------------------------------------------------------


async def test_token_matrix_on_http_and_websocket(tmp_path, http):
    async with serving(config_doc(tmp_path)) as (server, holder):
        cases = [(None, 401), ("nope", 401), (TOK["expired"], 401), (TOK["pi-02"], 403),
                 (STREAM, 401), (ADMIN, 401)]
        for i, (token, status) in enumerate(cases, start=1):
            got, doc = await post(http, server, chunk("pi-01", i), token)
            assert got == status, (token, doc)
            assert doc["error"] in ("unauthenticated", "forbidden")
            for secret in TOK.values():
                assert secret not in json.dumps(doc)
            assert await handshake_status(http, server, "pi-01", token) == status
        assert not server.manager.connections and server.store.chunk_count() == 0
        # Both of pi-01's live tokens work; now revoke one by a reload.
        assert (await post(http, server, chunk("pi-01", 10), TOK["doomed"]))[0] == 200
        doc = dict(holder["doc"])
        sensors = [dict(s) for s in doc["auth"]["sensors"]]
        sensors[0]["tokens"] = [t for t in sensors[0]["tokens"] if t["token"] != TOK["doomed"]]
        holder["doc"] = {**doc, "auth": {**doc["auth"], "sensors": sensors}}
        async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/admin/reload",
                             headers=bearer(ADMIN)) as resp:
            assert resp.status == 200 and (await resp.json())["reloaded"] is True
        assert (await post(http, server, chunk("pi-01", 11), TOK["doomed"]))[0] == 401
        assert await handshake_status(http, server, "pi-01", TOK["doomed"]) == 401
        assert (await post(http, server, chunk("pi-01", 12), TOK["pi-01"]))[0] == 200
        assert server.store.chunk_count() == 2


async def test_revocation_closes_only_the_revoked_connections(tmp_path, http):
    async with serving(config_doc(tmp_path)) as (server, holder):
        keep = await connect(http, server, "pi-01", TOK["pi-01"])
        doomed = await connect(http, server, "pi-02", TOK["pi-02"])
        stream = await http.ws_connect(f"ws://127.0.0.1:{server.stream_port}/",
                                       headers=bearer(STREAM))
        assert json.loads((await stream.receive(timeout=5)).data)["type"] == "snapshot_batch"
        doc = holder["doc"]
        holder["doc"] = {**doc, "stream": {**doc["stream"], "token": "a-new-stream-token-0123"},
                         "auth": {**doc["auth"], "sensors": [
                             s for s in doc["auth"]["sensors"] if s["id"] != "pi-02"]}}
        result = await server.security.reload("test")
        assert result.closed_connections == 2 and result.sensors == 1
        assert await close_code(doomed) == 1008
        assert await close_code(stream) == 1008
        assert not keep.closed and server.manager.is_connected("pi-01")
        await keep.send_str(envelope("pi-01", "heartbeat", {
            "software_version": "t", "last_committed_sequence": 0, "queue_depth": 0,
            "clock_skew_ms": 0.0}))
        assert (await post(http, server, chunk("pi-01", 1), TOK["pi-01"]))[0] == 200
        assert await handshake_status(http, server, "pi-02", TOK["pi-02"]) == 401
        await keep.close()


async def test_a_token_expiring_while_connected_closes_its_connection(tmp_path, http):
    doc = config_doc(tmp_path)
    doc["auth"]["sensors"][1] = {"id": "pi-02", "tokens": [
        {"token": TOK["pi-02"], "not_after": iso(1.5)}]}
    async with serving(doc) as (server, _):
        ws = await connect(http, server, "pi-02", TOK["pi-02"])
        other = await connect(http, server, "pi-01", TOK["pi-01"])
        assert await close_code(ws, timeout=6.0) == 1008
        assert not other.closed
        await other.close()


async def test_read_only_stream_token_and_admin_token(tmp_path, http):
    async with serving(config_doc(tmp_path)) as (server, _):
        base = f"http://127.0.0.1:{server.ingest_port}"
        for path in ("/v1/snapshots", "/v1/sensors", "/v1/sensors/pi-01/events",
                     "/v1/snapshots/pi-01"):
            for token, status in ((STREAM, None), (TOK["pi-01"], 401), (ADMIN, 401),
                                  (None, 401)):
                async with http.get(base + path, headers=bearer(token)) as resp:
                    if status is None:
                        assert resp.status in (200, 404), path
                    else:
                        assert resp.status == status, (path, token)
        for token in (STREAM, TOK["pi-01"], None):
            async with http.post(base + "/v1/admin/reload", headers=bearer(token)) as resp:
                assert resp.status == 401
            async with http.post(base + "/v1/sensors/pi-01/rotate",
                                 headers=bearer(token)) as resp:
                assert resp.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(f"ws://127.0.0.1:{server.stream_port}/",
                                  headers=bearer(TOK["pi-01"]))
        assert info.value.status == 401
        # Browsers: the subprotocol carries the token, the answer never echoes it.
        ws = await http.ws_connect(f"ws://127.0.0.1:{server.stream_port}/",
                                   protocols=("openuxi.stream.v1", f"bearer.{STREAM}"))
        assert ws.protocol == "openuxi.stream.v1"
        await ws.close()
    doc = config_doc(tmp_path / "b")
    doc["auth"] = {**doc["auth"], "admin_token": ""}
    async with serving(doc) as (server, _):
        async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/admin/reload",
                             headers=bearer(ADMIN)) as resp:
            assert resp.status == 404  # no admin token configured: no admin API


async def test_repeated_failures_ban_the_address_then_the_ban_ends(tmp_path, http):
    doc = config_doc(tmp_path, limits={"auth_failures_before_ban": 5,
                                       "auth_failure_window_s": 30, "ban_s": 1.5})
    async with serving(doc) as (server, _):
        for i in range(5):
            assert (await post(http, server, chunk("pi-01", 1), f"wrong-{i}"))[0] == 401
        async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk",
                             json=chunk("pi-01", 1), headers=bearer(TOK["pi-01"])) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert await handshake_status(http, server, "pi-01", TOK["pi-01"]) == 429
        async with http.get(f"http://127.0.0.1:{server.ingest_port}/healthz") as resp:
            assert resp.status == 200  # health stays open
        assert server.registry.get_sample_value("pipeline_auth_bans_total") == 1
        assert server.registry.get_sample_value("pipeline_throttled_total",
                                                {"sensor_id": ""}) >= 2
        await asyncio.sleep(1.6)
        assert (await post(http, server, chunk("pi-01", 1), TOK["pi-01"]))[0] == 200


# ---------------------------------------------------------------------------------------
# Rotation over the control channel, with the real agent


async def rotate(http, server, sensor_id: str, body: dict[str, Any] | None = None,
                 token: str = ADMIN) -> tuple[int, dict[str, Any]]:
    async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/sensors/{sensor_id}/rotate",
                         json=body or {}, headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def test_rotation_end_to_end_with_overlap(tmp_path, http):
    token_file = tmp_path / "pi-01.token"
    token_file.write_text(TOK["pi-01"] + "\n")
    doc = config_doc(tmp_path)
    async with serving(doc) as (server, _):
        config = sensor_config(server, tmp_path, "pi-01", token_file=token_file,
                               capabilities=("chunks", "heartbeats", "epoch", "rotation"))
        async with running_agent(config) as (agent, queue):
            first = enqueue(queue, agent, 3)
            await eventually(lambda: first <= stored_events(server, "pi-01"), what="first")
            status, answer = await rotate(http, server, "pi-01", {"overlap_s": 2.0})
            assert status == 200, answer
            assert answer["confirmed"] is True and answer["previous_not_after"]
            new_token = token_file.read_text().strip()
            assert new_token != TOK["pi-01"] and new_token.startswith("oux_")
            assert new_token not in json.dumps(answer)
            assert answer["token_hint"] == hash_token(new_token)[:8]
            overlay = (tmp_path / "credentials.json").read_text()
            assert new_token not in overlay and hash_token(new_token) in overlay
            # Overlap: both tokens work.
            assert (await post(http, server, chunk("pi-01", 100), TOK["pi-01"]))[0] == 200
            assert (await post(http, server, chunk("pi-01", 101), new_token))[0] == 200
            await asyncio.sleep(2.2)
            # After the overlap only the new one does; the agent never noticed.
            assert (await post(http, server, chunk("pi-01", 102), TOK["pi-01"]))[0] == 401
            assert (await post(http, server, chunk("pi-01", 103), new_token))[0] == 200
            second = enqueue(queue, agent, 3)
            await eventually(lambda: second <= stored_events(server, "pi-01"), what="second")
            assert agent.connects == 1 and server.manager.is_connected("pi-01")
            assert server.manager.connections["pi-01"].token_sha256 == hash_token(new_token)
        # Other sensors' tokens are untouched.
        assert (await post(http, server, chunk("pi-02", 1), TOK["pi-02"]))[0] == 200
    # The rotated token survives a restart (the overlay is read at start-up).
    async with serving(doc) as (server, _):
        assert (await post(http, server, chunk("pi-01", 200), new_token))[0] == 200
        assert (await post(http, server, chunk("pi-01", 201), TOK["pi-01"]))[0] == 401


async def test_rotation_refusals_leave_credentials_unchanged(tmp_path, http):
    doc = config_doc(tmp_path, auth={"fleet_token": "fleet-token-0123456789"})
    async with serving(doc) as (server, _):
        assert (await rotate(http, server, "pi-01", token="wrong"))[0] == 401
        assert (await rotate(http, server, "pi-01"))[0] == 409            # not connected
        status, answer = await rotate(http, server, "pi-01", {"overlap_s": -1})
        assert status == 400 and answer["field"] == "overlap_s"
        # A 1.0 sensor (no "rotation" capability) is never sent the command.
        ws = await connect(http, server, "pi-02", TOK["pi-02"])
        status, answer = await rotate(http, server, "pi-02")
        assert status == 409 and "rotation" in answer["message"]
        await ws.close()
        fleet = await connect(http, server, "lab-7", "fleet-token-0123456789")
        assert (await rotate(http, server, "lab-7"))[0] == 409          # no own credentials
        await fleet.close()
        # The sensor cannot store the token: it says so, and the new token is withdrawn.
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        config = sensor_config(server, tmp_path, "pi-01", token=TOK["pi-01"],
                               token_file=blocker / "token",
                               capabilities=("chunks", "heartbeats", "rotation"))
        before = {c.token_sha256 for c in server.authenticator.credentials("pi-01")}
        async with running_agent(config):
            await eventually(lambda: server.manager.is_connected("pi-01"), what="agent up")
            status, answer = await rotate(http, server, "pi-01")
            assert status == 409 and "token_file" in answer["message"]
        assert {c.token_sha256 for c in server.authenticator.credentials("pi-01")} == before
        assert (await post(http, server, chunk("pi-01", 1), TOK["pi-01"]))[0] == 200


async def test_reload_with_a_broken_config_keeps_serving(tmp_path, http):
    async with serving(config_doc(tmp_path)) as (server, holder):
        holder["doc"] = {**holder["doc"], "limits": {"chunk_rate": -1}}
        async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/admin/reload",
                             headers=bearer(ADMIN)) as resp:
            assert resp.status == 422
            assert (await resp.json())["field"] == "limits.chunk_rate"
        assert (await post(http, server, chunk("pi-01", 1), TOK["pi-01"]))[0] == 200

