"""Every capability this package knows, and which side offers which (protocol.md section 4).

The one place they are declared: the messages, the server's hello, the ingest listener,
the sensor agent and the sensor's configuration default all read them from here. A
capability is used only when both sides list it; a 1.0 peer lists only ``BASE_CAPABILITIES``.
"""

from __future__ import annotations

CAP_CHUNKS = "chunks"
CAP_HEARTBEATS = "heartbeats"
CAP_EPOCH = "epoch"
CAP_SERVER_TIME = "server_time"
CAP_PROTO = "proto"
CAP_BATCH = "batch"
CAP_HTTP_ACK = "http_ack"
CAP_ROTATION = "rotation"
CAP_HEARTBEAT_STATS = "heartbeat_stats"

#: The protocol 1.0 set.
BASE_CAPABILITIES: tuple[str, ...] = (CAP_CHUNKS, CAP_HEARTBEATS)

#: What the server announces in its hello (read at call time: tests narrow it).
SERVER_CAPABILITIES: tuple[str, ...] = (CAP_CHUNKS, CAP_HEARTBEATS, CAP_EPOCH, CAP_SERVER_TIME,
                                        CAP_HEARTBEAT_STATS, CAP_ROTATION, CAP_PROTO,
                                        CAP_BATCH, CAP_HTTP_ACK)

#: What the sensor agent implements; others found in its config are dropped with a warning.
SENSOR_CAPABILITIES: tuple[str, ...] = (CAP_CHUNKS, CAP_HEARTBEATS, CAP_EPOCH, CAP_SERVER_TIME,
                                        CAP_HTTP_ACK, CAP_HEARTBEAT_STATS, CAP_ROTATION,
                                        CAP_PROTO, CAP_BATCH)

#: The sensor configuration's default list. proto, batch, http_ack: used only with a server
#: that announces them too (1.0 servers get JSON single-chunk POSTs and ChunkAck deletes).
SENSOR_DEFAULT_CAPABILITIES: tuple[str, ...] = (CAP_CHUNKS, CAP_HEARTBEATS, CAP_EPOCH,
                                                CAP_SERVER_TIME, CAP_HEARTBEAT_STATS,
                                                CAP_PROTO, CAP_BATCH, CAP_HTTP_ACK)
