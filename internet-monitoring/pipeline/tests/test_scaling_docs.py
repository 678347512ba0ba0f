"""docs/scaling.md works as written: its ``yaml`` block is the configuration, its ``sh``
blocks run in order with bash (libpq's ``PGHOST``/``PGUSER``/``PGDATABASE`` naming a
database of this test's own, dropped after; the listeners' ports from the documented
environment overrides, so nothing collides with other servers on the machine)."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from pipeline.sim.processes import free_port
from pipeline.tests.conftest import require_tool
from pipeline.tests.docs_support import REPO, doc_blocks, run_block
from pipeline.tests.pg_support import BASE_DSN, HOST, PORT, USER, require_postgres

DOC = REPO / "docs" / "scaling.md"

pytestmark = pytest.mark.postgres


def blocks(kind: str) -> list[str]:
    return doc_blocks(DOC, kind)


def test_scaling_doc_commands_work_as_written(tmp_path: Path) -> None:
    require_postgres()
    require_tool("createdb")
    name = f"scaledoc_{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update({"PGHOST": HOST, "PGPORT": str(PORT), "PGUSER": USER, "PGDATABASE": name,
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    for listener in ("CONTROL", "INGEST", "STREAM"):
        env[f"PIPELINE_SERVER__{listener}__PORT"] = str(free_port())
    [config] = blocks("yaml")
    serve, sim = blocks("sh")
    (tmp_path / "replicas.yml").write_text(config)
    try:
        out = run_block(serve, tmp_path, env, timeout=120)
        assert "replicas.yml: ok" in out
        assert out.strip().splitlines()[-1] == "2"  # two workers joined the cluster
        log = (tmp_path / "server.log").read_text()
        assert log.count("msg=server_stopped") == 2 and "msg=workers_stopped" in log
        # The simulator picks its own ports for its replicas: no listener overrides.
        sim_env = {k: v for k, v in env.items() if not k.startswith("PIPELINE_")}
        out = run_block(sim, tmp_path, sim_env, timeout=300)
        assert "verdict                       PASS" in out, out
        assert re.search(r"kills \(SIGKILL\)\s+sensors 0, server [1-9]", out), out
    finally:
        with psycopg.connect(BASE_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
