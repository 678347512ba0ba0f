"""Which capabilities a sensor announces (protocol.md section 4), from its config."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.common.capabilities import SENSOR_CAPABILITIES
from pipeline.common.messages import (
    CAP_ROTATION,
    CAP_SERVER_TIME,
)

log = logging.getLogger(__name__)

#: Capabilities this agent implements; others found in the config are dropped with a warning.
SUPPORTED_CAPABILITIES = SENSOR_CAPABILITIES


def effective_capabilities(config: Any) -> tuple[str, ...]:
    """The capabilities to announce: the configured ones this agent implements, in order.

    ``server_time`` is dropped when ``time_sync.enabled`` is false: announcing it would
    only make the server send timestamps nobody reads.
    """
    wanted: list[str] = []
    for cap in getattr(config, "capabilities", None) or ():
        if cap in wanted:
            continue
        if cap not in SUPPORTED_CAPABILITIES:
            log.warning("capability_unsupported capability=%s action=not_announced", cap)
            continue
        wanted.append(cap)
    time_sync = getattr(config, "time_sync", None)
    if CAP_SERVER_TIME in wanted and time_sync is not None and not time_sync.enabled:
        wanted.remove(CAP_SERVER_TIME)
    if CAP_ROTATION in wanted and not getattr(config, "token_file", ""):
        # A rotated token must survive a restart: only a token_file can hold it.
        log.warning("capability_unsupported capability=rotation reason=no_token_file "
                    "action=not_announced")
        wanted.remove(CAP_ROTATION)
    return tuple(wanted)
