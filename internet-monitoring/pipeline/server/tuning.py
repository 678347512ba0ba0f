"""Process-wide tuning of the ``pipeline-server`` process (not applied to embedders/tests).

Garbage collector: with thousands of control connections a process tracks millions of
objects, and CPython's full (generation 2) collection walks all of them: measured pauses of
200-350 ms with 5,000 sockets, every few seconds at the default thresholds, which put the
heartbeat handling p99 at ~400 ms. What is allocated per request dies young; what lives
long (sockets, sessions) does not need scanning on every full collection. So: the objects
of a started server are frozen out of the collector, generation 0 is larger (fewer
promotions of short-lived request objects) and full collections are rare. Reference
counting frees everything that is not in a cycle as before; cyclic garbage is still
collected, by the young generations or the (rarer) full collections.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

GC_THRESHOLDS = (10_000, 50, 1_000)


def tune_gc() -> None:
    """Freeze what exists now (modules, configuration, the started server) and raise the
    collection thresholds. Call once the server is up."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("gc_tuned thresholds=%s frozen=%d", ",".join(map(str, GC_THRESHOLDS)),
             gc.get_freeze_count())
