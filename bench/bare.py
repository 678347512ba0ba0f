"""The upper bound: ``python -m bench.bare PORT``, an aiohttp server whose ingest handlers
only read the body and answer 200 (a 1.0-sized JSON answer for single chunks, an empty
body for batches). Same framework, same generator, no decoding, no store."""

from __future__ import annotations

import sys

from aiohttp import web

ANSWER = (b'{"stored": true, "duplicate": false, "sequence": 1, "event_id": '
          b'"0123456789abcdef0123456789abcdef", "sensor_id": "bench-000", '
          b'"event_complete": true, "last_committed_sequence": 1}')


async def chunk(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def batch(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> int:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/ingest/chunk", chunk)
    app.router.add_post("/v1/ingest/batch", batch)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
