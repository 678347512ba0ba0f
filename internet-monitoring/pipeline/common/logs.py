"""Structured logging: key=value lines for people, JSON lines with a flag.

Call sites log ``log.info("event_completed sensor_id=%s event_id=%s", sid, eid)``: the
first word is the event name, the rest are key=value pairs. Extra fields may also be
passed with ``extra={"fields": {...}}``; both formatters render them. Secrets are never
passed to a logger (tokens are reduced to ``token_hint``, the first 8 hex characters of
their SHA-256).

``bind_log_context(sensor_id=...)`` adds fields to every record logged from the current
asyncio task and the tasks and worker threads it starts (a ``ContextVar``): the sensor
agent binds its ``sensor_id`` so that each line says which sensor it is about, even when a
simulator runs many agents in one process. A key already in the message wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any, Mapping, TextIO

_RESERVED = set(vars(logging.makeLogRecord({})))
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("pipeline_log_context",
                                                     default=MappingProxyType({}))


def bind_log_context(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add ``fields`` to the records of this context; undo with ``reset_log_context``."""
    return _CONTEXT.set({**_CONTEXT.get(), **fields})


def reset_log_context(token: Token[Mapping[str, Any]]) -> None:
    _CONTEXT.reset(token)


def token_hint(token: str) -> str:
    """A short, non-reversible tag that lets operators tell tokens apart in logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Bound context fields, then the record's own ``fields``, minus keys the message
    already names."""
    merged = dict(_CONTEXT.get())
    found = getattr(record, "fields", None)
    if isinstance(found, dict):
        merged.update(found)
    if merged:
        message = record.getMessage()
        merged = {k: v for k, v in merged.items()
                  if f" {k}=" not in f" {message}" or k in (found or {})}
    return merged


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={stamp}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={record.getMessage()}"]
        parts.extend(f"{k}={v}" for k, v in _fields(record).items())
        if record.exc_info:
            parts.append("exc=" + json.dumps(self.formatException(record.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": record.created, "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        message = doc["msg"]
        # Lift key=value pairs of the message into fields so JSON consumers can filter.
        for token in message.split(" ")[1:]:
            key, sep, value = token.partition("=")
            if sep and key.isidentifier() and key not in doc:
                doc[key] = value
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "INFO", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Configure the root logger once per process (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pipeline", False):
            root.removeHandler(old)
    handler._pipeline = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
