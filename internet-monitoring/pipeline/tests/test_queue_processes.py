"""DurableQueue with real second processes and real SIGKILLs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.common.chunking import reassemble
from pipeline.sensor.queue import DurableQueue, QueuedChunk
from pipeline.tests.queue_support import (
    CHILD,
    _raw,
    _rebuild,
)


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


# ---------------------------------------------------------------------- processes


def _spawn(*args: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    if line != "ready\n":
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"child did not start: {line!r} {err}")
    return child


def test_second_process_enqueues_while_first_reads_and_deletes(qpath: Path) -> None:
    DurableQueue(qpath).close()
    child = _spawn("burst", str(qpath), "7", "120")
    received: dict[str, list[QueuedChunk]] = defaultdict(list)
    mine: dict[str, bytes] = {}
    since = 0
    deadline = time.monotonic() + 60
    with DurableQueue(qpath) as queue:
        rng = random.Random(8)
        while time.monotonic() < deadline:
            if len(mine) < 60:
                data = rng.randbytes(rng.randint(1, 200_000))
                mine[queue.enqueue(data).event_id] = data
            child_done = child.poll() is not None  # before reading: its last commit is visible
            window = queue.read_window(since, 16, 512 * 1024)
            for chunk in window:
                received[chunk.event_id].append(chunk)
            if window:
                since = window[-1].sequence
                assert queue.delete([c.sequence for c in window]) == len(window)
            elif child_done and len(mine) >= 60:
                break
        out, err = child.communicate(timeout=30)
        assert queue.queue_depth() == 0
    assert child.returncode == 0, err
    assert "locked" not in err
    theirs = [json.loads(line) for line in out.splitlines()]
    assert len(theirs) == 120
    their_sequences = [c.sequence for item in theirs for c in received[item["event_id"]]]
    my_sequences = [c.sequence for event_id in mine for c in received[event_id]]
    # The two writers really interleaved on the file.
    assert min(their_sequences) < max(my_sequences)
    assert min(my_sequences) < max(their_sequences)
    for item in theirs:
        rebuilt = _rebuild(received.pop(item["event_id"]))
        assert len(rebuilt) == item["size"]
        assert hashlib.sha256(rebuilt).hexdigest() == item["sha256"]
    for event_id, data in mine.items():
        assert _rebuild(received.pop(event_id)) == data
    assert not received


def _check_every_event_is_whole(path: Path) -> tuple[int, list[int]]:
    """Assert the file is sound and every event in it is complete; return counts."""
    with _raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT sequence, event_id, chunk_index, chunk_count, payload, "
                            "event_sha256 FROM chunks ORDER BY sequence").fetchall()
    events: dict[str, list[tuple]] = defaultdict(list)
    for row in rows:
        events[row[1]].append(row)
    for event_id, parts in events.items():
        parts.sort(key=lambda r: r[2])
        count = parts[0][3]
        assert len(parts) == count, f"event {event_id} has {len(parts)} of {count} chunks"
        assert [p[2] for p in parts] == list(range(count))
        assert {p[3] for p in parts} == {count}
        assert {p[5] for p in parts} == {parts[0][5]}
        reassemble([p[4] for p in parts], parts[0][5])
    return len(events), [r[0] for r in rows]


def test_sigkill_during_enqueue_never_leaves_a_partial_event(qpath: Path) -> None:
    rng = random.Random(20261127)
    DurableQueue(qpath).close()
    events_seen = 0
    multi_chunk_seen = 0
    last_sequence = 0
    for kill in range(50):
        child = _spawn("crash", str(qpath), str(rng.randrange(2**32)))
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL, f"child died on its own at kill {kill}"

        count, sequences = _check_every_event_is_whole(qpath)
        with DurableQueue(qpath) as queue:
            assert queue.quarantined_count() == 0
            assert queue.last_sequence() >= last_sequence
            assert all(s > last_sequence for s in sequences)
            events_seen += count
            multi_chunk_seen += len({c.event_id for c in queue.read_window(0, 10**6, 10**12)
                                     if c.chunk_count > 1})
            last_sequence = queue.last_sequence()
            # Empty the file so every round checks only what the last child wrote.
            assert queue.delete(sequences) == len(sequences)
    # The kills really landed on a busy writer of multi-chunk events.
    assert events_seen >= 50
    assert multi_chunk_seen >= 25


def test_reserved_attributes_and_wire_limit_refused_at_enqueue(tmp_path):
    """The agent adds window_id/traceparent when sending; an event whose attributes would
    push a chunk past the server's limit must be refused now, not quarantined later."""
    from pipeline.common.errors import FieldValueError
    from pipeline.common.messages import MAX_ATTRIBUTES
    from pipeline.sensor.queue import RESERVED_ATTRIBUTES

    with DurableQueue(tmp_path / "q.db") as queue:
        with pytest.raises(FieldValueError) as err:
            queue.enqueue(b"x", attributes={"window_id": "w"})
        assert err.value.field == "attributes.window_id"
        too_many = {f"k{i}": "v" for i in range(MAX_ATTRIBUTES - len(RESERVED_ATTRIBUTES) + 1)}
        with pytest.raises(FieldValueError):
            queue.enqueue(b"x", attributes=too_many)
        too_many.popitem()
        queue.enqueue(b"x", attributes=too_many)
        assert queue.event_count() == 1
