"""TEST ONLY -- a deliberately broken pipeline server that acks before it commits.

It exists to prove that ``pipeline-sim`` can fail: run under ``--kill-server-every``, it
must lose events and the simulator must say so and exit non-zero
(``tests/test_sim_cli.py``). Never deploy it.

How it breaks invariant 2 ("the server acks a sequence only after the commit that holds
it is durable"): the store's SQLite connection is wrapped so that ``COMMIT`` is a no-op
until ``PIPELINE_TEST_COMMIT_DELAY_S`` seconds (default 2) have passed since the
transaction began. The store believes each batch is durable and the server answers 200 and
sends ``chunk_ack``; the sensors delete those chunks; a SIGKILL in that interval throws
the open transaction away.

Off by default, and not reachable through configuration: it is a separate module
(``python -m pipeline.sim.broken_server --config server.yml``) that refuses to start unless
the environment holds ``PIPELINE_TEST_ACK_BEFORE_COMMIT=1``. The real server
(``pipeline.server``) has no such switch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

from pipeline.common.config import load_server_config
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.common.logs import setup_logging

log = logging.getLogger(__name__)

ENV_FLAG = "PIPELINE_TEST_ACK_BEFORE_COMMIT"
ENV_DELAY = "PIPELINE_TEST_COMMIT_DELAY_S"
DEFAULT_DELAY_S = 2.0


class _NoRows:
    """What a pretended ``BEGIN``/``COMMIT`` returns in place of a cursor."""

    rowcount = 0
    lastrowid = None

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []


class DeferredCommitConnection:
    """Wraps an ``sqlite3.Connection``: ``COMMIT`` is pretended until ``delay_s`` passed
    since the transaction began; a ``BEGIN`` inside the open transaction joins it."""

    def __init__(self, conn: Any, delay_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self._delay_s = delay_s
        self._clock = clock
        self._open_since: float | None = None
        self.pretended_commits = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        verb = sql.lstrip()[:8].upper()
        if verb.startswith("BEGIN"):
            if self._open_since is not None:
                return _NoRows()
            self._open_since = self._clock()
            return self._conn.execute(sql, params)
        if verb.startswith("COMMIT") and self._open_since is not None:
            if self._clock() - self._open_since < self._delay_s:
                self.pretended_commits += 1
                return _NoRows()
            self._open_since = None
            return self._conn.execute(sql, params)
        if verb.startswith("ROLLBACK"):
            self._open_since = None
        return self._conn.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _delay_from_env() -> float:
    raw = os.environ.get(ENV_DELAY, "")
    try:
        return float(raw) if raw else DEFAULT_DELAY_S
    except ValueError as exc:
        raise ConfigError(f"{ENV_DELAY} must be a number, got {raw!r}", field=ENV_DELAY) from exc


def broken_server_class() -> type:
    from pipeline.server.app import PipelineServer

    class AckBeforeCommitServer(PipelineServer):
        def _open_store(self) -> Any:
            store: Any = super()._open_store()  # the SQLite backend: its connection is wrapped
            store._conn = DeferredCommitConnection(store._conn, _delay_from_env())
            log.warning("TEST_ONLY_BROKEN_SERVER acks_before_commit=true commit_delay_s=%.1f "
                        "path=%s", _delay_from_env(), self.config.store.path)
            return store

    return AckBeforeCommitServer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sim.broken_server",
                                     description="TEST ONLY: a server that acks before commit")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    if os.environ.get(ENV_FLAG) != "1":
        sys.stderr.write(f"refusing to start: this is a deliberately broken test server; set "
                         f"{ENV_FLAG}=1 to run it (never in production)\n")
        return 2
    try:
        config = load_server_config(args.config)
        setup_logging(config.logging.level, config.logging.format)
        server = broken_server_class()(config)
        asyncio.run(server.run_forever())
    except ConfigError as exc:
        sys.stderr.write(f"broken_server: configuration error: {exc.message}\n")
        return 2
    except PipelineError as exc:
        sys.stderr.write(f"broken_server: {exc.code}: {exc.message}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
