"""Named simulator profiles: each builds a plan with its documented parameters, and every
parameter can be overridden (validated, unknown names rejected by name)."""

from __future__ import annotations

import pytest

from pipeline.common.errors import ConfigError
from pipeline.sim.faults import DirectionFaults, FaultPlan
from pipeline.sim.profiles import (
    PROFILES,
    get_profile,
    override_names,
    parse_overrides,
    profile_names,
)


@pytest.mark.parametrize("name", ["clean", "lossy", "satellite", "partition", "chaos"])
def test_every_profile_builds_a_seeded_plan(name: str) -> None:
    profile = get_profile(name)
    assert profile.name == name and profile.description
    plan = profile.to_plan(seed=5)
    assert isinstance(plan, FaultPlan) and plan.seed == 5
    assert plan == profile.to_plan(seed=5)
    assert plan.decide_segment(0, 0, 100, 0.0) == profile.to_plan(5).decide_segment(0, 0, 100, 0.0)


def test_profile_parameters_match_their_documentation() -> None:
    assert get_profile("clean").to_plan(1) == FaultPlan(seed=1)
    lossy = get_profile("lossy").faults
    assert lossy.reset_at_connect_p == 0.10
    assert lossy.upstream == lossy.downstream
    assert (lossy.upstream.reset_mid_stream_p, lossy.upstream.latency_ms,
            lossy.upstream.jitter_ms) == (0.10, 25.0, 12.5)  # 50 +/- 25 ms round trip
    satellite = get_profile("satellite").faults.downstream
    assert (satellite.latency_ms, satellite.jitter_ms, satellite.bandwidth_bps) == (
        300.0, 100.0, 2_000_000)
    partition = get_profile("partition").to_plan(1, horizon_s=100)
    assert partition.partitions == ((20.0, 10.0), (50.0, 10.0), (80.0, 10.0))
    chaos = get_profile("chaos")
    plan = chaos.to_plan(1)
    assert plan.partitions == ((15.0, 10.0), (45.0, 10.0))  # two, whatever the horizon
    assert plan.faults.reset_at_connect_p == 0.20
    assert plan.faults.upstream.reset_mid_stream_p == 0.20
    assert plan.blackholes and chaos.kill_sensors_every_s > 0 and chaos.kill_server_every_s > 0


def test_periodic_partitions_run_until_the_horizon() -> None:
    plan = get_profile("partition").to_plan(1)  # default horizon: a day
    assert plan.partitioned(20.0 + 30.0 * 1000)
    assert not plan.partitioned(30.0 + 30.0 * 1000)


def test_overrides_apply_to_both_or_one_direction() -> None:
    base = get_profile("lossy")
    both = base.with_overrides(latency_ms=80, bandwidth_bps="1000000")
    assert both.faults.upstream.latency_ms == both.faults.downstream.latency_ms == 80.0
    assert both.faults.downstream.bandwidth_bps == 1_000_000
    assert both.faults.upstream.jitter_ms == 12.5  # untouched parameters stay
    one = base.with_overrides(downstream_close_after_bytes=4096, upstream_slow_close_ms="250")
    assert one.faults.downstream.close_after_bytes == 4096
    assert one.faults.upstream.close_after_bytes == 0
    assert one.faults.upstream.slow_close_ms == 250.0
    assert base.faults.upstream.latency_ms == 25.0  # the registered profile is unchanged
    assert get_profile("lossy") == base


def test_a_one_direction_override_wins_over_a_both_directions_one() -> None:
    for params in ({"upstream_latency_ms": 9, "latency_ms": 1},
                   {"latency_ms": 1, "upstream_latency_ms": 9}):
        faults = get_profile("clean").with_overrides(**params).faults
        assert (faults.upstream.latency_ms, faults.downstream.latency_ms) == (9.0, 1.0)


def test_periodic_partitions_default_to_one_period_in_or_start_where_told() -> None:
    default = get_profile("clean").with_overrides(partition_every_s=10, partition_duration_s=1)
    assert default.to_plan(0, horizon_s=25).partitions == ((10.0, 1.0), (20.0, 1.0))
    at_zero = default.with_overrides(partition_first_s=0)
    assert at_zero.to_plan(0, horizon_s=15).partitions == ((0.0, 1.0), (10.0, 1.0))


