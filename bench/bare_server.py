"""Baseline server for bench/ingest_http.py: the ingester's HTTP stack with nothing behind it.

Why it exists: on a shared, noisy machine an absolute requests/s figure means little.
Running this server in the same benchmark run, under the same load generator, gives the
ceiling that aiohttp itself allows on this host at this moment; the ingester's figure
divided by this one (the "ratio") is what the Kafka hand-off, validation, Avro encoding
and metrics cost, and it is comparable across runs.

It mirrors `ingest.server` on purpose: uvloop when installed, one process with one
asyncio loop, `AppRunner(access_log=None)`, `TCPSite(backlog=1024)`, SIGTERM/SIGINT
for a graceful stop with exit code 0, and the same announce line format, so the only
difference is the request handler. `POST /postback` reads the body and answers
`202 {"status":"accepted","receipt_id":"<ULID>"}` -- the ingester's answer shape --
without parsing, validating or producing anything. `GET /healthz` is for readiness.

Run: `python -m bench.bare_server --port 0` (0 = ephemeral; the chosen port is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from aiohttp import web
from ulid import ULID


def _json(status: int, body: dict[str, Any]) -> web.Response:
    """The same encoding as ingest.app._json (compact separators, application/json)."""
    return web.Response(status=status, body=json.dumps(body, separators=(",", ":")).encode(),
                        content_type="application/json")


async def postback(request: web.Request) -> web.Response:
    await request.read()
    return _json(202, {"status": "accepted", "receipt_id": str(ULID())})


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/postback", postback)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, shutdown_timeout_s: float = 15.0) -> None:
    runner = web.AppRunner(build_app(), shutdown_timeout=shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=shutdown_timeout_s, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"bare listening on http://{host}:{bound}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare_server",
        description="Bare aiohttp server (no Kafka): the baseline that bench/ingest_http.py compares the ingester to.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 = ephemeral (default 0)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
