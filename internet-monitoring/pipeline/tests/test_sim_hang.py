"""The fault proxy's hung connections (``hang_p``): what the client sends reaches the
server, nothing comes back -- no data, no FIN -- until the client gives up. The decision
(pure) and the proxy over real loopback sockets with a recording server."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.common.errors import ConfigError
from pipeline.sim.faults import Direction, FaultPlan, LinkFaults, LinkSession, StepKind
from pipeline.sim.profiles import get_profile
from pipeline.sim.proxy import FaultProxy
from pipeline.tests.server_support import eventually

HOST = "127.0.0.1"


def test_hang_share_is_seeded_and_close_to_its_probability() -> None:
    plan = FaultPlan(seed=5, faults=LinkFaults(hang_p=0.2))
    hung = [plan.decide_hang(i) for i in range(2000)]
    assert hung == [plan.decide_hang(i) for i in range(2000)]  # a pure function
    assert 0.17 < sum(hung) / len(hung) < 0.23
    assert not any(FaultPlan(seed=5).decide_hang(i) for i in range(200))
    # Adding hangs reshuffles no other decision.
    other = FaultPlan(seed=5, faults=LinkFaults(reset_at_connect_p=0.3))
    both = FaultPlan(seed=5, faults=LinkFaults(reset_at_connect_p=0.3, hang_p=0.2))
    assert [other.decide_connection(i) for i in range(200)] == \
        [both.decide_connection(i) for i in range(200)]


def test_a_hung_session_forwards_upstream_and_swallows_downstream() -> None:
    plan = FaultPlan(seed=5, faults=LinkFaults(hang_p=1.0))
    session = LinkSession(plan, 0)
    assert session.hung
    assert session.on_segment(Direction.UPSTREAM, 100, 0.0).kind is StepKind.FORWARD
    step = session.on_segment(Direction.DOWNSTREAM, 100, 0.0)
    assert step.kind is StepKind.DISCARD and step.reason == "hang"


def test_hang_p_is_a_profile_override_and_validated() -> None:
    assert get_profile("lossy").with_overrides(hang_p="0.1").faults.hang_p == 0.1
    with pytest.raises(ConfigError) as info:
        get_profile("lossy").with_overrides(hang_p=1.5)
    assert info.value.field == "hang_p"


async def test_hung_connection_delivers_the_request_and_never_answers() -> None:
    received = bytearray()
    got_request = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1024)
        received.extend(data)
        got_request.set()
        writer.write(b"answer")  # swallowed by the hang
        await writer.drain()
        writer.close()  # and so is the FIN

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    plan = FaultPlan(seed=1, faults=LinkFaults(hang_p=1.0))
    async with FaultProxy(target_port=port, plan=plan) as proxy:
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        writer.write(b"request")
        await writer.drain()
        await asyncio.wait_for(got_request.wait(), 5)
        assert bytes(received) == b"request"
        # Neither the answer nor the server's close come through: the client waits.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(100), 0.5)
        assert proxy.stats.hangs == 1 and proxy.stats.blackholed_bytes >= len(b"answer")
        # The client gives up: the proxy lets the connection go.
        writer.close()
        await eventually(lambda: proxy.stats.active == 0, 5, "hung connection released")
    server.close()
    await server.wait_closed()
