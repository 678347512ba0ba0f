"""The server's per-sensor session and the request scheduler, without sockets."""

from __future__ import annotations

from pipeline.common.messages import ChunkAck, ChunkRequest, Heartbeat
from pipeline.server.control.scheduler import RequestScheduler
from pipeline.server.control.session import (
    AckLedger,
    Committed,
    SensorSession,
    WindowPolicy,
    WindowStatus,
)

POLICY = WindowPolicy(max_chunks=4, max_bytes=10_000, max_in_flight=8, windows_per_sensor=2,
                      window_timeout_s=5.0, quiet_s=1.0)


def hb(depth: int) -> Heartbeat:
    return Heartbeat(software_version="t", last_committed_sequence=0, queue_depth=depth,
                     clock_skew_ms=0.0)


def connected(depth: int = 10) -> SensorSession:
    s = SensorSession("pi-01", policy=POLICY)
    s.on_connect(now=0)
    s.on_heartbeat(hb(depth), now=0)
    return s


def test_no_window_without_backlog():
    s = connected(depth=0)
    assert not s.wants_window()
    assert s.issue_window(now=0) is None


def test_first_window_after_connect_asks_from_zero_then_watermark():
    s = connected()
    first = s.issue_window(now=0)
    assert first is not None and first.since_sequence == 0
    s.on_committed([Committed(1, first.window_id, 10), Committed(2, first.window_id, 10)],
                   watermark=2, now=0.1)
    second = s.issue_window(now=0.2)
    assert second is not None and second.since_sequence == 2
    assert second.window_id != first.window_id
    assert second.max_in_flight == POLICY.max_in_flight


def test_windows_per_sensor_cap():
    s = connected()
    assert s.issue_window(now=0) and s.issue_window(now=0)
    assert s.issue_window(now=0) is None


def test_acks_grouped_by_window_and_sent_for_unknown_windows():
    s = connected()
    w = s.issue_window(now=0)
    acks = s.on_committed([Committed(1, w.window_id, 1), Committed(2, "old-window", 1),
                           Committed(3, w.window_id, 1)], watermark=3, now=1)
    assert {(a.window_id, a.committed_sequences) for a in acks} == {
        (w.window_id, (1, 3)), ("old-window", (2,))}
    assert all(a.reset_window is False for a in acks)


def test_filled_window_keeps_windows_flowing_back_to_back():
    s = connected(depth=4)
    w = s.issue_window(now=0)
    s.on_committed([Committed(i, w.window_id, 1) for i in range(1, 5)], watermark=4, now=0.5)
    assert s.windows[w.window_id].status is WindowStatus.FILLED
    assert s.wants_window()  # no heartbeat needed
    assert s.issue_window(now=0.6) is not None


def test_underfilled_quiet_window_ends_backlog():
    s = connected(depth=10)
    w = s.issue_window(now=0)
    s.on_committed([Committed(1, w.window_id, 1)], watermark=1, now=0.1)
    assert s.on_tick(now=1.5) == []
    assert s.windows[w.window_id].status is WindowStatus.QUIET
    assert not s.wants_window()


def test_stuck_chunks_rerequested_with_same_window_id():
    """Chunk k was sent under A and its POST lost: the sensor holds it under A, so a new
    window gets nothing; the session re-requests A by its id."""
    s = connected(depth=3)
    a = s.issue_window(now=0)
    s.on_committed([Committed(2, a.window_id, 1), Committed(3, a.window_id, 1)],
                   watermark=0, now=0.1)
    s.on_tick(now=1.2)  # A goes quiet
    s.on_disconnect(now=1.3)  # the acks of 2 and 3 may have died with the connection
    s.on_connect(now=1.5)
    s.on_heartbeat(hb(1), now=3)  # sensor still holds one chunk
    b = s.issue_window(now=3)
    assert b is not None
    # The acks of 2 and 3 may have died with the connection: sent again at once.
    assert [(m.window_id, m.committed_sequences) for m in s.on_tick(now=4)] == \
        [(a.window_id, (2, 3))]
    s.on_heartbeat(hb(1), now=10)
    # B got nothing for window_timeout, and nothing was committed for three of them.
    assert s.on_tick(now=16.4) == []
    out = s.on_tick(now=16.6)
    # A's committed chunks are acked again right before A is re-requested.
    assert isinstance(out[0], ChunkAck) and out[0].window_id == a.window_id
    assert out[0].committed_sequences == (2, 3)
    rerequests = [r for r in out if isinstance(r, ChunkRequest)]
    # Every unsettled window is asked again under its own id (B too: its POSTs may be lost).
    assert [r.window_id for r in rerequests] == [a.window_id, b.window_id]
    assert rerequests[0].since_sequence == a.since_sequence
    # The re-request yields the chunk; the session acks it under A.
    acks = s.on_committed([Committed(1, a.window_id, 1)], watermark=3, now=8.5)
    assert acks[0].window_id == a.window_id and acks[0].committed_sequences == (1,)


