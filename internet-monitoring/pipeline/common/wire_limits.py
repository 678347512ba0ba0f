"""Limits, identifier patterns and capability names of the wire protocol (protocol.md)."""

from __future__ import annotations

import re

# The capability names are declared in common/capabilities.py (protocol.md section 4).
from pipeline.common.capabilities import (  # noqa: F401 - re-exported for callers
    BASE_CAPABILITIES,
    CAP_BATCH,
    CAP_CHUNKS,
    CAP_EPOCH,
    CAP_HEARTBEAT_STATS,
    CAP_HEARTBEATS,
    CAP_HTTP_ACK,
    CAP_PROTO,
    CAP_ROTATION,
    CAP_SERVER_TIME,
)

SENSOR_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
EVENT_ID_RE = re.compile(r"^[0-9a-f]{32}$")
EPOCH_RE = re.compile(r"^[0-9a-f]{8,64}$")
MAX_SEQUENCE = 2**63 - 1
MAX_CHUNK_COUNT = 65_536
MAX_PAYLOAD_BYTES = 1024 * 1024  # compressed bytes of one chunk
MAX_STRING = 256
MAX_MESSAGE = 4096
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_VALUE = 1024
MAX_LIST = 100_000
SHA256_LEN = 32

