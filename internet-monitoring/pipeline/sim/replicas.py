"""N ``pipeline-server`` replicas on one PostgreSQL database behind round-robin balancers.

Looks like one ``ServerProcess`` to the fleet: its ports are the balancers' (control,
ingest), ``kill()`` SIGKILLs one replica (the next in turn) and ``start()`` starts the
replicas that are down. The database is created fresh (``uxi_sim_<hex>`` on the server of
``dsn``) and dropped by ``terminate()``.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any, Mapping

import psycopg
from psycopg import conninfo, sql

from pipeline.sim.balancer import RoundRobinBalancer
from pipeline.sim.processes import ServerProcess, _merge

log = logging.getLogger(__name__)

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_database(dsn: str, prefix: str = "uxi_sim") -> str:
    """A fresh database on ``dsn``'s server; returns its DSN."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return conninfo.make_conninfo(dsn, dbname=name)


def drop_database(dsn: str) -> None:
    name = conninfo.conninfo_to_dict(dsn).get("dbname")
    admin = conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(str(name))))


class ReplicaSet:
    def __init__(self, workdir: Path, sensors: Mapping[str, str], *, replicas: int,
                 dsn: str = DEFAULT_DSN, extra_config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, fresh_database: bool = True) -> None:
        """``fresh_database``: create (and drop) a database on ``dsn``'s server; False:
        use ``dsn`` as it is (tests hand in a schema of their own)."""
        self.workdir = workdir
        self.fresh_database = fresh_database
        self.db_dsn = create_database(dsn) if fresh_database else dsn
        store = {"store": {"engine": "postgres", "dsn": self.db_dsn}}
        config = _merge(dict(extra_config or {}), store)
        self.replicas = [ServerProcess(workdir / f"replica-{i}", sensors, extra_config=config,
                                       name=f"replica-{i}") for i in range(replicas)]
        for replica in self.replicas:
            replica.env = dict(env or {})
        self.control = RoundRobinBalancer(
            "control", [("127.0.0.1", r.control_port) for r in self.replicas])
        self.ingest = RoundRobinBalancer(
            "ingest", [("127.0.0.1", r.ingest_port) for r in self.replicas])
        self._victim = 0
        self.kills = 0
        self._balancing = False
        self.start_balancers()  # the fleet reads their ports at once

    # -- what the fleet reads of a ServerProcess ------------------------------------------

    @property
    def control_port(self) -> int:
        return self.control.port

    @property
    def ingest_port(self) -> int:
        return self.ingest.port

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.ingest.port}"

    @property
    def replica_bases(self) -> list[str]:
        return [r.http_base for r in self.replicas if r.running]

    @property
    def running(self) -> bool:
        return any(r.running for r in self.replicas)

    @property
    def pid(self) -> int | None:
        return next((r.pid for r in self.replicas if r.running), None)

    def start_balancers(self) -> None:
        """Bind the balancers (their ports are the fleet's targets) before anything else."""
        if not self._balancing:
            self.control.start()
            self.ingest.start()
            self._balancing = True

    def start(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Start every replica that is down (the first alone: it creates the schema)."""
        self.start_balancers()
        for replica in self.replicas:
            if not replica.running:
                replica.start(wait=wait, timeout=timeout)
        log.info("replicas_up count=%d", sum(r.running for r in self.replicas))

    def kill(self) -> None:
        """SIGKILL the next replica in turn."""
        victim = self.replicas[self._victim % len(self.replicas)]
        self._victim += 1
        victim.kill()
        self.kills += 1
        log.info("replica_killed name=%s kills=%d", victim.name, self.kills)

    def terminate(self, timeout: float = 15.0) -> int:
        status = 0
        for replica in self.replicas:
            status = status or replica.terminate(timeout)
        if self._balancing:
            self.control.stop()
            self.ingest.stop()
            self._balancing = False
        if self.fresh_database:
            drop_database(self.db_dsn)
        return status

    def log_text(self) -> str:
        return "\n".join(f"== {r.name}\n{r.log_text()}" for r in self.replicas)

    def get_json(self, path: str, token: str | None = None) -> Any:
        return self.replicas[0].get_json(path, token) if self.replicas[0].running \
            else next(r for r in self.replicas if r.running).get_json(path, token)

    def events(self, sensor_id: str) -> list[dict[str, Any]]:
        return next(r for r in self.replicas if r.running).events(sensor_id)
