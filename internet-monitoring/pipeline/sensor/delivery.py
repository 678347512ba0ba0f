"""What to do after one POST attempt of planned chunks, sans-I/O.

``Delivery`` holds the chunks of one send (one chunk, or one batch with capability
``batch``) and turns each attempt's outcome into actions for the agent's send loop:

* the server answered for the chunks (``Answered``): each chunk is ``Delivered`` (the
  server holds it; ``confirmed`` when the answer says stored/duplicate) or ``Quarantined``
  (a permanent rejection, always with its reason); the rest stays pending;
* ``Retry`` after a delay: bounded exponential backoff with jitter
  (``pipeline.common.backoff.Backoff``), at least the server's ``Retry-After`` (capped);
* ``Split``: a batch whose POST failed on the network is halved, down to its floor
  (``BATCH_SPLIT_MIN``): the newer half goes out in a send of its own;
* ``FallBackToSingles``: a batch refused as a whole for good (400/413/415, e.g. a body
  over the server's limit) goes out one POST per chunk, which sorts out each chunk alone.

No I/O, no asyncio, no clock: the agent feeds outcomes and carries out the actions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Container, Protocol, Sequence

from pipeline.common.backoff import Backoff, is_permanent_rejection
from pipeline.common.batch import ChunkRejection
from pipeline.common.messages import IngestResult
from pipeline.sensor.batching import BATCH_SPLIT_MIN, split_in_half

RETRY_AFTER_CAP_S = 300.0
REFUSAL_STATUSES = (401, 403)  # about the credential: the chunk stays queued, retried

#: What the server said about one chunk of an accepted POST (None: the body was unreadable).
ChunkOutcome = IngestResult | ChunkRejection | None


class BackoffSettings(Protocol):
    """A config ``backoff`` section, as far as the delivery policy reads it."""

    @property
    def initial_s(self) -> float: ...
    @property
    def max_s(self) -> float: ...
    @property
    def jitter(self) -> float: ...


@dataclass(frozen=True)
class DeliveryPolicy:
    """Pacing of retries and the floor of batch halving."""

    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.1
    retry_after_cap_s: float = RETRY_AFTER_CAP_S
    split_min: int = BATCH_SPLIT_MIN

    @classmethod
    def from_backoff(cls, backoff: BackoffSettings) -> DeliveryPolicy:
        """From a config ``backoff`` section (``initial_s``, ``max_s``, ``jitter``)."""
        return cls(initial_s=float(backoff.initial_s),
                   max_s=float(backoff.max_s),
                   jitter=float(backoff.jitter))

    def max_delay(self) -> float:
        """No retry waits longer than this."""
        return max(self.max_s * (1.0 + self.jitter), self.retry_after_cap_s)


@dataclass(frozen=True)
class AttemptAnswer:
    """The server's HTTP answer to one attempt.

    ``outcomes``: one per chunk posted, in order (a single POST's parsed body, or a batch
    answer's per-chunk outcomes); None when there is none to read.
    """

    status: int
    outcomes: tuple[ChunkOutcome, ...] | None = None
    retry_after: float | None = None
    error_code: str = ""
    error_message: str = ""


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Delivered:
    """The server holds this chunk; ``confirmed``: its answer says stored or duplicate."""

    sequence: int
    confirmed: bool


@dataclass(frozen=True)
class Quarantined:
    """This chunk will never be accepted: move it aside with ``reason``."""

    sequence: int
    reason: str
    status: int
    code: str
    message: str


Verdict = Delivered | Quarantined


@dataclass(frozen=True)
class Answered:
    """The server answered for these chunks (``accepted``: with a 2xx)."""

    verdicts: tuple[Verdict, ...]
    accepted: bool


#: Why a retry: the POST failed on the network, the server answered a transient status,
#: it refused the credential (401/403), or it answered for some chunks only.
CAUSE_NETWORK = "network"
CAUSE_STATUS = "status"
CAUSE_REFUSED = "refused"
CAUSE_PARTIAL = "partial"


@dataclass(frozen=True)
class Retry:
    """Post the pending chunks again after ``delay`` seconds.

    ``count`` is how many chunks are retried; ``status``, ``error_code`` and
    ``error_message`` describe the answer (status 0 after a network failure).
    """

    delay: float
    attempt: int
    count: int
    cause: str
    status: int = 0
    error_code: str = ""
    error_message: str = ""


@dataclass(frozen=True)
class Split:
    """Go on with ``keep``; ``rest`` goes out in a send of its own."""

    keep: tuple[int, ...]
    rest: tuple[int, ...]


@dataclass(frozen=True)
class FallBackToSingles:
    """The batch was refused as a whole for good: one POST per chunk instead."""

    sequences: tuple[int, ...]
    status: int
    error_code: str


@dataclass(frozen=True)
class Done:
    """Nothing left pending in this send."""


Action = Answered | Retry | Split | FallBackToSingles | Done


def quarantine_reason(status: int, code: str) -> str:
    """The reason stored with a quarantined chunk: ``http_<status>[ <code>]``."""
    return f"http_{status}" + (f" {code}" if code else "")


class Delivery:
    """The retry rules for one send of planned chunks (``batch``: posted together)."""

    def __init__(self, sequences: Sequence[int], policy: DeliveryPolicy, *, batch: bool,
                 rng: random.Random | None = None) -> None:
        self.policy = policy
        self.batch = batch
        self.pending: tuple[int, ...] = tuple(sequences)
        self._backoff = Backoff(policy.initial_s, policy.max_s, policy.jitter, rng)

    @property
    def attempts(self) -> int:
        """Retries scheduled so far."""
        return self._backoff.attempts

    def keep_only(self, in_flight: Container[int]) -> tuple[int, ...]:
        """Drop pending chunks no longer in flight (acked or released meanwhile)."""
        self.pending = tuple(s for s in self.pending if s in in_flight)
        return self.pending

    def on_network_error(self) -> list[Action]:
        """The POST failed before an answer (reset, timeout, refused connection)."""
        delay = self._backoff.next()
        actions: list[Action] = []
        if self.batch and len(self.pending) >= 2 * self.policy.split_min:
            keep, rest = split_in_half(self.pending)
            self.pending = keep
            actions.append(Split(keep, rest))
        actions.append(self._retry(delay, CAUSE_NETWORK))
        return actions

    def on_answer(self, answer: AttemptAnswer) -> list[Action]:
        """The server answered the POST."""
        if self._accepted(answer):
            return self._on_accepted(answer.outcomes or ())
        if is_permanent_rejection(answer.status):
            return self._on_refused_for_good(answer)
        delay = self._backoff.next()
        if answer.retry_after is not None:
            delay = max(delay, min(answer.retry_after, self.policy.retry_after_cap_s))
        cause = CAUSE_REFUSED if answer.status in REFUSAL_STATUSES else CAUSE_STATUS
        return [self._retry(delay, cause, answer)]

    # ------------------------------------------------------------------ internals

    def _accepted(self, answer: AttemptAnswer) -> bool:
        if self.batch:
            return answer.status == 200 and answer.outcomes is not None
        return 200 <= answer.status < 300

    def _on_accepted(self, outcomes: tuple[ChunkOutcome, ...]) -> list[Action]:
        verdicts: list[Verdict] = []
        retry: list[int] = []
        padded = outcomes if self.batch else (outcomes[0] if outcomes else None,)
        for index, sequence in enumerate(self.pending):
            if index >= len(padded):
                retry.append(sequence)  # no word about this chunk: it is posted again
                continue
            outcome = padded[index]
            if isinstance(outcome, ChunkRejection):
                if is_permanent_rejection(outcome.http_status):
                    verdicts.append(Quarantined(
                        sequence, quarantine_reason(outcome.http_status, outcome.code),
                        outcome.http_status, outcome.code, outcome.message))
                else:
                    retry.append(sequence)
                continue
            confirmed = outcome is not None and (outcome.stored or outcome.duplicate)
            verdicts.append(Delivered(sequence, confirmed))
        self.pending = tuple(retry)
        actions: list[Action] = [Answered(tuple(verdicts), accepted=True)]
        if not self.pending:
            return [*actions, Done()]
        return [*actions, self._retry(self._backoff.next(), CAUSE_PARTIAL)]

    def _on_refused_for_good(self, answer: AttemptAnswer) -> list[Action]:
        pending, self.pending = self.pending, ()
        if self.batch:
            return [FallBackToSingles(pending, answer.status, answer.error_code), Done()]
        verdicts = tuple(
            Quarantined(sequence, quarantine_reason(answer.status, answer.error_code),
                        answer.status, answer.error_code, answer.error_message)
            for sequence in pending)
        return [Answered(verdicts, accepted=False), Done()]

    def _retry(self, delay: float, cause: str, answer: AttemptAnswer | None = None) -> Retry:
        if answer is None:
            return Retry(delay, self._backoff.attempts, len(self.pending), cause)
        return Retry(delay, self._backoff.attempts, len(self.pending), cause, answer.status,
                     answer.error_code, answer.error_message)
