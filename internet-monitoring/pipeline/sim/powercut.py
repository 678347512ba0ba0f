"""Power-cut campaign: does acknowledged data survive losing every unsynced write?

One cut: a child process works on the sensor queue or the server store, through their
public API, on a ``powerfs`` mount (``sim/powerfs.py``), and prints a line on its stdout
for every write the API acknowledged: an event ``submit`` accepted (queue), an event
deleted after delivery (queue), a chunk the store committed (what the server acks). At a
random moment the child is SIGKILLed, then the power is cut (every file goes back to its
last fsync), the file is reopened and checked:

* queue: every accepted event not yet deleted is queued whole and byte-identical; no
  event is half there; nothing is there that was never submitted;
* store: every acknowledged chunk is in the committed offsets, every event whose chunks
  were all acknowledged is stored and matches its hash;
* both: ``PRAGMA integrity_check`` is ``ok``.

The next cut continues on the same file (ten cuts a file, so a check stays cheap), so
damage would accumulate. With the shipped
``synchronous=FULL`` no cut may lose anything; with ``NORMAL`` the same check finds loss.

    python -m pipeline.sim.powercut --side queue --cuts 500 --report queue.json
    python -m pipeline.sim.powercut --side store --cuts 500 --synchronous NORMAL
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.sim.powerfs import PowerFS

SIDES = ("queue", "store")
SENSOR_ID = "powercut-1"
EPOCH = "powercut-epoch"
QUEUE_RESERVE = 256 * 1024  # small: the reserve file is written through FUSE at open
KILL_AFTER_S = (0.02, 0.35)  # the child is killed this long after it is ready
CUTS_PER_FILE = 10  # then a fresh file: checking a file costs its size, every cut


@dataclass
class CutResult:
    """What one cut found; ``lost`` and ``corrupt`` must stay empty."""

    index: int
    acked: int = 0
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    fs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CampaignReport:
    side: str
    synchronous: str
    cuts: int = 0
    acked: int = 0
    cuts_with_loss: int = 0
    lost: int = 0
    corrupt: int = 0
    duration_s: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.corrupt == 0

    def add(self, cut: CutResult) -> None:
        self.cuts += 1
        self.acked += cut.acked
        self.lost += len(cut.lost)
        self.corrupt += len(cut.corrupt)
        if cut.lost:
            self.cuts_with_loss += 1
        for text in (cut.lost + cut.corrupt)[:3]:
            if len(self.examples) < 10:
                self.examples.append(f"cut {cut.index}: {text}")

    def summary(self) -> str:
        return (f"powercut side={self.side} synchronous={self.synchronous} cuts={self.cuts} "
                f"acked={self.acked} lost={self.lost} cuts_with_loss={self.cuts_with_loss} "
                f"corrupt={self.corrupt} duration_s={self.duration_s:.1f} "
                f"result={'PASS' if self.passed else 'LOSS'}")


# ---------------------------------------------------------------------------------------
# The child: real work through the public API, one stdout line per acknowledged write


def _event_data(rng: random.Random) -> bytes:
    """Mostly small results, one in twenty a multi-chunk event (over the 64 KiB slice).
    Random bytes: gzip cannot shrink them, so every byte goes through the disk."""
    roll = rng.random()
    size = (rng.randint(100, 2_000) if roll < 0.6 else rng.randint(2_000, 12_000)
            if roll < 0.95 else rng.randint(66_000, 140_000))
    return rng.randbytes(size)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # unbuffered: printed == acknowledged


def _child_queue(path: Path, synchronous: str, rng: random.Random) -> None:
    from pipeline.sensor.queue import DurableQueue, EventInput

    queue = DurableQueue(path, synchronous=synchronous, reserve_bytes=QUEUE_RESERVE,
                         slice_size=64 * 1024, verify_on_open=False)
    _say("ready")
    while True:
        roll = rng.random()
        if roll < 0.75:  # submit: announce (S) before, acknowledge (A) after
            items = [(rng.randbytes(16).hex(), _event_data(rng))
                     for _ in range(1 if roll < 0.6 else rng.randint(2, 6))]
            for event_id, data in items:
                _say(f"S {event_id} {hashlib.sha256(data).hexdigest()}")
            if len(items) == 1:
                queue.enqueue(items[0][1], event_id=items[0][0])
            else:
                queue.enqueue_many([EventInput(d, event_id=e) for e, d in items])
            for event_id, _ in items:
                _say(f"A {event_id}")
        else:  # deliver: delete the oldest few events, as the agent does after acks
            chunks = queue.read_window(0, rng.randint(1, 20), 1 << 30)
            by_event: dict[str, list[int]] = {}
            for chunk in chunks:
                by_event.setdefault(chunk.event_id, []).append(chunk.sequence)
            whole = [e for e, seqs in by_event.items()
                     if len(seqs) == next(c.chunk_count for c in chunks if c.event_id == e)]
            if whole:  # announce (X) before: a delete may commit just before the kill
                _say("X " + " ".join(whole))
                queue.delete([s for e in whole for s in by_event[e]])
                for event_id in whole:
                    _say(f"D {event_id}")


def _child_store(path: Path, synchronous: str, rng: random.Random, first_sequence: int
                 ) -> None:
    from pipeline.common.chunking import split_event
    from pipeline.common.messages import Chunk
    from pipeline.common.config import StoreConfig
    from pipeline.server.store import open_store

    mode: Any = synchronous  # StoreConfig checks it is FULL or NORMAL
    store = open_store(StoreConfig(path=str(path), synchronous=mode, reserve_bytes=0))
    _say("ready")
    sequence = first_sequence
    pending: list[Chunk] = []
    while True:
        while len(pending) < rng.randint(1, 12):
            data = _event_data(rng)
            split = split_event(data, slice_size=64 * 1024)
            _say(f"E {split.event_id} {hashlib.sha256(data).hexdigest()} {len(split.pieces)}")
            for piece in split.pieces:
                sequence += 1
                pending.append(Chunk(
                    sensor_id=SENSOR_ID, event_id=split.event_id, sequence=sequence,
                    chunk_index=piece.index, chunk_count=piece.count, payload=piece.payload,
                    chunk_sha256=piece.chunk_sha256, event_sha256=split.event_sha256,
                    created_at="2026-12-05T00:00:00Z", logical_timestamp_ms=sequence,
                    queue_epoch=EPOCH))
        batch, pending = pending, []
        outcomes = store.ingest(batch)
        acked = [str(o.sequence) for o in outcomes if o.stored or o.duplicate]
        if acked:
            _say("K " + " ".join(acked))


def child_main(side: str, path: Path, synchronous: str, seed: int, first_sequence: int) -> None:
    rng = random.Random(seed)
    if side == "queue":
        _child_queue(path, synchronous, rng)
    else:
        _child_store(path, synchronous, rng, first_sequence)


# ---------------------------------------------------------------------------------------
# The parent: kill, cut, verify


class _Expectations:
    """Everything acknowledged so far across the cuts of one campaign."""

    def __init__(self) -> None:
        self.events: dict[str, tuple[str, int]] = {}  # id -> (sha256 hex, chunks)
        self.live: dict[str, str] = {}  # queue: accepted and not deleted -> sha256 hex
        self.deleted: set[str] = set()
        self.deleting: set[str] = set()  # delete announced, not confirmed (last cut)
        self.acked: set[int] = set()  # store: acked sequences
        self.chunk_event: dict[int, str] = {}
        self.next_sequence = 0

    def read(self, side: str, lines: Iterable[str]) -> int:
        """Apply a child's acknowledgement lines; returns how many it acknowledged."""
        count = 0
        sequence = self.next_sequence
        for line in lines:
            parts = line.split()
            if not parts or parts[0] == "ready":
                continue
            if parts[0] == "S":
                self.events[parts[1]] = (parts[2], 0)
            elif parts[0] == "A":
                self.live[parts[1]] = self.events[parts[1]][0]
                count += 1
            elif parts[0] == "X":
                self.deleting.update(parts[1:])
            elif parts[0] == "D":
                self.live.pop(parts[1], None)
                self.deleted.add(parts[1])
            elif parts[0] == "E":
                chunks = int(parts[3])
                self.events[parts[1]] = (parts[2], chunks)
                for _ in range(chunks):
                    sequence += 1
                    self.chunk_event[sequence] = parts[1]
            elif parts[0] == "K":
                for text in parts[1:]:
                    self.acked.add(int(text))
                    count += 1
        self.next_sequence = sequence
        return count