def test_rerequest_that_yields_nothing_settles_window():
    s = connected(depth=2)
    a = s.issue_window(now=0)
    s.on_committed([Committed(1, a.window_id, 1)], watermark=1, now=0.1)
    s.on_tick(now=2)
    s.on_heartbeat(hb(1), now=3)
    s.issue_window(now=3)
    assert s.on_tick(now=15.2)  # re-request of A
    s.on_tick(now=30)
    assert a.window_id not in s.windows


def test_zero_depth_heartbeat_settles_everything():
    s = connected()
    s.issue_window(now=0)
    s.on_heartbeat(hb(0), now=1)
    assert s.windows == {}


def test_new_epoch_resets_watermark_and_windows():
    s = connected()
    s.on_connect(now=0, epoch="aaaaaaaa")
    w = s.issue_window(now=0)
    s.on_committed([Committed(1, w.window_id, 1)], watermark=1, now=0.1)
    s.on_heartbeat(hb(5), now=1, epoch="bbbbbbbb")
    assert s.watermark == 0 and s.windows == {}


def test_windows_survive_export_restore():
    s = connected()
    w = s.issue_window(now=0)
    state = s.export_windows()
    fresh = SensorSession("pi-01", policy=POLICY)
    fresh.restore_windows(state)
    assert fresh.windows[w.window_id].status is WindowStatus.QUIET
    assert fresh.windows[w.window_id].since_sequence == w.since_sequence


def test_disconnected_session_issues_nothing():
    s = connected()
    s.on_disconnect(now=1)
    assert s.issue_window(now=1, force=True) is None


def test_scheduler_global_budget_round_robin():
    sched = RequestScheduler(POLICY, global_max_windows=3)
    for sid in ("a", "b", "c"):
        sess = sched.session(sid)
        sess.on_connect(now=0)
        sess.on_heartbeat(hb(100), now=0)
    out = sched.pump(0, touched=["a", "b", "c"])
    assert len(out) == 3
    assert {o.sensor_id for o in out} == {"a", "b", "c"}
    assert sched.active_total == 3
    assert sched.pump(0.1, touched=["a"]) == []
    # A window fills: budget frees and the waiting sensor gets the next one.
    first = out[0]
    sess = sched.sessions[first.sensor_id]
    sess.on_committed([Committed(i, first.request.window_id, 1) for i in range(1, 5)],
                      watermark=4, now=0.2)
    more = sched.pump(0.2, touched=[first.sensor_id])
    assert len(more) == 1 and sched.active_total == 3


def test_request_sensor_forces_a_window():
    sched = RequestScheduler(POLICY)
    sess = sched.session("a")
    sess.on_connect(now=0)
    sess.on_heartbeat(hb(0), now=0)
    assert sched.request_sensor("a", now=1) is not None
    assert sched.request_sensor("unknown", now=1) is None


# ---------------------------------------------------------------------------------------
# Re-acks for deployed 1.0 sensors (issue 12): the ack ledger and recovery rounds


def test_ledger_keeps_ranges_per_window_and_drops_oldest_beyond_its_cap():
    ledger = AckLedger(max_sequences=5)
    for seq in (1, 2, 3):
        ledger.add("A", seq)
    ledger.add("A", 2)  # a duplicate is not counted twice
    ledger.add("B", 7)
    ledger.add("B", 9)
    assert len(ledger) == 5
    ledger.connection_lost()
    assert {a.window_id: a.committed_sequences for a in ledger.round(max_rounds=9)} == {
        "A": (1, 2, 3), "B": (7, 9)}
    assert ledger.round(max_rounds=9) == []  # re-acked once per lost connection
    ledger.add("C", 10)  # over the cap: A (oldest) goes
    assert len(ledger) == 3
    ledger.connection_lost()
    assert [a.window_id for a in ledger.round(max_rounds=9)] == ["B", "C"]
    assert ledger.ack_for("C") is not None and ledger.ack_for("A") is None


