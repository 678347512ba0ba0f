"""Sensor token authentication, sans-I/O.

Only SHA-256 digests of tokens are kept in memory: plain tokens from the configuration are
hashed on load, ``token_sha256`` entries are taken as they are. A presented token is hashed
and looked up by digest; the match is confirmed with ``hmac.compare_digest``. (The dict
lookup on a SHA-256 digest leaks nothing useful about the token: an attacker cannot steer a
digest's bytes.)

Outcomes of ``authenticate(sensor_id, token, now)``::

    no token / unknown token / expired token          -> Unauthenticated (401, close 1008)
    a live token of another sensor                    -> Forbidden       (403, close 1008)
    the fleet token for a sensor with own credentials -> Forbidden       (403)
    the sensor's own live token                       -> sensor_id
    the fleet token for any other well-formed id      -> sensor_id       (demo deployments)

Tokens never reach a log line: ``token_hint`` reduces them to a short digest prefix.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from pipeline.common.errors import ConfigError, Forbidden, Unauthenticated
from pipeline.common.logs import token_hint
from pipeline.common.messages import SENSOR_ID_RE

log = logging.getLogger(__name__)

TOKEN_PREFIX = "oux_"
DEMO_TOKEN_PREFIX = "oux_demo_"


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token: the only form in which the server keeps credentials."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def mint_token(prefix: str = TOKEN_PREFIX, nbytes: int = 32) -> str:
    """A fresh random token: ``prefix`` + base64url (no padding) of ``nbytes`` random bytes."""
    raw = secrets.token_bytes(nbytes)
    return prefix + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _normalise_digest(value: str, key: str) -> str:
    digest = value.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{key} must be 64 hex characters (SHA-256)", field=key)
    return digest


def _to_epoch(value: Any, key: str) -> float | None:
    """``not_after`` as POSIX seconds; accepts a datetime, an ISO 8601 string or a number."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a timestamp", field=key)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"{key} must be an ISO 8601 timestamp", field=key) from exc
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    raise ConfigError(f"{key} must be a timestamp", field=key)


@dataclass(frozen=True)
class Credential:
    """One accepted token of one sensor, kept as a digest."""

    sensor_id: str
    token_sha256: str
    not_after: float | None = None

    def live(self, now: float) -> bool:
        return self.not_after is None or now <= self.not_after


