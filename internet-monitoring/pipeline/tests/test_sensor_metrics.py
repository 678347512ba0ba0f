"""The sensor agent's /metrics (``metrics.listen``) and the figures its heartbeats carry to
the server (capability ``heartbeat_stats``), against a real PipelineServer over sockets.

Values are read from both ``/metrics`` endpoints over HTTP and compared with what the
agent and its queue really hold."""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.submit import open_queue
from pipeline.common import capabilities
from pipeline.tests.observability_support import (
    RunningAgent,
    agent_config,
    parse_samples,
    scrape,
    value,
    wait_for,
)
from pipeline.tests.server_support import TOKENS, running_server, server_config, urls

SID = "pi-01"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def agent_metrics(http: aiohttp.ClientSession, agent: SensorAgent) -> dict:
    assert agent.metrics_port is not None
    return parse_samples(await scrape(http, f"http://127.0.0.1:{agent.metrics_port}"))


async def test_agent_metrics_after_delivery(tmp_path: Path, http) -> None:
    async with running_server(server_config(tmp_path)) as server:
        config = agent_config(server, tmp_path, SID, TOKENS[SID],
                              metrics={"listen": "127.0.0.1:0"})
        queue = open_queue(config)
        try:
            sequences = [s for _ in range(3)
                         for s in queue.enqueue(os.urandom(100 * 1024)).sequences]
            assert len(sequences) == 3
            agent = SensorAgent(config, queue)
            # The injected registry reads the live queue (delivery below is too fast to
            # catch the backlog over HTTP reliably).
            assert agent.registry.get_sample_value("sensor_queue_depth",
                                                   {"sensor_id": SID}) == 3
            async with RunningAgent(agent):
                await wait_for(lambda: agent.metrics_port is not None)
                await wait_for(lambda: server.store.event_count() == 3, timeout=10)
                await wait_for(lambda: agent.acked == 3, timeout=10)
                # The first heartbeat of a connection goes out before the server's
                # capabilities are known, so it carries no stats; the next ones do.
                await wait_for(lambda: server.registry.get_sample_value(
                    "sensor_chunk_retry_total", {"sensor_id": SID}) is not None
                    and server.registry.get_sample_value(
                        "sensor_queue_depth", {"sensor_id": SID}) == 0, timeout=5)
                after = await agent_metrics(http, agent)
                server_side = parse_samples(await scrape(http, urls(server)["ingest"]))
        finally:
            queue.close()
    assert value(after, "sensor_queue_depth", sensor_id=SID) == 0
    assert value(after, "sensor_queue_bytes", sensor_id=SID) == 0
    assert value(after, "sensor_chunks_posted_total", sensor_id=SID) == 3
    assert value(after, "sensor_chunks_acked_total", sensor_id=SID) == 3
    assert value(after, "sensor_chunk_retry_total", sensor_id=SID) == 0
    assert value(after, "sensor_chunks_in_flight", sensor_id=SID) == 0
    assert value(after, "control_channel_connected", sensor_id=SID) == 1
    assert value(after, "sensor_control_connects_total", sensor_id=SID) == 1
    assert value(after, "sensor_heartbeats_sent_total", sensor_id=SID) >= 1
    assert value(after, "sensor_chunks_quarantined", sensor_id=SID) == 0
    # Both sides announced heartbeat_stats: the server mirrors the sensor's counters.
    assert value(server_side, "sensor_chunk_retry_total", sensor_id=SID) == 0
    assert value(server_side, "pipeline_sensor_dropped_total", sensor_id=SID) == 0
    assert value(server_side, "pipeline_sensor_quarantined_total", sensor_id=SID) == 0
    assert value(server_side, "control_channel_connected", sensor_id=SID) == 1


