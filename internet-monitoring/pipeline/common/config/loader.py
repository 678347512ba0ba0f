"""The generic loader: dataclass fields and the YAML mapping walked together.

An unknown key, a wrong type or a bad value stops start-up with a ``ConfigError`` whose
``field`` is the dotted key; environment overrides (conveniences, then
``PREFIX__SECTION__KEY``) are applied over the file first, and an error in an overridden
value names the variable that set it.
"""

from __future__ import annotations

import difflib
import functools
import math
import types
from dataclasses import MISSING, fields, is_dataclass
from typing import (
    Any,
    Literal,
    Mapping,
    NoReturn,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from pipeline.common.config.checks import dotted_key, fail
from pipeline.common.config.yaml_reader import YamlLoader
from pipeline.common.errors import ConfigError

T = TypeVar("T")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (list, "list"), (tuple, "list"), (Mapping, "mapping")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _expected(tp: Any) -> str:
    origin = get_origin(tp)
    if _is_union(tp):
        return " or ".join(_expected(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_expected(get_args(tp)[0])}"
    if origin is dict or is_dataclass(tp):
        return "mapping"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _hints(cls: type) -> dict[str, Any]:
    key: Any = cls  # (functools.cache types its arguments as Hashable, a class is one)
    return _cached_hints(key)


@functools.cache
def _cached_hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    """A dataclass type: a config section (a plain bool, so ``tp`` stays ``Any``)."""
    return is_dataclass(tp)


def _wrong_type(key: str, tp: Any, value: Any) -> NoReturn:
    fail(key, f"expected {_expected(tp)}, got {_kind(value)}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        return _convert_union(tp, value, key)
    if origin is Literal:
        if not any(type(value) is type(arg) and value == arg for arg in get_args(tp)):
            got = repr(value[:64]) if isinstance(value, str) else _kind(value)
            fail(key, f"expected {_expected(tp)}, got {got}")
        return value
    if _is_section(tp):
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _wrong_type(key, tp, value)
        item_type = get_args(tp)[0]
        items = [_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            _wrong_type(key, tp, value)
        key_type, value_type = get_args(tp)
        return {_convert(key_type, k, key): _convert(value_type, v, f"{key}.{k}")
                for k, v in value.items()}
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    options = get_args(tp)
    if value is None and type(None) in options:
        return None
    real = [arg for arg in options if arg is not type(None)]
    if len(real) == 1:
        inner = real[0]
        if is_dataclass(inner) or get_origin(inner) in (list, tuple, dict, Literal):
            return _convert(inner, value, key)  # its own errors name nested keys
        try:
            return _convert(inner, value, key)
        except ConfigError:
            _wrong_type(key, tp, value)
    for option in real:
        try:
            return _convert(option, value, key)
        except ConfigError:
            continue
    _wrong_type(key, tp, value)


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                fail(key, "number is too large")
            if not math.isfinite(value):
                fail(key, "must be a finite number")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {key} has an unsupported type {tp!r}")
    if not ok:
        _wrong_type(key, tp, value)
    return value


def _build(cls: type[T], doc: Any, at: str) -> T:
    """Build and validate one dataclass from a mapping; ``at`` is its dotted key."""
    if doc is None:
        doc = {}  # an empty section (every sub-key commented out) means all defaults
    if not isinstance(doc, Mapping):
        fail(at, f"expected mapping, got {_kind(doc)}")
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    for name in doc:
        if not isinstance(name, str):
            fail(dotted_key(at, str(name)), "keys must be strings")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            fail(dotted_key(at, name), f"unknown key{hint}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name in doc:
            values[name] = _convert(hints[name], doc[name], dotted_key(at, name))
        elif spec.default is MISSING and spec.default_factory is MISSING:
            fail(dotted_key(at, name), "required key is missing")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(at)
    return obj


def _plain(value: Any) -> Any:
    """A deep copy with plain dicts and lists, so overrides never touch the caller's data."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# Environment overrides


def _is_text(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(arg, str) for arg in get_args(tp))
    if _is_union(tp):
        real = [arg for arg in get_args(tp) if arg is not type(None)]
        return len(real) == 1 and _is_text(real[0])
    return False


def _resolve(cls: type, segments: list[str], env_name: str) -> tuple[str, list[str | int], Any]:
    """Map variable-name segments to (dotted key, path steps, target type)."""
    tp: Any = cls
    dotted = ""
    steps: list[str | int] = []
    for segment in segments:
        real = [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        tp = real[0] if len(real) == 1 else tp
        if _is_section(tp):
            name = segment.lower()
            if not name:
                fail(dotted, f"{env_name} has an empty key segment (a stray '__')")
            if name not in _hints(tp):
                fail(dotted_key(dotted, name), f"unknown key (from {env_name})")
            dotted, tp = dotted_key(dotted, name), _hints(tp)[name]
            steps.append(name)
        elif get_origin(tp) in (list, tuple) and segment.isdigit():
            dotted, tp = f"{dotted}[{int(segment)}]", get_args(tp)[0]
            steps.append(int(segment))
        else:
            fail(dotted, f"cannot set part of this value from {env_name}; set {dotted} as a whole")
    return dotted, steps, tp


def _assign(doc: dict[str, Any], steps: list[str | int], value: Any, env_name: str) -> None:
    node: Any = doc
    where = ""
    for i, step in enumerate(steps):
        if isinstance(step, int):
            if not isinstance(node, list):
                fail(where, f"expected list, got {_kind(node)}")
            where = f"{where}[{step}]"
            if step >= len(node):
                fail(where, f"no such list item to override (from {env_name})")
        else:
            if not isinstance(node, dict):
                fail(where, f"expected mapping, got {_kind(node)}")
            where = dotted_key(where, step)
        if i == len(steps) - 1:
            node[step] = value
            return
        child = node[step] if isinstance(step, int) else node.get(step)
        if child is None:
            child = [] if isinstance(steps[i + 1], int) else {}
            node[step] = child
        node = child


def _apply_env(cls: type, doc: dict[str, Any], env: Mapping[str, str], prefix: str,
               conveniences: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Apply overrides to ``doc`` in place; returns dotted key -> variable name."""
    overrides = [(name, list(path)) for name, path in conveniences.items() if name in env]
    start = prefix + "__"
    overrides += [(name, name[len(start):].split("__"))
                  for name in sorted(env) if name.startswith(start)]
    sources: dict[str, str] = {}
    for env_name, segments in overrides:
        dotted, steps, tp = _resolve(cls, segments, env_name)
        raw = env[env_name]
        if _is_text(tp):
            value: Any = raw
        else:
            try:
                value = yaml.load(raw, Loader=YamlLoader)  # noqa: S506
            except yaml.YAMLError as exc:
                raise ConfigError(f"{dotted}: {env_name} is not a valid YAML value",
                                  field=dotted) from exc
        _assign(doc, steps, value, env_name)
        sources[dotted] = env_name
    return sources


def _source_of(key: str | None, sources: Mapping[str, str]) -> str | None:
    if key is None:
        return None
    best = None
    for dotted, env_name in sources.items():
        if key == dotted or key.startswith((dotted + ".", dotted + "[")):
            if best is None or len(dotted) > len(best[0]):
                best = (dotted, env_name)
    return best[1] if best else None


def load_tree(cls: type[T], doc: Any, env: Mapping[str, str], prefix: str,
          conveniences: Mapping[str, tuple[str, ...]]) -> tuple[T, dict[str, str]]:
    if doc is None:
        doc = {}  # an empty file: defaults and environment only
    if not isinstance(doc, Mapping):
        raise ConfigError(f"configuration: expected a mapping at the top level, got {_kind(doc)}")
    data = _plain(doc)
    sources: dict[str, str] = {}
    try:
        sources = _apply_env(cls, data, env, prefix, conveniences)
        return _build(cls, data, ""), sources
    except ConfigError as exc:
        origin = _source_of(exc.field, sources)
        if origin is None:
            raise
        raise ConfigError(f"{exc.message} (set by {origin})", field=exc.field) from exc
