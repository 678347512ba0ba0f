"""Who is really on the other end when a reverse proxy terminated TLS, sans-I/O.

Behind Nginx (docs/tls-proxy.md) the server's TCP peer is the proxy: the sensor's client
certificate and address reach the server only as request headers the proxy set. Anyone
who can reach a listener can send the same headers, so they are believed only from the
peers listed in ``proxy.trusted_proxies``::

    peer in trusted_proxies (and the list is not empty)
        address  = client_address_header (one IP address; unusable -> the peer's, flagged)
        peercert = client_cert_header, parsed, only when client_verify_header == SUCCESS
                   (otherwise none: the proxy vouches for no certificate); never the TLS
                   layer's own certificate of the connection, which is the proxy's
    any other peer
        address  = the peer
        peercert = the TLS layer's (direct mutual TLS), or none
        the forwarded headers are ignored; naming them in ``ignored_headers`` lets the
        gate count and log a forgery attempt

``peercert`` has the shape of ``ssl.SSLSocket.getpeercert()`` (``subject``,
``subjectAltName``), so ``identity.bind_identity`` binds a forwarded certificate to a
sensor id exactly as it binds a directly presented one.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping
from urllib.parse import unquote

from pipeline.common.config import ProxyConfig
from pipeline.common.errors import ConfigError, Forbidden

VERIFIED = "SUCCESS"  # Nginx $ssl_client_verify for a certificate that passed verification
MAX_CERT_HEADER = 16 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ForwardedCert:
    """A parsed forwarded certificate: the getpeercert()-shaped names and its validity."""

    peercert: Mapping[str, Any]
    not_before: float
    not_after: float


@dataclass(frozen=True)
class ClientView:
    """The client as the gate should see it (real address, certificate it proved)."""

    address: str
    peercert: Mapping[str, Any] | None
    via_proxy: bool = False
    ignored_headers: tuple[str, ...] = ()
    bad_address: bool = False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d
    return ip


@dataclass(frozen=True)
class ProxyTrust:
    """``proxy.*`` as the gate applies it; an empty ``networks`` trusts no one."""

    networks: tuple[Network, ...] = ()
    cert_header: str = "X-Client-Cert"
    verify_header: str = "X-Client-Verify"
    address_header: str = "X-Real-IP"

    @classmethod
    def from_config(cls, config: ProxyConfig) -> ProxyTrust:
        """Raises ConfigError when proxies are trusted but certificates cannot be read."""
        if config.trusted_proxies:
            _require_x509()
        return cls(
            networks=tuple(ipaddress.ip_network(entry.strip(), strict=False)
                           for entry in config.trusted_proxies),
            cert_header=config.client_cert_header,
            verify_header=config.client_verify_header,
            address_header=config.client_address_header)

    def trusts(self, peer: str) -> bool:
        if not self.networks:
            return False
        ip = _ip(peer)
        return ip is not None and any(ip in network for network in self.networks)

    @property
    def headers(self) -> tuple[str, str, str]:
        return (self.cert_header, self.verify_header, self.address_header)


def _require_x509() -> None:
    """``cryptography`` (the server extra) reads forwarded certificates. It is imported only
    when a proxy is trusted, so a server without one (``make demo``) runs without it; with
    one, its absence stops start-up (or a reload) instead of failing requests."""
    try:
        import cryptography.x509  # noqa: F401
    except ImportError as exc:
        raise ConfigError("proxy.trusted_proxies: reading forwarded client certificates "
                          "needs the cryptography package (pip install "
                          "'openuxi-pipeline[server]')", field="proxy.trusted_proxies") from exc


def _utc_seconds(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@functools.lru_cache(maxsize=1024)
def parse_forwarded_cert(value: str) -> ForwardedCert:
    """The certificate in a forwarded header: URL-escaped PEM (Nginx
    ``$ssl_client_escaped_cert``) or plain PEM. Cached: a sensor sends the same
    certificate with every POST. Raises ``Forbidden`` when it cannot be read."""
    from cryptography import x509  # see _require_x509
    from cryptography.x509.oid import NameOID

    if len(value) > MAX_CERT_HEADER:
        raise Forbidden("the forwarded client certificate is too large", field="certificate")
    pem = unquote(value.strip()).encode("ascii", "replace")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise Forbidden("the forwarded client certificate cannot be read",
                        field="certificate") from exc
    subject = tuple((("commonName", str(attr.value)),)
                    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    sans: list[tuple[str, str]] = []
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    except ValueError as exc:  # a malformed extension
        raise Forbidden("the forwarded client certificate cannot be read",
                        field="certificate") from exc
    if names is not None:
        sans += [("DNS", name) for name in names.get_values_for_type(x509.DNSName)]
        sans += [("URI", uri) for uri in names.get_values_for_type(x509.UniformResourceIdentifier)]
    peercert: dict[str, Any] = {"subject": subject, "subjectAltName": tuple(sans)}
    return ForwardedCert(peercert, _utc_seconds(cert.not_valid_before_utc),
                         _utc_seconds(cert.not_valid_after_utc))


def _forwarded_peercert(trust: ProxyTrust, headers: Mapping[str, str],
                        now: float) -> Mapping[str, Any] | None:
    value = headers.get(trust.cert_header)
    if not value or headers.get(trust.verify_header, "").strip() != VERIFIED:
        return None
    cert = parse_forwarded_cert(value)
    if not cert.not_before <= now <= cert.not_after:
        # The proxy verified it; a certificate outside its validity here means the two
        # clocks disagree or the proxy does not check dates. Either way: not accepted.
        raise Forbidden("the forwarded client certificate is not valid now",
                        field="certificate")
    return cert.peercert


def client_view(trust: ProxyTrust, peer: str, headers: Mapping[str, str],
                direct_cert: Mapping[str, Any] | None, now: float) -> ClientView:
    """The client behind ``peer``: see the module docstring. Raises ``Forbidden`` when a
    trusted proxy forwards a certificate that cannot be read or is not valid now."""
    if trust.trusts(peer):
        forwarded = headers.get(trust.address_header)
        ip = _ip(forwarded) if forwarded else None
        address = str(ip) if ip is not None else peer
        # A proxied request (it carries a certificate header) without a usable address, or
        # an address header that is not one IP: a proxy misconfiguration worth a log line.
        # A bare request from the proxy's host (a local tool) is neither.
        proxied = forwarded is not None or trust.cert_header in headers \
            or trust.verify_header in headers
        return ClientView(address=address, peercert=_forwarded_peercert(trust, headers, now),
                          via_proxy=True, bad_address=proxied and ip is None)
    ignored = tuple(name for name in trust.headers if name in headers)
    return ClientView(address=peer, peercert=direct_cert, ignored_headers=ignored)


class LogThrottle:
    """At most one log line per ``interval_s``; counts what it held back. Stops a client
    sending forged headers in a loop from flooding the log (the metric counts them all)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._next = float("-inf")
        self._held = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet; else log now and mention this many suppressed lines."""
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self.interval_s
        return held
