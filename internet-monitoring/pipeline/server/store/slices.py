"""Decompressed slices of stored chunks kept in memory for their event's completion."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class SliceCache:
    """Decompressed slices of stored chunks whose event is still incomplete, by
    ``chunk_sha256`` (content-addressed, so a rolled-back or replaced row can never be
    served a wrong slice), least recently stored dropped first beyond ``max_bytes``.

    Completing an event then needs no second decompression of the slices that arrived
    recently; a miss just decompresses from the stored payload as before. Identical slices
    of several incomplete events (same content) share one entry, counted, so the first
    event to complete does not take it from the others."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[bytes, list[Any]] = OrderedDict()  # digest -> [data, uses]
        self._bytes = 0

    def put(self, digest: bytes, data: bytes) -> None:
        entry = self._items.get(digest)
        if entry is not None:
            entry[1] += 1
            self._items.move_to_end(digest)
            return
        if len(data) > self._max_bytes:
            return
        self._items[digest] = [data, 1]
        self._bytes += len(data)
        while self._bytes > self._max_bytes:
            _, (dropped, _uses) = self._items.popitem(last=False)
            self._bytes -= len(dropped)

    def pop(self, digest: bytes) -> bytes | None:
        """The slice for one completing event (the entry stays while others use it)."""
        entry = self._items.get(digest)
        if entry is None:
            return None
        data: bytes = entry[0]
        entry[1] -= 1
        if entry[1] <= 0:
            del self._items[digest]
            self._bytes -= len(data)
        return data

    def move_to(self, other: SliceCache) -> None:
        """Hand every entry, with its count, to ``other`` and empty this one."""
        for digest, (data, uses) in self._items.items():
            for _ in range(uses):
                other.put(digest, data)
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

