"""End to end on PostgreSQL with real processes: a ``pipeline-server`` with
``store.engine: postgres`` and real sensor agents; the server is SIGKILLed mid-run and
restarted; the database goes away mid-run (a cuttable TCP relay in front of it) and comes
back; the server refuses to start, naming ``store.dsn``, when there is no database.

Every event must be stored exactly once (checked in the database itself and through the
read API, which answers from PostgreSQL), and every sensor queue must end empty."""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from pipeline.sensor.queue import DurableQueue
from pipeline.sim.processes import ServerProcess, free_port
from pipeline.tests.fleet_support import ProcessFleet
from pipeline.tests.pg_support import CuttableProxy, require_postgres

SENSORS = {f"pg-{i}": f"token-pg-{i}-{'x' * 24}" for i in range(2)}
EVENTS_PER_SENSOR = 150

pytestmark = pytest.mark.postgres


class PgFleet(ProcessFleet):
    def __init__(self, workdir: Path, dsn: str) -> None:
        self.dsn = dsn
        super().__init__(workdir, ServerProcess(workdir / "server", SENSORS, extra_config={
            "store": {"engine": "postgres", "dsn": dsn}}), SENSORS)
        self.rng = random.Random(16)

    def submit_all(self, spread_s: float = 4.0) -> None:
        queues = {sid: DurableQueue(s.queue_path) for sid, s in self.sensors.items()}
        try:
            for index in range(EVENTS_PER_SENSOR):
                for sid, queue in queues.items():
                    size = self.rng.randint(200, 3000) if index % 10 else 40_000
                    data = self.rng.randbytes(size)
                    self.sent[sid][queue.enqueue(data).event_id] = data
                time.sleep(spread_s / EVENTS_PER_SENSOR)
        finally:
            for queue in queues.values():
                queue.close()

    def wait_drained(self, direct_dsn: str) -> None:
        """Until the database holds every event."""
        self.wait_stored(lambda: db_events(direct_dsn))

    def verify(self, direct_dsn: str) -> None:
        with psycopg.connect(direct_dsn) as conn:
            doubled = conn.execute("SELECT sensor_id, event_id FROM events GROUP BY 1, 2"
                                   " HAVING count(*) > 1").fetchall()
        assert doubled == []
        assert db_events(direct_dsn) == sum(len(v) for v in self.sent.values())
        self.verify_read_api()  # the read API answers from PostgreSQL


def db_events(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def fleet(tmp_path: Path, pg_dsn: str) -> Iterator[PgFleet]:
    fleet = PgFleet(tmp_path, pg_dsn)
    fleet.start()
    yield fleet
    fleet.stop()


def test_pg_server_sigkilled_mid_run_loses_and_doubles_nothing(fleet: PgFleet) -> None:
    thread = fleet.submit_in_background()
    for _ in range(2):
        time.sleep(1.5)
        fleet.server.kill()
        time.sleep(0.5)
        fleet.server.start()
    thread.join()
    fleet.wait_drained(fleet.dsn)
    fleet.verify(fleet.dsn)
    assert fleet.server.kills == 2
    snapshots = fleet.server.get_json("/v1/snapshots")
    assert {s["sensor_id"] for s in snapshots["snapshots"]} == set(SENSORS)


def readyz_status(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(server.http_base + "/readyz", timeout=15) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_pg_database_lost_mid_run_then_back_loses_nothing(tmp_path: Path, pg_dsn: str) -> None:
    schema = pg_dsn.split("search_path=")[1].rstrip("'")
    proxy = CuttableProxy()
    fleet = PgFleet(tmp_path, proxy.dsn_for(schema))
    fleet.start()
    try:
        thread = fleet.submit_in_background()
        time.sleep(1.5)
        proxy.cut()
        deadline = time.monotonic() + 30
        status = readyz_status(fleet.server)
        while status != 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            status = readyz_status(fleet.server)
        assert status == 503
        time.sleep(2.0)  # sensors keep trying (and get errors) while the database is away
        proxy.restore()
        thread.join()
        fleet.wait_drained(pg_dsn)
        fleet.verify(pg_dsn)
        assert readyz_status(fleet.server) == 200
        assert "store_unavailable" in fleet.server.log_text() or \
            "unreachable" in fleet.server.log_text()
    finally:
        fleet.stop()
        proxy.close()


def test_pg_server_refuses_to_start_without_its_database(tmp_path: Path) -> None:
    require_postgres()
    dsn = f"host=127.0.0.1 port={free_port()} dbname=test user=postgres connect_timeout=2"
    server = ServerProcess(tmp_path, SENSORS, extra_config={
        "store": {"engine": "postgres", "dsn": dsn}})
    server.start(wait=False)
    assert server.proc is not None
    code = server.proc.wait(timeout=60)
    assert code != 0
    assert "store.dsn: cannot connect to PostgreSQL" in server.log_text()
