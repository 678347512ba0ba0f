"""The snapshot arithmetic the PostgreSQL dashboard feed relies on (no database)."""

from __future__ import annotations

import pytest

from pipeline.server.read.feed_marks import Snapshot, new_xid_range


def test_a_snapshot_is_parsed_and_sees_finished_transactions_only():
    snap = Snapshot.parse("100:110:100,104")
    assert snap == Snapshot(100, 110, frozenset({100, 104}))
    assert [x for x in range(98, 112) if snap.sees(x)] == [98, 99, 101, 102, 103, 105,
                                                            106, 107, 108, 109]
    assert Snapshot.parse("7:7:") == Snapshot(7, 7, frozenset())
    with pytest.raises(ValueError, match="not a pg_snapshot"):
        Snapshot.parse("7:x")


def test_the_new_range_starts_at_the_oldest_transaction_finished_since():
    since = Snapshot.parse("100:110:100,104")
    # 104 finished, 100 still runs: it holds nothing back, the range starts at 104
    assert new_xid_range(since, Snapshot.parse("100:120:100,115")) == (104, 120)
    # neither finished: only transactions that started since
    assert new_xid_range(since, Snapshot.parse("100:120:100,104")) == (110, 120)
    # nothing new at all
    assert new_xid_range(since, Snapshot.parse("100:110:100,104")) is None
    assert new_xid_range(Snapshot.parse("5:5:"), Snapshot.parse("5:5:")) is None
