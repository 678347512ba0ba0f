"""Checks of a loaded configuration against the host it runs on, and ``check-config``.

The loader in ``common/config/`` checks values; this module checks what only the host can
answer and what an operator's deployment tool needs:

* TLS files: a listener (or sensor connection) with ``tls.enabled`` must name files that
  exist and can be read, or start-up stops naming the key and the path. Paths of a
  disabled listener are not looked at: the platform's playbook renders them even when it
  wrote no file.
* Ignored keys: keys the platform's playbook renders that this pipeline does not use
  (fields marked ``ignored_field``) are reported once per process, not at every reload.
* ``check-config FILE``: load and check without starting anything; exit 0, or exit 2 with
  the dotted key and the fix. Ansible runs it as ``validate:`` on the rendered temp file;
  ``--tls-dir`` says where the files the config names under ``/tls/`` (the containers' and
  units' mount point) are on the host doing the check.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, TextIO

from pipeline.common.config import IGNORED, _read_yaml_file
from pipeline.common.errors import ConfigError

log = logging.getLogger(__name__)

#: Where containers and systemd units mount the TLS directory; the rendered configs name it.
TLS_MOUNT = PurePosixPath("/tls")
EXIT_OK = 0
EXIT_CONFIG = 2
#: The file keys of a server listener's and of a sensor connection's ``tls`` section.
_SERVER_TLS_KEYS = ("cert", "key", "client_ca")
_SENSOR_TLS_KEYS = ("ca_cert", "cert", "key")

_reported: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class TlsFile:
    """One TLS path a config names under an enabled ``tls`` section."""

    key: str
    path: str


def tls_files(config: Any) -> list[TlsFile]:
    """Files that must exist: every non-empty TLS path of an enabled ``tls`` section."""
    found: list[TlsFile] = []
    for at, section in _sections(config, ""):
        tls = getattr(section, "tls", None)
        if tls is None or not getattr(tls, "enabled", False):
            continue
        names = _SERVER_TLS_KEYS if hasattr(tls, "client_ca") else _SENSOR_TLS_KEYS
        for name in names:
            value = getattr(tls, name)
            if value:
                found.append(TlsFile(f"{at}.tls.{name}", value))
    return found


def _sections(node: Any, at: str) -> Iterator[tuple[str, Any]]:
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            key = f"{at}.{f.name}" if at else f.name
            yield key, value
            yield from _sections(value, key)


def host_path(path: str, tls_dir: str | None) -> Path:
    """Where ``path`` is on this host: paths under ``/tls/`` move to ``tls_dir`` if given."""
    pure = PurePosixPath(path)
    if tls_dir and pure.is_relative_to(TLS_MOUNT):
        return Path(tls_dir, *pure.relative_to(TLS_MOUNT).parts)
    return Path(path)


def check_tls_files(config: Any, tls_dir: str | None = None) -> None:
    """Raise ``ConfigError`` naming the first enabled TLS file that cannot be read."""
    for item in tls_files(config):
        where = host_path(item.path, tls_dir)
        try:
            with open(where, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            shown = item.path if str(where) == item.path else f"{item.path} (checked at {where})"
            raise ConfigError(
                f"{item.key}: TLS is enabled but {shown} cannot be read ({reason}); write the "
                "file, or set tls.enabled to false", field=item.key) from exc


def ignored_keys(cls: type, doc: Any, at: str = "") -> list[tuple[str, str]]:
    """Dotted keys present in ``doc`` whose field is marked ignored, with the reason."""
    found: list[tuple[str, str]] = []
    if not isinstance(doc, Mapping):
        return found
    for f in fields(cls):
        if f.name not in doc:
            continue
        key = f"{at}.{f.name}" if at else f.name
        if IGNORED in f.metadata:
            found.append((key, f.metadata[IGNORED]))
        elif isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            found.extend(ignored_keys(f.default_factory, doc[f.name], key))
    return found


def report_ignored(cls: type, doc: Any, program: str) -> list[str]:
    """Log each ignored key once per process (a reload does not repeat it)."""
    keys = []
    for key, reason in ignored_keys(cls, doc):
        keys.append(key)
        if (program, key) not in _reported:
            _reported.add((program, key))
            log.info("config_key_ignored program=%s key=%s reason=%r", program, key, reason)
    return keys


def read_document(path: str | Path) -> Any:
    """The YAML document of a config file (errors as ``ConfigError``)."""
    return _read_yaml_file(path)


def check_config_command(path: str, tls_dir: str | None, out: TextIO, err: TextIO,
                         program: str, loader: Callable[[str, Mapping[str, str]], Any],
                         config_cls: type) -> int:
    """``check-config FILE``: 0 and one ``ok`` line, or 2 and the problem and its fix."""
    try:
        config = loader(path, os.environ)
        check_tls_files(config, tls_dir)
        ignored = [key for key, _ in ignored_keys(config_cls, read_document(path))]
    except ConfigError as exc:
        err.write(f"{program}: {path}: {exc.message}\n")
        return EXIT_CONFIG
    note = f" (ignored: {', '.join(ignored)})" if ignored else ""
    out.write(f"{program}: {path}: ok{note}\n")
    return EXIT_OK


__all__ = ["TLS_MOUNT", "TlsFile", "check_config_command", "check_tls_files", "host_path",
           "ignored_keys", "read_document", "report_ignored", "tls_files"]
