"""``reads``: server ingest while the dashboard and the read API are read continuously.

The read API and the dashboard read through their own SQLite connection (``EventReader``)
and bounded queries; this section measures what that costs ingest: Protobuf-batch ingest
of 1 KiB chunks with no reader, next to the same load while one reader thread cycles
through ``GET /v1/dashboard``, ``/v1/sensors``, a 500-event page newest first and a series
over every stored result of one sensor (each event decompressed and parsed), paced at
``READS_PER_S`` (an open page polls ``/v1/sensors`` every 5 s and loads a few series when
opened, so 2 reads/s is about ten operators' pages, opened over and over). Runs alternate
which measurement comes first, so the store's growth favours neither.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


READS_PER_S = 2.0


@dataclass
class Reader:
    """One thread reading the read API in a loop until stopped; counts the reads."""

    port: int
    sensor_id: str
    per_s: float = READS_PER_S
    reads: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def paths(self) -> list[str]:
        sid = self.sensor_id
        return ["/v1/dashboard", "/v1/sensors",
                f"/v1/sensors/{sid}/events?order=desc&limit=500",
                f"/v1/sensors/{sid}/series?field=value&since=0&step=2678400"]

    def _run(self) -> None:
        paths = self.paths()
        pause = 1.0 / self.per_s
        while not self._stop.is_set():
            for path in paths:
                if self._stop.wait(pause):
                    return
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                                timeout=30) as answer:
                        answer.read()
                    self.reads += 1
                except (urllib.error.URLError, OSError) as exc:
                    self.errors.append(f"{path}: {exc}")
                    return

    def __enter__(self) -> Reader:
        self._thread = threading.Thread(target=self._run, name="bench-reader", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def measure(work: Path, runs: int, requests: int,
            loadgen: Callable[[int, str], float], server_factory: Callable[[Path], object]
            ) -> tuple[list[float], list[float], list[float]]:
    """(rates with reads, rates without, reads per second) over ``runs`` runs."""
    with_reads: list[float] = []
    without: list[float] = []
    read_rates: list[float] = []
    for run in range(runs):
        server = server_factory(work / f"reads-{run}")
        server.start()  # type: ignore[attr-defined]
        port = server.ingest_port  # type: ignore[attr-defined]
        try:
            loadgen(port, f"warm{run}")  # results to read: sensor warm<run>-000 and others
            order = ("reads", "plain") if run % 2 == 0 else ("plain", "reads")
            for label in order:
                if label == "plain":
                    without.append(loadgen(port, f"p{run}"))
                    continue
                with Reader(port, f"warm{run}-000") as reader:
                    started = time.monotonic()
                    with_reads.append(loadgen(port, f"r{run}"))
                    elapsed = time.monotonic() - started
                if reader.errors:
                    raise RuntimeError(f"read API failed during the bench: {reader.errors[0]}")
                read_rates.append(reader.reads / elapsed if elapsed else 0.0)
        finally:
            server.stop()  # type: ignore[attr-defined]
    return with_reads, without, read_rates
