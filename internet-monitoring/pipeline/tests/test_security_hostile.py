"""Hostile input over real sockets: every nasty request gets a 4xx or a closed connection,
the store does not change, the server logs no error or traceback, and keeps serving.

The Hypothesis fuzz of the control-envelope and chunk decoders themselves lives in
test_messages.py / test_proto_codec.py; the HTTP API is fuzzed against its OpenAPI
document in test_security_openapi.py. This file is the hand-written corpus: truncated
base64, wrong types, huge integers, negative sequences, unicode and path-traversal sensor
ids, gzip bombs (inside a chunk and as HTTP Content-Encoding), a 100 MB body, one header
byte per second, a dribbling body, oversized WebSocket frames, a per-address connection
cap."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from pipeline.tests.server_support import eventually
from pipeline.tests.server_support import (
    TOKENS,
    chunk_docs,
    envelope,
    running_server,
    server_config,
)

MAX_BODY = 256 * 1024
TOKEN = TOKENS["pi-01"]


def hostile_config(tmp_path, **limits: Any):
    return server_config(tmp_path, ingest={"max_body_bytes": MAX_BODY},
                         limits={"auth_failures_before_ban": 0, "header_timeout_s": 2.0,
                                 "body_timeout_s": 1.5, **limits})


def good_chunk(sequence: int = 1, sensor_id: str = "pi-01") -> dict[str, Any]:
    _, docs = chunk_docs(sensor_id, b'{"ok": %d}' % sequence, sequence)
    docs[0]["attributes"] = {"window_id": "w-hostile"}
    return docs[0]


def mutated(**changes: Any) -> bytes:
    doc = good_chunk()
    for key, value in changes.items():
        if value is KeyError:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def gzip_bomb_chunk() -> bytes:
    bomb = gzip.compress(b"\0" * (8 * 1024 * 1024), compresslevel=9)  # ~8 KiB -> 8 MiB
    doc = good_chunk()
    doc["payload"] = base64.b64encode(bomb).decode()
    doc["chunk_sha256"] = base64.b64encode(hashlib.sha256(bomb).digest()).decode()
    return json.dumps(doc).encode()


def counts(server) -> tuple[int, int]:
    return server.store.chunk_count(), server.store.event_count()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = await asyncio.wait_for(reader.read(65536),
                                               max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            except ConnectionError:
                break
            if not piece:
                break
            out += piece
        return out
    finally:
        writer.close()


def status_of(response: bytes) -> int | None:
    if not response.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        return None
    return int(response[9:12])


@pytest.fixture
def clean_logs(caplog):
    """Fails the test if anything logged an error or a traceback."""
    caplog.set_level(logging.INFO)
    yield caplog
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


CORPUS: list[tuple[str, bytes, dict[str, str], set[int]]] = [
    ("truncated base64", mutated(payload="H4sIAAAAAAAA/6tW"[:-3]), {}, {400}),
    ("payload not base64", mutated(payload="%%%%"), {}, {400}),
    ("hash of wrong length", mutated(chunk_sha256=base64.b64encode(b"x" * 31).decode()), {},
     {400}),
    ("sequence as string", mutated(sequence="1"), {}, {400}),
    ("payload as number", mutated(payload=123), {}, {400}),
    ("attributes as list", mutated(attributes=["a"]), {}, {400}),
    ("missing event_id", mutated(event_id=KeyError), {}, {400}),
    ("boolean chunk_count", mutated(chunk_count=True), {}, {400}),
    ("float sequence", mutated(sequence=1.5), {}, {400}),
    ("huge integer", mutated(sequence=2**64), {}, {400}),
    ("5000-digit integer", mutated(sequence=0).replace(b'"sequence": 0',
                                                      b'"sequence": ' + b"9" * 5000), {}, {400}),
    ("infinite skew", mutated(clock_skew_ms=0).replace(b'"clock_skew_ms": 0',
                                                      b'"clock_skew_ms": 1e999'), {}, {400}),
    ("negative sequence", mutated(sequence=-1), {}, {400}),
    ("negative chunk_index", mutated(chunk_index=-5), {}, {400}),
    ("unicode sensor id", mutated(sensor_id="пи-01"), {}, {400}),
    ("path traversal sensor id", mutated(sensor_id="../../etc/passwd"), {}, {400}),
    ("NUL in sensor id", mutated(sensor_id="pi-01\u0000"), {}, {400}),
    ("lone surrogate", mutated(created_at="\ud800"), {}, {400}),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, {}, {400, 413}),
    ("not JSON", b"\xff\xfe garbage", {}, {400}),
    ("JSON array", b"[1, 2, 3]", {}, {400}),
    ("empty body", b"", {}, {400}),
    ("unknown schema major", mutated(schema_version="2.0.0"), {}, {400}),
    ("gzip bomb in a chunk", gzip_bomb_chunk(), {}, {413}),
    ("gzip Content-Encoding", gzip.compress(mutated()),
     {"Content-Encoding": "gzip"}, {415}),
    ("wrong Content-Type", mutated(), {"Content-Type": "text/plain"}, {415}),
    ("another sensor's chunk", json.dumps(good_chunk(7, "pi-02")).encode(), {}, {403}),
]


async def test_nasty_requests_get_4xx_and_change_nothing(tmp_path, clean_logs):
    async with running_server(hostile_config(tmp_path)) as server:
        url = f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
        before = counts(server)
        async with aiohttp.ClientSession() as http:
            for name, body, extra, expected in CORPUS:
                headers = {"Authorization": f"Bearer {TOKEN}",
                           "Content-Type": "application/json", **extra}
                async with http.post(url, data=body, headers=headers) as resp:
                    assert resp.status in expected, (name, resp.status, await resp.text())
                    doc = await resp.json()
                    assert doc["error"] and doc["message"], name
                    assert TOKEN not in json.dumps(doc)
            # Read API: traversal and unicode in paths and queries.
            base = f"http://127.0.0.1:{server.ingest_port}"
            for path in ("/v1/sensors/..%2F..%2Fetc/events", "/v1/snapshots/%2e%2e",
                         "/v1/sensors/%D0%BF%D0%B8/events", "/v1/sensors/pi-01/events?after=-1",
                         "/v1/sensors/pi-01/events?limit=99999999999999999999999",
                         "/v1/sensors/pi-01/events?after=%F0%9F%92%A5"):
                async with http.get(base + path) as resp:
                    assert 400 <= resp.status < 500, (path, resp.status)
            assert counts(server) == before
            # Still serving.
            async with http.post(url, json=good_chunk(1),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200
        assert counts(server) == (before[0] + 1, before[1] + 1)


async def test_raw_protocol_abuse(tmp_path, clean_logs):
    async with running_server(hostile_config(tmp_path)) as server:
        port = server.ingest_port
        garbage = await raw_exchange(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert status_of(garbage) == 400 or garbage == b""
        huge_header = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
                       + b"\r\n\r\n")
        answer = await raw_exchange(port, huge_header)
        assert answer == b"" or 400 <= (status_of(answer) or 0) < 500
        # A unicode X-Sensor-ID on the control handshake (raw UTF-8 bytes in a header).
        handshake = ("GET /control HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n").encode() + \
            "X-Sensor-ID: пи-01/../x\r\n\r\n".encode()
        answer = await raw_exchange(server.control_port, handshake)
        assert status_of(answer) == 400
        assert not server.manager.connections
        assert counts(server) == (0, 0)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200


async def test_a_100_mb_body_is_refused_early_without_being_read(tmp_path, clean_logs):
    async with running_server(hostile_config(tmp_path)) as server:
        port = server.ingest_port
        # Declared length: answered 413 as soon as the headers are in, nothing read.
        head = (f"POST /v1/ingest/chunk HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode()
        answer = await raw_exchange(port, head, timeout=5)
        assert status_of(answer) == 413 and b"too_large" in answer
        # Chunked, no declared length: streamed until the cap, then 413 and closed. The
        # client stops being able to send long before 100 MB.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/ingest/chunk HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"a" * 65536
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        sent = 0
        answer = b""
        read = asyncio.ensure_future(reader.read(65536))
        started = time.monotonic()
        try:
            while sent < 100 * 1024 * 1024 and time.monotonic() - started < 20:
                if read.done():
                    break
                writer.write(frame)
                await asyncio.wait_for(writer.drain(), timeout=5)
                sent += len(piece)
        except (TimeoutError, ConnectionError):
            pass
        try:
            answer = await asyncio.wait_for(read, timeout=5)
        except (TimeoutError, ConnectionError):
            answer = b""
        writer.close()
        assert sent < 20 * 1024 * 1024, f"server kept reading: {sent} bytes accepted"
        assert answer == b"" or status_of(answer) == 413
        assert counts(server) == (0, 0)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v1/ingest/chunk", json=good_chunk(),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200


async def test_slow_headers_and_slow_bodies_are_cut_off(tmp_path, clean_logs):
    async with running_server(hostile_config(tmp_path)) as server:
        port = server.ingest_port
        # One header byte per second: cut off after header_timeout_s (2 s).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"POST /v1/ingest/chunk HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"z" * 100
        started = time.monotonic()
        closed_after = None
        for byte in request:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1024), timeout=1.0)
            except TimeoutError:
                continue
            except ConnectionError:
                data = b""
            closed_after = time.monotonic() - started
            assert data == b"" or status_of(data) in (400, 408)
            break
        writer.close()
        assert closed_after is not None and closed_after < 4.5, closed_after
        # Complete headers, then a body dribbled one byte at a time: 408 after 1.5 s.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/ingest/chunk HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{".encode())
        await writer.drain()
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < 6:
            try:
                answer = await asyncio.wait_for(reader.read(4096), timeout=0.4)
                break
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
        writer.close()
        assert status_of(answer) == 408, answer[:200]
        assert time.monotonic() - started < 4
        assert counts(server) == (0, 0)


async def test_oversized_websocket_frames_close_with_1009(tmp_path, clean_logs):
    async with running_server(hostile_config(tmp_path)) as server:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws://127.0.0.1:{server.control_port}/control",
                                       headers={"X-Sensor-ID": "pi-01",
                                                "Authorization": f"Bearer {TOKEN}"})
            await ws.send_str(envelope("pi-01", "heartbeat", {
                "software_version": "x" * 100, "last_committed_sequence": 0,
                "queue_depth": 0, "clock_skew_ms": 0.0}))
            await ws.send_str("x" * (200 * 1024))
            msg = await ws.receive(timeout=5)
            while msg.type is aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009
            stream = await http.ws_connect(f"ws://127.0.0.1:{server.stream_port}/")
            await stream.receive(timeout=5)  # the snapshot batch
            await stream.send_str("y" * (200 * 1024))
            msg = await stream.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009
            # The listener is fine: a well-behaved sensor still connects.
            ws = await http.ws_connect(f"ws://127.0.0.1:{server.control_port}/control",
                                       headers={"X-Sensor-ID": "pi-01",
                                                "Authorization": f"Bearer {TOKEN}"})
            await ws.send_str(envelope("pi-01", "heartbeat", {
                "software_version": "x", "last_committed_sequence": 0,
                "queue_depth": 0, "clock_skew_ms": 0.0}))
            await eventually(lambda: server.manager.is_connected("pi-01"), what="reconnect")
            await ws.close()


async def test_connections_per_address_are_capped(tmp_path, clean_logs):
    async with running_server(hostile_config(tmp_path, max_connections_per_address=4)) as server:
        port = server.ingest_port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = await asyncio.wait_for(reader.read(1024), timeout=3)
        except ConnectionError:
            answer = b""
        writer.close()
        assert answer == b"", answer  # dropped before aiohttp saw a byte
        for _, w in held[:2]:
            w.close()
        await asyncio.sleep(0.2)
        answer = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
        assert status_of(answer) == 200
        for _, w in held[2:]:
            w.close()
        assert server.registry.get_sample_value("pipeline_throttled_total",
                                                {"sensor_id": ""}) >= 1


async def test_event_size_cap_and_unanswered_pings(tmp_path, clean_logs):
    config = hostile_config(tmp_path, max_event_bytes=100_000, ws_ping_interval_s=0.4)
    async with running_server(config) as server:
        async with aiohttp.ClientSession() as http:
            # limits.max_event_bytes: three slices of at least 64 KiB cannot fit 100 kB.
            doc = good_chunk()
            doc["chunk_count"] = 3
            async with http.post(f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk",
                                 json=doc, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 413 and (await r.json())["field"] == "chunk_count"
            # A control peer that never answers pings is dropped after ~1.5 intervals.
            ws = await http.ws_connect(f"ws://127.0.0.1:{server.control_port}/control",
                                       headers={"X-Sensor-ID": "pi-01",
                                                "Authorization": f"Bearer {TOKEN}"},
                                       autoping=False)
            await ws.send_str(envelope("pi-01", "heartbeat", {
                "software_version": "x", "last_committed_sequence": 0, "queue_depth": 0,
                "clock_skew_ms": 0.0}))
            await eventually(lambda: server.manager.is_connected("pi-01"), what="connected")
            started = time.monotonic()
            await eventually(lambda: not server.manager.is_connected("pi-01"), timeout=5,
                             what="silent peer dropped")
            assert time.monotonic() - started < 3
            await ws.close()
        assert counts(server) == (0, 0)