def _integrity(path: Path) -> list[str]:
    conn = sqlite3.connect(str(path))
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()
    return [] if rows == ["ok"] else [f"integrity_check: {'; '.join(rows)[:300]}"]


def _verify_queue(path: Path, expect: _Expectations, result: CutResult) -> None:
    from pipeline.sensor.queue import DurableQueue

    with DurableQueue(path, reserve_bytes=QUEUE_RESERVE, verify_on_open=True) as queue:
        if queue.quarantined_count():
            result.corrupt.append(f"{queue.quarantined_count()} chunks quarantined")
        chunks = queue.read_window(0, 1 << 30, 1 << 62)
    found: dict[str, list[Any]] = {}
    for chunk in chunks:
        found.setdefault(chunk.event_id, []).append(chunk)
    import gzip

    for event_id, parts in found.items():
        if event_id not in expect.events:
            result.corrupt.append(f"event {event_id} was never submitted")
            continue
        parts.sort(key=lambda c: c.chunk_index)
        if len(parts) != parts[0].chunk_count:
            result.corrupt.append(f"event {event_id}: {len(parts)} of {parts[0].chunk_count}"
                                  " chunks queued")
            continue
        data = b"".join(gzip.decompress(c.payload) for c in parts)
        if hashlib.sha256(data).hexdigest() != expect.events[event_id][0]:
            result.corrupt.append(f"event {event_id}: bytes differ")
    for event_id in [e for e in expect.live if e not in found]:
        del expect.live[event_id]  # counted once
        if event_id in expect.deleting:  # its delete committed just before the kill
            expect.deleted.add(event_id)
            continue
        result.lost.append(f"accepted event {event_id} neither delivered nor queued")
    expect.deleting.clear()
    # Submitted, never acknowledged, but queued: the submit committed just before the
    # kill (the caller would not know; a retry would send a second copy).
    for event_id in found:
        if event_id not in expect.live and event_id not in expect.deleted:
            expect.live[event_id] = expect.events[event_id][0] if event_id in expect.events \
                else ""
    # Deleted events that came back are allowed (the server dedupes): deliver them again.
    for event_id in found:
        if event_id in expect.deleted and event_id in expect.events:
            expect.live[event_id] = expect.events[event_id][0]
            expect.deleted.discard(event_id)


