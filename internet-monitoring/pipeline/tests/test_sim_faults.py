"""Fault plans and the per-connection schedule, without sockets: determinism, rates,
windows, fragmentation, bandwidth, ordering, close-after-N and black-hole stalls."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.errors import ConfigError
from pipeline.sim.faults import (
    Direction,
    DirectionFaults,
    FaultPlan,
    LinkFaults,
    LinkSession,
    StepKind,
    TokenBucket,
    periodic_windows,
)

UP = Direction.UPSTREAM
DOWN = Direction.DOWNSTREAM


def noisy_plan(seed: int) -> FaultPlan:
    faults = LinkFaults.symmetric(reset_at_connect_p=0.3, reset_mid_stream_p=0.2,
                                  latency_ms=40, jitter_ms=30, fragment_max_bytes=64)
    return FaultPlan(seed=seed, faults=faults)


def decisions(plan: FaultPlan, conns: int = 50, segments: int = 20) -> list[object]:
    out: list[object] = [plan.decide_connection(c) for c in range(conns)]
    for c, s, d in itertools.product(range(conns), range(segments), Direction):
        out.append(plan.decide_segment(c, s, 1000, 0.0, direction=d))
    return out


# ---------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_the_same_decisions() -> None:
    assert decisions(noisy_plan(7)) == decisions(noisy_plan(7))


def test_different_seeds_give_different_decisions() -> None:
    a, b = decisions(noisy_plan(1)), decisions(noisy_plan(2))
    differing = sum(x != y for x, y in zip(a, b))
    assert differing > len(a) // 2


def test_decisions_do_not_depend_on_the_order_they_are_asked_in() -> None:
    plan = noisy_plan(3)
    keys = list(itertools.product(range(30), range(10)))
    forward = {k: plan.decide_segment(k[0], k[1], 500, 0.0) for k in keys}
    backward = {k: plan.decide_segment(k[0], k[1], 500, 0.0) for k in reversed(keys)}
    assert forward == backward
    # ... and a second plan object with the same seed, asked interleaved with another plan.
    other, twin = noisy_plan(99), noisy_plan(3)
    for k in keys:
        other.decide_segment(k[0], k[1], 500, 0.0)
        assert twin.decide_segment(k[0], k[1], 500, 0.0) == forward[k]


def test_directions_draw_independently() -> None:
    plan = noisy_plan(5)
    ups = [plan.decide_segment(0, s, 1000, 0.0, direction=UP) for s in range(200)]
    downs = [plan.decide_segment(0, s, 1000, 0.0, direction=DOWN) for s in range(200)]
    assert [a.delay_s for a in ups] != [a.delay_s for a in downs]


# ---------------------------------------------------------------------------------------
# Rates


@pytest.mark.parametrize("p", [0.0, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 12345])
def test_reset_at_connect_rate_converges(p: float, seed: int) -> None:
    plan = FaultPlan(seed=seed, faults=LinkFaults(reset_at_connect_p=p))
    n = 10_000
    fates = [plan.decide_connection(i) for i in range(n)]
    rate = sum(f.reset for f in fates) / n
    assert abs(rate - p) <= 0.02
    assert all(f.reason == "reset_at_connect" for f in fates if f.reset)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 1.0])
def test_reset_mid_stream_rate_converges_per_direction(p: float) -> None:
    faults = LinkFaults(upstream=DirectionFaults(reset_mid_stream_p=p))
    plan = FaultPlan(seed=42, faults=faults)
    ups = [plan.decide_segment(i // 100, i % 100, 10, 0.0, direction=UP) for i in range(10_000)]
    rate = sum(a.reset for a in ups) / len(ups)
    assert abs(rate - p) <= 0.02
    assert all(a.reason == "reset_mid_stream" for a in ups if a.reset)
    downs = [plan.decide_segment(0, i, 10, 0.0, direction=DOWN) for i in range(2000)]
    assert not any(a.reset for a in downs)  # downstream has no resets configured


def test_jitter_stays_within_bounds_and_centres_on_the_latency() -> None:
    plan = FaultPlan(seed=8, faults=LinkFaults.symmetric(latency_ms=50, jitter_ms=25))
    delays = [plan.decide_segment(0, i, 1, 0.0).delay_s for i in range(5000)]
    assert min(delays) >= 0.025 and max(delays) <= 0.075
    assert abs(sum(delays) / len(delays) - 0.050) < 0.002
    assert len(set(delays)) > 4000  # really jittered, not a constant


def test_jitter_larger_than_latency_never_gives_a_negative_delay() -> None:
    plan = FaultPlan(seed=8, faults=LinkFaults.symmetric(latency_ms=5, jitter_ms=50))
    delays = [plan.decide_segment(0, i, 1, 0.0).delay_s for i in range(2000)]
    assert min(delays) == 0.0 and max(delays) > 0.04


# ---------------------------------------------------------------------------------------
# Windows


def test_partition_windows_are_half_open_and_exact() -> None:
    plan = FaultPlan(partitions=((10.0, 5.0), (30.0, 1.5)))
    assert not plan.partitioned(0.0)
    assert not plan.partitioned(math.nextafter(10.0, 0))
    assert plan.partitioned(10.0)
    assert plan.partitioned(14.999)
    assert not plan.partitioned(15.0)
    assert plan.partitioned(30.0) and plan.partitioned(31.49) and not plan.partitioned(31.5)
    assert plan.next_partition_start(0.0) == 10.0
    assert plan.next_partition_start(10.0) == 30.0
    assert plan.next_partition_start(30.0) is None
    assert plan.partition_end(12.0) == 15.0 and plan.partition_end(16.0) is None


def test_overlapping_and_unsorted_windows_merge_for_lookups() -> None:
    plan = FaultPlan(partitions=((8.0, 4.0), (5.0, 4.0)))
    assert plan.partitions == ((5.0, 4.0), (8.0, 4.0))
    assert all(plan.partitioned(t) for t in (5.0, 8.5, 9.0, 11.99))
    assert not plan.partitioned(12.0)
    assert plan.partition_end(6.0) == 12.0


def test_connection_refused_during_a_partition_and_accepted_after() -> None:
    plan = FaultPlan(partitions=((1.0, 2.0),))
    assert plan.decide_connection(0, now_s=0.5) == plan.decide_connection(0)
    assert plan.decide_connection(0, now_s=1.0).reason == "partition"
    assert not plan.decide_connection(0, now_s=3.0).reset


def test_segment_precedence_partition_then_blackhole_then_reset() -> None:
    faults = LinkFaults.symmetric(reset_mid_stream_p=1.0)
    plan = FaultPlan(faults=faults, partitions=((0.0, 1.0),), blackholes=((0.5, 1.0),))
    assert plan.decide_segment(0, 0, 10, 0.7).reason == "partition"
    during_hole = plan.decide_segment(0, 0, 10, 1.2)
    assert during_hole.blackhole and not during_hole.reset and not during_hole.forwarded
    assert plan.decide_segment(0, 0, 10, 2.0).reason == "reset_mid_stream"


def test_periodic_windows() -> None:
    assert list(periodic_windows(30, 10, first_s=20, count=3)) == [
        (20.0, 10), (50.0, 10), (80.0, 10)]
    assert list(periodic_windows(5, 1, until_s=16)) == [(5.0, 1), (10.0, 1), (15.0, 1)]
    endless = periodic_windows(2, 1, first_s=0)
    assert list(itertools.islice(endless, 4)) == [(0.0, 1), (2.0, 1), (4.0, 1), (6.0, 1)]
    plan = FaultPlan(partitions=tuple(periodic_windows(30, 10, first_s=20, count=2)))
    assert [plan.partitioned(t) for t in (19.9, 20, 29.9, 30, 50, 59.9, 60, 80)] == [
        False, True, True, False, True, True, False, False]


@pytest.mark.parametrize("every,duration,field", [(10, 10, "duration_s"), (10, 0, "duration_s"),
                                                  (0, 1, "every_s"), (10, -1, "duration_s")])
def test_periodic_windows_reject_nonsense(every: float, duration: float, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        next(periodic_windows(every, duration))
    assert info.value.field == field


@pytest.mark.parametrize("windows", [((-1, 2),), ((1, 0),), ((1,),), ((1, float("inf")),),
                                     (("a", 1),), 5])
def test_bad_windows_are_config_errors(windows: object) -> None:
    with pytest.raises(ConfigError) as info:
        FaultPlan(partitions=windows)  # type: ignore[arg-type]
    assert info.value.field == "partitions"


# ---------------------------------------------------------------------------------------
# Fragmentation and bandwidth


@settings(max_examples=150, deadline=None)
@given(nbytes=st.integers(0, 20_000), max_bytes=st.integers(0, 3000), seed=st.integers(0, 99),
       segment=st.integers(0, 1000))
def test_fragments_sum_to_the_segment_and_respect_the_maximum(nbytes: int, max_bytes: int,
                                                              seed: int, segment: int) -> None:
    plan = FaultPlan(seed=seed, faults=LinkFaults.symmetric(fragment_max_bytes=max_bytes))
    fragments = plan.decide_segment(0, segment, nbytes, 0.0).fragments
    assert sum(fragments) == nbytes
    assert all(f >= 1 for f in fragments)
    if max_bytes == 0:
        assert fragments == ((nbytes,) if nbytes else ())
    else:
        assert all(f <= max_bytes for f in fragments)


def test_fragment_sizes_vary() -> None:
    plan = FaultPlan(seed=1, faults=LinkFaults.symmetric(fragment_max_bytes=100))
    fragments = plan.decide_segment(0, 0, 10_000, 0.0).fragments
    assert len(set(fragments)) > 20


@pytest.mark.parametrize("nbytes,bps", [(1000, 8000), (250_000, 2_000_000), (1, 1)])
def test_transmit_time_is_bits_over_bandwidth(nbytes: int, bps: int) -> None:
    plan = FaultPlan(faults=LinkFaults.symmetric(bandwidth_bps=bps))
    assert plan.decide_segment(0, 0, nbytes, 0.0).transmit_s == pytest.approx(nbytes * 8 / bps)
    assert FaultPlan().decide_segment(0, 0, nbytes, 0.0).transmit_s == 0.0


def test_token_bucket_serialises_without_burst() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000)
    assert bucket.reserve(500, 0.0) == pytest.approx(0.5)
    assert bucket.reserve(500, 0.0) == pytest.approx(1.0)  # queued behind the first
    assert bucket.reserve(100, 5.0) == pytest.approx(5.1)  # idle link: no backlog


def test_token_bucket_burst_is_free_then_rate_limited() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=300)
    assert bucket.reserve(300, 0.0) == 0.0
    assert bucket.reserve(200, 0.0) == pytest.approx(0.2)
    # Long idle refills to the burst only, never beyond it.
    assert bucket.reserve(300, 100.0) == 100.0
    assert bucket.reserve(1, 100.0) == pytest.approx(100.001)


# ---------------------------------------------------------------------------------------
# LinkSession: the schedule of one connection


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000),
       gaps=st.lists(st.floats(0, 0.05), min_size=1, max_size=60),
       sizes=st.lists(st.integers(1, 5000), min_size=60, max_size=60))
def test_release_times_never_go_backwards_despite_jitter(seed: int, gaps: list[float],
                                                         sizes: list[int]) -> None:
    faults = LinkFaults.symmetric(latency_ms=30, jitter_ms=30, bandwidth_bps=1_000_000)
    session = LinkSession(FaultPlan(seed=seed, faults=faults), conn_index=0)
    now, last = 0.0, -1.0
    for gap, size in zip(gaps, sizes):
        now += gap
        step = session.on_segment(UP, size, now)
        assert step.kind is StepKind.FORWARD
        assert step.release_at_s >= last and step.release_at_s >= now
        last = step.release_at_s
    eof_at = session.on_eof(UP, now)
    assert eof_at is not None and eof_at >= last


def test_bandwidth_cap_spaces_out_a_burst_of_segments() -> None:
    faults = LinkFaults(downstream=DirectionFaults(bandwidth_bps=80_000, latency_ms=100))
    session = LinkSession(FaultPlan(faults=faults), conn_index=0)
    steps = [session.on_segment(DOWN, 1000, 0.0) for _ in range(10)]  # 10 kB at 10 kB/s
    assert steps[-1].release_at_s == pytest.approx(1.0 + 0.1)
    assert [s.release_at_s for s in steps] == sorted(s.release_at_s for s in steps)
    up = session.on_segment(UP, 1000, 0.0)  # the other direction is not capped
    assert up.release_at_s == 0.0


def test_close_after_bytes_truncates_then_discards() -> None:
    faults = LinkFaults(upstream=DirectionFaults(close_after_bytes=2500, fragment_max_bytes=300))
    session = LinkSession(FaultPlan(seed=4, faults=faults), conn_index=0)
    first = session.on_segment(UP, 2000, 0.0)
    assert first.kind is StepKind.FORWARD and first.nbytes == 2000 and not first.close_after
    second = session.on_segment(UP, 2000, 0.0)
    assert second.nbytes == 500 and second.close_after
    assert all(1 <= f <= 300 for f in second.fragments)
    assert session.on_segment(UP, 10, 0.0).kind is StepKind.DISCARD
    assert session.forwarded_bytes(UP) == 2500
    assert session.on_segment(DOWN, 10_000, 0.0).nbytes == 10_000  # other way unaffected


def test_blackhole_discards_and_then_stalls_the_connection_both_ways() -> None:
    plan = FaultPlan(blackholes=((1.0, 1.0),))
    session = LinkSession(plan, conn_index=0)
    assert session.on_segment(UP, 10, 0.5).kind is StepKind.FORWARD
    hole = session.on_segment(UP, 10, 1.5)
    assert hole.kind is StepKind.DISCARD and hole.reason == "blackhole"
    after = session.on_segment(DOWN, 10, 5.0)
    assert after.kind is StepKind.DISCARD and after.reason == "stalled"
    assert session.on_eof(UP, 5.0) is None  # torn down, never passed on
    fresh = LinkSession(plan, conn_index=1)  # a connection opened after the window works
    assert fresh.on_segment(UP, 10, 5.0).kind is StepKind.FORWARD


def test_a_reset_is_final_for_the_connection() -> None:
    faults = LinkFaults(upstream=DirectionFaults(reset_mid_stream_p=1.0))
    session = LinkSession(FaultPlan(faults=faults), conn_index=0)
    assert session.on_segment(UP, 1, 0.0).kind is StepKind.RESET
    assert session.on_segment(DOWN, 1, 0.0).kind is StepKind.RESET
    assert session.on_eof(DOWN, 0.0) is None


def test_eof_follows_the_data_after_latency_and_slow_close() -> None:
    faults = LinkFaults(upstream=DirectionFaults(latency_ms=100, slow_close_ms=400))
    session = LinkSession(FaultPlan(faults=faults), conn_index=0)
    data = session.on_segment(UP, 10, 0.0)
    assert data.release_at_s == pytest.approx(0.1)
    assert session.on_eof(UP, 0.0) == pytest.approx(0.5)


def test_plan_windows_count_from_the_plan_origin() -> None:
    session = LinkSession(FaultPlan(), conn_index=0, origin_s=100.0)
    session.set_plan(FaultPlan(partitions=((1.0, 1.0),)), origin_s=200.0)
    assert session.on_segment(UP, 1, 200.5).kind is StepKind.FORWARD
    assert session.on_segment(UP, 1, 201.5).reason == "partition"


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kwargs,field", [
    ({"latency_ms": -1}, "latency_ms"),
    ({"jitter_ms": float("nan")}, "jitter_ms"),
    ({"bandwidth_bps": 1.5}, "bandwidth_bps"),
    ({"reset_mid_stream_p": 1.01}, "reset_mid_stream_p"),
    ({"fragment_max_bytes": -3}, "fragment_max_bytes"),
    ({"close_after_bytes": True}, "close_after_bytes"),
    ({"slow_close_ms": "5"}, "slow_close_ms"),
])
def test_bad_direction_parameters_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        DirectionFaults(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field and field in info.value.message


def test_bad_link_and_plan_parameters() -> None:
    with pytest.raises(ConfigError) as info:
        LinkFaults(reset_at_connect_p=-0.1)
    assert info.value.field == "reset_at_connect_p"
    with pytest.raises(ConfigError) as info:
        LinkFaults.symmetric(latency=5)
    assert info.value.field == "latency"
    with pytest.raises(ConfigError) as info:
        FaultPlan(seed="x")  # type: ignore[arg-type]
    assert info.value.field == "seed"


def test_symmetric_sets_both_directions() -> None:
    link = LinkFaults.symmetric(latency_ms=7, bandwidth_bps=100, reset_at_connect_p=0.5)
    assert link.upstream == link.downstream == DirectionFaults(latency_ms=7, bandwidth_bps=100)
    assert link.reset_at_connect_p == 0.5
