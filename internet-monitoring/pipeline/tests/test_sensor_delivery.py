"""The sensor's delivery core (``pipeline.sensor.delivery``) without sockets or asyncio."""

from __future__ import annotations

import random
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common import backoff
from pipeline.common.batch import ChunkRejection
from pipeline.common.messages import IngestResult
from pipeline.sensor.delivery import (
    CAUSE_NETWORK,
    CAUSE_PARTIAL,
    CAUSE_REFUSED,
    CAUSE_STATUS,
    Action,
    Answered,
    AttemptAnswer,
    ChunkOutcome,
    Delivered,
    Delivery,
    DeliveryPolicy,
    Done,
    FallBackToSingles,
    Quarantined,
    Retry,
    Split,
    quarantine_reason,
)

POLICY = DeliveryPolicy(initial_s=0.5, max_s=30.0, jitter=0.1, retry_after_cap_s=300.0,
                        split_min=8)


@pytest.fixture(autouse=True)
def real_delays() -> Iterator[None]:
    backoff.set_testing(False)
    yield


def stored(sequence: int, *, duplicate: bool = False) -> IngestResult:
    return IngestResult(stored=not duplicate, duplicate=duplicate, sequence=sequence,
                        event_id=f"e{sequence}", sensor_id="s1", event_complete=True,
                        last_committed_sequence=sequence)


def rejected(code: str) -> ChunkRejection:
    return ChunkRejection(code=code, message=f"{code} here")


def single(sequence: int = 7) -> Delivery:
    return Delivery((sequence,), POLICY, batch=False, rng=random.Random(1))


def batch(sequences: range | tuple[int, ...]) -> Delivery:
    return Delivery(tuple(sequences), POLICY, batch=True, rng=random.Random(1))


