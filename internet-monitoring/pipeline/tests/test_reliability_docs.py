"""Every command docs/reliability-disk.md shows is run here.

The short commands run exactly as written. The campaign commands (500 and 100 cuts, the
figures of the page, minutes each) run with their ``--cuts`` lowered to 3 and everything
else as written: same side, seed, synchronous mode and report file. Their exit status
must be 0 for ``FULL``; a ``NORMAL`` run may or may not meet a loss in three cuts (the
detection itself is asserted in test_power_cut.py), so it must end with a summary line
and status 0 or 1, never a crash.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tests.disk_support import require_fuse

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "reliability-disk.md"


@pytest.fixture
def fuse() -> None:
    require_fuse()


def _commands() -> list[str]:
    text = DOC.read_text()
    blocks = re.findall(r"```\n(.*?)```", text, re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith(".venv/bin/python")]


def test_the_page_shows_the_campaign_commands() -> None:
    commands = _commands()
    assert len(commands) == 6
    assert all("pipeline.sim.powercut" in c for c in commands)
    assert "RESULTS_TABLE" not in DOC.read_text(), "the figures were never filled in"


@pytest.mark.parametrize("command", _commands())
def test_documented_command_runs(fuse: None, command: str, tmp_path: Path) -> None:
    argv = shlex.split(command)
    python = ROOT / ".venv" / "bin" / "python"
    argv[0] = str(python) if python.exists() else sys.executable
    cuts = argv.index("--cuts") + 1
    long_run = int(argv[cuts]) > 5
    if long_run:
        argv[cuts] = "3"
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    summary = [line for line in done.stdout.splitlines() if line.startswith("powercut ")]
    assert summary, done.stdout + done.stderr
    if "NORMAL" in argv:
        assert done.returncode in (0, 1), done.stderr
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "result=PASS" in summary[0]
    if "--report" in argv:
        report = json.loads((tmp_path / argv[argv.index("--report") + 1]).read_text())
        assert report["cuts"] == int(argv[cuts]) and report["passed"] is True
