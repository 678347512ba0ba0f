"""Running a document's fenced blocks as written (the docs tests of postgres.md and
scaling.md): the blocks of one kind, in order, and one ``sh`` block run with bash."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def doc_blocks(doc: Path, kind: str) -> list[str]:
    """The bodies of ``doc``'s fenced blocks tagged ``kind`` (``sh``, ``yaml``), in order."""
    return [body for lang, body in FENCE_RE.findall(doc.read_text()) if lang == kind]


def run_block(block: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``block`` with ``bash -euo pipefail`` in ``cwd``; its stdout. A failure shows
    the block, its output and the tail of ``cwd/server.log`` when a server wrote one."""
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    log = cwd / "server.log"
    tail = log.read_text()[-3000:] if log.exists() else ""
    assert proc.returncode == 0, f"{block}\n{proc.stdout}\n{proc.stderr}\n{tail}"
    return proc.stdout
