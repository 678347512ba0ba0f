"""The fault proxy over real loopback sockets: a raw echo/recording server and an aiohttp
server (HTTP keep-alive and WebSocket) as targets, ephemeral ports. Timing assertions are
lower bounds only."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from pipeline.common.errors import ConfigError
from pipeline.sim.faults import DirectionFaults, FaultPlan, LinkFaults
from pipeline.sim.proxy import FaultProxy
from pipeline.tests.server_support import eventually as polled

HOST = "127.0.0.1"


@dataclass
class RawTarget:
    """Echo server recording what it saw: connections, read sizes, bytes, EOF times."""

    echo: bool = True
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)
    read_sizes: list[int] = field(default_factory=list)
    eof_at: list[float] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                self.read_sizes.append(len(data))
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            self.eof_at.append(time.monotonic())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def target() -> AsyncIterator[RawTarget]:
    server = RawTarget()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def web_target() -> AsyncIterator[int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"hello " + request.query.get("n", "").encode())

    async def echo_body(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data.upper())
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.add_routes([web.get("/hello", hello), web.post("/echo", echo_body),
                    web.get("/ws", ws_echo)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield port
    await runner.cleanup()


def link(**params: float) -> FaultPlan:
    return FaultPlan(seed=11, faults=LinkFaults.symmetric(**params))


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, proxy.port)


async def roundtrip(proxy: FaultProxy, payload: bytes) -> bytes:
    reader, writer = await connect(proxy)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    writer.close()
    await writer.wait_closed()
    return data


async def eventually(predicate, timeout: float = 3.0) -> None:
    await polled(predicate, timeout, interval=0.01)


# ---------------------------------------------------------------------------------------
# Clean forwarding


async def test_clean_plan_forwards_identical_bytes_both_ways(target: RawTarget) -> None:
    payload = os.urandom(1_000_000)
    async with FaultProxy(target_port=target.port) as proxy:
        assert await roundtrip(proxy, payload) == payload
        assert bytes(target.received) == payload
        await eventually(lambda: proxy.stats.bytes_downstream == len(payload))
        stats = proxy.stats
    assert stats.connections == 1 and stats.bytes_upstream == len(payload)
    assert stats.resets == 0


async def test_half_close_passes_through(target: RawTarget) -> None:
    async with FaultProxy(target_port=target.port) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"last words")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"last words"  # read to EOF
        writer.close()
        await writer.wait_closed()
        await eventually(lambda: len(target.eof_at) == 1)
        await eventually(lambda: proxy.stats.active == 0)


# ---------------------------------------------------------------------------------------
# Latency, jitter, bandwidth, fragmentation


async def test_latency_delays_each_direction(target: RawTarget) -> None:
    async with FaultProxy(target_port=target.port, plan=link(latency_ms=100)) as proxy:
        reader, writer = await connect(proxy)
        for _ in range(2):
            started = time.monotonic()
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            assert time.monotonic() - started >= 0.19  # 100 ms up + 100 ms down
        writer.close()
        await writer.wait_closed()


async def test_jitter_and_fragments_keep_the_byte_order(target: RawTarget) -> None:
    plan = link(latency_ms=10, jitter_ms=10, fragment_max_bytes=37)
    messages = [os.urandom(n) for n in range(1, 3000, 97)]
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        reader, writer = await connect(proxy)
        for message in messages:  # many small segments, each with its own jitter draw
            writer.write(message)
            await writer.drain()
            await asyncio.sleep(0.002)
        expected = b"".join(messages)
        assert await asyncio.wait_for(reader.readexactly(len(expected)), 10) == expected
        writer.close()
        await writer.wait_closed()
    assert bytes(target.received) == expected


async def test_bandwidth_cap_bounds_the_transfer_time(target: RawTarget) -> None:
    plan = FaultPlan(faults=LinkFaults(upstream=DirectionFaults(bandwidth_bps=800_000)))
    payload = os.urandom(60_000)  # 60 kB at 100 kB/s: at least 0.6 s
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        started = time.monotonic()
        assert await roundtrip(proxy, payload) == payload
        assert time.monotonic() - started >= 0.57


async def test_fragmentation_delivers_small_writes(target: RawTarget) -> None:
    target.echo = False
    payload = os.urandom(2000)
    async with FaultProxy(target_port=target.port, plan=link(fragment_max_bytes=7)) as proxy:
        _reader, writer = await connect(proxy)
        writer.write(payload)
        await writer.drain()
        await eventually(lambda: len(target.received) == len(payload))
        writer.close()
        await writer.wait_closed()
    assert bytes(target.received) == payload
    assert len(target.read_sizes) >= 20  # the target saw pieces, not one 2000-byte read


# ---------------------------------------------------------------------------------------
# Resets, close-after, slow close


async def test_reset_at_connect_resets_the_client_and_never_reaches_the_target(
        target: RawTarget) -> None:
    plan = FaultPlan(faults=LinkFaults(reset_at_connect_p=1.0))
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        for _ in range(3):
            reader, writer = await connect(proxy)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(100), 5)
            writer.close()
        stats = proxy.stats
    assert stats.resets == stats.resets_at_connect == 3
    assert target.connections == 0


async def test_reset_mid_stream(target: RawTarget) -> None:
    plan = FaultPlan(faults=LinkFaults(upstream=DirectionFaults(reset_mid_stream_p=1.0)))
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"doomed")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        await eventually(lambda: proxy.stats.active == 0)
        stats = proxy.stats
    assert stats.resets_mid_stream == 1 and stats.bytes_upstream == 0
    assert target.connections == 1 and target.received == b""  # the segment was not sent on


async def test_reset_mid_stream_with_a_seed_hits_some_connections_only(
        target: RawTarget) -> None:
    plan = FaultPlan(seed=3, faults=LinkFaults(upstream=DirectionFaults(reset_mid_stream_p=0.5)))
    outcomes = []
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        for _ in range(16):
            reader, writer = await connect(proxy)
            writer.write(b"x")
            try:
                outcomes.append(await asyncio.wait_for(reader.readexactly(1), 5) == b"x")
            except (ConnectionResetError, asyncio.IncompleteReadError):
                outcomes.append(False)
            writer.close()
        expected = [not plan.decide_segment(i, 0, 1, 0.0).reset for i in range(16)]
    assert outcomes == expected  # exactly the connections the plan said
    assert True in outcomes and False in outcomes


async def test_close_after_bytes_downstream(target: RawTarget) -> None:
    plan = FaultPlan(faults=LinkFaults(downstream=DirectionFaults(close_after_bytes=1000)))
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        reader, writer = await connect(proxy)
        writer.write(os.urandom(5000))
        received = await asyncio.wait_for(reader.read(), 5)  # until EOF, not a reset
        writer.close()
        assert proxy.stats.closed_after_bytes == 1
    assert len(received) == 1000 and received == bytes(target.received[:1000])


async def test_close_after_bytes_upstream(target: RawTarget) -> None:
    target.echo = False
    plan = FaultPlan(faults=LinkFaults(upstream=DirectionFaults(close_after_bytes=300)))
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        reader, writer = await connect(proxy)
        payload = os.urandom(1000)
        writer.write(payload)
        await eventually(lambda: len(target.eof_at) == 1)  # the target saw a clean FIN
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert bytes(target.received) == payload[:300]


async def test_slow_close_delays_the_fin(target: RawTarget) -> None:
    plan = FaultPlan(faults=LinkFaults(upstream=DirectionFaults(slow_close_ms=300)))
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"bye")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"bye"  # data not delayed
        closed_at = time.monotonic()
        writer.write_eof()
        await eventually(lambda: len(target.eof_at) == 1)
        assert target.eof_at[0] - closed_at >= 0.29
        writer.close()


async def test_unreachable_target_resets_the_client() -> None:
    spare = await asyncio.start_server(lambda r, w: None, HOST, 0)
    dead_port = spare.sockets[0].getsockname()[1]
    spare.close()
    await spare.wait_closed()
    async with FaultProxy(target_port=dead_port) as proxy:
        reader, writer = await connect(proxy)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 5)
        writer.close()
        assert proxy.stats.target_connect_failures == 1


# ---------------------------------------------------------------------------------------
# Black-holes and partitions


async def test_blackhole_discards_bytes_and_stalls_the_connection(target: RawTarget) -> None:
    plan = FaultPlan(blackholes=((0.0, 0.6),))
    async with FaultProxy(target_port=target.port, plan=plan) as proxy:
        reader, writer = await connect(proxy)  # accepted during the window
        writer.write(b"lost")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.3)
        await asyncio.sleep(max(0.0, 0.65 - proxy.plan_time()))
        writer.write(b"also lost")  # after the window: this connection stays silent
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.2)
        assert target.received == b""
        assert proxy.stats.blackholed_bytes == len(b"lost") + len(b"also lost")
        assert await roundtrip(proxy, b"fresh") == b"fresh"  # a new connection works
        writer.close()


async def test_partition_resets_live_connections_refuses_new_ones_then_heals(
        target: RawTarget) -> None:
    async with FaultProxy(target_port=target.port) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
        proxy.set_plan(FaultPlan(partitions=((0.2, 0.5),)))
        with pytest.raises(ConnectionResetError):  # the live connection is cut at 0.2 s
            await asyncio.wait_for(reader.read(10), 5)
        assert proxy.plan_time() >= 0.2
        writer.close()
        connects_before = target.connections
        r2, w2 = await connect(proxy)  # during the window
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r2.read(10), 5)
        w2.close()
        assert target.connections == connects_before
        await asyncio.sleep(max(0.0, 0.75 - proxy.plan_time()))
        assert await roundtrip(proxy, b"after") == b"after"
        stats = proxy.stats
    assert stats.resets_partition == 2


async def test_set_plan_changes_faults_of_a_live_connection(target: RawTarget) -> None:
    async with FaultProxy(target_port=target.port) as proxy:
        reader, writer = await connect(proxy)
        started = time.monotonic()
        writer.write(b"a")
        await asyncio.wait_for(reader.readexactly(1), 5)
        fast = time.monotonic() - started
        proxy.set_plan(link(latency_ms=150))
        started = time.monotonic()
        writer.write(b"b")
        await asyncio.wait_for(reader.readexactly(1), 5)
        assert time.monotonic() - started >= 0.29 > fast
        writer.close()


# ---------------------------------------------------------------------------------------
# HTTP keep-alive and WebSocket


async def test_aiohttp_get_post_and_websocket_through_a_clean_proxy(web_target: int) -> None:
    async with FaultProxy(target_port=web_target) as proxy:
        async with aiohttp.ClientSession() as http:
            for n in range(5):  # keep-alive: one connection for all of them
                async with http.get(proxy.url("http", f"/hello?n={n}")) as response:
                    assert await response.read() == f"hello {n}".encode()
            body = os.urandom(300_000)
            async with http.post(proxy.url("http", "/echo"), data=body) as response:
                assert await response.read() == body
            assert proxy.stats.connections == 1  # keep-alive through the proxy
            async with http.ws_connect(proxy.url("ws", "/ws")) as ws:
                await ws.send_str("hi")
                assert await ws.receive_str() == "HI"
                await ws.send_bytes(b"abc")
                assert await ws.receive_bytes() == b"cba"
        assert proxy.stats.resets == 0


async def test_aiohttp_and_websocket_survive_latency_jitter_and_fragmentation(
        web_target: int) -> None:
    plan = link(latency_ms=5, jitter_ms=5, fragment_max_bytes=61)
    async with FaultProxy(target_port=web_target, plan=plan) as proxy:
        async with aiohttp.ClientSession() as http:
            body = os.urandom(20_000)
            async with http.post(proxy.url("http", "/echo"), data=body) as response:
                assert await response.read() == body
            async with http.ws_connect(proxy.url("ws", "/ws")) as ws:
                for i in range(5):
                    await ws.send_str(f"msg-{i}" * 50)
                    assert await ws.receive_str() == f"MSG-{i}" * 50


# ---------------------------------------------------------------------------------------
# Life cycle and safety


async def test_stop_leaves_no_tasks_behind(target: RawTarget) -> None:
    before = asyncio.all_tasks()
    proxy = FaultProxy(target_port=target.port, plan=FaultPlan(
        faults=LinkFaults.symmetric(latency_ms=200), partitions=((30.0, 1.0),)))
    await proxy.start()
    clients = [await connect(proxy) for _ in range(4)]
    for _, writer in clients:
        writer.write(b"in flight")  # still queued behind the latency when we stop
    await eventually(lambda: proxy.stats.active == 4)
    proxy.set_plan(proxy.plan)  # retires a partition watcher
    await proxy.stop()
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("faultproxy")]
    assert leftovers == []
    for reader, writer in clients:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 5)
        writer.close()
    await eventually(lambda: asyncio.all_tasks() == before)  # incl. the handlers asyncio made
    await proxy.stop()  # idempotent


@pytest.mark.parametrize("kwargs,field", [
    ({"target_host": "10.0.0.1"}, "target_host"),
    ({"target_host": "example.com"}, "target_host"),
    ({"listen_host": "0.0.0.0"}, "listen_host"),
    ({"target_port": 0}, "target_port"),
    ({"target_port": 70000}, "target_port"),
])
def test_refuses_non_loopback_and_bad_ports(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"target_port": 8080, **kwargs}
    with pytest.raises(ConfigError) as info:
        FaultProxy(**args)  # type: ignore[arg-type]
    assert info.value.field == field


def test_remote_targets_need_an_explicit_opt_in() -> None:
    proxy = FaultProxy(target_host="10.0.0.1", target_port=80, allow_remote=True)
    assert proxy.target_host == "10.0.0.1"
    v6 = FaultProxy(listen_host="::1", target_host="localhost", target_port=1)
    assert v6.listen_host == "::1"
