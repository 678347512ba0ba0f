"""Tokens minted by rotation: the overlay file next to the configuration.

The configuration (``auth.sensors``) stays the operator's file; the server never rewrites
it. What rotation changes is kept in a small JSON file (``auth.credentials_file``, by
default ``credentials.json`` next to ``store.path``) holding only SHA-256 digests, so the
file, like a ``token_sha256`` configuration, holds nothing a thief could present::

    {"version": 1, "entries": [
      {"sensor_id": "pi-01", "token_sha256": "<hex>", "not_after": null,
       "created_at": 1795755600.0, "reason": "rotation"},
      {"sensor_id": "pi-01", "token_sha256": "<hex of the configured token>",
       "not_after": 1795842000.0, "created_at": 1795755601.0, "reason": "rotated_out"}]}

Merging with the configuration (``merge``), per (sensor, digest):

* a digest the configuration also has: the overlay can only *shorten* its life
  (``not_after`` = the earlier of the two), which is how a rotated-out configured token
  expires after the overlap without anyone editing the configuration;
* a digest only the overlay has: an extra credential (a rotated-in token);
* entries of sensors the configuration no longer lists are ignored: the configuration
  decides which sensors exist.

Pruning never drops the entry capping a configured token (the token would come back to
life); it drops only overlay-only credentials that expired more than ``PRUNE_AFTER_S`` ago.
Writes are atomic (``common.files.atomic_write_text``), mode 0600.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.common.errors import ConfigError
from pipeline.common.files import atomic_write_text
from pipeline.common.messages import SENSOR_ID_RE
from pipeline.server.security.auth import Credential

log = logging.getLogger(__name__)

OVERLAY_VERSION = 1
DEFAULT_FILE_NAME = "credentials.json"
PRUNE_AFTER_S = 7 * 86400.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def overlay_path(config: Any) -> Path:
    """``auth.credentials_file``, or ``credentials.json`` next to ``store.path``."""
    configured = getattr(config.auth, "credentials_file", "")
    if configured:
        return Path(configured)
    return Path(config.store.path).parent / DEFAULT_FILE_NAME


@dataclass(frozen=True)
class OverlayEntry:
    sensor_id: str
    token_sha256: str
    not_after: float | None
    created_at: float
    reason: str = "rotation"

    def to_json(self) -> dict[str, Any]:
        return {"sensor_id": self.sensor_id, "token_sha256": self.token_sha256,
                "not_after": self.not_after, "created_at": self.created_at,
                "reason": self.reason}


def _entry_from_json(doc: Any, where: str) -> OverlayEntry:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected an object", field=where)
    sensor_id = doc.get("sensor_id")
    digest = doc.get("token_sha256")
    not_after = doc.get("not_after")
    created_at = doc.get("created_at", 0.0)
    reason = doc.get("reason", "rotation")
    if not isinstance(sensor_id, str) or not SENSOR_ID_RE.fullmatch(sensor_id):
        raise ConfigError(f"{where}.sensor_id is not a valid sensor id", field=where)
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ConfigError(f"{where}.token_sha256 must be 64 lowercase hex characters",
                          field=where)
    if not_after is not None and (isinstance(not_after, bool)
                                  or not isinstance(not_after, (int, float))):
        raise ConfigError(f"{where}.not_after must be a number or null", field=where)
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
        raise ConfigError(f"{where}.created_at must be a number", field=where)
    return OverlayEntry(sensor_id, digest, None if not_after is None else float(not_after),
                        float(created_at), str(reason)[:32])


class CredentialOverlay:
    """The overlay's entries in memory; ``load`` / ``save`` touch the file."""

    def __init__(self, path: Path, entries: Iterable[OverlayEntry] = ()) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], OverlayEntry] = {
            (e.sensor_id, e.token_sha256): e for e in entries}

    @classmethod
    def load(cls, path: Path) -> CredentialOverlay:
        """A missing file is an empty overlay; an unreadable one is a ``ConfigError``."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read credentials file: {exc}",
                              field="auth.credentials_file") from exc
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: credentials file is not valid JSON",
                              field="auth.credentials_file") from exc
        if not isinstance(doc, dict) or doc.get("version") != OVERLAY_VERSION or \
                not isinstance(doc.get("entries"), list):
            raise ConfigError(f"{path}: not a version {OVERLAY_VERSION} credentials file",
                              field="auth.credentials_file")
        entries = [_entry_from_json(item, f"auth.credentials_file entries[{i}]")
                   for i, item in enumerate(doc["entries"])]
        return cls(path, entries)

    def save(self) -> None:
        doc = {"version": OVERLAY_VERSION,
               "entries": [e.to_json() for e in sorted(
                   self.entries.values(), key=lambda e: (e.sensor_id, e.created_at))]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(doc, indent=1) + "\n")

    # -- changes ------------------------------------------------------------------------

    def add(self, sensor_id: str, token_sha256: str, not_after: float | None, now: float,
            reason: str = "rotation") -> None:
        self.entries[(sensor_id, token_sha256)] = OverlayEntry(
            sensor_id, token_sha256, not_after, now, reason)

    def cap(self, sensor_id: str, token_sha256: str, not_after: float, now: float) -> None:
        """The credential expires at ``not_after`` at the latest (never lengthened)."""
        old = self.entries.get((sensor_id, token_sha256))
        if old is not None and old.not_after is not None and old.not_after <= not_after:
            return
        reason = old.reason if old is not None else "rotated_out"
        created = old.created_at if old is not None else now
        self.entries[(sensor_id, token_sha256)] = OverlayEntry(
            sensor_id, token_sha256, not_after, created, reason)

    def remove(self, sensor_id: str, token_sha256: str) -> bool:
        return self.entries.pop((sensor_id, token_sha256), None) is not None

    def prune(self, configured: Iterable[Credential], now: float) -> int:
        """Drop overlay-only credentials long expired; keep every cap on a configured one."""
        keep = {(c.sensor_id, c.token_sha256) for c in configured}
        gone = [key for key, e in self.entries.items()
                if key not in keep and e.not_after is not None
                and e.not_after < now - PRUNE_AFTER_S]
        for key in gone:
            del self.entries[key]
        return len(gone)

    # -- merge --------------------------------------------------------------------------

    def merge(self, configured: Iterable[Credential]) -> list[Credential]:
        """The configuration's credentials with the overlay applied (see module doc)."""
        merged: dict[tuple[str, str], Credential] = {}
        sensors: set[str] = set()
        for cred in configured:
            merged[(cred.sensor_id, cred.token_sha256)] = cred
            sensors.add(cred.sensor_id)
        for key, entry in self.entries.items():
            if entry.sensor_id not in sensors:
                continue
            base = merged.get(key)
            if base is None:
                merged[key] = Credential(entry.sensor_id, entry.token_sha256, entry.not_after)
            elif entry.not_after is not None:
                until = entry.not_after if base.not_after is None else min(base.not_after,
                                                                           entry.not_after)
                merged[key] = Credential(base.sensor_id, base.token_sha256, until)
        return list(merged.values())
