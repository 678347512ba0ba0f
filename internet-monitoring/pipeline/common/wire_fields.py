"""Readers of JSON wire fields: each checks one field and names it when it refuses it.

Every problem raises a ``ProtocolError`` subclass whose ``field`` is the offending key, so
a sensor or server can say exactly what was wrong with a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Mapping

from pipeline.common.errors import (
    FieldTypeError,
    FieldValueError,
    MissingField,
    PayloadTooLarge,
    ProtocolError,
    UnsupportedSchemaVersion,
)
from pipeline.common.wire_limits import MAX_SEQUENCE, MAX_STRING
from pipeline.version import SUPPORTED_SCHEMA_MAJOR


def check_text(value: str, field_name: str) -> None:
    """Refuse lone surrogates (legal in JSON escapes): they cannot be stored or re-encoded."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FieldValueError(f"field {field_name} is not valid unicode",
                                  field=field_name) from exc


def require(doc: Mapping[str, Any], name: str, prefix: str) -> Any:
    """The value of a field that must be present."""
    if name not in doc:
        raise MissingField(f"missing field {prefix}{name}", field=prefix + name)
    return doc[name]


def read_str(doc: Mapping[str, Any], name: str, prefix: str = "", *,
             max_len: int = MAX_STRING, pattern: re.Pattern[str] | None = None) -> str:
    value = require(doc, name, prefix)
    if not isinstance(value, str):
        raise FieldTypeError(f"field {prefix}{name} must be a string", field=prefix + name)
    if len(value) > max_len:
        raise PayloadTooLarge(f"field {prefix}{name} is longer than {max_len}", field=prefix + name)
    check_text(value, prefix + name)
    if pattern is not None and not pattern.fullmatch(value):
        raise FieldValueError(f"field {prefix}{name} has an invalid value", field=prefix + name)
    return value


def read_int(doc: Mapping[str, Any], name: str, prefix: str = "", *,
             minimum: int = 0, maximum: int = MAX_SEQUENCE) -> int:
    value = require(doc, name, prefix)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldTypeError(f"field {prefix}{name} must be an integer", field=prefix + name)
    if value < minimum or value > maximum:
        raise FieldValueError(
            f"field {prefix}{name} must be between {minimum} and {maximum}", field=prefix + name)
    return value


def read_float(doc: Mapping[str, Any], name: str, prefix: str = "") -> float:
    value = require(doc, name, prefix)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldTypeError(f"field {prefix}{name} must be a number", field=prefix + name)
    try:
        result = float(value)
    except OverflowError as exc:
        raise FieldValueError(f"field {prefix}{name} must be finite", field=prefix + name) from exc
    if result != result or result in (float("inf"), float("-inf")):
        raise FieldValueError(f"field {prefix}{name} must be finite", field=prefix + name)
    return result


def read_bool(doc: Mapping[str, Any], name: str, prefix: str = "") -> bool:
    value = require(doc, name, prefix)
    if not isinstance(value, bool):
        raise FieldTypeError(f"field {prefix}{name} must be a boolean", field=prefix + name)
    return value


def read_b64(doc: Mapping[str, Any], name: str, *, max_bytes: int,
             exact_len: int | None = None) -> bytes:
    text = read_str(doc, name, max_len=(max_bytes * 4) // 3 + 4)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise FieldValueError(f"field {name} is not valid base64", field=name) from exc
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"field {name} is larger than {max_bytes} bytes", field=name)
    if exact_len is not None and len(raw) != exact_len:
        raise FieldValueError(f"field {name} must decode to {exact_len} bytes", field=name)
    return raw


def check_schema_version(value: str, field_name: str = "schema_version") -> str:
    """Same major = compatible; anything else is refused before the rest is read."""
    parts = value.split(".")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        raise FieldValueError(f"field {field_name} is not a semantic version", field=field_name)
    if int(parts[0]) != SUPPORTED_SCHEMA_MAJOR:
        raise UnsupportedSchemaVersion(
            f"schema major {parts[0]} is not supported (this server speaks "
            f"{SUPPORTED_SCHEMA_MAJOR}.x)", field=field_name)
    return value


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def read_capabilities(doc: Mapping[str, Any], name: str = "capabilities") -> tuple[str, ...]:
    value = doc.get(name, [])
    if not isinstance(value, list) or len(value) > 64:
        raise FieldTypeError(f"field {name} must be a list of strings", field=name)
    for item in value:
        if not isinstance(item, str) or len(item) > 64:
            raise FieldTypeError(f"field {name} must be a list of strings", field=name)
        check_text(item, name)
    return tuple(value)


def optional_str(doc: Mapping[str, Any], name: str,
                 pattern: re.Pattern[str] | None = None) -> str | None:
    """The field's text, or None when it is absent or null."""
    if doc.get(name) is None:
        return None
    return read_str(doc, name, pattern=pattern)


def load_json_object(data: bytes | str) -> dict[str, Any]:
    """Parse a body that must be one JSON object."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise FieldTypeError("body must be a JSON object")
    return doc


def dumps(doc: Mapping[str, Any]) -> str:
    """The 1.0 JSON text of a document (separators as the 1.0 format has them)."""
    return json.dumps(doc, separators=(", ", ": "), ensure_ascii=False)