class TokenAuthenticator:
    def __init__(self, credentials: Iterable[Credential] = (), *,
                 fleet_token_sha256: str | None = None) -> None:
        self._by_digest: dict[str, Credential] = {}
        self._sensors: set[str] = set()
        for cred in credentials:
            other = self._by_digest.get(cred.token_sha256)
            if other is not None and other.sensor_id != cred.sensor_id:
                raise ConfigError(f"the same token is configured for sensors {other.sensor_id} "
                                  f"and {cred.sensor_id}", field="auth.sensors")
            self._by_digest[cred.token_sha256] = cred
            self._sensors.add(cred.sensor_id)
        self._fleet = fleet_token_sha256

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_entries(cls, sensors: Iterable[Any], fleet_token: str | None = None,
                     fleet_token_sha256: str | None = None) -> TokenAuthenticator:
        """Build from ``auth.sensors`` entries (mappings or objects with the same fields):
        ``{id, token?, token_sha256?, tokens?: [{token?, token_sha256?, not_after?}]}``."""
        return cls(credentials_from_entries(sensors),
                   fleet_token_sha256=fleet_digest(fleet_token, fleet_token_sha256))

    @classmethod
    def from_config(cls, config: Any) -> TokenAuthenticator:
        """From a ``ServerConfig`` (``auth.sensors``, ``auth.fleet_token[_sha256]``)."""
        auth = config.auth
        return cls.from_entries(auth.sensors, fleet_token=getattr(auth, "fleet_token", "") or None,
                                fleet_token_sha256=getattr(auth, "fleet_token_sha256", "") or None)

    def replace_with(self, other: TokenAuthenticator) -> None:
        """Take over ``other``'s credentials in place (reload): every holder of this object
        (control manager, ingest context, security gate) sees the new set at once."""
        self._by_digest = dict(other._by_digest)
        self._sensors = set(other._sensors)
        self._fleet = other._fleet

    def credentials(self, sensor_id: str | None = None) -> list[Credential]:
        """The accepted credentials (digests only), all or one sensor's."""
        return [c for c in self._by_digest.values()
                if sensor_id is None or c.sensor_id == sensor_id]

    def identify(self, token: str | None, now: float) -> str | None:
        """The owner of a live token, None for the fleet token; raises Unauthenticated."""
        return self._resolve(None, token, now)

    def still_valid(self, sensor_id: str, token_sha256: str | None, now: float) -> bool:
        """Whether a connection authenticated as ``sensor_id`` with the token of this digest
        may stay open (used after a reload and when a token's ``not_after`` passes)."""
        if not token_sha256:
            return False
        cred = self._by_digest.get(token_sha256)
        if cred is not None:
            return cred.sensor_id == sensor_id and cred.live(now)
        return (self._fleet is not None and hmac.compare_digest(self._fleet, token_sha256)
                and sensor_id not in self._sensors)

    # -- queries ------------------------------------------------------------------------

    @property
    def sensor_ids(self) -> frozenset[str]:
        """Sensors with their own credentials (the fleet token adds no names)."""
        return frozenset(self._sensors)

    @property
    def has_fleet_token(self) -> bool:
        return self._fleet is not None

    def check(self, token: str | None, now: float) -> None:
        """Raise Unauthenticated unless ``token`` is a live credential of some sensor or the
        fleet token (lets a listener refuse strangers before reading their request body)."""
        self._resolve(None, token, now)

    def authenticate(self, sensor_id: str | None, token: str | None, now: float) -> str:
        """The sensor id this token may act as; raises Unauthenticated or Forbidden.

        With ``sensor_id=None`` the token's owner is returned (the fleet token has none)."""
        owner = self._resolve(sensor_id, token, now)
        if owner is None:
            raise Unauthenticated("the fleet token does not name a sensor")
        return owner

    def _resolve(self, sensor_id: str | None, token: str | None, now: float) -> str | None:
        if not token:
            raise Unauthenticated("missing bearer token")
        digest = hash_token(token)
        cred = self._by_digest.get(digest)
        if cred is not None and hmac.compare_digest(cred.token_sha256, digest):
            if not cred.live(now):
                log.info("auth_refused reason=expired sensor_id=%s token=%s",
                         cred.sensor_id, token_hint(token))
                raise Unauthenticated("token expired")
            if sensor_id is None or sensor_id == cred.sensor_id:
                return cred.sensor_id
            log.info("auth_refused reason=other_sensor sensor_id=%s owner=%s token=%s",
                     sensor_id, cred.sensor_id, token_hint(token))
            # The caller holds this token, so naming its owner reveals nothing new and
            # tells an operator which sensor_id (or token) is misconfigured.
            raise Forbidden(f"token belongs to sensor {cred.sensor_id}, not {sensor_id}",
                            field="sensor_id")
        if self._fleet is not None and hmac.compare_digest(self._fleet, digest):
            if sensor_id is None:
                return None
            if not SENSOR_ID_RE.fullmatch(sensor_id):
                raise Unauthenticated("invalid sensor id")
            if sensor_id in self._sensors:
                raise Forbidden(f"sensor {sensor_id} has its own credentials",
                                field="sensor_id")
            return sensor_id
        log.info("auth_refused reason=unknown_token sensor_id=%s token=%s",
                 sensor_id, token_hint(token))
        raise Unauthenticated("unknown token")


def credentials_from_entries(sensors: Iterable[Any]) -> list[Credential]:
    """Digests of every token configured in ``auth.sensors`` entries."""
    creds: list[Credential] = []
    for index, entry in enumerate(sensors):
        sensor_id = _field(entry, "id")
        key = f"auth.sensors[{index}]"
        if not isinstance(sensor_id, str) or not SENSOR_ID_RE.fullmatch(sensor_id):
            raise ConfigError(f"{key}.id is not a valid sensor id", field=f"{key}.id")
        items: list[tuple[Any, str]] = [(entry, key)]
        for j, item in enumerate(_field(entry, "tokens") or ()):
            items.append((item, f"{key}.tokens[{j}]"))
        for item, item_key in items:
            digest = _digest_of(item, item_key)
            if digest is None:
                continue
            creds.append(Credential(sensor_id, digest,
                                    _to_epoch(_field(item, "not_after"),
                                              f"{item_key}.not_after")))
    return creds


def fleet_digest(fleet_token: str | None, fleet_token_sha256: str | None) -> str | None:
    if fleet_token:
        return hash_token(fleet_token)
    if fleet_token_sha256:
        return _normalise_digest(fleet_token_sha256, "auth.fleet_token_sha256")
    return None


def check_bearer(expected_sha256: str, token: str | None) -> bool:
    """Constant-time check of a single shared token (stream / read API)."""
    if not token:
        return False
    return hmac.compare_digest(expected_sha256, hash_token(token))


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def _field(entry: Any, name: str) -> Any:
    if isinstance(entry, dict):
        return entry.get(name)
    return getattr(entry, name, None)


def _digest_of(item: Any, key: str) -> str | None:
    token = _field(item, "token")
    digest = _field(item, "token_sha256")
    if token:
        if not isinstance(token, str):
            raise ConfigError(f"{key}.token must be a string", field=f"{key}.token")
        return hash_token(token)
    if digest:
        if not isinstance(digest, str):
            raise ConfigError(f"{key}.token_sha256 must be a string", field=f"{key}.token_sha256")
        return _normalise_digest(digest, f"{key}.token_sha256")
    return None
