"""How the agent cuts a window into batch POSTs (capability ``batch``), sans-I/O.

A window's planned chunks go out in a few POSTs of at most ``max_chunks`` chunks and
``max_bytes`` compressed payload each (a chunk bigger than ``max_bytes`` travels alone),
oldest first. The agent sends the batches of a window in parallel, bounded by its POST
semaphore (``ingest.max_parallel``).

A batch whose POST fails on the network (reset, timeout) is halved before it is retried,
down to ``BATCH_SPLIT_MIN`` chunks: on a link that cuts long transfers a big batch might
otherwise never get through whole.

``RecentlyDeleted`` remembers sequences the agent already deleted on an HTTP answer
(capability ``http_ack``), so the ``ChunkAck`` the server still sends for them costs no
second queue transaction.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping, Sequence

BATCH_MAX_CHUNKS = 256
BATCH_MAX_BYTES = 1024 * 1024  # payload bytes per POST; well under the 4 MiB body default
BATCH_SPLIT_MIN = 8  # a batch whose POST failed on the network is halved down to this


def split_batches(sequences: Sequence[int], sizes: Mapping[int, int], *,
                  max_chunks: int = BATCH_MAX_CHUNKS, max_bytes: int = BATCH_MAX_BYTES
                  ) -> list[tuple[int, ...]]:
    """Consecutive groups of ``sequences`` within both limits (order kept)."""
    if max_chunks < 1 or max_bytes < 1:
        raise ValueError("batch limits must be positive")
    batches: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for sequence in sequences:
        size = sizes.get(sequence, 0)
        if current and (len(current) >= max_chunks or used + size > max_bytes):
            batches.append(tuple(current))
            current, used = [], 0
        current.append(sequence)
        used += size
    if current:
        batches.append(tuple(current))
    return batches


def split_in_half(sequences: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Oldest half first (it is retried in place; the newer half goes on its own)."""
    middle = (len(sequences) + 1) // 2
    return sequences[:middle], sequences[middle:]


class RecentlyDeleted:
    """A bounded set of sequences (oldest forgotten first)."""

    def __init__(self, capacity: int = 65_536) -> None:
        self._capacity = capacity
        self._order: deque[int] = deque()
        self._members: set[int] = set()

    def add(self, sequences: Iterable[int]) -> None:
        for sequence in sequences:
            if sequence in self._members:
                continue
            self._members.add(sequence)
            self._order.append(sequence)
            if len(self._order) > self._capacity:
                self._members.discard(self._order.popleft())

    def __contains__(self, sequence: object) -> bool:
        return sequence in self._members

    def __len__(self) -> int:
        return len(self._order)
