"""The cluster's pure parts: bus message codec (NOTIFY's size limit), ack routing and
session ownership, without sockets or PostgreSQL."""

from __future__ import annotations

import pytest

from pipeline.server.cluster.messages import (
    MAX_PAYLOAD_BYTES,
    BusMessageError,
    EventsCommitted,
    PayloadTooLarge,
    ReleaseRequest,
    RoutedAcks,
    decode,
    encode,
)
from pipeline.server.cluster.ownership import (
    AskRelease,
    ClaimState,
    CloseSocket,
    LoadSession,
    OwnershipTable,
    Persist,
    Refuse,
    Resume,
    TryLock,
    Unlock,
    lock_key,
)
from pipeline.server.cluster.routing import (
    AckRouter,
    ApplyAcks,
    Defer,
    HandRelease,
    LoadEvents,
    Publish,
)
from pipeline.server.control.session import Committed, SensorSession, WindowPolicy

# -- codec -------------------------------------------------------------------------------


def test_acks_round_trip_and_split_under_the_notify_limit() -> None:
    items = tuple(Committed(seq, f"pi-01-1795755600000-ab{seq // 64}", 900 + seq, epoch="e1")
                  for seq in range(1, 2001))
    msg = RoutedAcks(origin="host-1-abc", sensor_id="pi-01", items=items,
                     marks={"e1": 2000})
    payloads = encode(msg)
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 and len(p.encode()) <= MAX_PAYLOAD_BYTES
               for p in payloads)
    back = [decode(p) for p in payloads]
    assert all(isinstance(b, RoutedAcks) and b.sensor_id == "pi-01" and b.marks == {"e1": 2000}
               for b in back)
    got = tuple(item for b in back for item in b.items)
    assert got == items


def test_events_and_release_round_trip() -> None:
    events = tuple((f"sensor-{i}", f"event-{i:06d}") for i in range(500))
    payloads = encode(EventsCommitted(origin="r1", events=events))
    assert len(payloads) > 1
    assert tuple(e for p in payloads for e in decode(p).events) == events
    assert decode(encode(ReleaseRequest("r1", "pi-02"))[0]) == ReleaseRequest("r1", "pi-02")


def test_an_item_too_big_for_one_payload_is_refused_not_truncated() -> None:
    msg = EventsCommitted(origin="r1", events=(("s", "x" * 9000),))
    with pytest.raises(PayloadTooLarge):
        encode(msg)


@pytest.mark.parametrize("payload", ["not json", "[]", '{"t": "zzz", "o": "r"}',
                                     '{"t": "ack", "o": "r", "s": "x", "m": {}, "i": [[1]]}',
                                     '{"t": "rel", "o": "", "s": "x"}',
                                     '{"t": "ev", "o": "r", "e": [[1, 2]]}'])
def test_foreign_payloads_are_refused(payload: str) -> None:
    with pytest.raises(BusMessageError):
        decode(payload)


# -- routing -----------------------------------------------------------------------------

ITEMS = (Committed(7, "w1", 100, epoch="e"),)


def test_commit_is_acked_here_only_when_the_session_is_owned_here() -> None:
    states = {"a": ClaimState.OWNED, "b": ClaimState.NONE, "c": ClaimState.LOADING}
    router = AckRouter("me", lambda s: states.get(s, ClaimState.NONE))
    assert router.on_commit("a", ITEMS, {"e": 7}) == [ApplyAcks("a", ITEMS, {"e": 7})]
    [published] = router.on_commit("b", ITEMS, {"e": 7})
    assert isinstance(published, Publish)
    assert published.message == RoutedAcks("me", "b", ITEMS, {"e": 7})
    assert router.on_commit("c", ITEMS, {}) == [Defer(ApplyAcks("c", ITEMS, {}))]
    assert router.routed_out == 1


def test_bus_acks_apply_on_the_owner_and_nowhere_else() -> None:
    owner = AckRouter("A", lambda s: ClaimState.OWNED)
    other = AckRouter("C", lambda s: ClaimState.NONE)
    msg = RoutedAcks("B", "pi-01", ITEMS, {"e": 7})
    assert owner.on_message(msg) == [ApplyAcks("pi-01", ITEMS, {"e": 7})]
    assert other.on_message(msg) == []
    assert other.not_owned == 1
    # NOTIFY echoes a replica's own messages back to it: never applied twice.
    assert AckRouter("B", lambda s: ClaimState.OWNED).on_message(msg) == []


