"""RequestScheduler: shares the window budget between sensor sessions, sans-I/O.

Each sensor gets at most ``windows_per_sensor`` active windows (times
``batch_windows_factor`` for sensors that POST batches) and the whole server at
most ``global_max_windows``, so a thousand sensors reconnecting after an outage cannot
swamp the store: sensors waiting for budget are served round-robin as windows close.
The control shell calls ``pump`` after anything that may free or want a window and
``tick`` on a timer, and sends the requests it returns.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from pipeline.common.messages import ChunkAck, ChunkRequest
from pipeline.server.control.session import SensorSession, WindowPolicy


@dataclass(frozen=True)
class Outgoing:
    """A body for one sensor: a window request, or a re-ack from a recovery round."""

    sensor_id: str
    request: ChunkRequest | ChunkAck


class RequestScheduler:
    def __init__(self, policy: WindowPolicy | None = None, global_max_windows: int = 1000) -> None:
        self.policy = policy or WindowPolicy()
        self.global_max_windows = global_max_windows
        self.sessions: dict[str, SensorSession] = {}
        self._active: dict[str, int] = {}
        self._active_total = 0
        self._waiting: OrderedDict[str, None] = OrderedDict()

    # -- sessions --------------------------------------------------------------------

    def session(self, sensor_id: str) -> SensorSession:
        found = self.sessions.get(sensor_id)
        if found is None:
            found = SensorSession(sensor_id=sensor_id, policy=self.policy)
            self.sessions[sensor_id] = found
            self._active[sensor_id] = 0
        return found

    def forget(self, sensor_id: str) -> None:
        """Drop a session this process no longer owns (cluster: another replica may)."""
        self.sessions.pop(sensor_id, None)
        self._active_total -= self._active.pop(sensor_id, 0)
        self._waiting.pop(sensor_id, None)

    @property
    def active_total(self) -> int:
        return self._active_total

    # -- budget ----------------------------------------------------------------------

    def pump(self, now: float, touched: Iterable[str] = ()) -> list[Outgoing]:
        """Grant windows to sessions that want one, oldest waiter first."""
        for sensor_id in touched:
            self._refresh(sensor_id)
            if self.sessions[sensor_id].wants_window():
                self._waiting[sensor_id] = None
        out: list[Outgoing] = []
        while self._waiting and self._active_total < self.global_max_windows:
            sensor_id, _ = self._waiting.popitem(last=False)
            session = self.sessions[sensor_id]
            request = session.issue_window(now)
            self._refresh(sensor_id)
            if request is None:
                continue
            out.append(Outgoing(sensor_id, request))
            if session.wants_window():
                self._waiting[sensor_id] = None
        return out

    def tick(self, now: float) -> list[Outgoing]:
        """Run every session's timers, then hand out freed budget."""
        out: list[Outgoing] = []
        total = 0
        for sensor_id, session in self.sessions.items():
            # Only windows and re-acks have timers: idle sessions cost one test each.
            if session.windows or session.ledger.suspects:
                out.extend(Outgoing(sensor_id, r) for r in session.on_tick(now))
                active = session.active_windows()
            else:
                active = 0
            self._active[sensor_id] = active
            total += active
            if session.backlog > 0 and session.connected and session.wants_window():
                self._waiting.setdefault(sensor_id, None)
        self._active_total = total
        out.extend(self.pump(now))
        return out

    def request_sensor(self, sensor_id: str, now: float) -> ChunkRequest | None:
        """Ask a sensor for fresh data now (dashboards), outside its backlog estimate.

        Returns None when the sensor is not connected or already has its windows open."""
        session = self.sessions.get(sensor_id)
        if session is None:
            return None
        request = session.issue_window(now, force=True)
        self._refresh(sensor_id)
        return request

    def _refresh(self, sensor_id: str) -> None:
        count = self.sessions[sensor_id].active_windows()
        self._active_total += count - self._active.get(sensor_id, 0)
        self._active[sensor_id] = count
