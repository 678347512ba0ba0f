"""Bounded exponential backoff with jitter, as a pure generator.

Tests switch delays off with ``set_testing(True)`` instead of patching ``sleep``.
``is_retryable`` is kept apart so policy (what to retry) and pacing (how long to wait)
change independently.
"""

from __future__ import annotations

import random
from typing import Iterator

from pipeline.common.errors import (
    AuthError, ConflictError, IntegrityError, PipelineError, ProtocolError, StoreError, Throttled,
)

_TESTING = False


def set_testing(enabled: bool) -> None:
    """Make every delay zero (for tests that exercise retry loops)."""
    global _TESTING
    _TESTING = enabled


def delays(initial: float = 0.5, maximum: float = 30.0, jitter: float = 0.1,
           rng: random.Random | None = None) -> Iterator[float]:
    """Yield ``initial, 2*initial, ...`` capped at ``maximum``, each scaled by 1 +/- jitter."""
    rand = rng or random.Random()
    base = initial
    while True:
        yield 0.0 if _TESTING else base * (1.0 + rand.uniform(-jitter, jitter))
        base = min(base * 2.0, maximum)


class Backoff:
    """Stateful wrapper: ``next()`` gives the next delay, ``reset()`` after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, jitter: float = 0.1,
                 rng: random.Random | None = None) -> None:
        self._args = (initial, maximum, jitter)
        self._rng = rng
        self.attempts = 0
        self._it = delays(initial, maximum, jitter, rng)

    def next(self) -> float:
        self.attempts += 1
        return next(self._it)

    def reset(self) -> None:
        self.attempts = 0
        self._it = delays(*self._args, rng=self._rng)


def is_retryable_status(status: int) -> bool:
    """Transient HTTP answers: throttling, server errors, storage pressure, timeouts."""
    return status in (408, 425, 429) or status >= 500


def is_permanent_rejection(status: int) -> bool:
    """Answers that mean this chunk will never be accepted: quarantine it, don't retry.

    401/403 are *not* permanent for a chunk: they concern the credential, which rotation or
    an operator can fix, so the chunk stays queued.
    """
    return status in (400, 409, 413, 415, 422)


def is_retryable(error: BaseException) -> bool:
    """Whether an error raised while sending may succeed if tried again later."""
    if isinstance(error, (Throttled, StoreError)):
        return True
    if isinstance(error, (ProtocolError, IntegrityError, ConflictError, AuthError)):
        return False
    if isinstance(error, PipelineError):
        return is_retryable_status(error.http_status)
    return isinstance(error, (OSError, TimeoutError, ConnectionError))
