"""Child process for the queue tests: a second writer on the same SQLite file.

Not a test module (no ``test_`` prefix). Modes:

``crash PATH SEED``   enqueue random events forever until killed; writes ``ready`` once the
                      queue is open and nothing else, so the parent learns what survived
                      only from the file.
``burst PATH SEED N`` enqueue N random events, then write one JSON line per event
                      (event_id, sha256 hex, size) so the parent can check delivery.
"""

from __future__ import annotations

import json
import random
import sys

from pipeline.sensor.queue import DurableQueue

MAX_CRASH_EVENT = 600 * 1024
MAX_BURST_EVENT = 300 * 1024


def _event(rng: random.Random, max_size: int) -> bytes:
    size = rng.randint(1, max_size)
    if rng.random() < 0.5:
        return rng.randbytes(size)
    # Compressible data too, so chunk sizes vary as they do in the field.
    return (rng.randbytes(64) * (size // 64 + 1))[:size]


def _crash(path: str, seed: int) -> None:
    rng = random.Random(seed)
    with DurableQueue(path) as queue:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:
            queue.enqueue(_event(rng, MAX_CRASH_EVENT))


def _burst(path: str, seed: int, count: int) -> None:
    rng = random.Random(seed)
    done = []
    with DurableQueue(path) as queue:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        for _ in range(count):
            result = queue.enqueue(_event(rng, MAX_BURST_EVENT))
            done.append({"event_id": result.event_id, "sha256": result.event_sha256.hex(),
                         "size": result.size})
    for item in done:
        sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    mode, path, seed = argv[0], argv[1], int(argv[2])
    if mode == "crash":
        _crash(path, seed)
    elif mode == "burst":
        _burst(path, seed, int(argv[3]))
    else:
        sys.stderr.write(f"unknown mode {mode}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