def of_type(actions: list[Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


# ------------------------------------------------------------------ one chunk per POST


def test_single_2xx_is_delivered_and_done() -> None:
    actions = single().on_answer(AttemptAnswer(200, (stored(7),)))
    assert actions == [Answered((Delivered(7, confirmed=True),), accepted=True), Done()]


def test_single_2xx_without_readable_body_is_delivered_unconfirmed() -> None:
    actions = single().on_answer(AttemptAnswer(200, (None,)))
    assert actions[0] == Answered((Delivered(7, confirmed=False),), accepted=True)


def test_single_permanent_rejection_quarantines_with_reason() -> None:
    delivery = single()
    actions = delivery.on_answer(AttemptAnswer(422, None, error_code="bad_value",
                                               error_message="no"))
    assert actions == [Answered((Quarantined(7, "http_422 bad_value", 422, "bad_value", "no"),),
                                accepted=False), Done()]
    assert delivery.pending == ()


def test_quarantine_reason_without_code() -> None:
    assert quarantine_reason(400, "") == "http_400"


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credential_is_retried_not_quarantined(status: int) -> None:
    delivery = single()
    [retry] = delivery.on_answer(AttemptAnswer(status, None, error_message="bad token"))
    assert isinstance(retry, Retry) and retry.cause == CAUSE_REFUSED
    assert retry.error_message == "bad token" and delivery.pending == (7,)


def test_transient_status_backs_off_exponentially_within_jitter() -> None:
    delivery = single()
    delays = []
    for _ in range(8):
        [retry] = delivery.on_answer(AttemptAnswer(503, None))
        assert retry.cause == CAUSE_STATUS and retry.status == 503
        delays.append(retry.delay)
    bases = [0.5, 1, 2, 4, 8, 16, 30, 30]
    for delay, base in zip(delays, bases):
        assert base * 0.9 <= delay <= base * 1.1
    assert delivery.attempts == 8


def test_retry_after_is_honoured_and_capped() -> None:
    delivery = single()
    [retry] = delivery.on_answer(AttemptAnswer(429, None, retry_after=12.0))
    assert retry.delay == 12.0
    [retry] = delivery.on_answer(AttemptAnswer(429, None, retry_after=10_000.0))
    assert retry.delay == 300.0


def test_network_error_on_a_single_chunk_never_splits() -> None:
    actions = single().on_network_error()
    assert len(actions) == 1 and actions[0].cause == CAUSE_NETWORK


def test_keep_only_drops_chunks_acked_meanwhile() -> None:
    delivery = batch(range(1, 5))
    assert delivery.keep_only({2, 4, 9}) == (2, 4)


# ------------------------------------------------------------------ batches


def test_batch_answer_sorts_each_chunk() -> None:
    delivery = batch((1, 2, 3, 4))
    outcomes: tuple[ChunkOutcome, ...] = (stored(1), rejected("bad_value"),
                                          rejected("throttled"), stored(4, duplicate=True))
    actions = delivery.on_answer(AttemptAnswer(200, outcomes))
    answered, retry = actions
    assert answered == Answered((Delivered(1, True),
                                 Quarantined(2, "http_400 bad_value", 400, "bad_value",
                                             "bad_value here"),
                                 Delivered(4, True)), accepted=True)
    assert isinstance(retry, Retry) and retry.cause == CAUSE_PARTIAL and retry.count == 1
    assert delivery.pending == (3,)


def test_batch_answer_without_outcomes_is_retried_whole() -> None:
    delivery = batch((1, 2))
    [retry] = delivery.on_answer(AttemptAnswer(200, None))
    assert isinstance(retry, Retry) and retry.cause == CAUSE_STATUS and retry.count == 2


def test_batch_refused_for_good_falls_back_to_single_posts() -> None:
    delivery = batch((1, 2, 3))
    actions = delivery.on_answer(AttemptAnswer(413, None, error_code="too_large"))
    assert actions == [FallBackToSingles((1, 2, 3), 413, "too_large"), Done()]
    assert delivery.pending == ()


def test_network_error_halves_a_batch_down_to_its_floor() -> None:
    delivery = batch(range(1, 33))
    sizes = []
    while True:
        actions = delivery.on_network_error()
        splits = of_type(actions, Split)
        if not splits:
            break
        sizes.append(len(delivery.pending))
        assert splits[0].keep == delivery.pending
    assert sizes == [16, 8]
    assert len(delivery.pending) == 8 and of_type(actions, Retry)[0].count == 8


# ------------------------------------------------------------------ properties

outcome_st = st.one_of(
    st.none(),
    st.builds(stored, st.integers(0, 100), duplicate=st.booleans()),
    st.sampled_from([rejected(c) for c in ("bad_value", "conflict", "throttled",
                                           "store_unavailable", "too_large", "unknown")]),
)
attempt_st = st.one_of(
    st.just(None),  # a network failure
    st.builds(AttemptAnswer, st.sampled_from([200, 202, 400, 401, 403, 408, 409, 413, 415,
                                              422, 429, 500, 503]),
              st.none() | st.lists(outcome_st, max_size=40).map(tuple),
              st.none() | st.floats(0, 1e6, allow_nan=False)),
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 40), is_batch=st.booleans(),
       attempts=st.lists(attempt_st, min_size=1, max_size=12), seed=st.integers(0, 2**32))
def test_delays_stay_in_bounds_and_no_chunk_is_dropped_without_a_reason(
        size: int, is_batch: bool, attempts: list[AttemptAnswer | None], seed: int) -> None:
    sequences = tuple(range(100, 100 + (size if is_batch else 1)))
    delivery = Delivery(sequences, POLICY, batch=is_batch, rng=random.Random(seed))
    accounted: set[int] = set()  # delivered, quarantined with a reason, or handed on
    for attempt in attempts:
        before = set(delivery.pending)
        if not before:
            break
        actions = (delivery.on_network_error() if attempt is None
                   else delivery.on_answer(attempt))
        handed_on: set[int] = set()
        for action in actions:
            if isinstance(action, Retry):
                assert 0.0 <= action.delay <= POLICY.max_delay()
                assert action.count == len(delivery.pending)
                if attempt is not None and attempt.retry_after is not None \
                        and action.cause != CAUSE_PARTIAL:
                    assert action.delay >= min(attempt.retry_after, POLICY.retry_after_cap_s)
            elif isinstance(action, Answered):
                for verdict in action.verdicts:
                    if isinstance(verdict, Quarantined):
                        assert verdict.reason.startswith("http_")
                    handed_on.add(verdict.sequence)
            elif isinstance(action, Split):
                assert len(action.keep) >= POLICY.split_min
                handed_on.update(action.rest)
            elif isinstance(action, FallBackToSingles):
                handed_on.update(action.sequences)
        # Every chunk of the attempt is still pending or accounted for, exactly once.
        assert handed_on.isdisjoint(delivery.pending)
        assert handed_on | set(delivery.pending) == before
        assert isinstance(actions[-1], (Retry, Done))
        assert (not delivery.pending) == isinstance(actions[-1], Done)
        accounted |= handed_on
    assert accounted | set(delivery.pending) == set(sequences)
