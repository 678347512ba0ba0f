"""No secret is committed: the repository tree holds no minted token (``oux_...``), no demo
token (``oux_demo_...``) and no private key.

Scans every file git tracks plus untracked files that are not ignored (what the next
``git add`` could pick up). The patterns are assembled from pieces so this file does not
match itself, and they are checked against freshly minted tokens first, so the scan is not
vacuous."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.server.security.auth import DEMO_TOKEN_PREFIX, TOKEN_PREFIX, mint_token

REPO = Path(__file__).resolve().parents[3]
PREFIX = "oux" + "_"
TOKEN_RE = re.compile(re.escape(PREFIX) + r"(?:demo_)?[A-Za-z0-9_-]{20,}")
KEY_RE = re.compile("-----BEGIN " + r"(?:RSA |EC |ENCRYPTED |OPENSSH )?" + "PRIVATE KEY-----")
MAX_BYTES = 5 * 1024 * 1024


def candidate_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def test_the_patterns_catch_real_tokens_and_keys():
    assert TOKEN_PREFIX == PREFIX and DEMO_TOKEN_PREFIX == PREFIX + "demo_"
    assert TOKEN_RE.search(f"token: {mint_token()}\n")
    assert TOKEN_RE.search(f"demo token: {mint_token(DEMO_TOKEN_PREFIX)}")
    assert not TOKEN_RE.search('DEMO_TOKEN_PREFIX = "' + PREFIX + 'demo_"')
    assert KEY_RE.search("-----BEGIN " + "EC PRIVATE KEY-----\nMHc...")


def test_no_token_or_private_key_in_the_repository():
    files = candidate_files()
    assert len(files) > 50, "git ls-files found too little: wrong repository root?"
    found: list[str] = []
    for path in files:
        try:
            if not path.is_file() or path.stat().st_size > MAX_BYTES:
                continue
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        for pattern in (TOKEN_RE, KEY_RE):
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {match.group()[:12]}...")
    assert not found, "secrets in the tree:\n" + "\n".join(found)
