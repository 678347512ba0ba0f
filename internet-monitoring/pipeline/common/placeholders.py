"""Placeholder credentials: the ``change-me…`` values of the examples.

A deployment that still runs on them is open to anyone who has read the examples, so
both programs warn at start-up when they find one (sans-I/O: the checks return the dotted
keys, the callers log).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

PLACEHOLDER_PREFIX = "change-me"


def is_placeholder(token: str) -> bool:
    """Whether a plain token is an example placeholder (``change-me``, ``change-me-pi-01``)."""
    return token.strip().lower().startswith(PLACEHOLDER_PREFIX)


def _placeholder_digests(sensor_id: str) -> set[str]:
    """Hashes of the placeholders the examples write as ``token_sha256``."""
    names = (PLACEHOLDER_PREFIX, f"{PLACEHOLDER_PREFIX}-{sensor_id}",
             f"{PLACEHOLDER_PREFIX}-{sensor_id}-next")
    return {hashlib.sha256(n.encode("utf-8")).hexdigest() for n in names}


def placeholder_keys(auth: Any, stream_token: str = "") -> list[str]:
    """Dotted keys of the server configuration that hold a placeholder credential."""
    keys: list[str] = []
    for i, sensor in enumerate(auth.sensors):
        digests = _placeholder_digests(sensor.id)
        items: Iterable[tuple[Any, str]] = [(sensor, f"auth.sensors[{i}]")] + [
            (item, f"auth.sensors[{i}].tokens[{j}]") for j, item in enumerate(sensor.tokens)]
        for item, at in items:
            if item.token and is_placeholder(item.token):
                keys.append(f"{at}.token")
            if item.token_sha256 and item.token_sha256.lower() in digests:
                keys.append(f"{at}.token_sha256")
    for name in ("fleet_token", "admin_token"):
        if is_placeholder(getattr(auth, name, "") or ""):
            keys.append(f"auth.{name}")
    if stream_token and is_placeholder(stream_token):
        keys.append("stream.token")
    return keys
