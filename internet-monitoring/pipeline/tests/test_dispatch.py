"""The sensor dispatcher's protocol 1.0 rules, without sockets."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings, strategies as st

from pipeline.common.messages import ChunkAck, ChunkRequest
from pipeline.sensor.dispatch import Dispatcher


@dataclass(frozen=True)
class Meta:
    sequence: int
    nbytes: int


def metas(seqs, size=100):
    return [Meta(s, size) for s in seqs]


def req(window, since=0, max_chunks=10, max_bytes=10_000, max_in_flight=100):
    return ChunkRequest(since_sequence=since, max_chunks=max_chunks, max_bytes=max_bytes,
                        window_id=window, max_in_flight=max_in_flight)


def test_request_respects_since_and_max_chunks():
    d = Dispatcher()
    plan = d.on_request(req("A", since=2, max_chunks=3), metas(range(1, 10)), now=0)
    assert plan.window_id == "A"
    assert plan.sequences == (3, 4, 5)


def test_max_bytes_but_at_least_one_chunk():
    d = Dispatcher()
    plan = d.on_request(req("A", max_bytes=50), metas([1, 2, 3], size=100), now=0)
    assert plan.sequences == (1,)
    d2 = Dispatcher()
    plan2 = d2.on_request(req("A", max_bytes=250), metas([1, 2, 3], size=100), now=0)
    assert plan2.sequences == (1, 2)


def test_max_in_flight_counts_unacked_chunks():
    d = Dispatcher()
    d.on_request(req("A", max_in_flight=3), metas([1, 2]), now=0)
    plan = d.on_request(req("B", max_in_flight=3), metas([1, 2, 3, 4, 5]), now=0)
    assert plan.sequences == (3,)


def test_in_flight_chunk_not_resent_under_another_window():
    d = Dispatcher()
    d.on_request(req("A", max_chunks=2), metas([1, 2, 3]), now=0)
    d.on_post_delivered(1, now=1)
    d.on_post_delivered(2, now=1)
    plan = d.on_request(req("B"), metas([1, 2, 3]), now=2)
    assert plan.sequences == (3,)


def test_same_window_id_resends_delivered_but_unacked_chunks():
    d = Dispatcher()
    d.on_request(req("A", max_chunks=2), metas([1, 2]), now=0)
    d.on_post_delivered(1, now=1)
    d.on_post_delivered(2, now=1)
    d.on_ack(ChunkAck("A", (2,)), now=2)
    plan = d.on_request(req("A"), metas([1]), now=3)
    assert plan.sequences == (1,)


def test_chunk_still_posting_is_never_sent_twice():
    d = Dispatcher()
    d.on_request(req("A", max_chunks=1), metas([1]), now=0)
    plan = d.on_request(req("A"), metas([1]), now=1)
    assert plan.sequences == ()


def test_ack_deletes_and_frees_in_flight():
    d = Dispatcher()
    d.on_request(req("A"), metas([1, 2]), now=0)
    assert d.on_ack(ChunkAck("A", (1, 2)), now=1) == (1, 2)
    assert d.in_flight_count() == 0


def test_http_ack_deletes_on_delivery():
    d = Dispatcher()
    d.on_request(req("A"), metas([1]), now=0)
    assert d.on_post_delivered(1, now=1, http_ack=True) == (1,)
    assert d.in_flight_count() == 0


def test_reset_window_releases_its_delivered_chunks():
    d = Dispatcher()
    d.on_request(req("A"), metas([1, 2]), now=0)
    d.on_post_delivered(1, now=1)
    d.on_ack(ChunkAck("A", (), reset_window=True), now=2)
    plan = d.on_request(req("B"), metas([1, 2]), now=3)
    assert plan.sequences == (1,)  # 2 is still posting under A


def test_give_up_timer_releases_stale_window():
    d = Dispatcher(give_up_after_s=10)
    d.on_request(req("A"), metas([1]), now=0)
    d.on_post_delivered(1, now=1)
    assert d.on_tick(now=5) == ()
    assert d.on_tick(now=11) == ("A",)
    assert d.on_request(req("B"), metas([1]), now=12).sequences == (1,)


def test_disconnect_releases_delivered_not_posting():
    d = Dispatcher()
    d.on_request(req("A"), metas([1, 2]), now=0)
    d.on_post_delivered(1, now=1)
    d.on_disconnect()
    assert set(d.in_flight) == {2}


def test_rejected_and_abandoned_leave_flight():
    d = Dispatcher()
    d.on_request(req("A"), metas([1, 2]), now=0)
    d.on_post_rejected(1)
    d.on_post_abandoned(2)
    assert d.in_flight_count() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABC"), st.integers(0, 20), st.integers(1, 6),
                          st.integers(1, 8)), min_size=1, max_size=30))
def test_no_chunk_is_ever_in_two_windows(requests):
    """Whatever requests arrive, a sequence is in flight under one window at most and the
    in-flight count never exceeds the largest max_in_flight asked for."""
    d = Dispatcher()
    queue = metas(range(1, 30))
    owner: dict[int, str] = {}
    for i, (window, since, max_chunks, max_in_flight) in enumerate(requests):
        r = req(window, since=since, max_chunks=max_chunks, max_in_flight=max_in_flight)
        plan = d.on_request(r, queue, now=i)
        for seq in plan.sequences:
            assert seq > since
            assert owner.setdefault(seq, window) == window
            d.on_post_delivered(seq, now=i)
        assert len(plan.sequences) <= max_chunks
    assert all(item.window_id == owner[seq] for seq, item in d.in_flight.items())
