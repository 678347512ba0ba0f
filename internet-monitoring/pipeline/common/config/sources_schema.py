"""Where the sensor's results come from besides ``submit``: the ``sources`` section.

``sources.remote_write`` is the Prometheus remote-write receiver
(``sensor/remote_write_server.py``), ``sources.scrape`` the exporters the agent scrapes
itself (``sensor/scrape.py``). docs/remote-write.md describes both.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipeline.common.config.checks import (
    KIB,
    MIB,
    check_listen,
    check_not_empty,
    check_positive,
    check_url,
    dotted_key,
    fail,
)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal (``127.0.0.0/8``, ``::1``); names other than
    ``localhost`` are not resolved, so they count as not loopback."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RemoteWriteSourceConfig:
    """``POST /api/v1/write`` (remote write 1.0) into the queue; ``listen`` empty = off."""

    listen: str = ""
    #: A listen address that is not loopback is refused unless this is true (the endpoint
    #: has no authentication).
    allow_remote: bool = False
    #: Cap of the compressed request body (413 above it).
    max_body_bytes: int = 8 * MIB
    #: Cap of the decompressed WriteRequest, checked before decompressing (413 above it).
    max_decompressed_bytes: int = 32 * MIB
    #: Requests arriving together are committed in one queue transaction; those that fit
    #: in ``batch_max_bytes`` (uncompressed) become one queued event.
    batch_max_bytes: int = 1 * MIB
    #: How long the first request of a batch waits for others before the commit.
    batch_delay_ms: float = 2.0
    #: Retry-After (seconds) of the 503 sent while the queue cannot take samples.
    retry_after_s: int = 5

    def validate(self, at: str) -> None:
        check_listen(at, "listen", self.listen)
        if self.listen and not self.allow_remote:
            host = self.listen.rpartition(":")[0]
            if not is_loopback_host(host):
                fail(dotted_key(at, "listen"),
                     f"{host} is not a loopback address; the receiver has no authentication"
                     f" (set {dotted_key(at, 'allow_remote')}: true to listen there anyway)")
        check_positive(at, "max_body_bytes", self.max_body_bytes)
        check_positive(at, "max_decompressed_bytes", self.max_decompressed_bytes)
        if self.batch_max_bytes < 64 * KIB:
            fail(dotted_key(at, "batch_max_bytes"), "must be at least 65536 bytes")
        if not 0 <= self.batch_delay_ms <= 1000:
            fail(dotted_key(at, "batch_delay_ms"), "must be between 0 and 1000 ms")
        check_positive(at, "retry_after_s", self.retry_after_s)


@dataclass(frozen=True)
class ScrapeTargetConfig:
    """One exporter the agent scrapes (``sources.scrape[i]``), as a Prometheus job would."""

    url: str
    job: str
    interval: float = 15.0
    #: 0 = 80 % of the interval, at most 10 s (the timeout is always below the interval).
    timeout: float = 0.0

    def validate(self, at: str) -> None:
        check_url(at, "url", self.url, ("http", "https"))
        check_not_empty(at, "job", self.job)
        check_positive(at, "interval", self.interval)
        if self.timeout < 0 or (self.timeout and self.timeout >= self.interval):
            fail(dotted_key(at, "timeout"), "must be 0 (automatic) or below interval")

    @property
    def effective_timeout(self) -> float:
        return self.timeout or min(10.0, self.interval * 0.8)

    @property
    def instance(self) -> str:
        """``host:port`` of the URL, the port filled in from the scheme (as Prometheus)."""
        parts = urlsplit(self.url)
        if parts.port is not None:
            return parts.netloc.rpartition("@")[2]
        default = 443 if parts.scheme == "https" else 80
        return f"{parts.netloc.rpartition('@')[2]}:{default}"


@dataclass(frozen=True)
class SourcesConfig:
    remote_write: RemoteWriteSourceConfig = field(default_factory=RemoteWriteSourceConfig)
    scrape: tuple[ScrapeTargetConfig, ...] = ()

    def validate(self, at: str) -> None:
        seen: set[tuple[str, str]] = set()
        for index, target in enumerate(self.scrape):
            key = (target.job, target.url)
            if key in seen:
                fail(dotted_key(at, f"scrape[{index}]"), "same job and url listed twice")
            seen.add(key)
