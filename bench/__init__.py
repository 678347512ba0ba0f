"""``make bench``: throughput, latency and memory of the pipeline, each figure next to its
baseline measured in the same run (see ``bench.main`` and docs/performance.md).

Every load generator runs in its own process; with ``taskset`` available the measured
process is pinned to CPU 0 and its load generator to CPU 1.
"""
