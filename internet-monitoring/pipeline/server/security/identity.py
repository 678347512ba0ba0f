"""Sensor identity from a client certificate, sans-I/O.

With ``tls.client_ca`` set on a listener, the TLS layer has already checked the chain, the
validity period and the key; what is left is *which sensor* the certificate speaks for.
This module answers that from the ``getpeercert()`` dictionary alone, so it is tested
without sockets.

A certificate names sensors through its subjectAltName entries, in this order of trust::

    URI  urn:openuxi:sensor:<sensor_id>                -> <sensor_id>
    URI  spiffe://<trust domain>/sensor/<sensor_id>    -> <sensor_id>
    DNS  <sensor_id>                                   -> <sensor_id>   (no dns_suffix set)
    DNS  <sensor_id><dns_suffix>                       -> <sensor_id>   (dns_suffix set, e.g.
                                                                          ".sensors.example")
    CN   <sensor_id>     only with cn_fallback=True AND no subjectAltName entry at all

Every entry maps to exactly one identity (no "first label" guessing: a certificate for
``a.b`` must not also pass as sensor ``a``). When ``dns_suffix`` is set, DNS names without
it are ignored. The CN is a fallback for old PKIs only: RFC 6125 deprecates it, and
ignoring it whenever a SAN exists stops a CA that puts a host name in the SAN and a
free-form CN from minting a second identity by accident.

``bind_identity(claimed, peercert, policy)`` is the one check the listeners call: the
sensor id a request claims (``X-Sensor-ID``, a chunk's ``sensor_id``, an envelope's
``sensor_id``) must be one the certificate names, else ``Forbidden`` (403 / close 1008).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pipeline.common.errors import Forbidden
from pipeline.common.messages import SENSOR_ID_RE

URN_PREFIX = "urn:openuxi:sensor:"
SPIFFE_SCHEME = "spiffe://"
SPIFFE_SENSOR_SEGMENT = "sensor"


@dataclass(frozen=True)
class IdentityPolicy:
    """How certificate names map to sensor ids (``auth.client_cert_*`` keys)."""

    dns_suffix: str = ""
    cn_fallback: bool = False


def _uri_identity(uri: str) -> str | None:
    if uri.startswith(URN_PREFIX):
        candidate = uri[len(URN_PREFIX):]
    elif uri.lower().startswith(SPIFFE_SCHEME):
        rest = uri[len(SPIFFE_SCHEME):]
        _, _, path = rest.partition("/")
        segments = path.split("/")
        if len(segments) != 2 or segments[0] != SPIFFE_SENSOR_SEGMENT:
            return None
        candidate = segments[1]
    else:
        return None
    return candidate if SENSOR_ID_RE.fullmatch(candidate) else None


def _dns_identity(name: str, suffix: str) -> str | None:
    if suffix:
        if not name.lower().endswith(suffix.lower()) or len(name) == len(suffix):
            return None
        name = name[: len(name) - len(suffix)]
    return name if SENSOR_ID_RE.fullmatch(name) else None


def _subject_common_names(peercert: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for rdn in peercert.get("subject", ()) or ():
        for attribute in rdn:
            if len(attribute) == 2 and attribute[0] == "commonName" and \
                    isinstance(attribute[1], str):
                names.append(attribute[1])
    return names


def _san_entries(peercert: Mapping[str, Any]) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    for entry in peercert.get("subjectAltName", ()) or ():
        if len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], str):
            entries.append((entry[0], entry[1]))
    return entries


def certificate_identities(peercert: Mapping[str, Any] | None,
                           policy: IdentityPolicy = IdentityPolicy()) -> frozenset[str]:
    """Every sensor id the certificate names (empty without a certificate)."""
    if not peercert:
        return frozenset()
    found: set[str] = set()
    sans = _san_entries(peercert)
    for kind, value in sans:
        identity: str | None = None
        if kind == "URI":
            identity = _uri_identity(value)
        elif kind == "DNS":
            identity = _dns_identity(value, policy.dns_suffix)
        if identity is not None:
            found.add(identity)
    if not sans and policy.cn_fallback:
        for cn in _subject_common_names(peercert):
            identity = _dns_identity(cn, policy.dns_suffix)
            if identity is not None:
                found.add(identity)
    return frozenset(found)


def bind_identity(claimed: str, peercert: Mapping[str, Any] | None,
                  policy: IdentityPolicy = IdentityPolicy(), *,
                  field: str = "sensor_id") -> str:
    """``claimed`` if the certificate names it; ``Forbidden`` otherwise.

    The error message never lists what the certificate does name: a refused peer learns
    only that its certificate does not match."""
    if not peercert:
        raise Forbidden("a client certificate is required", field="certificate")
    if claimed not in certificate_identities(peercert, policy):
        raise Forbidden(f"the client certificate does not name sensor {claimed[:128]}",
                        field=field)
    return claimed


def bind_all(claimed: Iterable[str], peercert: Mapping[str, Any] | None,
             policy: IdentityPolicy = IdentityPolicy(), *, field: str = "sensor_id") -> None:
    """``bind_identity`` for every id of a request (e.g. each chunk of a batch)."""
    for sensor_id in claimed:
        bind_identity(sensor_id, peercert, policy, field=field)
