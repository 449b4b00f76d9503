"""Run the ingester: one asyncio loop per process, N processes sharing a port via SO_REUSEPORT.

Why processes: one Python event loop uses one core; the kernel balances connections over
the workers' sockets. Each worker owns its own producer, metrics and shutdown.

Shutdown (SIGTERM or SIGINT): stop accepting, let in-flight requests finish (they get
their real answer: 202 only if Kafka acknowledged), flush the producer, exit 0. The
parent (a `postback.workers.WorkerPool`) forwards the signal to every worker and exits 0
when they all did. Until then, a worker that dies is replaced, after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import socket
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from ingest.app import Ingester, ReceiptLookup, build_app
from postback.config import IngestOptions, Settings
from postback.eventloop import install_uvloop
from postback.kafka import AsyncProducer, producer_config
from postback.partners import PartnerConfig, load_partner_config
from postback.topics import Topics, ensure_topics
from postback.workers import WorkerPool

log = logging.getLogger("ingest")

#: How long the parent waits for every worker to listen before it gives up (seconds).
STARTUP_TIMEOUT_S = 60.0


def load_partners(settings: Settings) -> PartnerConfig:
    return load_partner_config(settings.config_file) if settings.config_file else PartnerConfig.empty()


def prepare_topics(bootstrap: str, topics: Topics) -> None:
    from confluent_kafka.admin import AdminClient

    created = ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), topics)
    if created:
        log.info("created topics: %s", ", ".join(created))


async def _serve(opts: IngestOptions, bootstrap: str, topics: Topics, partners: PartnerConfig,
                 reuse_port: bool, announce: bool, started: Any = None,
                 receipt_lookup: ReceiptLookup | None = None) -> None:
    ingester = Ingester(opts, topics, partners, lambda loop: AsyncProducer(
        producer_config(bootstrap, opts.delivery_timeout_s, **{"client.id": "postback-ingest"}), loop),
        receipt_lookup)
    runner = web.AppRunner(build_app(ingester), shutdown_timeout=opts.shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, reuse_port=reuse_port or None,
                       shutdown_timeout=opts.shutdown_timeout_s, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = runner.addresses[0][1] if runner.addresses else opts.port
    if announce:
        print(f"ingest listening on http://{opts.host}:{port} (kafka {bootstrap})", flush=True)
    if started is not None:
        started.put(os.getpid())
    await stop.wait()
    log.info("shutting down: no new connections, finishing in-flight requests, flushing Kafka")
    await runner.cleanup()


def run_worker(opts: IngestOptions, bootstrap: str, settings: Settings, reuse_port: bool, announce: bool,
               started: Any = None, receipt_lookup: ReceiptLookup | None = None) -> None:
    """One ingester process. Loads the partner file itself: workers share no objects."""
    topics = Topics(settings.topic_prefix)
    partners = load_partners(settings)
    install_uvloop()
    asyncio.run(_serve(opts, bootstrap, topics, partners, reuse_port, announce, started, receipt_lookup))


def _free_port(host: str) -> int:
    """An ephemeral port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve(opts: IngestOptions, settings: Settings, bootstrap: str,
          receipt_lookup: ReceiptLookup | None = None) -> int:
    """Run `opts.workers` ingester processes until SIGTERM; returns the exit code.

    `receipt_lookup` answers `GET /postback/receipts/{id}` (given a ClickHouse client and
    the id; it must be picklable, a module-level function, to reach spawned workers).
    Without it, or without `opts.clickhouse_url`, that route answers 503.
    """
    load_partners(settings)  # a broken partner file fails here, once, before any worker starts
    if opts.create_topics:
        prepare_topics(bootstrap, Topics(settings.topic_prefix))
    if opts.workers <= 1:
        run_worker(opts, bootstrap, settings, reuse_port=False, announce=True, receipt_lookup=receipt_lookup)
        return 0
    if opts.port == 0:
        opts = replace(opts, port=_free_port(opts.host))
    started = multiprocessing.get_context("spawn").Queue()
    worker_args = (opts, bootstrap, settings, True, False, started, receipt_lookup)
    # A worker that dies (crash, OOM kill) is replaced; its port share moves to the others meanwhile.
    # A worker stops within shutdown_timeout_s plus one delivery timeout for the final flush.
    stop_timeout_s = opts.shutdown_timeout_s + opts.delivery_timeout_s + 10.0
    with WorkerPool("ingest", run_worker, lambda _i: worker_args, opts.workers,
                    stop_timeout_s=stop_timeout_s) as pool:
        pool.start()
        _wait_until_listening(pool, started, opts.workers, STARTUP_TIMEOUT_S)
        if not pool.stopping:
            print(f"ingest listening on http://{opts.host}:{opts.port} with {opts.workers} workers "
                  f"(kafka {bootstrap})", flush=True)
        return pool.run()


def _wait_until_listening(pool: WorkerPool, started: Any, count: int, timeout: float) -> None:
    """Until `count` workers reported listening (announce only then), shutdown began, or `timeout`
    passed (RuntimeError; leaving the pool's block kills the workers). Meanwhile a worker that
    dies while booting is restarted as it would be later."""
    deadline = time.monotonic() + timeout
    ready = 0
    while ready < count and not pool.stopping:
        try:
            started.get(timeout=0.2)
            ready += 1
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest workers did not start within {timeout:.0f}s") from None
            pool.step(0)
