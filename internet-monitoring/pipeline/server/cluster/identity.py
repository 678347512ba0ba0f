"""A replica's identity: unique per process start, short enough for every bus message."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from dataclasses import dataclass

def channel_for(namespace: str) -> str:
    """The NOTIFY channel of one cluster. Channels (and advisory locks) are per database,
    not per schema: clusters sharing a database (one schema each) need their own."""
    digest = hashlib.blake2b(namespace.encode(), digest_size=6).hexdigest()
    return f"pipeline_cluster_{digest}"


@dataclass(frozen=True)
class ReplicaId:
    """``host-pid-nonce``: a restarted process (same pid after a reboot) is a new replica."""

    value: str

    @classmethod
    def new(cls) -> ReplicaId:
        host = socket.gethostname().split(".")[0][:24] or "host"
        return cls(f"{host}-{os.getpid()}-{secrets.token_hex(3)}")

    @property
    def window_tag(self) -> str:
        """Goes into window ids this replica issues: ids of two owners never collide."""
        return self.value.rsplit("-", 1)[-1]

    def __str__(self) -> str:
        return self.value
