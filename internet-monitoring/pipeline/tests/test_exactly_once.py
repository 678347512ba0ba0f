"""Exactly-once delivery of the sans-I/O cores over a hostile in-memory link.

The real sensor queue (SQLite) and dispatcher are joined to the real server scheduler,
session and chunk store (SQLite) by a link that Hypothesis drives: HTTP POSTs and their
answers are dropped, duplicated and reordered; the control channel (a WebSocket: ordered,
lossless while it lives) is cut, losing everything in flight on it. After the link heals,
every enqueued event must be stored exactly once with identical bytes and the sensor queue
must be empty.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.common.messages import Chunk, ChunkAck, ChunkRequest, Heartbeat
from pipeline.sensor.dispatch import Dispatcher
from pipeline.sensor.queue import DurableQueue, QueuedChunk
from pipeline.server.control.scheduler import RequestScheduler
from pipeline.server.control.session import Committed, WindowPolicy
from pipeline.server.store import ChunkStore
from pipeline.tests.store_support import open_test_store

SENSOR = "pi-01"
POLICY = WindowPolicy(max_chunks=3, max_bytes=64 * 1024, max_in_flight=6, windows_per_sensor=2,
                      window_timeout_s=3.0, quiet_s=1.0)


def to_wire(qc: QueuedChunk, window_id: str, epoch: str) -> Chunk:
    return qc.to_wire(SENSOR, window_id, queue_epoch=epoch)


@dataclass
class Post:
    chunk: Chunk


@dataclass
class Answer:
    sequence: int
    ok: bool


@dataclass
class World:
    """Both ends and the link between them; time advances only through ``tick``."""

    queue: DurableQueue
    store: ChunkStore
    use_epoch: bool
    retries: bool = True  # False: a strict 1.0 peer that re-sends only on a same-id request
    now: float = 0.0
    dispatcher: Dispatcher = field(default_factory=lambda: Dispatcher(give_up_after_s=1e9))
    scheduler: RequestScheduler = field(
        default_factory=lambda: RequestScheduler(POLICY, global_max_windows=10))
    to_sensor: deque = field(default_factory=deque)     # control, server -> sensor (FIFO)
    to_server: deque = field(default_factory=deque)     # control, sensor -> server (FIFO)
    http: list = field(default_factory=list)            # posts and answers, any order
    retry: set = field(default_factory=set)             # posts the sensor will try again
    connected: bool = False
    sent: dict = field(default_factory=dict)            # event_id -> bytes

    @property
    def epoch(self) -> str:
        return self.queue.epoch if self.use_epoch else ""

    # -- sensor side -----------------------------------------------------------------

    def connect(self) -> None:
        self.connected = True
        self.scheduler.session(SENSOR).on_connect(self.now, epoch=self.epoch)
        self.heartbeat()

    def cut(self) -> None:
        """The control socket dies: whatever was on it is lost."""
        self.to_sensor.clear()
        self.to_server.clear()
        self.connected = False
        self.dispatcher.on_disconnect()
        self.scheduler.session(SENSOR).on_disconnect(self.now)

    def heartbeat(self) -> None:
        if self.connected:
            self.to_server.append(Heartbeat("t", 0, self.queue.queue_depth(), 0.0))

    def enqueue(self, size: int, rng: random.Random) -> None:
        data = rng.randbytes(size)
        ev = self.queue.enqueue(data)
        self.sent[ev.event_id] = data
        self.heartbeat()

    def sensor_receive(self, msg: object) -> None:
        if isinstance(msg, ChunkRequest):
            metas = self.queue.list_after(msg.since_sequence, self.dispatcher.candidate_limit(msg))
            plan = self.dispatcher.on_request(msg, metas, self.now)
            for qc in self.queue.get(plan.sequences):
                self.http.append(Post(to_wire(qc, plan.window_id, self.epoch)))
        elif isinstance(msg, ChunkAck):
            self.queue.delete(self.dispatcher.on_ack(msg, self.now))

    def sensor_answer(self, answer: Answer) -> None:
        if answer.ok:
            self.queue.delete(self.dispatcher.on_post_delivered(answer.sequence, self.now))
            self.retry.discard(answer.sequence)

    # -- server side -----------------------------------------------------------------

    def server_receive(self, msg: object) -> None:
        assert isinstance(msg, Heartbeat)
        self.scheduler.session(SENSOR).on_heartbeat(msg, self.now, epoch=self.epoch)
        self.send_requests(self.scheduler.pump(self.now, touched=[SENSOR]))

    def server_post(self, post: Post) -> None:
        (outcome,) = self.store.ingest([post.chunk])
        ok = outcome.error is None
        if ok:
            session = self.scheduler.session(SENSOR)
            acks = session.on_committed(
                [Committed(outcome.sequence, post.chunk.window_id, len(post.chunk.payload))],
                outcome.last_committed_sequence, self.now)
            if self.connected:
                self.to_sensor.extend(acks)
            self.send_requests(self.scheduler.pump(self.now, touched=[SENSOR]))
        self.http.append(Answer(post.chunk.sequence, ok))

    def send_requests(self, outgoing) -> None:
        if self.connected:
            self.to_sensor.extend(o.request for o in outgoing)

    # -- time ------------------------------------------------------------------------

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.dispatcher.on_tick(self.now)
        for seq in sorted(self.retry):  # POSTs whose request or answer was lost
            for qc in self.queue.get([seq]):
                item = self.dispatcher.in_flight.get(seq)
                if item is not None and item.posting:
                    self.http.append(Post(to_wire(qc, item.window_id, self.epoch)))
        self.retry.clear()
        self.send_requests(self.scheduler.tick(self.now))

    # -- the link --------------------------------------------------------------------

    def deliver_http(self, index: int) -> None:
        msg = self.http.pop(index % len(self.http))
        if isinstance(msg, Post):
            self.server_post(msg)
        else:
            self.sensor_answer(msg)

    def drop_http(self, index: int) -> None:
        msg = self.http.pop(index % len(self.http))
        sequence = msg.chunk.sequence if isinstance(msg, Post) else msg.sequence
        if self.retries:
            self.retry.add(sequence)
        else:  # the peer believes it was sent and waits for an ack or a same-id request
            self.dispatcher.on_post_delivered(sequence, self.now)

    def duplicate_http(self, index: int) -> None:
        self.http.append(self.http[index % len(self.http)])

    def deliver_control(self) -> None:
        if self.to_server:
            self.server_receive(self.to_server.popleft())
        if self.to_sensor:
            self.sensor_receive(self.to_sensor.popleft())

    def heal(self, max_rounds: int = 800) -> None:
        if not self.connected:
            self.connect()
        for round_no in itertools.count():
            assert round_no < max_rounds, "link healed but the queue never drained"
            if self.queue.queue_depth() == 0 and not self.http and not self.retry:
                return
            while self.to_server or self.to_sensor or self.http:
                self.deliver_control()
                if self.http:
                    self.deliver_http(0)
            self.tick(0.5)
            if round_no % 4 == 0:
                self.heartbeat()


OPS = st.one_of(
    st.tuples(st.just("enqueue"), st.integers(0, 300_000)),
    st.tuples(st.just("deliver_http"), st.integers(0, 50)),
    st.tuples(st.just("drop_http"), st.integers(0, 50)),
    st.tuples(st.just("dup_http"), st.integers(0, 50)),
    st.tuples(st.just("control"), st.just(0)),
    st.tuples(st.just("tick"), st.integers(1, 8)),
    st.tuples(st.just("cut"), st.just(0)),
    st.tuples(st.just("heartbeat"), st.just(0)),
)


def run_world(tmp: Path, ops, use_epoch: bool, retries: bool, seed: int) -> World:
    rng = random.Random(seed)
    world = World(queue=DurableQueue(tmp / "q.db", synchronous="NORMAL", slice_size=64 * 1024),
                  store=open_test_store(tmp / "s.db", synchronous="NORMAL"), use_epoch=use_epoch,
                  retries=retries)
    world.connect()
    for op, arg in ops:
        if op == "enqueue":
            world.enqueue(arg, rng)
        elif op == "deliver_http" and world.http:
            world.deliver_http(arg)
        elif op == "drop_http" and world.http:
            world.drop_http(arg)
        elif op == "dup_http" and world.http:
            world.duplicate_http(arg)
        elif op == "control":
            world.deliver_control()
        elif op == "tick":
            world.tick(arg / 2)
        elif op == "cut" and world.connected:
            world.cut()
            world.connect()
        elif op == "heartbeat":
            world.heartbeat()
    world.heal()
    return world


def assert_exactly_once(world: World) -> None:
    assert world.queue.queue_depth() == 0
    assert world.store.event_count(SENSOR) == len(world.sent)
    for event_id, data in world.sent.items():
        stored = world.store.get_event(SENSOR, event_id)
        assert stored is not None, f"event {event_id} lost"
        assert stored.data == data


@settings(max_examples=int(os.environ.get("EXACTLY_ONCE_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=60), use_epoch=st.booleans(),
       retries=st.booleans(), seed=st.integers(0, 2**32))
def test_every_event_stored_exactly_once_after_the_link_heals(ops, use_epoch, retries, seed):
    with tempfile.TemporaryDirectory() as tmp:
        world = run_world(Path(tmp), ops, use_epoch, retries, seed)
        try:
            assert_exactly_once(world)
        finally:
            world.queue.close()
            world.store.close()


@pytest.mark.parametrize("retries", [True, False])
def test_chunk_k_lost_while_k_plus_one_stored(tmp_path, retries):
    """A highest-sequence offset would skip k for ever; the gap-aware path delivers it,
    also for a strict 1.0 peer that re-sends only when the server re-requests the window."""
    world = World(queue=DurableQueue(tmp_path / "q.db", synchronous="NORMAL"),
                  store=open_test_store(tmp_path / "s.db", synchronous="NORMAL"), use_epoch=True,
                  retries=retries)
    world.connect()
    rng = random.Random(7)
    for _ in range(3):
        world.enqueue(1000, rng)
    world.deliver_control()  # heartbeat in, request out
    world.deliver_control()  # the request reaches the sensor: three posts
    while world.to_server:
        world.deliver_control()
    assert [type(m).__name__ for m in world.http] == ["Post", "Post", "Post"]
    first = world.http[0]
    assert isinstance(first, Post)
    world.drop_http(0)  # chunk k's POST is lost
    while world.http:
        world.deliver_http(0)
    while world.to_sensor:
        world.deliver_control()
    tracker_gaps = world.store.missing_sequences(SENSOR, world.epoch)
    assert tracker_gaps == [first.chunk.sequence]
    assert world.store.committed_offset(SENSOR, world.epoch) < first.chunk.sequence
    assert world.queue.queue_depth() == 1
    world.heal()
    assert_exactly_once(world)


def test_ack_lost_with_the_connection_is_recovered(tmp_path):
    world = World(queue=DurableQueue(tmp_path / "q.db", synchronous="NORMAL"),
                  store=open_test_store(tmp_path / "s.db", synchronous="NORMAL"), use_epoch=False)
    world.connect()
    world.enqueue(5000, random.Random(1))
    world.deliver_control()
    world.deliver_control()
    while world.http:
        world.deliver_http(0)
    assert world.store.event_count(SENSOR) == 1
    assert world.to_sensor  # the ack is on its way...
    world.cut()             # ...and dies with the socket
    assert world.queue.queue_depth() == 1
    world.heal()
    assert_exactly_once(world)
