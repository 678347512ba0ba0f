"""ClockSkewEstimator: the sans-I/O skew filter, without sockets."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.sensor.time_sync import ClockSkewEstimator, parse_server_time

BASE = 1_800_000_000.0  # local receive time, epoch seconds


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="milliseconds")


def test_no_sample_means_zero_skew():
    est = ClockSkewEstimator()
    assert est.skew_ms == 0.0
    assert est.sample_count == 0


def test_single_sample_is_server_minus_receive_time():
    est = ClockSkewEstimator()
    # Server clock 2.5 s ahead, frame took 40 ms to arrive.
    assert est.observe(iso(BASE + 2.5 - 0.040), BASE) == pytest.approx(2460.0, abs=1.0)


def test_least_delayed_sample_wins():
    """Delays only ever make a sample smaller; the filter keeps the largest one."""
    est = ClockSkewEstimator()
    true_skew = -1.2  # server 1.2 s behind
    for i, delay in enumerate([0.300, 0.020, 0.150, 0.900]):
        est.observe(iso(BASE + i + true_skew - delay), BASE + i)
    assert est.skew_ms == pytest.approx(-1220.0, abs=1.0)


def test_window_forgets_old_samples_after_clock_step():
    est = ClockSkewEstimator(window=4)
    for i in range(4):
        est.observe(BASE + i + 5.0, BASE + i)  # epoch seconds accepted too
    assert est.skew_ms == pytest.approx(5000.0)
    # The sensor clock was stepped forward by 5 s: skew is now about 0.
    for i in range(4, 8):
        est.observe(BASE + i + 5.0 - 0.01, BASE + i + 5.0)
    assert est.skew_ms == pytest.approx(-10.0, abs=0.5)


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-13-40T00:00:00Z", "nan"])
def test_unreadable_server_time_is_ignored(bad):
    est = ClockSkewEstimator()
    est.observe(iso(BASE + 1.0), BASE)
    assert est.observe(bad, BASE) is None
    assert est.rejected == 1
    assert est.skew_ms == pytest.approx(1000.0, abs=1.0)


def test_naive_and_zulu_timestamps_are_utc():
    moment = datetime(2026, 11, 27, 5, 0, tzinfo=timezone.utc)
    assert parse_server_time("2026-11-27T05:00:00Z") == moment.timestamp()
    assert parse_server_time("2026-11-27T05:00:00") == moment.timestamp()
    assert parse_server_time("2026-11-27T06:00:00+01:00") == moment.timestamp()


def test_warns_once_beyond_limit_and_reports_recovery(caplog):
    est = ClockSkewEstimator(max_skew_ms=500.0, window=1)
    with caplog.at_level(logging.INFO, logger="pipeline.sensor.time_sync"):
        est.observe(BASE + 0.1, BASE)
        est.observe(BASE + 1 + 2.0, BASE + 1)
        est.observe(BASE + 2 + 2.1, BASE + 2)
        assert est.beyond_limit
        est.observe(BASE + 3 + 0.05, BASE + 3)
    messages = [r.getMessage() for r in caplog.records]
    beyond = [m for m in messages if m.startswith("clock_skew_beyond_limit")]
    back = [m for m in messages if m.startswith("clock_skew_within_limit")]
    assert len(beyond) == 1 and "skew_ms=2000.0" in beyond[0]
    assert len(back) == 1
    assert [r.levelno for r in caplog.records if r.getMessage() in beyond] == [logging.WARNING]


@settings(max_examples=100, deadline=None)
@given(skew_ms=st.floats(-600_000, 600_000),
       delays_ms=st.lists(st.floats(0, 5_000), min_size=1, max_size=40))
def test_estimate_never_exceeds_true_skew_and_matches_least_delay(skew_ms, delays_ms):
    est = ClockSkewEstimator(window=64)
    for i, delay in enumerate(delays_ms):
        received = BASE + i * 10
        est.observe(received + (skew_ms - delay) / 1000.0, received)
    assert est.skew_ms <= skew_ms + 1e-3
    assert est.skew_ms == pytest.approx(skew_ms - min(delays_ms), abs=1e-3)


def test_iso_helper_roundtrip():
    assert parse_server_time(iso(BASE + 0.25)) == pytest.approx(BASE + 0.25)
