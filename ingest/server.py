"""Run the ingester: one asyncio loop per process, N processes sharing a port via SO_REUSEPORT.

Why processes: one Python event loop uses one core; the kernel balances connections over
the workers' sockets. Each worker owns its own producer, metrics and shutdown.

Shutdown (SIGTERM or SIGINT): stop accepting, let in-flight requests finish (they get
their real answer: 202 only if Kafka acknowledged), flush the producer, exit 0. The
parent forwards the signal to every worker and exits 0 when they all did.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import sys
from dataclasses import replace
from typing import Any

from aiohttp import web

from ingest.app import Ingester, build_app
from postback.config import IngestOptions, Settings
from postback.eventloop import install_uvloop
from postback.kafka import AsyncProducer, producer_config
from postback.partners import PartnerConfig, load_partner_config
from postback.topics import Topics, ensure_topics

log = logging.getLogger("ingest")


def load_partners(settings: Settings) -> PartnerConfig:
    return load_partner_config(settings.config_file) if settings.config_file else PartnerConfig.empty()


def prepare_topics(bootstrap: str, topics: Topics) -> None:
    from confluent_kafka.admin import AdminClient

    created = ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), topics)
    if created:
        log.info("created topics: %s", ", ".join(created))


async def _serve(opts: IngestOptions, bootstrap: str, topics: Topics, partners: PartnerConfig,
                 reuse_port: bool, announce: bool, started: Any = None) -> None:
    ingester = Ingester(opts, topics, partners, lambda loop: AsyncProducer(
        producer_config(bootstrap, opts.delivery_timeout_s, **{"client.id": "postback-ingest"}), loop))
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
               started: Any = None) -> None:
    """One ingester process. Loads the partner file itself: workers share no objects."""
    topics = Topics(settings.topic_prefix)
    partners = load_partners(settings)
    install_uvloop()
    asyncio.run(_serve(opts, bootstrap, topics, partners, reuse_port, announce, started))


def serve(opts: IngestOptions, settings: Settings, bootstrap: str) -> int:
    """Run `opts.workers` ingester processes until SIGTERM; returns the exit code."""
    load_partners(settings)  # a broken partner file fails here, once, before any worker starts
    if opts.create_topics:
        prepare_topics(bootstrap, Topics(settings.topic_prefix))
    if opts.workers <= 1:
        run_worker(opts, bootstrap, settings, reuse_port=False, announce=True)
        return 0
    if opts.port == 0:
        from deploy.procs import free_port

        opts = replace(opts, port=free_port(opts.host))
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Queue()

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        worker = ctx.Process(target=run_worker, args=(opts, bootstrap, settings, True, False, started),
                             name=f"ingest-{i}")
        worker.start()
        return worker

    workers = [spawn(i) for i in range(opts.workers)]
    try:
        for _ in workers:  # announce only once every worker listens
            started.get(timeout=60)
    except queue.Empty:
        for w in workers:
            w.kill()
        raise RuntimeError("ingest workers did not start within 60s")
    print(f"ingest listening on http://{opts.host}:{opts.port} with {opts.workers} workers "
          f"(kafka {bootstrap})", flush=True)
    stopping = {"signal": 0}

    def forward(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        for w in workers:
            if w.pid and w.is_alive():
                os.kill(w.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes: list[int | None] = []
    # A worker that dies (crash, OOM kill) is replaced; its port share moves to the others meanwhile.
    while any(w.is_alive() for w in workers) or not stopping["signal"]:
        for i, w in enumerate(workers):
            w.join(timeout=0.2)
            if not w.is_alive() and not stopping["signal"]:
                log.error("ingest worker %s (pid %s) died with %s; starting a new one", w.name, w.pid, w.exitcode)
                codes.append(w.exitcode)
                workers[i] = spawn(i)
    codes = [w.exitcode for w in workers]
    # A worker still booting when the signal came has no handler yet and dies of it: that is a clean stop too.
    bad = [c for c in codes if c not in (0, None, -stopping["signal"])]
    if bad:
        print(f"ingest: workers exited with {codes}", file=sys.stderr)
    return 1 if bad else 0
