"""The HTTP load generator: ``python -m bench.loadgen '<json spec>'`` (its own process).

A minimal HTTP/1.1 keep-alive client on asyncio streams, one connection per worker, each
worker with one request in flight (so ``concurrency`` = requests in flight). Bodies are
encoded before the clock starts; the generator only writes prebuilt requests and reads the
answers, so the same generator measures the pipeline server and the bare handler.

Spec keys: ``port``, ``mode`` (``json`` = protocol 1.0 single-chunk POSTs, ``proto_batch``
= Protobuf batches), ``size`` (uncompressed bytes per chunk), ``concurrency``, ``requests``
(total POSTs), ``batch`` (chunks per batch POST), ``prefix`` (sensor ids ``<prefix>-<n>``,
one per worker), ``path`` (optional).

Prints one JSON line: chunks sent and confirmed (stored or duplicate), elapsed seconds,
chunks/s, MB/s of uncompressed payload, request latency p50/p99, non-200 answers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench.payloads import sensor_chunks
from bench.procs import BENCH_TOKEN
from pipeline.common.messages import encode_chunk
from pipeline.common.proto_codec import PROTO_CONTENT_TYPE, encode_batch_proto
from pipeline.proto import data_pb2


def _request(path: str, port: int, content_type: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {BENCH_TOKEN}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


def build_requests(spec: dict[str, Any]) -> list[list[tuple[bytes, int]]]:
    """Per worker: (request bytes, chunks in it)."""
    mode, size, workers = spec["mode"], int(spec["size"]), int(spec["concurrency"])
    per_worker = max(1, int(spec["requests"]) // workers)
    port = int(spec["port"])
    out: list[list[tuple[bytes, int]]] = []
    for w in range(workers):
        sensor = f"{spec['prefix']}-{w:03d}"
        if mode == "json":
            path = spec.get("path", "/v1/ingest/chunk")
            chunks = sensor_chunks(sensor, size, per_worker)
            out.append([(_request(path, port, "application/json",
                                  encode_chunk(c).encode()), 1) for c in chunks])
        elif mode == "proto_batch":
            path = spec.get("path", "/v1/ingest/batch")
            batch = int(spec["batch"])
            chunks = sensor_chunks(sensor, size, per_worker * batch)
            out.append([(_request(path, port, PROTO_CONTENT_TYPE,
                                  encode_batch_proto(chunks[i:i + batch])), batch)
                        for i in range(0, len(chunks), batch)])
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return out


def confirmed_chunks(mode: str, body: bytes, sent: int) -> int:
    """Chunks the answer confirms as durably committed (stored or duplicate)."""
    if mode == "json":
        doc = json.loads(body) if body[:1] == b"{" else {}
        return 1 if doc.get("stored") or doc.get("duplicate") else 0
    if not body:  # the bare handler answers batches with an empty 200
        return sent
    answer = data_pb2.IngestBatchResult()
    answer.ParseFromString(body)
    return sum(1 for r in answer.results if not r.error_code and (r.stored or r.duplicate))


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    work = build_requests(spec)
    port, mode, size = int(spec["port"]), spec["mode"], int(spec["size"])
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in work]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    totals = {"sent": 0, "confirmed": 0}
    check_answers = bool(spec.get("check", True))

    async def worker(index: int) -> None:
        reader, writer = conns[index]
        for request, n in work[index]:
            started = time.perf_counter()
            writer.write(request)
            status, body = await _read_answer(reader)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            totals["sent"] += n
            if status == 200:
                totals["confirmed"] += confirmed_chunks(mode, body, n) if check_answers else n

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(len(work))))
    elapsed = time.perf_counter() - started
    for _, writer in conns:
        writer.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000.0

    return {"mode": mode, "size": size, "concurrency": len(work), "requests": len(latencies),
            "chunks": totals["sent"], "confirmed": totals["confirmed"], "seconds": elapsed,
            "chunks_per_s": totals["confirmed"] / elapsed,
            "mb_per_s": totals["confirmed"] * size / elapsed / 1e6,
            "latency_p50_ms": pct(0.50), "latency_p99_ms": pct(0.99),
            "statuses": {str(k): v for k, v in statuses.items()}}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
