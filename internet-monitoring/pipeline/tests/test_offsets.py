"""OffsetTracker: gap-aware committed-sequence tracking, checked against a plain-set model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.errors import FieldTypeError, FieldValueError
from pipeline.server.offsets import OffsetBook, OffsetTracker


def model_watermark(added: set[int]) -> int:
    w = 0
    while w + 1 in added:
        w += 1
    return w


@st.composite
def subsets_in_order(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A bound N and a shuffled subset of 1..N, possibly with repeats."""
    n = draw(st.integers(min_value=0, max_value=120))
    chosen = draw(st.lists(st.integers(min_value=1, max_value=max(n, 1)), max_size=3 * n + 1))
    chosen = [s for s in chosen if s <= n]
    order = draw(st.permutations(chosen))
    return n, list(order)


@settings(max_examples=200, deadline=None)
@given(subsets_in_order())
def test_tracker_matches_set_model(case: tuple[int, list[int]]) -> None:
    n, order = case
    tracker = OffsetTracker()
    added: set[int] = set()
    for seq in order:
        assert tracker.add(seq) is (seq not in added)
        added.add(seq)
        # The invariants hold after every single step, not only at the end.
        assert tracker.watermark == model_watermark(added)
        assert tracker.highest == max(added)
    highest = max(added, default=0)
    assert tracker.highest == highest
    assert tracker.missing(limit=10_000) == [s for s in range(1, highest) if s not in added]
    assert tracker.missing_count() == highest - len(added)
    for seq in range(n + 3):
        assert tracker.contains(seq) is (seq in added), seq
        assert (seq in tracker) is (seq in added)


@settings(max_examples=100, deadline=None)
@given(subsets_in_order(), st.integers(min_value=0, max_value=20))
def test_missing_respects_limit(case: tuple[int, list[int]], limit: int) -> None:
    _, order = case
    tracker = OffsetTracker()
    for seq in order:
        tracker.add(seq)
    full = tracker.missing(limit=10_000)
    assert tracker.missing(limit=limit) == full[:limit]


@settings(max_examples=100, deadline=None)
@given(subsets_in_order())
def test_snapshot_restore_roundtrip_through_json(case: tuple[int, list[int]]) -> None:
    _, order = case
    tracker = OffsetTracker()
    for seq in order:
        tracker.add(seq)
    restored = OffsetTracker.restore(json.loads(json.dumps(tracker.snapshot())))
    assert restored == tracker
    assert restored.missing(10_000) == tracker.missing(10_000)
    assert restored.watermark == tracker.watermark


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 80), st.integers(0, 10)), max_size=30))
def test_add_range_equals_adding_each(ranges: list[tuple[int, int]]) -> None:
    by_range = OffsetTracker()
    by_one = OffsetTracker()
    for start, length in ranges:
        by_range.add_range(start, start + length)
        for seq in range(start, start + length + 1):
            by_one.add(seq)
    assert by_range == by_one


def test_lost_chunk_below_a_stored_one_stays_missing() -> None:
    tracker = OffsetTracker()
    for seq in (1, 2, 3, 5, 6):
        tracker.add(seq)
    assert tracker.watermark == 3  # a highest-sequence offset would say 6
    assert tracker.highest == 6
    assert tracker.missing() == [4]
    assert not tracker.contains(4)
    assert tracker.add(4)
    assert tracker.watermark == 6
    assert tracker.missing() == []


def test_memory_is_bounded_by_gaps_not_history() -> None:
    tracker = OffsetTracker()
    for seq in range(2, 50_002):  # sequence 1 is lost; everything after arrives in order
        tracker.add(seq)
    assert tracker.watermark == 0
    assert tracker.ranges == ((2, 50_001),)
    assert len(json.dumps(tracker.snapshot())) < 100
    assert tracker.missing() == [1]
    for seq in range(50_002, 50_010, 2):  # four more isolated islands
        tracker.add(seq + 1)
    assert tracker.gap_count == 5


def test_missing_on_a_huge_gap_is_limited_and_fast() -> None:
    tracker = OffsetTracker()
    tracker.add(10**15)
    assert tracker.missing(limit=5) == [1, 2, 3, 4, 5]
    assert tracker.missing_count() == 10**15 - 1


def test_invalid_sequences_are_refused() -> None:
    tracker = OffsetTracker()
    with pytest.raises(FieldValueError):
        tracker.add(0)
    with pytest.raises(FieldTypeError):
        tracker.add(True)
    assert not tracker.contains(0)
    assert not tracker.contains(-1)


def test_restore_rejects_bad_snapshots() -> None:
    with pytest.raises(FieldValueError):
        OffsetTracker.restore({"watermark": -1, "ranges": []})
    with pytest.raises(FieldValueError):
        OffsetTracker.restore({"watermark": 0, "ranges": [[5, 3]]})
    with pytest.raises(FieldTypeError):
        OffsetTracker.restore({"watermark": 0, "ranges": "1-3"})


def test_restore_merges_ranges_touching_the_watermark() -> None:
    tracker = OffsetTracker.restore({"watermark": 4, "ranges": [[5, 7], [9, 9]]})
    assert tracker.watermark == 7
    assert tracker.missing() == [8]


def test_copy_is_independent() -> None:
    tracker = OffsetTracker()
    tracker.add(2)
    clone = tracker.copy()
    clone.add(1)
    assert clone.watermark == 2
    assert tracker.watermark == 0


def test_offset_book_keys_are_independent_per_epoch() -> None:
    book = OffsetBook()
    book.get("pi-01", "").add(1)
    book.get("pi-01", "aaaaaaaa").add(2)
    book.get("pi-02", "").add(1)
    assert book.epochs("pi-01") == ["", "aaaaaaaa"]
    assert book.get("pi-01", "").watermark == 1
    assert book.get("pi-01", "aaaaaaaa").watermark == 0
    assert book.peek("pi-03", "") is None
    assert len(book) == 3
