"""Limits, identifier patterns and capability names of the wire protocol (protocol.md)."""

from __future__ import annotations

import re

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

# Capabilities this package knows (protocol.md section 4).
CAP_CHUNKS = "chunks"
CAP_HEARTBEATS = "heartbeats"
CAP_EPOCH = "epoch"
CAP_SERVER_TIME = "server_time"
CAP_PROTO = "proto"
CAP_BATCH = "batch"
CAP_HTTP_ACK = "http_ack"
CAP_ROTATION = "rotation"
CAP_HEARTBEAT_STATS = "heartbeat_stats"

BASE_CAPABILITIES = (CAP_CHUNKS, CAP_HEARTBEATS)
