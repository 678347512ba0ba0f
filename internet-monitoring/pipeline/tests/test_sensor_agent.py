"""The sensor agent over real sockets against a minimal 1.0 server (sensor_agent_support):
draining, deleting and failures.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

from pipeline.common.messages import (
    ChunkAck,
    Command,
    CommandResponse,
)
from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.submit import open_queue
from pipeline.tests.sensor_agent_support import (
    MiniServer,
    depth,
    fill,
    make_config,
    running,
    serving,
)
from pipeline.tests.server_support import eventually


@pytest.fixture
async def server() -> AsyncIterator[MiniServer]:
    async with serving(MiniServer()) as srv:
        yield srv


# ---------------------------------------------------------------------------------------
# Draining and deleting


async def test_drains_multi_chunk_events_and_empties_queue_only_through_acks(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 12)
    assert queue.queue_depth() == 36
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="empty queue")
        # The counters move when the deletion's thread returns to the loop, just after the
        # rows are gone: stopping in between would leave them one batch behind.
        await eventually(lambda: agent.deleted == 36, what="deletions counted")
    assert server.events() == submitted
    assert agent.acked == 36 and agent.deleted == 36
    assert agent.last_committed_sequence == queue.last_sequence()
    # More windows than the first heartbeat's: the extra heartbeats kept them flowing.
    assert server.windows >= 3
    # A 1.0 server announced no epoch: chunks must not carry one.
    assert all("queue_epoch" not in post for post in server.raw_posts)
    assert all(post["attributes"]["window_id"].startswith("w") for post in server.raw_posts)
    # Heartbeats: first one reports the whole backlog, protocol 1.0 fields only.
    assert server.heartbeats[0].queue_depth == 36
    assert server.heartbeats[0].software_version == config.software_version
    # No body extras for a peer that did not announce them.
    assert all(h.retry_total is None and h.dropped_total is None for h in server.heartbeats)
    queue.close()


async def test_a_window_loads_chunks_only_for_the_posts_it_can_make(server, tmp_path):
    """A window of 16 chunks with max_parallel 2: at most 2 sends hold loaded payloads at
    a time (they used to load all 16 first and then wait for a POST slot: the agent's
    memory peak while draining). Everything still drains."""
    server.max_chunks = 16
    config = make_config(server, tmp_path, ingest={"max_parallel": 2})
    queue = open_queue(config)
    submitted = fill(queue, 6)
    agent = SensorAgent(config, queue)
    sender = agent.sender
    held = {"now": 0, "peak": 0}
    real_get, real_post = queue.get, sender._ingest.post_chunk

    def get(sequences: list[int]) -> Any:
        rows = real_get(sequences)
        held["now"] += len(rows)
        held["peak"] = max(held["peak"], held["now"])
        return rows

    async def post_chunk(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.02)  # a slow server: the other sends would pile up
        try:
            return await real_post(*args, **kwargs)
        finally:
            held["now"] -= 1

    queue.get = get
    sender._ingest.post_chunk = post_chunk
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="empty queue")
    assert server.events() == submitted
    assert 1 <= held["peak"] <= 2
    queue.close()


async def test_chunk_is_deleted_only_after_its_ack_and_replayed_after_restart(server, tmp_path):
    server.send_acks = False
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 4)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: len(server.chunks) == 12, what="all chunks stored")
        await asyncio.sleep(1.2)  # a tick and an extra heartbeat: nothing may be deleted
        assert await depth(queue) == 12
        assert agent.posted == 12 and agent.acked == 0
        # One late ack: exactly that chunk goes.
        await server.send(ChunkAck(window_id="w1", committed_sequences=(2,)))
        await eventually(lambda: agent.acked == 1, what="ack handled")
        assert await depth(queue) == 11
        assert [c.sequence for c in queue.get([1, 2, 3])] == [1, 3]
    queue.close()

    # A fresh agent on the same file: whatever was not acked is offered again.
    server.send_acks = True
    queue = open_queue(config)
    assert queue.queue_depth() == 11
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="replayed and acked")
    assert server.events() == submitted
    assert server.duplicates == 11  # the server dedupes; the sensor re-sent, as it must
    queue.close()


async def test_http_ack_deletes_on_the_post_answer_when_both_sides_announce_it(tmp_path):
    srv = MiniServer(capabilities=("chunks", "heartbeats", "http_ack", "epoch"), send_acks=False)
    await srv.start()
    try:
        config = make_config(srv, tmp_path,
                             capabilities=["chunks", "heartbeats", "http_ack", "epoch"])
        queue = open_queue(config)
        submitted = fill(queue, 3)
        agent = SensorAgent(config, queue)
        async with running(agent):
            await eventually(lambda: queue.queue_depth() == 0, what="deleted on HTTP answer")
        assert srv.events() == submitted
        assert {post["queue_epoch"] for post in srv.raw_posts} == {queue.epoch}
        assert {env.queue_epoch for env in srv.envelopes} == {queue.epoch}
        queue.close()
    finally:
        await srv.close()


# ---------------------------------------------------------------------------------------
# Failures


async def test_permanent_rejection_quarantines_the_chunk_and_the_rest_drains(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 5)
    bad_sequence = 5  # second event, middle chunk

    def reject(chunk: Any) -> Any:
        if chunk.sequence == bad_sequence:
            return 422, {"error": "event_hash_mismatch", "message": "no"}, {}
        return None

    server.post_hook = reject
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="queue drained")
    quarantined = queue.quarantined()
    assert [(c.sequence, reason) for c, reason in quarantined] == \
        [(bad_sequence, "http_422 event_hash_mismatch")]
    assert agent.quarantined == 1
    bad_event = quarantined[0][0].event_id
    assert server.events() == {k: v for k, v in submitted.items() if k != bad_event}
    assert bad_sequence not in server.chunks
    queue.close()


async def test_transient_failures_are_retried_until_delivered(server, tmp_path, no_delays):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 2)
    answers = iter([(503, {"error": "store_unavailable"}, {}),
                    (429, {"error": "throttled"}, {"Retry-After": "0.05"}),
                    (401, {"error": "unauthenticated"}, {}),
                    (500, {"error": "internal"}, {})] * 3)

    def flaky(chunk: Any) -> Any:
        return next(answers, None)

    server.post_hook = flaky
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="delivered after retries")
    assert server.events() == submitted
    assert agent.retries == 12
    assert agent.quarantined == 0 and queue.quarantined_count() == 0
    queue.close()


async def test_network_errors_are_retried(tmp_path, no_delays):
    """Ingest URL pointing at a closed port first, then fixed through the hook-free path:
    the POST fails at the socket, the chunk stays queued, nothing is quarantined."""
    srv = MiniServer()
    await srv.start()
    try:
        closed = MiniServer()
        await closed.start()
        dead_url = closed.ingest_url
        await closed.close()
        config = make_config(srv, tmp_path, ingest={"url": dead_url})
        queue = open_queue(config)
        fill(queue, 1)
        agent = SensorAgent(config, queue)
        async with running(agent):
            await eventually(lambda: agent.retries >= 5, what="retries on refused connection")
        assert queue.queue_depth() == 3
        assert queue.quarantined_count() == 0
        assert agent.abandoned >= 1  # stop() gave the retrying chunks back
        queue.close()
    finally:
        await srv.close()


async def test_reconnects_with_backoff_that_resets_after_success(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: server.connections == 1 and len(server.heartbeats) == 1,
                         what="first connection")
        server.refuse_handshake = True
        assert server.ws is not None
        await server.ws.close()
        await eventually(lambda: agent.connect_failures >= 3, what="refused reconnects")
        assert agent.connect_backoff.attempts >= 3
        server.refuse_handshake = False
        await eventually(lambda: server.connections == 2, what="second connection")
        # The agent resets its backoff once its side of the handshake completes.
        await eventually(lambda: agent.connect_backoff.attempts == 0, what="backoff reset")
        # The new connection works end to end.
        submitted = fill(queue, 1)
        agent.notify_enqueued()
        await eventually(lambda: queue.queue_depth() == 0, what="drained after reconnect")
    assert server.events() == submitted
    assert len(server.heartbeats) >= 2
    queue.close()


async def test_unknown_frames_and_commands_do_not_break_the_channel(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: server.ws is not None and server.heartbeats, what="connected")
        assert server.ws is not None
        await server.ws.send_str('{"schema_version": "1.0.0", "sensor_id": "pi-01", '
                                 '"sent_at": "x", "body_type": "mystery", "body": {}}')
        await server.ws.send_str("not json")
        await server.send(Command(command_id="c1", name="reboot"))
        await eventually(lambda: any(isinstance(e.body, CommandResponse)
                                     for e in server.envelopes), what="command response")
        reply = next(e.body for e in server.envelopes if isinstance(e.body, CommandResponse))
        assert reply.command_id == "c1" and reply.success is False
        assert agent.bad_frames == 2
        # Still the same connection, still working.
        submitted = fill(queue, 1)
        agent.notify_enqueued()
        await eventually(lambda: queue.queue_depth() == 0, what="drained")
    assert server.connections == 1
    assert server.events() == submitted
    queue.close()


async def test_server_time_gives_clock_skew_in_heartbeats_and_chunks(tmp_path):
    caps = ("chunks", "heartbeats", "server_time", "heartbeat_stats")
    srv = MiniServer(capabilities=caps, server_time_offset_s=3.0)
    await srv.start()
    try:
        config = make_config(srv, tmp_path, capabilities=list(caps))
        queue = open_queue(config)
        fill(queue, 1)
        agent = SensorAgent(config, queue)
        async with running(agent):
            await eventually(lambda: queue.queue_depth() == 0, what="drained")
            # The ack envelopes carried server_time too; the next heartbeat reports it.
            submitted = fill(queue, 1)
            agent.notify_enqueued()
            await eventually(lambda: queue.queue_depth() == 0, what="second event drained")
        assert srv.heartbeats[-1].clock_skew_ms == pytest.approx(3000, abs=250)
        assert srv.raw_posts[-1]["clock_skew_ms"] == pytest.approx(3000, abs=250)
        assert list(srv.events().values())[-1] == next(iter(submitted.values()))
        assert "server_time" in srv.envelopes[0].capabilities
        # Stats go in the body only once the server announced heartbeat_stats too.
        assert srv.heartbeats[0].retry_total is None
        last = srv.heartbeats[-1]
        assert (last.retry_total, last.dropped_total, last.quarantined_total) == (0, 0, 0)
        queue.close()
    finally:
        await srv.close()
