"""The remote-write forwarder's decisions (server/forward/plan.py), without sockets:
order, splitting, relabelling, backoff, permanent rejection (bisected to the one bad
sample), and resuming from the durable cursor."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from pipeline.common import remote_write
from pipeline.common.backoff import Backoff
from pipeline.common.remote_write import Series
from pipeline.server.forward.plan import SensorOutbox, relabel, split_samples, verdict

RW = {remote_write.CONTENT_TYPE_ATTRIBUTE: remote_write.EVENT_CONTENT_TYPE}


@dataclass(frozen=True)
class Ev:
    row_id: int
    data: bytes
    completed_at: float = 100.0
    attributes: dict[str, str] = field(default_factory=lambda: dict(RW))


def rw_event(row_id: int, name: str, samples: list[tuple[int, float]],
             extra: tuple[tuple[str, str], ...] = ()) -> Ev:
    series = Series(labels=(("__name__", name), *extra), samples=tuple(samples))
    return Ev(row_id, remote_write.build([series]).SerializeToString())


def outbox(cursor: int = 0, per_send: int = 3) -> SensorOutbox:
    return SensorOutbox("pi-01", cursor, samples_per_send=per_send, label="sensor",
                        backoff=Backoff(0.5, 4.0, 0.2, rng=random.Random(1)))


def sent_samples(box: SensorOutbox) -> list[tuple[int, float]]:
    head = box.head()
    assert head is not None
    return [s for one in head.series for s in one.samples]


def test_relabel_sets_the_authenticated_id_and_keeps_a_forged_one_aside() -> None:
    forged = Series(labels=(("__name__", "up"), ("sensor", "pi-99")), samples=((1, 1.0),))
    assert dict(relabel(forged, "pi-01", "sensor").labels) == {
        "__name__": "up", "sensor": "pi-01", "exported_sensor": "pi-99"}
    same = Series(labels=(("__name__", "up"), ("sensor", "pi-01")), samples=((1, 1.0),))
    assert dict(relabel(same, "pi-01", "sensor").labels) == {"__name__": "up",
                                                            "sensor": "pi-01"}


def test_split_keeps_order_and_bounds_samples() -> None:
    a = Series((("__name__", "a"),), tuple((t, float(t)) for t in range(5)))
    b = Series((("__name__", "b"),), ((10, 1.0),))
    groups = split_samples([a, b], 2)
    assert [[(s.name, s.samples) for s in g] for g in groups] == [
        [("a", ((0, 0.0), (1, 1.0)))], [("a", ((2, 2.0), (3, 3.0)))],
        [("a", ((4, 4.0),)), ("b", ((10, 1.0),))]]


@pytest.mark.parametrize(("status", "kind"), [
    (200, "sent"), (204, "sent"), (None, "retry"), (500, "retry"), (503, "retry"),
    (429, "retry"), (401, "retry"), (403, "retry"), (400, "rejected"), (404, "rejected"),
    (413, "rejected")])
def test_verdicts(status: int | None, kind: str) -> None:
    assert verdict(status) == kind


def test_sends_in_order_and_cursor_only_after_an_events_last_part() -> None:
    box = outbox(per_send=3)
    events = [rw_event(5, "m", [(t, t) for t in range(1, 6)]),  # 5 samples: 3 + 2
              Ev(6, b'{"json": 1}', attributes={}),            # not remote write
              rw_event(7, "m", [(6, 6.0)])]
    assert box.load(events) == []
    assert box.read_after == 7
    order: list[int] = []
    cursors: list[int | None] = []
    while box.head() is not None:
        head = box.head()
        assert head is not None
        order.extend(t for s in head.series for t, _ in s.samples)
        d = box.on_answer(200)
        cursors.append(d.cursor)
        assert d.retry_after is None
    assert order == [1, 2, 3, 4, 5, 6]
    assert cursors == [None, 5, 6, 7]
    assert box.cursor == 7 and box.needs_events


def test_retry_backs_off_exponentially_bounded_and_resets_after_success() -> None:
    box = outbox()
    box.load([rw_event(1, "m", [(1, 1.0)]), rw_event(2, "m", [(2, 2.0)])])
    delays = [box.on_answer(status).retry_after for status in (503, None, 429, 500, 502, 500)]
    assert all(d is not None for d in delays)
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2
    assert max(delays) <= 4.0 * 1.2  # type: ignore[type-var]
    assert sent_samples(box) == [(1, 1.0)]  # the head is still the first event
    assert box.on_answer(200).cursor == 1
    first_again = box.on_answer(503).retry_after
    assert first_again is not None and first_again <= 0.6


def test_permanent_rejection_bisects_to_the_bad_sample_and_never_retries_it() -> None:
    box = outbox(per_send=8)
    box.load([rw_event(3, "m", [(t, float(t)) for t in range(1, 9)])])
    bad = 6
    sent, failed, cursor = [], 0, None
    for _ in range(50):
        head = box.head()
        if head is None:
            break
        samples = [t for s in head.series for t, _ in s.samples]
        d = box.on_answer(400 if bad in samples else 200)
        assert d.retry_after is None
        if d.sent:
            sent.extend(samples)
        failed += d.failed
        cursor = d.cursor if d.cursor is not None else cursor
    assert box.head() is None
    assert sorted(sent) == [1, 2, 3, 4, 5, 7, 8] and failed == 1
    assert cursor == 3


def test_resume_starts_after_the_durable_cursor_and_resends_an_unsaved_event() -> None:
    first = outbox(per_send=2)
    first.load([rw_event(1, "m", [(1, 1.0)]), rw_event(2, "m", [(2, 2.0), (3, 3.0), (4, 4.0)])])
    assert first.on_answer(200).cursor == 1
    assert first.on_answer(200).cursor is None  # half of event 2 sent, then the server dies
    # After a restart the store's cursor is 1: the store hands out events after it.
    again = outbox(cursor=first.cursor, per_send=2)
    again.load([rw_event(2, "m", [(2, 2.0), (3, 3.0), (4, 4.0)])])
    assert sent_samples(again) == [(2, 2.0), (3, 3.0)]  # at least once: resent
    assert again.on_answer(200).cursor is None
    assert again.on_answer(200).cursor == 2


def test_unreadable_event_is_reported_and_passed() -> None:
    box = outbox()
    assert box.load([Ev(4, b"\xff\xff not protobuf")]) != []
    d = box.on_answer(200)
    assert d.cursor == 4 and d.sent == 0


def test_release_drops_what_is_loaded_and_reads_again_from_the_cursor() -> None:
    box = outbox(per_send=2)
    box.load([rw_event(1, "m", [(1, 1.0)]), rw_event(2, "m", [(2, 2.0), (3, 3.0), (4, 4.0)])])
    assert box.on_answer(200).cursor == 1 and not box.mid_event
    assert box.on_answer(200).cursor is None and box.mid_event  # half of event 2
    before = box.oldest_completed_at()
    box.release()
    assert box.pending == deque() and box.read_after == 1 and not box.mid_event
    assert box.oldest_completed_at() == before  # the lag still counts while released
    box.load([rw_event(2, "m", [(2, 2.0), (3, 3.0), (4, 4.0)])])
    assert sent_samples(box) == [(2, 2.0), (3, 3.0)]  # event 2 again from its start


def test_a_rejected_send_being_halved_is_mid_event() -> None:
    box = outbox(per_send=4)
    box.load([rw_event(1, "m", [(t, float(t)) for t in range(1, 5)])])
    assert box.on_answer(400).rejected and box.mid_event
