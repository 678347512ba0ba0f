"""``pipeline-server token create SENSOR_ID --add-to server.yml``: write a sensor's new
token into the server configuration, so nobody pastes YAML by hand.

The file is edited round-trip (ruamel.yaml keeps its comments, order and layout), only
the token's SHA-256 goes in (the file never holds the secret), the result is validated as
a whole before it replaces the file, and it replaces it atomically with the file's own
permissions: a failure leaves the old file untouched. A sensor that already has an entry
keeps its real tokens (the new one is added, as during a rotation by hand) but loses the
example placeholders (``change-me…``), which must never stay valid next to a real token.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from pipeline.common.config import load_server_config
from pipeline.common.errors import ConfigError
from pipeline.common.files import atomic_write_text
from pipeline.common.placeholders import is_placeholder
from pipeline.server.security.auth import hash_token

_PLACEHOLDER_HASHES = ("change-me", "change-me-{id}", "change-me-{id}-next")


@dataclass(frozen=True)
class AddedToken:
    """What ``add_sensor_token`` did, for the message to the operator."""

    sensor_id: str
    key: str                      # dotted key of the new digest
    new_entry: bool
    removed_placeholders: tuple[str, ...] = field(default=())


def _yaml() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap long lines (a flow list may end up on one line)
    rt.indent(mapping=2, sequence=4, offset=2)  # the layout of examples/server.yml
    return rt


def _is_placeholder_item(item: Any, sensor_id: str) -> bool:
    token = item.get("token")
    if isinstance(token, str) and is_placeholder(token):
        return True
    digest = item.get("token_sha256")
    return isinstance(digest, str) and digest.lower() in {
        hash_token(p.format(id=sensor_id)) for p in _PLACEHOLDER_HASHES}


def _drop_placeholders(entry: dict[str, Any], at: str, sensor_id: str) -> list[str]:
    removed: list[str] = []
    for name in ("token", "token_sha256"):
        value = entry.get(name)
        if isinstance(value, str) and value and _is_placeholder_item({name: value}, sensor_id):
            del entry[name]
            removed.append(f"{at}.{name}")
    tokens = entry.get("tokens")
    if isinstance(tokens, list):
        for j in reversed(range(len(tokens))):
            if isinstance(tokens[j], dict) and _is_placeholder_item(tokens[j], sensor_id):
                del tokens[j]
                removed.append(f"{at}.tokens[{j}]")
        if not tokens:
            del entry["tokens"]
    return removed


def _sensors_of(doc: dict[str, Any]) -> list[Any]:
    auth = doc.get("auth")
    if auth is None:
        auth = doc["auth"] = CommentedMap()
    if not isinstance(auth, dict):
        raise ConfigError("auth must be a mapping", field="auth")
    sensors = auth.get("sensors")
    if sensors is None:
        sensors = auth["sensors"] = CommentedSeq()
    if not isinstance(sensors, list):
        raise ConfigError("auth.sensors must be a list", field="auth.sensors")
    return sensors


def insert_token(doc: dict[str, Any], sensor_id: str, digest: str) -> AddedToken:
    """Put ``digest`` into ``doc``'s ``auth.sensors`` entry of ``sensor_id`` (sans-I/O)."""
    sensors = _sensors_of(doc)
    for i, entry in enumerate(sensors):
        if isinstance(entry, dict) and entry.get("id") == sensor_id:
            at = f"auth.sensors[{i}]"
            removed = _drop_placeholders(entry, at, sensor_id)
            if not (entry.get("token") or entry.get("token_sha256")):
                entry["token_sha256"] = digest
                return AddedToken(sensor_id, f"{at}.token_sha256", False, tuple(removed))
            tokens = entry.get("tokens")
            if tokens is None:
                tokens = entry["tokens"] = CommentedSeq()
            tokens.append(CommentedMap([("token_sha256", digest)]))
            return AddedToken(sensor_id, f"{at}.tokens[{len(tokens) - 1}].token_sha256",
                              False, tuple(removed))
    sensors.append(CommentedMap([("id", sensor_id), ("token_sha256", digest)]))
    return AddedToken(sensor_id, f"auth.sensors[{len(sensors) - 1}].token_sha256", True)


def add_sensor_token(path: str | os.PathLike[str], sensor_id: str, token: str) -> AddedToken:
    """Add ``token``'s digest for ``sensor_id`` to the server config at ``path``.

    Raises ``ConfigError`` (naming the key) if the file cannot be read, is no valid server
    configuration before or after the edit, or cannot be replaced."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8") if target.exists() else ""
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o600
    except OSError as exc:
        raise ConfigError(f"--add-to {target}: {exc.strerror or exc}", field="--add-to") from exc
    if text.strip():
        _validate(target)  # never build on a file the server would refuse anyway
    rt = _yaml()
    try:
        doc = rt.load(text) if text.strip() else CommentedMap()
    except YAMLError as exc:
        raise ConfigError(f"--add-to {target}: not YAML: {exc}", field="--add-to") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"--add-to {target}: the top level must be a mapping",
                          field="--add-to")
    added = insert_token(doc, sensor_id, hash_token(token))
    out = io.StringIO()
    rt.dump(doc, out)
    candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}.check.yml")
    try:
        atomic_write_text(candidate, out.getvalue(), mode=mode)
        _validate(candidate, shown=target)
        atomic_write_text(target, out.getvalue(), mode=mode)
    except OSError as exc:
        raise ConfigError(f"--add-to {target}: cannot write: {exc.strerror or exc}",
                          field="--add-to") from exc
    finally:
        candidate.unlink(missing_ok=True)
    return added


def _validate(path: Path, shown: Path | None = None) -> None:
    """As the server will load it: with this environment's overrides."""
    try:
        load_server_config(path)
    except ConfigError as exc:
        raise ConfigError(f"--add-to {shown or path}: {exc.message}", field=exc.field) from exc