def test_overrides_of_schedules_and_run_parameters() -> None:
    profile = get_profile("partition").with_overrides(
        partition_every_s="20", partition_duration_s=3, partition_first_s=1, partition_count=2,
        blackholes="40:2, 50:1", kill_sensors_every_s=7, duration_hint_s="12.5",
        reset_at_connect_p="0.3")
    plan = profile.to_plan(2)
    assert plan.partitions == ((1.0, 3.0), (21.0, 3.0))
    assert plan.blackholes == ((40.0, 2.0), (50.0, 1.0))
    assert plan.faults.reset_at_connect_p == 0.3
    assert (profile.kill_sensors_every_s, profile.duration_hint_s) == (7.0, 12.5)
    explicit = get_profile("clean").with_overrides(partitions=[(5, 1)])
    assert explicit.to_plan(0).partitions == ((5.0, 1.0),)


def test_every_listed_parameter_is_accepted() -> None:
    values = {"partitions": "1:1", "blackholes": "2:1", "description": "x",
              "partition_duration_s": 1, "partition_every_s": 10}
    profile = get_profile("clean").with_overrides(
        **{name: values.get(name, 1) for name in override_names()})
    assert profile.faults.upstream.fragment_max_bytes == 1
    assert profile.to_plan(0).partitions[:2] == ((1.0, 1.0), (1.0, 1.0))


def test_overrides_are_checked_together_not_one_by_one() -> None:
    # Shortening the period below the profile's 10 s duration is fine when the same call
    # shortens the duration too.
    profile = get_profile("partition").with_overrides(partition_every_s=5,
                                                      partition_duration_s=2)
    assert profile.to_plan(0, horizon_s=31).partitions == ((20.0, 2.0), (25.0, 2.0),
                                                           (30.0, 2.0))


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        get_profile("lossy").with_overrides(latancy_ms=5)
    assert info.value.field == "latancy_ms" and "latancy_ms" in info.value.message
    assert "latency_ms" in info.value.message  # and the valid names are listed
    with pytest.raises(ConfigError):
        get_profile("lossy").with_overrides(sideways_latency_ms=5)


@pytest.mark.parametrize("params,field", [
    ({"reset_mid_stream_p": 2}, "reset_mid_stream_p"),
    ({"upstream_latency_ms": -1}, "upstream_latency_ms"),
    ({"bandwidth_bps": "fast"}, "bandwidth_bps"),
    ({"fragment_max_bytes": 1.5}, "fragment_max_bytes"),
    ({"reset_at_connect_p": "1.5"}, "reset_at_connect_p"),
    ({"partition_duration_s": 40}, "partition_duration_s"),  # longer than the period
    ({"partition_count": -1}, "partition_count"),
    ({"blackholes": "5"}, "blackholes"),
    ({"partitions": "5:0"}, "partitions"),
    ({"kill_server_every_s": -3}, "kill_server_every_s"),
])
def test_invalid_override_values_are_named(params: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        get_profile("partition").with_overrides(**params)
    assert info.value.field == field and field in info.value.message


def test_unknown_profile_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_profile("stormy")
    for name in ("clean", "lossy", "satellite", "partition", "chaos"):
        assert name in info.value.message
    assert profile_names() == tuple(PROFILES) == ("clean", "lossy", "satellite", "partition",
                                                  "chaos")


def test_parse_overrides() -> None:
    parsed = parse_overrides(["latency_ms=100", " partitions = 5:2,20:2 "])
    assert parsed == {"latency_ms": "100", "partitions": "5:2,20:2"}
    profile = get_profile("clean").with_overrides(**parsed)
    assert profile.faults.upstream == DirectionFaults(latency_ms=100.0)
    assert profile.partitions == ((5.0, 2.0), (20.0, 2.0))
    with pytest.raises(ConfigError):
        parse_overrides(["latency_ms"])
