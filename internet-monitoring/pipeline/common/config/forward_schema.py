"""The server's ``forward`` section: where committed results are sent on to (today:
Prometheus remote write to the cloud Prometheus). The keys follow Prometheus's own
``remote_write`` client (``tls_config``, ``basic_auth``, ``remote_timeout``,
``queue_config.max_samples_per_send``) under this project's names."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.common.config.checks import check_positive, check_url, dotted_key, fail

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(frozen=True)
class ForwardTlsConfig:
    """TLS towards the receiver: ``ca_file`` (else the system CAs), a client certificate
    (``cert_file`` + ``key_file``), ``server_name`` (SNI and the name checked),
    ``insecure_skip_verify`` (no certificate check at all: tests only)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    insecure_skip_verify: bool = False

    def validate(self, at: str) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            fail(dotted_key(at, "key_file" if self.cert_file else "cert_file"),
                 "cert_file and key_file go together")


@dataclass(frozen=True)
class BasicAuthConfig:
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""  # read at every send, so a rotated file needs no restart

    def validate(self, at: str) -> None:
        if self.password and self.password_file:
            fail(dotted_key(at, "password_file"), "give password or password_file, not both")
        if (self.password or self.password_file) and not self.username:
            fail(dotted_key(at, "username"), "required with a password")


@dataclass(frozen=True)
class RemoteWriteForwardConfig:
    """``url`` empty: forwarding is off."""

    url: str = ""
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    tls: ForwardTlsConfig = field(default_factory=ForwardTlsConfig)
    basic_auth: BasicAuthConfig = field(default_factory=BasicAuthConfig)
    timeout_s: float = 30.0
    samples_per_send: int = 2000
    sensor_label: str = "sensor"
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    poll_interval_s: float = 1.0
    max_parallel_sensors: int = 4

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def validate(self, at: str) -> None:
        if self.url:
            check_url(at, "url", self.url, ("http", "https"))
        for name in ("timeout_s", "samples_per_send", "min_backoff_s", "max_backoff_s",
                     "poll_interval_s", "max_parallel_sensors"):
            check_positive(at, name, getattr(self, name))
        if self.max_backoff_s < self.min_backoff_s:
            fail(dotted_key(at, "max_backoff_s"), "must not be below min_backoff_s")
        if not self.sensor_label or not set(self.sensor_label) <= _LABEL_CHARS \
                or self.sensor_label[0].isdigit() or self.sensor_label.startswith("__"):
            fail(dotted_key(at, "sensor_label"), "must be a Prometheus label name")
        for name in self.headers:
            if name.lower() in ("content-type", "content-encoding", "content-length",
                                "x-prometheus-remote-write-version"):
                fail(dotted_key(at, f"headers.{name}"), "is set by the forwarder")
        self.tls.validate(dotted_key(at, "tls"))
        self.basic_auth.validate(dotted_key(at, "basic_auth"))
        if self.basic_auth.username and any(h.lower() == "authorization" for h in self.headers):
            fail(dotted_key(at, "headers.Authorization"), "conflicts with basic_auth")


@dataclass(frozen=True)
class ForwardConfig:
    remote_write: RemoteWriteForwardConfig = field(default_factory=RemoteWriteForwardConfig)
