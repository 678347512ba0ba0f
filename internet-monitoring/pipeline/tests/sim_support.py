"""Run the real ``pipeline-sim`` CLI (``python -m pipeline.sim``) in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclass
class SimRun:
    code: int
    report: dict[str, Any] | None
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"exit={self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-4000:]}"


def run_sim(args: Sequence[str], tmp_path: Path, *, env: Mapping[str, str] | None = None,
            timeout: float = 240.0) -> SimRun:
    report = tmp_path / "report.json"
    argv = [sys.executable, "-m", "pipeline.sim", *args, "--report", str(report),
            "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    doc = json.loads(report.read_text()) if report.exists() else None
    return SimRun(proc.returncode, doc, proc.stdout, proc.stderr)
