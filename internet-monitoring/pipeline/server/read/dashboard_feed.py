"""DashboardFeed: the stored results the dashboard needs, kept up to date from the store.

It follows the ``events`` table on the reader's own connection (``EventReader``), so the
ingest path does nothing extra for it: each refresh reads only the events stored since the
last one (the reader's ``FeedMark``: by row id on SQLite; on PostgreSQL by the inserting
transactions a snapshot sees, so rows committed out of row-id order by several servers are
each taken once, see feed_marks.py), and at most ``READ_RATE`` of them per second (a
sample beyond that).
It keeps compact samples of the last two reporting windows (the KPIs compare a window
with the one before) and, per sensor, the latest result of every test type (the page's
per-test cards, so a sensor's DNS card does not turn into its speed card).
The KPI arithmetic itself is ``dashboard_kpis`` (pure).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline.common.config import DashboardConfig
from pipeline.common.errors import ConfigError
from pipeline.server.read.dashboard_kpis import (
    Sample,
    SensorState,
    Thresholds,
    build_payload,
    sample_from_result,
)
from pipeline.server.read.event_pages import ResultRow
from pipeline.server.read.feed_marks import FeedMark, PageKey
from pipeline.server.read.readers import Reader
from pipeline.server.read.snapshot_cache import decode_json_payload, iso_utc

log = logging.getLogger(__name__)

PAGE = 2000
# Test types remembered per sensor: the names come from results, so a sensor sending a
# new name in every result must not grow the server's memory without bound.
MAX_TESTS_PER_SENSOR = 32
READ_RATE = 2000.0      # results decoded per second of wall time, at most (see refresh)
MIN_BUDGET = 2000
MAX_BUDGET = 20_000
FIRST_BUDGET = 200_000
PAYLOAD_REUSE_S = 2.0


@dataclass(frozen=True)
class LatestResult:
    """A sensor's most recent result of one test type."""

    test: str
    event_id: str
    logical_timestamp_ms: int
    completed_at: float
    payload: Any

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, "event_id": self.event_id,
                "logical_timestamp_ms": self.logical_timestamp_ms,
                "completed_at": iso_utc(self.completed_at), "payload_json": self.payload}