def test_events_and_release_requests_are_dispatched() -> None:
    router = AckRouter("A", lambda s: ClaimState.NONE)
    assert router.on_events([]) == []
    [pub] = router.on_events([("s", "e")])
    assert isinstance(pub, Publish) and isinstance(pub.message, EventsCommitted)
    assert router.on_message(EventsCommitted("B", (("s", "e"),))) == [LoadEvents((("s", "e"),))]
    rel = ReleaseRequest("B", "s")
    assert router.on_message(rel) == [HandRelease(rel)]


# -- ownership ---------------------------------------------------------------------------


def test_claim_lock_load_own_release_unlock() -> None:
    table = OwnershipTable(namespace="schema_a")
    key = lock_key("pi-01", "schema_a")
    assert table.on_connect("pi-01", 0.0) == [TryLock("pi-01", key)]
    assert table.on_lock_result("pi-01", True, 0.01) == [LoadSession("pi-01")]
    assert table.defer("pi-01", "ack-1")
    assert table.on_loaded("pi-01") == [Resume("pi-01", ("ack-1",))]
    assert table.state("pi-01") is ClaimState.OWNED
    assert table.on_disconnect("pi-01") == [Persist("pi-01")]
    assert table.on_persisted("pi-01") == [Unlock("pi-01", key)]
    assert table.state("pi-01") is ClaimState.NONE


def test_busy_lock_asks_the_owner_once_retries_then_refuses() -> None:
    table = OwnershipTable(retry_s=0.2, claim_timeout_s=1.0)
    key = lock_key("pi-01")
    table.on_connect("pi-01", 0.0)
    assert table.on_lock_result("pi-01", False, 0.0) == [AskRelease("pi-01")]
    assert table.on_tick(0.1) == []
    assert table.on_tick(0.2) == [TryLock("pi-01", key)]
    assert table.on_tick(0.3) == []  # one attempt in flight at a time
    assert table.on_lock_result("pi-01", False, 0.3) == []  # asked already
    assert table.on_lock_result("pi-01", False, 1.0) == [Refuse("pi-01")]
    assert table.state("pi-01") is ClaimState.NONE
    assert table.refused == 1


def test_owner_lets_go_when_asked_and_reconnect_while_releasing_keeps_the_lock() -> None:
    table = OwnershipTable()
    table.on_connect("s", 0.0)
    table.on_lock_result("s", True, 0.0)
    table.on_loaded("s")
    assert table.on_release_request("s") == [CloseSocket("s", "replaced")]
    assert table.on_release_request("other") == []
    assert table.on_disconnect("s") == [Persist("s")]
    assert table.on_connect("s", 1.0) == [Resume("s")]  # back on this replica meanwhile
    assert table.on_persisted("s") == []  # no unlock: still ours
    assert table.state("s") is ClaimState.OWNED


def test_lock_taken_after_the_socket_left_is_given_back() -> None:
    table = OwnershipTable()
    table.on_connect("s", 0.0)
    assert table.on_disconnect("s") == []
    assert table.on_lock_result("s", True, 0.1) == [Unlock("s", lock_key("s"))]
    assert table.on_lock_result("s", False, 0.1) == []


def test_lost_lock_connection_closes_every_held_session() -> None:
    table = OwnershipTable()
    for sid in ("a", "b"):
        table.on_connect(sid, 0.0)
        table.on_lock_result(sid, True, 0.0)
    table.on_loaded("a")
    table.on_connect("c", 0.0)  # still waiting: nothing to close
    out = table.on_locks_lost()
    assert sorted(a.sensor_id for a in out if isinstance(a, CloseSocket)) == ["a", "b"]
    assert table.owned() == [] and table.state("c") is ClaimState.NONE


def test_lock_keys_differ_by_sensor_and_by_cluster_and_fit_int4() -> None:
    keys = {lock_key(f"sensor-{i}") for i in range(20_000)}
    assert len(keys) == 20_000
    assert lock_key("s", "schema_a") != lock_key("s", "schema_b")
    assert all(-2**31 <= half < 2**31 for key in keys for half in key)


def test_two_owners_in_turn_never_issue_the_same_window_id() -> None:
    """The new owner restores the old owner's windows and issues new ids with its tag."""
    first = SensorSession("pi-01", policy=WindowPolicy(id_tag="aaaaaa"))
    first.on_connect(100.0)
    first.backlog = 10
    issued = {first.issue_window(100.0).window_id}
    second = SensorSession("pi-01", policy=WindowPolicy(id_tag="bbbbbb"))
    second.restore_windows(first.export_windows())
    second.on_connect(100.0)  # same millisecond, same counter: only the tag differs
    second.backlog = 10
    request = second.issue_window(100.0)
    assert request is not None and request.window_id not in issued
    assert set(second.windows) >= issued  # the old owner's window is kept, same id
