"""docs/postgres.md works as written: its ``sh`` blocks run in order with bash (libpq's
``PGHOST``/``PGUSER``/``PGDATABASE`` naming a database of this test's own, dropped after),
its ``yaml`` block is the configuration ``check-config`` validates and a real server
starts with, and what the commands print is checked."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pipeline.common.config import StoreConfig
from pipeline.server.store import open_store
from pipeline.server.store.pg_schema import SCHEMA_VERSION, day_of
from pipeline.sim.processes import ServerProcess
from pipeline.tests.conftest import require_tool
from pipeline.tests.docs_support import REPO, doc_blocks, run_block
from pipeline.tests.pg_support import BASE_DSN, HOST, PORT, USER, require_postgres
from pipeline.tests.store_support import make_chunks

DOC = REPO / "docs" / "postgres.md"

pytestmark = pytest.mark.postgres


def blocks(kind: str) -> list[str]:
    return doc_blocks(DOC, kind)


def drop_database(name: str) -> None:
    with psycopg.connect(BASE_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgres_doc_commands_work_as_written(tmp_path: Path) -> None:
    require_postgres()
    for tool in ("createdb", "psql", "pg_dump", "pg_restore"):
        require_tool(tool)
    name = f"pgdoc_{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "PGHOST": HOST, "PGPORT": str(PORT), "PGUSER": USER,
           "PGDATABASE": name, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    [config_block] = blocks("yaml")
    sh = blocks("sh")
    assert len(sh) == 4, "a new sh block in docs/postgres.md needs its check here"
    store_doc: dict[str, Any] = yaml.safe_load(config_block)["store"]
    (tmp_path / "server.yml").write_text(yaml.safe_dump({"store": store_doc}))
    server = None
    try:
        out = run_block(sh[0], tmp_path, env)  # createdb, check-config
        assert "server.yml: ok" in out
        # A real server on the documented configuration, the DSN's database being ours
        # (the doc's "dbname=pipeline" with libpq's PGDATABASE here).
        server = ServerProcess(tmp_path / "server", {"doc-1": "token-doc-1-" + "x" * 24},
                               extra_config={"store": {**store_doc, "dsn": f"dbname={name}"}})
        server.env = {k: env[k] for k in ("PGHOST", "PGPORT", "PGUSER")}
        server.start()
        dsn = f"host={HOST} port={PORT} user={USER} dbname={name}"
        with open_store(StoreConfig(engine="postgres", dsn=dsn)) as store:
            store.ingest([make_chunks(f"doc {i}".encode(), i, sensor="doc-1")[0]
                          for i in range(1, 4)])
        assert run_block(sh[1], tmp_path, env).strip() == str(SCHEMA_VERSION)
        partitions = run_block(sh[2], tmp_path, env).split()
        assert f"events_d{day_of(time.time()):06d}" in partitions
        assert run_block(sh[3], tmp_path, env).strip().splitlines()[-1] == "3"
        assert (tmp_path / "pipeline.dump").stat().st_size > 0
    finally:
        if server is not None:
            server.terminate()
        drop_database(name)
        drop_database(f"{name}_restore")