class DashboardFeed:
    """Samples and latest-per-test results; ``refresh`` runs in a worker thread."""

    def __init__(self, reader: Reader, config: DashboardConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.reader = reader
        self.config = config
        self.thresholds = Thresholds.from_config(config)
        self.clock = clock
        self._lock = threading.Lock()
        self._samples: collections.deque[Sample] = collections.deque()
        self._latest: dict[str, dict[str, LatestResult]] = {}
        self._mark: FeedMark | None = None
        self._payload: tuple[float, dict[str, Any]] | None = None
        self._refreshed_at = 0.0
        self.sampled = 1.0  # share of the results the last refresh read
        self.events_seen = 0

    # -- following the store ------------------------------------------------------------

    def refresh(self) -> int:
        """Read what was stored since the last refresh; returns how many results were read.

        At most ``READ_RATE`` results per second since the last refresh are decoded (between
        ``MIN_BUDGET`` and ``MAX_BUDGET``; ``FIRST_BUDGET`` at start): under a heavier ingest
        an evenly spread sample is read and each sample counts for the results it stands
        for, so the feed's cost stays flat however fast sensors deliver (bench ``reads``)."""
        with self._lock:
            now = self.clock()
            keep_s = 2 * self.config.reporting_window_s
            budget: float
            if self._mark is None:
                self._mark = FeedMark(self.reader.first_row_completed_since(now - keep_s))
                budget = FIRST_BUDGET
            else:
                budget = min(MAX_BUDGET, max(MIN_BUDGET, READ_RATE * (now - self._refreshed_at)))
            upto = self.reader.feed_mark()
            # About how many rows are new (exact with one writer); a changed snapshot may
            # also bring rows with lower ids committed late, so it is read too.
            pending = upto.row - self._mark.row
            read = 0
            if pending > 0 or upto.snapshot != self._mark.snapshot:
                fraction = min(1.0, budget / max(1, pending))
                self.sampled = fraction
                read = self._read_range(self._mark, upto, fraction)
                self._mark = upto
            self._refreshed_at = now
            self._trim(now - keep_s)
            self.events_seen += read
            return read

    def _read_range(self, since: FeedMark, upto: FeedMark, fraction: float) -> int:
        read = 0
        after: PageKey | None = None
        while True:
            rows, last = self.reader.feed_rows(since, upto, after, PAGE, fraction)
            for row in rows:
                self._take(row, 1.0 / fraction)
            read += len(rows)
            if len(self._samples) > self.config.max_samples:
                self._trim(self.clock() - 2 * self.config.reporting_window_s)
            if last is None:
                return read
            after = last

    def _take(self, row: ResultRow, weight: float) -> None:
        doc = decode_json_payload(row.data)
        sample = sample_from_result(row.sensor_id, row.logical_timestamp_ms, row.completed_at,
                                    doc, weight)
        self._samples.append(sample)
        per_test = self._latest.setdefault(row.sensor_id, {})
        current = per_test.get(sample.test)
        if current is None and len(per_test) >= MAX_TESTS_PER_SENSOR:
            return
        if current is None or row.logical_timestamp_ms >= current.logical_timestamp_ms:
            per_test[sample.test] = LatestResult(sample.test, row.event_id,
                                                 row.logical_timestamp_ms, row.completed_at,
                                                 doc if doc else None)

    def _trim(self, cutoff: float) -> None:
        samples = self._samples
        while samples and (samples[0].received_at < cutoff
                           or len(samples) > self.config.max_samples):
            samples.popleft()

    # -- reading ------------------------------------------------------------------------

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def latest(self, sensor_id: str) -> list[LatestResult]:
        with self._lock:
            per_test = self._latest.get(sensor_id, {})
            return sorted(per_test.values(), key=lambda r: r.test)

    def has_results(self) -> bool:
        with self._lock:
            return bool(self._latest)

    def payload(self, states: Iterable[SensorState], now: float | None = None
                ) -> dict[str, Any]:
        """The UXI payload; one computed less than ``PAYLOAD_REUSE_S`` ago is reused, so
        many pages and the stream asking at once cost one computation (~0.5 s of CPU for
        300,000 samples)."""
        now = self.clock() if now is None else now
        cached = self._payload
        if cached is not None and 0 <= now - cached[0] < PAYLOAD_REUSE_S:
            return cached[1]
        doc = build_payload(now=now, window_s=self.config.reporting_window_s,
                            points=self.config.timeline_points, samples=self.samples(),
                            states=states, thresholds=self.thresholds,
                            labels=self.config.sensors)
        self._payload = (now, doc)
        return doc


def sensor_states(manager: Any, sensor_ids: Iterable[str],
                  last_results: Mapping[str, float]) -> list[SensorState]:
    """The control channel's view of each sensor, as ``dashboard_kpis`` takes it."""
    sessions = manager.scheduler.sessions
    # Replicas: a sensor whose socket another replica holds is connected too.
    claims = getattr(manager, "claims", None)
    out = []
    for sid in sorted(set(sensor_ids)):
        session = sessions.get(sid)
        info = manager.info.get(sid)
        hb = session.last_heartbeat if session is not None else None
        out.append(SensorState(
            sensor_id=sid, connected=manager.is_connected(sid) or (
                claims is not None and claims.held_elsewhere(sid)),
            last_heartbeat_at=session.last_heartbeat_at if session is not None else None,
            disconnected_at=info.disconnected_at if info is not None else None,
            queue_depth=hb.queue_depth if hb is not None else None,
            backlog=session.backlog if session is not None else 0,
            clock_skew_ms=hb.clock_skew_ms if hb is not None else None,
            last_result_at=last_results.get(sid)))
    return out


def load_sample(path: str) -> dict[str, Any]:
    """The ``dashboard.sample_path`` document (served only while no result is stored);
    read at start-up, so a missing or broken file stops the server with the key's name."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dashboard.sample_path: cannot read {path}: {exc}",
                          field="dashboard.sample_path") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"dashboard.sample_path: {path} is not a JSON object",
                          field="dashboard.sample_path")
    return doc
