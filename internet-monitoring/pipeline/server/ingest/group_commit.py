"""GroupCommitter: concurrent POSTs share one durable store transaction.

Each request ``await submit(chunks)``; a single writer task takes everything queued at
that moment (up to ``max_batch`` chunks or ``max_batch_bytes``), runs ONE
``store.ingest(batch)`` on a dedicated store thread, and resolves every waiter with its
own outcomes. While a transaction is being fsynced the next batch accumulates, so
throughput grows with concurrency without weakening durability, and the event loop
never blocks on SQLite.

Post-commit work (acks, snapshot cache, stream, metrics) runs in ``on_commit`` from the
writer task, once per batch, in commit order, after ``store.ingest`` returned: it therefore
happens exactly once per commit even when the HTTP client that posted the chunk has gone
away. It runs while the NEXT batch's transaction is in the store thread (or at once when
nothing else is queued), so its CPU work overlaps that transaction's fsync. The hook must
not block (it only queues messages).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from pipeline.common.errors import PipelineError, StorageFull, StoreError
from pipeline.common.messages import Chunk

log = logging.getLogger(__name__)


class IngestStore(Protocol):
    """The part of the store port (``store/port.py``) the committer uses: ``ingest``, and
    ``begin_ingest(chunks, blocking=)`` / ``commit_ingest`` / ``abort_ingest`` to split a
    transaction."""

    def ingest(self, chunks: Sequence[Chunk]) -> list[Any]: ...
    def begin_ingest(self, chunks: Sequence[Chunk], *, blocking: bool = True) -> Any: ...
    def commit_ingest(self, prepared: Any) -> list[Any]: ...
    def abort_ingest(self, prepared: Any) -> None: ...


@dataclass(frozen=True)
class CommitRecord:
    """One committed (or refused) chunk, handed to the post-commit hook."""

    chunk: Chunk
    outcome: Any
    received_at: float


@dataclass
class _Pending:
    chunks: Sequence[Chunk]
    received_at: float
    future: asyncio.Future[list[Any]]


CommitHook = Callable[[list[CommitRecord]], None]


class GroupCommitter:
    def __init__(self, store: IngestStore, *, executor: Executor | None = None,
                 on_commit: CommitHook | None = None, max_batch: int = 512,
                 max_batch_bytes: int = 32 * 1024 * 1024) -> None:
        self._store = store
        self._executor = executor
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0  # transactions run (for tests and logs)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer(),
                                                                name="group-commit")

    async def submit(self, chunks: Sequence[Chunk], *,
                     received_at: float | None = None) -> list[Any]:
        """Commit ``chunks`` durably (sharing a transaction with concurrent callers)."""
        if self._closing or self._task is None:
            raise StoreError("server is shutting down")
        if not chunks:
            return []
        loop = asyncio.get_running_loop()
        pending = _Pending(list(chunks), time.time() if received_at is None else received_at,
                           loop.create_future())
        self._queue.put_nowait(pending)
        return await asyncio.shield(pending.future)

    async def close(self) -> None:
        """Stop accepting, commit everything already queued, stop the writer."""
        self._closing = True
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    # -- the writer ---------------------------------------------------------------------

    async def _writer(self) -> None:
        # The post-commit hook of batch k runs while batch k+1's transaction is in the
        # store thread (its fsync leaves the loop free), or at once when nothing is queued.
        hook: list[CommitRecord] | None = None
        stop = False
        while not stop:
            if hook is not None and self._queue.empty():
                self._run_hook(hook)
                hook = None
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            size = len(first.chunks)
            nbytes = _payload_bytes(first)
            while (size < self._max_batch and nbytes < self._max_batch_bytes
                   and not self._queue.empty()):
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += len(item.chunks)
                nbytes += _payload_bytes(item)
            hook = await self._commit(batch, hook)
        # Anything queued behind the stop marker (there should be none) still commits.
        rest = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                rest.append(item)
        if rest:
            hook = await self._commit(rest, hook)
        if hook is not None:
            self._run_hook(hook)

    async def _commit(self, batch: list[_Pending], previous: list[CommitRecord] | None
                      ) -> list[CommitRecord] | None:
        """Commit ``batch``; run ``previous``'s hook meanwhile. Returns this batch's records
        for its hook (None when the batch failed: nothing was committed)."""
        chunks = [c for p in batch for c in p.chunks]
        loop = asyncio.get_running_loop()
        try:
            running = self._start(loop, chunks)
        except PipelineError as exc:
            # Refused before any statement (a full disk): the store logs that, rate-limited.
            log.log(logging.DEBUG if isinstance(exc, StorageFull) else logging.WARNING,
                    "group_commit_failed chunks=%d error=%s", len(chunks), exc.code)
            self._fail(batch, exc)
            if previous is not None:
                self._run_hook(previous)
            return None
        if previous is not None:
            self._run_hook(previous)
        try:
            outcomes = await running
            if len(outcomes) != len(chunks):
                raise StoreError(f"store answered {len(outcomes)} outcomes for "
                                 f"{len(chunks)} chunks")
        except PipelineError as exc:
            log.warning("group_commit_failed chunks=%d error=%s", len(chunks), exc.code)
            self._fail(batch, exc)
            return None
        except Exception as exc:  # a store bug must not kill the writer for good
            log.exception("group_commit_crashed chunks=%d", len(chunks))
            self._fail(batch, StoreError("store failure"))
            del exc
            return None
        self.batches += 1
        records: list[CommitRecord] = []
        offset = 0
        for pending in batch:
            mine = outcomes[offset:offset + len(pending.chunks)]
            records.extend(CommitRecord(c, o, pending.received_at)
                           for c, o in zip(pending.chunks, mine))
            offset += len(pending.chunks)
            if not pending.future.done():
                pending.future.set_result(list(mine))
        return records

    def _start(self, loop: asyncio.AbstractEventLoop, chunks: list[Chunk]
               ) -> asyncio.Future[list[Any]]:
        """Start the transaction: the statements run here on the loop and only the COMMIT
        (fsync) in the store thread (see ``SQLiteChunkStore.begin_ingest``); a store busy
        with another call ingests entirely in the store thread."""
        prepared = self._store.begin_ingest(chunks, blocking=False)
        if prepared is None:
            return loop.run_in_executor(self._executor, self._store.ingest, chunks)
        try:
            return loop.run_in_executor(self._executor, self._store.commit_ingest, prepared)
        except BaseException:
            self._store.abort_ingest(prepared)
            raise

    def _run_hook(self, records: list[CommitRecord]) -> None:
        if self._on_commit is None:
            return
        try:
            self._on_commit(records)
        except Exception:  # post-commit bugs must not undo the commit
            log.exception("post_commit_hook_failed chunks=%d", len(records))

    @staticmethod
    def _fail(batch: list[_Pending], exc: PipelineError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)


def _payload_bytes(pending: _Pending) -> int:
    return sum(len(c.payload) for c in pending.chunks)
