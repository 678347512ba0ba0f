"""``make bench`` keeps working: the harness runs end to end in its tiny configuration.

Real processes (server, bare handler, load generator, agent, connection client), seconds
of load. Only the shape of the output is checked; benchmark numbers are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tests.pg_support import require_postgres

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.postgres
def test_bench_runs_every_section_and_writes_one_table_and_json(tmp_path: Path) -> None:
    require_postgres()  # the postgres section needs it (fails under CI=true without it)
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    sections = {row["section"] for row in doc["rows"]}
    assert sections == {"ingest", "disk", "flat", "queue", "drain", "conns", "reads",
                        "postgres", "remote_write", "cluster"}
    for row in doc["rows"]:
        assert row["runs"] and all(value > 0 for value in row["runs"]), row["name"]
        assert row["min"] <= row["median"] <= row["max"]
        if row["baseline_runs"]:
            assert row["ratio"] is not None and row["baseline_name"]
    ingest = [row for row in doc["rows"] if row["section"] == "ingest"]
    assert {row["name"].split(",")[0] for row in ingest} == {"JSON 1.0 single-chunk POSTs",
                                                             "Protobuf batches"}
    assert all(row["baseline_name"] == "bare aiohttp handler" for row in ingest)
    postgres = [row for row in doc["rows"] if row["section"] == "postgres"]
    assert len(postgres) == 2
    assert all(row["baseline_name"] == "SQLite store" for row in postgres)
    # One table on stdout, the same one as in the JSON.
    assert doc["table"] in proc.stdout
    assert proc.stdout.count("| Measure ") == 1
