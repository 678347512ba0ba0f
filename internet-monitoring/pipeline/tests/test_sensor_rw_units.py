"""Sans-I/O parts of the remote-write receiver: how requests become events (rw_batch),
how refusals are answered, and the scrape target's defaults."""

from __future__ import annotations

from pipeline.common.config.sources_schema import ScrapeTargetConfig
from pipeline.common.errors import EventTooLarge, PayloadTooLarge, QueueError, QueueFull
from pipeline.common.remote_write import RemoteWriteMalformed
from pipeline.sensor.group_commit import CommitterClosed
from pipeline.sensor.remote_write_server import refusal_for
from pipeline.sensor.rw_batch import GroupPlan


def test_plan_packs_requests_in_order_into_events_within_the_byte_bound() -> None:
    plan: GroupPlan[str] = GroupPlan(max_event_bytes=10)
    assert not plan.add(b"aaaa", "r1", "remote_write")
    assert not plan.add(b"bbbb", "r2", "remote_write")
    assert plan.add(b"cccc", "r3", "remote_write")  # 12 bytes pending: commit now
    plan.add(b"x" * 25, "big", "remote_write")       # larger than an event: on its own
    plan.add(b"dd", "s1", "scrape")                  # another source: another event
    groups = plan.take()
    assert [(g.data, g.waiters, g.source) for g in groups] == [
        (b"aaaabbbb", ("r1", "r2"), "remote_write"),
        (b"cccc", ("r3",), "remote_write"),
        (b"x" * 25, ("big",), "remote_write"),
        (b"dd", ("s1",), "scrape")]
    assert plan.empty and plan.pending_bytes == 0 and plan.take() == []


def test_refusals_map_to_400_413_and_503_with_retry_after() -> None:
    malformed = refusal_for(RemoteWriteMalformed("no __name__ label"), 5)
    assert (malformed.status, malformed.outcome, malformed.retry_after) == (400, "malformed",
                                                                            None)
    too_large = refusal_for(PayloadTooLarge("over"), 5)
    assert (too_large.status, too_large.outcome) == (413, "too_large")
    assert refusal_for(EventTooLarge("queue cap"), 5).status == 413
    for error in (QueueFull("disk full"), QueueError("io"), CommitterClosed("stopping")):
        answer = refusal_for(error, 7)
        assert (answer.status, answer.outcome, answer.retry_after) == (503, "unavailable", 7)
        assert answer.response().headers["Retry-After"] == "7"


def test_scrape_target_instance_and_timeout_as_prometheus() -> None:
    plain = ScrapeTargetConfig(url="http://10.0.0.5/metrics", job="node", interval=30)
    assert plain.instance == "10.0.0.5:80" and plain.effective_timeout == 10.0
    tls = ScrapeTargetConfig(url="https://pi:9443/metrics", job="x", interval=5)
    assert tls.instance == "pi:9443" and tls.effective_timeout == 4.0
    assert ScrapeTargetConfig(url="https://pi/m", job="x").instance == "pi:443"


def test_heap_trimmer_trims_once_per_quiet_spell_after_work() -> None:
    from pipeline.common.heap_trim import HeapTrimmer

    now = [0.0]
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    trimmer = HeapTrimmer(min_interval_s=30, clock=lambda: now[0], trim=trim)
    assert not trimmer.tick(0, 0)         # no work yet
    assert not trimmer.tick(10, 0)        # working (activity grew)
    assert not trimmer.tick(10, 3)        # still in flight
    assert trimmer.tick(10, 0)            # quiet after work: trim
    assert not trimmer.tick(10, 0)        # once per quiet spell
    assert not trimmer.tick(20, 0)
    now[0] = 10.0
    assert not trimmer.tick(20, 0)        # quiet again, but within the interval
    now[0] = 31.0
    assert trimmer.tick(20, 0)
    assert calls == [0, 0] and trimmer.trims == 2
    # Without glibc's malloc_trim it decides the same and does nothing.
    assert not HeapTrimmer(load=False).tick(5, 0)
