"""The protocol 1.0 sensor emulator's rules (sans-I/O) and its queue file, without sockets:
what it sends under which window, what an ack lets it delete, which bodies make it drop
the connection. The emulator is only worth what these rules are."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.common.errors import ProtocolError
from pipeline.sim.legacy_sensor import LegacyQueue, LegacyWindows, check_body, fill_queue


def request(window_id: str, since: int = 0, max_chunks: int = 10, max_bytes: int = 10**6,
            max_in_flight: int = 10) -> dict[str, object]:
    return {"since_sequence": since, "max_chunks": max_chunks, "max_bytes": max_bytes,
            "window_id": window_id, "max_in_flight": max_in_flight}


ROWS = [(seq, 100) for seq in range(1, 7)]


def test_a_chunk_in_flight_under_a_is_only_resent_by_a_request_reusing_a() -> None:
    w = LegacyWindows()
    assert w.pick(request("A", max_chunks=3), ROWS) == [1, 2, 3]
    # Another window skips 1..3 (in flight under A) and takes the next ones.
    assert w.pick(request("B", max_chunks=3), ROWS) == [4, 5, 6]
    assert w.pick(request("C"), ROWS) == []
    assert w.empty_requests == 1
    # Reusing A re-sends A's chunks.
    assert w.pick(request("A"), ROWS) == [1, 2, 3]


def test_request_limits_since_bytes_and_in_flight() -> None:
    w = LegacyWindows()
    assert w.pick(request("A", since=2, max_chunks=2), ROWS) == [3, 4]
    assert w.pick(request("B", max_bytes=150), ROWS) == [1]  # at least one, then the cap
    assert w.pick(request("C", max_in_flight=4), ROWS) == [2]  # 3 in flight before it
    assert w.pick(request("D", max_bytes=50), ROWS) == [5]  # one chunk even if larger


def test_ack_deletes_only_listed_chunks_of_that_window() -> None:
    w = LegacyWindows()
    w.pick(request("A", max_chunks=2), ROWS)
    w.pick(request("B", max_chunks=2), ROWS)
    queued = {1, 2, 3, 4, 5, 6}
    ack = {"window_id": "A", "committed_sequences": [1, 3, 5], "reset_window": False}
    # 1 is A's; 3 was sent under B (strict reading: not deleted); 5 was never sent.
    assert w.on_ack(ack, queued) == [1, 5]
    assert w.mismatched_acks == 1
    assert w.on_ack({"window_id": "A", "committed_sequences": [9], "reset_window": False},
                    queued) == []
    assert w.stale_acks == 1
    assert w.in_flight == {2: "A", 3: "B", 4: "B"}


def test_reset_window_releases_its_chunks_for_any_window() -> None:
    w = LegacyWindows()
    w.pick(request("A", max_chunks=2), ROWS)
    w.on_ack({"window_id": "A", "committed_sequences": [], "reset_window": True}, set())
    assert w.pick(request("B", max_chunks=2), ROWS) == [1, 2]


@pytest.mark.parametrize("body_type, body", [
    ("chunk_ack", {"window_id": "A", "committed_sequences": [], "reset_window": False,
                   "epoch": "x"}),
    ("chunk_request", {"since_sequence": 0, "max_chunks": 1, "max_bytes": 1, "window_id": "A"}),
    ("telemetry", {}),
])
def test_unknown_or_missing_body_fields_drop_the_connection(body_type: str, body: dict) -> None:
    with pytest.raises(ProtocolError):
        check_body(body_type, body)


def test_queue_file_numbers_chunks_and_deletes_for_good(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    events = fill_queue(path, "legacy-01", 3, 300 * 1024)  # three chunks each
    assert [e.chunks for e in events] == [3, 3, 3]
    queue = LegacyQueue(path)
    try:
        assert queue.sequences() == list(range(1, 10))
        body = queue.body(4)
        assert body is not None and body["event_id"] == events[1].event_id
        assert set(body) == {"schema_version", "sensor_id", "event_id", "sequence",
                             "chunk_index", "chunk_count", "compression", "payload",
                             "chunk_sha256", "event_sha256", "created_at",
                             "logical_timestamp_ms", "clock_skew_ms"}
        assert queue.delete([1, 2, 99]) == 2
        assert queue.depth() == 7
        assert queue.present([2, 3, 99]) == {3}
    finally:
        queue.close()
    reopened = LegacyQueue(path)
    try:
        assert [seq for seq, _ in reopened.after(0, 2)] == [3, 4]
    finally:
        reopened.close()
