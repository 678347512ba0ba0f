"""A replica's identity: unique per process start, short enough for every bus message."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

# The NOTIFY channel every replica of one database listens on.
CHANNEL = "pipeline_cluster"


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