def _verify_store(path: Path, expect: _Expectations, result: CutResult) -> None:
    from contextlib import closing

    from pipeline.common.config import StoreConfig
    from pipeline.server.store import open_store

    with closing(open_store(StoreConfig(path=str(path), reserve_bytes=0))) as store:
        tracker = store.tracker(SENSOR_ID, EPOCH)
        for sequence in sorted(expect.acked):
            if not tracker.contains(sequence):
                result.lost.append(f"acked chunk {sequence} not committed")
                expect.acked.discard(sequence)  # counted once
        complete: dict[str, int] = {}
        for sequence in expect.acked:
            event_id = expect.chunk_event[sequence]
            complete[event_id] = complete.get(event_id, 0) + 1
        for event_id, acked in complete.items():
            sha, chunks = expect.events[event_id]
            if acked < chunks:
                continue
            stored = store.get_event(SENSOR_ID, event_id)
            if stored is None:
                result.lost.append(f"acked event {event_id} not stored")
            elif hashlib.sha256(stored.data).hexdigest() != sha:
                result.corrupt.append(f"event {event_id}: bytes differ")


def _run_child(side: str, path: Path, synchronous: str, seed: int, first_sequence: int,
               rng: random.Random) -> list[str]:
    """Start the child, kill it at a random moment; returns every line it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sim.powercut", "--child", "--side", side,
         "--path", str(path), "--synchronous", synchronous, "--seed", str(seed),
         "--first-sequence", str(first_sequence)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = raw.decode(errors="replace").strip()
            lines.append(line)
            if line == "ready":
                ready.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not ready.wait(30):
        proc.kill()
        proc.wait()
        raise RuntimeError("powercut child never got ready: "
                           + proc.stderr.read().decode(errors="replace")[-2000:])
    time.sleep(rng.uniform(*KILL_AFTER_S))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    thread.join(10)
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"powercut child ended by itself ({proc.returncode}): "
                           + proc.stderr.read().decode(errors="replace")[-2000:])
    return lines


def _remove_files(directory: Path) -> None:
    for item in directory.iterdir():
        item.unlink()
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_campaign(side: str, cuts: int, *, synchronous: str = "FULL", seed: int = 1,
                 workdir: Path | None = None, stop_on_loss: bool = False,
                 progress: bool = False) -> CampaignReport:
    """``cuts`` power cuts on one file of ``side``; see the module docstring."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}")
    rng = random.Random(seed)
    report = CampaignReport(side=side, synchronous=synchronous)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="powercut-") as tmp:
        with PowerFS(Path(tmp) / "mnt") as fs:
            for index in range(cuts):
                if index % CUTS_PER_FILE == 0:
                    _remove_files(fs.mountpoint)
                    path = fs.mountpoint / f"{side}-{index // CUTS_PER_FILE}.db"
                    expect = _Expectations()
                lines = _run_child(side, path, synchronous, rng.getrandbits(32),
                                   expect.next_sequence, rng)
                result = CutResult(index=index, acked=expect.read(side, lines))
                result.fs = fs.cut()
                result.corrupt.extend(_integrity(path))
                if side == "queue":
                    _verify_queue(path, expect, result)
                else:
                    _verify_store(path, expect, result)
                report.add(result)
                if progress:
                    print(f"\rcut {index + 1}/{cuts} acked={report.acked} lost={report.lost}"
                          f" corrupt={report.corrupt}", end="", file=sys.stderr, flush=True)
                if stop_on_loss and not report.passed:
                    break
            if progress:
                print(file=sys.stderr)
    report.duration_s = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sim.powercut",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--cuts", type=int, default=50)
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the mount point is made (default: the temp dir)")
    parser.add_argument("--report", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first-sequence", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.side, args.path, args.synchronous, args.seed, args.first_sequence)
        return 0
    if args.cuts < 1:
        parser.error("--cuts must be at least 1")
    report = run_campaign(args.side, args.cuts, synchronous=args.synchronous, seed=args.seed,
                          workdir=args.workdir, progress=True)
    print(report.summary())
    for example in report.examples:
        print("  " + example)
    if args.report is not None:
        args.report.write_text(json.dumps({**asdict(report), "passed": report.passed},
                                          indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
