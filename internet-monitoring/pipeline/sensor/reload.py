"""What a SIGHUP reload may change on a running sensor: its credentials only."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

#: Keys a SIGHUP takes over without a restart.
RELOADABLE_KEYS = ("token", "token_file", "control.tls", "ingest.tls")


def credential_only_changes(old: Any, new: Any) -> list[str]:
    """Dotted keys (top level and sections) that differ between two configs, other than
    the reloadable credentials."""
    changed: list[str] = []
    for f in fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if f.name in ("token", "token_file") or before == after:
            continue
        if f.name in ("control", "ingest"):
            changed += [f"{f.name}.{g.name}" for g in fields(before)
                        if g.name != "tls" and getattr(before, g.name) != getattr(after, g.name)]
        else:
            changed.append(f.name)
    return changed
