"""PostgreSQL for tests: the server at 127.0.0.1:5432 (database ``test``, trust auth), a
fresh schema per test (dropped afterwards), and the DSN that points at it.

If nothing answers, ``pg_ctlcluster`` is asked to start the local cluster once. Locally a
missing PostgreSQL skips the test with the reason; under ``CI=true`` it fails it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pytest

from pipeline.tests.conftest import on_ci

HOST = os.environ.get("PIPELINE_TEST_PGHOST", "127.0.0.1")
PORT = int(os.environ.get("PIPELINE_TEST_PGPORT", "5432"))
DATABASE = "test"
USER = os.environ.get("PIPELINE_TEST_PGUSER", "postgres")
BASE_DSN = f"host={HOST} port={PORT} dbname={DATABASE} user={USER} connect_timeout=5"

_started: list[bool] = []


def _reachable() -> str | None:
    """None when the server answers, else why not."""
    try:
        with psycopg.connect(BASE_DSN, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


def _try_start() -> None:
    """``pg_ctlcluster <version> main start`` for the cluster /etc/postgresql holds."""
    if _started:
        return
    _started.append(True)
    versions = sorted(p.name for p in Path("/etc/postgresql").glob("*")) \
        if Path("/etc/postgresql").is_dir() else []
    for version in versions:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main",
                        "start"], capture_output=True, timeout=60, check=False)


def require_postgres() -> None:
    """Skip (locally) or fail (CI) unless PostgreSQL answers at HOST:PORT."""
    why = _reachable()
    if why is not None:
        _try_start()
        why = _reachable()
    if why is None:
        return
    message = f"needs PostgreSQL at {HOST}:{PORT} database {DATABASE} ({why})"
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


def dsn_for(schema: str) -> str:
    """A DSN whose connections work in ``schema`` (search_path)."""
    return f"{BASE_DSN} options='-c search_path={schema}'"


def create_schema(prefix: str = "t") -> str:
    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(BASE_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema


def drop_schema(schema: str) -> None:
    with psycopg.connect(BASE_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def fresh_dsn(prefix: str = "t") -> tuple[str, str]:
    """(dsn, schema) of a new empty schema; the caller drops it with ``drop_schema``."""
    require_postgres()
    schema = create_schema(prefix)
    return dsn_for(schema), schema


class CuttableProxy:
    """A TCP relay on a free loopback port to PostgreSQL that a test can cut (every open
    connection closed, new ones refused) and restore: "the database went away" without
    touching the PostgreSQL other developers share."""

    def __init__(self, target: tuple[str, int] = (HOST, PORT)) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    def dsn_for(self, schema: str) -> str:
        return (f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={USER}"
                f" connect_timeout=2 options='-c search_path={schema}'")

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
