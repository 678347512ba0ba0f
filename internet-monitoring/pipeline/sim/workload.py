"""The simulator's workload: seeded events submitted into each sensor's queue file.

The simulator plays the sensors' test programs: for every sensor a thread enqueues events
into the sensor's ``DurableQueue`` file (its own connection, as ``pipeline-sensor submit``
does) while the agent runs, and records what it wrote: event id, SHA-256 of the exact bytes,
size and the wall-clock time the enqueue committed. That record is the ground truth the
verification report (``pipeline.sim.report``) checks the server against.

Everything but the clock is a function of the seed: event ids, sizes and contents are
drawn from a per-sensor ``random.Random`` (``derive_seed``), so two runs with the same seed
submit byte-identical events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from pipeline.common.errors import ConfigError, PipelineError
from pipeline.demo import TESTS, synthetic_result
from pipeline.sensor.queue import DurableQueue
from pipeline.sim.report import GeneratedEvent

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 16 * 1024 * 1024
SIM_EPOCH_S = 1_795_000_000  # the simulated test programs' clock starts here
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)(?:i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed that depends only on ``seed`` and ``parts`` (stable across runs)."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# ---------------------------------------------------------------------------------------
# Sizes


def _parse_one_size(text: str) -> int:
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(f"event size: expected bytes like 2000, 2k or 1m, got {text!r}",
                          field="event_size")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if not 1 <= value <= MAX_EVENT_BYTES:
        raise ConfigError(f"event size: must be between 1 and {MAX_EVENT_BYTES} bytes, "
                          f"got {text!r}", field="event_size")
    return value


@dataclass(frozen=True)
class SizeSpec:
    """Event sizes drawn uniformly from ``[min_bytes, max_bytes]``."""

    min_bytes: int
    max_bytes: int

    @classmethod
    def parse(cls, text: str) -> SizeSpec:
        """``"2000"``, ``"2k"`` (KiB), ``"1m"`` (MiB) or a range ``"500-64k"``."""
        low, sep, high = text.partition("-")
        low_b = _parse_one_size(low)
        high_b = _parse_one_size(high) if sep else low_b
        if high_b < low_b:
            raise ConfigError(f"event size: range {text!r} ends below its start",
                              field="event_size")
        return cls(low_b, high_b)

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.min_bytes, self.max_bytes)

    @property
    def mean(self) -> float:
        return (self.min_bytes + self.max_bytes) / 2


def make_event(rng: random.Random, sensor_id: str, index: int, size: int) -> bytes:
    """A synthetic test result (JSON, as the sensors' test programs write) of ``size``
    bytes: the result document padded with random hex, so it compresses roughly 2:1."""
    doc = synthetic_result(rng, sensor_id, TESTS[index % len(TESTS)])
    doc["ts"] = SIM_EPOCH_S + 10 * index  # not the wall clock: same seed, same bytes
    doc["index"] = index
    doc["pad"] = ""
    head = json.dumps(doc, separators=(",", ":")).encode()
    missing = size - len(head)
    if missing <= 0:
        return head[:size] if size < len(head) else head
    pad = rng.randbytes((missing + 1) // 2).hex()[:missing]
    return head[:-2] + pad.encode() + head[-2:]  # inside the "pad" string


# ---------------------------------------------------------------------------------------
# The workload


@dataclass(frozen=True)
class WorkloadSpec:
    """``events_per_sensor`` events per sensor, one every ``interval_s`` seconds
    (0 = as fast as the queue takes them)."""

    events_per_sensor: int
    sizes: SizeSpec
    interval_s: float = 0.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.events_per_sensor < 0:
            raise ConfigError("events: must be >= 0", field="events")
        if self.interval_s < 0:
            raise ConfigError("rate: the interval between events must be >= 0", field="rate")

    @classmethod
    def paced(cls, events_per_sensor: int, sizes: SizeSpec, *, rate: float = 0.0,
              duration_s: float = 0.0, seed: int = 1) -> WorkloadSpec:
        """``rate`` events/s per sensor wins; else the events are spread over
        ``duration_s``; with neither they go in as fast as possible."""
        if rate < 0 or duration_s < 0:
            raise ConfigError("rate and duration must be >= 0", field="rate")
        if rate > 0:
            interval = 1.0 / rate
        elif duration_s > 0 and events_per_sensor > 0:
            interval = duration_s / events_per_sensor
        else:
            interval = 0.0
        return cls(events_per_sensor, sizes, interval, seed)

    def event_plan(self, sensor_index: int, sensor_id: str) -> list[tuple[str, bytes]]:
        """The (event_id, bytes) this sensor submits, in order: a pure function of the seed."""
        rng = random.Random(derive_seed(self.seed, "workload", sensor_index))
        plan = []
        for index in range(self.events_per_sensor):
            event_id = rng.randbytes(16).hex()
            plan.append((event_id, make_event(rng, sensor_id, index, self.sizes.draw(rng))))
        return plan


class Workload:
    """Submits a ``WorkloadSpec`` to the given queue files from one thread per sensor."""

    def __init__(self, spec: WorkloadSpec, queues: Mapping[str, Path], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.queue_paths = dict(queues)
        self._clock = clock
        self._records: dict[str, list[GeneratedEvent]] = {sid: [] for sid in queues}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._errors: list[str] = []
        self._lock = threading.Lock()

    @property
    def expected(self) -> int:
        return self.spec.events_per_sensor * len(self.queue_paths)

    def submitted(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._records.values())

    def records(self) -> list[GeneratedEvent]:
        with self._lock:
            return [e for recs in self._records.values() for e in recs]

    @property
    def errors(self) -> Sequence[str]:
        return tuple(self._errors)

    def start(self) -> None:
        started = time.monotonic()
        for index, (sensor_id, path) in enumerate(self.queue_paths.items()):
            thread = threading.Thread(target=self._run_one, args=(index, sensor_id, path, started),
                                      name=f"sim-submit-{sensor_id}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _run_one(self, index: int, sensor_id: str, path: Path, started: float) -> None:
        plan = self.spec.event_plan(index, sensor_id)
        try:
            queue = DurableQueue(path, verify_on_open=False)
        except (PipelineError, OSError) as exc:  # reported in the run, never silent
            self._fail(sensor_id, exc)
            return
        try:
            for i, (event_id, data) in enumerate(plan):
                due = started + i * self.spec.interval_s
                pause = due - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    return
                if self._stop.is_set():
                    return
                written = queue.enqueue(data, event_id=event_id, attributes={"sim": "1"})
                record = GeneratedEvent(sensor_id, written.event_id,
                                        hashlib.sha256(data).hexdigest(), len(data),
                                        self._clock())
                with self._lock:
                    self._records[sensor_id].append(record)
        except (PipelineError, OSError) as exc:  # ends this sensor's workload, reported
            self._fail(sensor_id, exc)
        finally:
            queue.close()

    def _fail(self, sensor_id: str, exc: BaseException) -> None:
        message = f"{sensor_id}: {type(exc).__name__}: {exc}"
        self._errors.append(message)
        log.error("workload_failed sensor_id=%s error=%s", sensor_id, exc)
