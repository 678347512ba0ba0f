"""Every command docs/reliability.md shows runs as written.

The document shows the long runs behind its figures (minutes to half an hour); this test
runs each one exactly as written with short-run options appended (argparse lets a later
option win), so a renamed program or option breaks the test, not the reader. A command
the table below does not know fails the test until it is given its short-run options.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "reliability.md"

# program prefix -> (argv prefix, options appended for a short run)
SHORT_RUNS: dict[str, tuple[list[str], list[str]]] = {
    "python -m pipeline.sim.legacy_link": (
        [sys.executable, "-m", "pipeline.sim.legacy_link"],
        ["--events", "12", "--timeout", "60", "--checkpoint", "10", "--heartbeat-interval", "2",
         "--ingest-timeout", "2", "--ping-interval", "5", "--window-timeout", "2"]),
    "python -m bench.memory": ([sys.executable, "-m", "bench.memory"], ["--quick"]),
    "pipeline-sim": (
        [sys.executable, "-m", "pipeline.sim"],
        ["--sensors", "1", "--soak", "16s", "--soak-warmup", "4", "--soak-sample-every", "1",
         "--quiet"]),
}


def documented_commands() -> list[str]:
    text = DOC.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_document_shows_commands() -> None:
    assert len(documented_commands()) >= 3


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_runs(command: str, tmp_path: Path) -> None:
    for prefix, run in SHORT_RUNS.items():
        if command.startswith(prefix + " ") or command == prefix:
            argv, short = run
            rest = shlex.split(command[len(prefix):])
            break
    else:
        pytest.fail(f"no short run known for {command!r}: add it to SHORT_RUNS")
    extra = ["--workdir", str(tmp_path / "work")] if "bench.memory" not in command else []
    rest = [str(tmp_path / Path(a).name) if a.endswith(".json") else a for a in rest]
    proc = subprocess.run(argv + rest + short + extra, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