async def test_retries_drops_and_quarantine_reach_both_endpoints(tmp_path: Path, http) -> None:
    """Ingest unreachable (connection refused): retries pile up on the sensor and the
    server learns them from heartbeats; a byte cap drops the oldest event; a chunk whose
    bytes rotted in the queue file is refused 422 and quarantined."""
    async with running_server(server_config(tmp_path)) as server:
        dead = f"http://127.0.0.1:{free_port()}/v1/ingest/chunk"
        config = agent_config(server, tmp_path, SID, TOKENS[SID],
                              metrics={"listen": "127.0.0.1:0"}, ingest={"url": dead},
                              queue={"max_bytes": 300 * 1024})
        queue = open_queue(config)
        try:
            for _ in range(3):  # 3 x 120 KiB incompressible under a 300 KiB cap
                queue.enqueue(os.urandom(120 * 1024))
            dropped = queue.dropped_counts()["byte_cap"]["chunks"]
            assert dropped == 1 and queue.queue_depth() == 2
            agent = SensorAgent(config, queue)
            async with RunningAgent(agent):
                await wait_for(lambda: agent.retries > 6, timeout=10)
                await wait_for(lambda: (server.registry.get_sample_value(
                    "sensor_chunk_retry_total", {"sensor_id": SID}) or 0) > 5, timeout=10)
                sensor_side = await agent_metrics(http, agent)
                server_side = parse_samples(await scrape(http, urls(server)["ingest"]))
            retries_at_stop = agent.retries
        finally:
            queue.close()

        assert value(sensor_side, "sensor_queue_depth", sensor_id=SID) == 2
        assert 6 < value(sensor_side, "sensor_chunk_retry_total", sensor_id=SID) <= retries_at_stop
        assert value(sensor_side, "sensor_chunks_dropped_total", sensor_id=SID,
                     reason="byte_cap") == 1
        assert value(sensor_side, "sensor_chunks_posted_total", sensor_id=SID) == 0
        assert 5 < value(server_side, "sensor_chunk_retry_total", sensor_id=SID) <= retries_at_stop
        assert value(server_side, "pipeline_sensor_dropped_total", sensor_id=SID) == 1
        assert value(server_side, "sensor_queue_depth", sensor_id=SID) == 2
        assert value(server_side, "pipeline_sensor_quarantined_total", sensor_id=SID) == 0

        # Now the real ingest URL, and one queued chunk's bytes altered on disk.
        config = agent_config(server, tmp_path, SID, TOKENS[SID],
                              metrics={"listen": "127.0.0.1:0"})
        with sqlite3.connect(config.queue.path) as db:
            (first,) = db.execute("SELECT MIN(sequence) FROM chunks").fetchone()
            db.execute("UPDATE chunks SET payload = zeroblob(length(payload)) "
                       "WHERE sequence = ?", (first,))
        queue = open_queue(config, verify_on_open=False)
        try:
            agent = SensorAgent(config, queue)
            async with RunningAgent(agent):
                await wait_for(lambda: agent.quarantined == 1 and agent.acked == 1, timeout=10)
                await wait_for(lambda: server.registry.get_sample_value(
                    "pipeline_sensor_quarantined_total", {"sensor_id": SID}) == 1, timeout=5)
                sensor_side = await agent_metrics(http, agent)
                server_side = parse_samples(await scrape(http, urls(server)["ingest"]))
        finally:
            queue.close()
    assert value(sensor_side, "sensor_chunks_quarantined", sensor_id=SID) == 1
    assert value(sensor_side, "sensor_queue_depth", sensor_id=SID) == 0
    assert value(server_side, "pipeline_sensor_quarantined_total", sensor_id=SID) == 1
    assert value(server_side, "pipeline_rejected_total", reason="chunk_hash_mismatch") == 1
    assert value(server_side, "pipeline_events_completed_total") == 1
    # A new agent process counts retries from 0: the server's mirror followed it down.
    assert value(server_side, "sensor_chunk_retry_total", sensor_id=SID) == agent.retries


async def test_stats_are_sent_only_when_both_sides_announce_them(
        tmp_path: Path, http, monkeypatch: pytest.MonkeyPatch) -> None:
    without = tuple(c for c in capabilities.SERVER_CAPABILITIES if c != "heartbeat_stats")
    monkeypatch.setattr(capabilities, "SERVER_CAPABILITIES", without)
    async with running_server(server_config(tmp_path)) as server:
        config = agent_config(server, tmp_path, SID, TOKENS[SID])
        queue = open_queue(config)
        try:
            agent = SensorAgent(config, queue)
            async with RunningAgent(agent):
                await wait_for(lambda: agent.heartbeats >= 3, timeout=10)
                samples = parse_samples(await scrape(http, urls(server)["ingest"]))
        finally:
            queue.close()
    assert "heartbeat_stats" in agent.capabilities
    assert "heartbeat_stats" not in agent.server_capabilities
    assert value(samples, "sensor_queue_depth", sensor_id=SID) == 0
    for name in ("sensor_chunk_retry_total", "pipeline_sensor_dropped_total",
                 "pipeline_sensor_quarantined_total"):
        assert value(samples, name, sensor_id=SID) is None


async def test_a_taken_metrics_port_is_a_config_error(tmp_path: Path) -> None:
    from pipeline.common.errors import ConfigError

    async with running_server(server_config(tmp_path)) as server:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            config = agent_config(server, tmp_path, SID, TOKENS[SID],
                                  metrics={"listen": f"127.0.0.1:{port}"})
            queue = open_queue(config)
            try:
                with pytest.raises(ConfigError) as info:
                    await SensorAgent(config, queue).run()
            finally:
                queue.close()
    assert info.value.field == "metrics.listen"