def test_ledger_windows_are_forgotten_after_their_rounds():
    ledger = AckLedger()
    ledger.add("A", 1)
    for _ in range(2):
        ledger.connection_lost()
        assert len(ledger.round(max_rounds=2)) == 1
    ledger.connection_lost()
    assert ledger.round(max_rounds=2) == [] and len(ledger) == 0 and ledger.suspects == 0


def _stranded(depth: int = 2) -> tuple[SensorSession, str]:
    """Chunks 1 and 2 committed under A, then the control connection dropped (their acks
    may be lost with it); the sensor reconnects and reports them still queued."""
    s = connected(depth=depth)
    a = s.issue_window(now=0)
    s.on_committed([Committed(1, a.window_id, 1), Committed(2, a.window_id, 1)],
                   watermark=2, now=0.5)
    s.on_disconnect(now=1)
    s.on_connect(now=1)
    s.on_heartbeat(hb(depth), now=1)
    return s, a.window_id


def test_acks_lost_with_a_connection_are_sent_again_at_once_on_the_next():
    s, window_id = _stranded()
    out = s.on_tick(now=1.1)
    assert [(a.window_id, a.committed_sequences) for a in out] == [(window_id, (1, 2))]
    assert all(isinstance(m, ChunkAck) for m in out)  # no upload asked for
    # Once per lost connection: the next heartbeat does not repeat them...
    s.on_committed([Committed(3, "other", 1)], watermark=3, now=30)  # (data flows)
    s.on_heartbeat(hb(2), now=31)
    assert not any(isinstance(m, ChunkAck) and m.window_id == window_id
                   for m in s.on_tick(now=31))
    # ...unless that connection drops too.
    s.on_disconnect(now=40)
    s.on_connect(now=41)
    s.on_heartbeat(hb(2), now=41)
    assert [m.window_id for m in s.on_tick(now=41) if isinstance(m, ChunkAck)] == \
        [window_id, "other"]


def test_no_reack_while_the_control_channel_stayed_up():
    """An ack queued on a live connection reaches the sensor: nothing is suspect."""
    s = connected(depth=2)
    a = s.issue_window(now=0)
    s.on_committed([Committed(1, a.window_id, 1)], watermark=1, now=0.5)
    s.on_heartbeat(hb(1), now=20)
    assert not any(isinstance(m, ChunkAck) for m in s.on_tick(now=40))


def test_no_reack_when_the_sensor_reports_an_empty_queue():
    s, _ = _stranded()
    s.on_heartbeat(hb(0), now=1.05)  # it holds nothing: ledger and windows cleared
    assert len(s.ledger) == 0
    assert s.on_tick(now=60) == []


def test_rerequests_wait_for_a_stall_and_follow_their_windows_acks():
    s, window_id = _stranded(depth=3)
    s.on_tick(now=1.1)  # the re-ack round
    s.on_committed([Committed(3, "other", 1)], watermark=3, now=10)
    assert s.on_tick(now=16.1) == []  # something arrived 6 s ago: not stalled
    s.on_heartbeat(hb(1), now=20)
    out = s.on_tick(now=25.1)  # nothing for 15 s (3 x window_timeout_s): re-request
    kinds = [(type(m).__name__, m.window_id) for m in out]
    assert kinds.index(("ChunkAck", window_id)) < kinds.index(("ChunkRequest", window_id))
    assert s.on_tick(now=45) == []  # paced: the sensor has not reported since


def test_acks_the_sensor_has_provably_read_are_never_repeated():
    """A chunk POSTed under a window requested after an ack proves the sensor read that
    ack (one ordered stream): after a disconnect only the unproven ones are re-acked."""
    s = connected(depth=10)
    a = s.issue_window(now=0)
    s.on_committed([Committed(1, a.window_id, 1), Committed(2, a.window_id, 1)],
                   watermark=2, now=1)  # acks of 1, 2 queued at t=1
    b = s.issue_window(now=2)  # requested after them
    s.on_committed([Committed(3, b.window_id, 1)], watermark=3, now=3)  # the sensor read it
    assert list(s.ledger._windows) == [b.window_id]
    s.on_disconnect(now=4)
    s.on_connect(now=5)
    s.on_heartbeat(hb(7), now=5)
    assert [(m.window_id, m.committed_sequences) for m in s.on_tick(now=5)] == \
        [(b.window_id, (3,))]


def test_acks_made_while_disconnected_are_suspect():
    s = connected(depth=3)
    a = s.issue_window(now=0)
    s.on_disconnect(now=1)
    s.on_committed([Committed(1, a.window_id, 1)], watermark=1, now=2)  # held by the shell
    assert s.ledger.suspects == 1
