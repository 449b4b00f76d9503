"""Run processor workers: one faust worker per process, all in one consumer group.

Each worker has its own RocksDB directory (`<state>/processor-<i>`) and its own faust web
port on 127.0.0.1 (faust would otherwise bind 0.0.0.0:6066 in every process). Wiping a
worker's directory is safe: its tables are rebuilt from their changelog topics.
SIGTERM stops a worker cleanly: faust finishes the current events and commits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from postback.config import ProcessOptions, Settings
from postback.topics import Topics, ensure_topics

log = logging.getLogger("processors")


def load_partners(settings: Settings):  # noqa: ANN201 - PartnerConfig
    from postback.partners import PartnerConfig, load_partner_config

    return load_partner_config(settings.config_file) if settings.config_file else PartnerConfig.empty()


def run_worker(settings: Settings, bootstrap: str, opts: ProcessOptions, index: int, data_root: Path,
               loglevel: str = "WARNING") -> None:
    """Run one worker in this process until SIGTERM/SIGINT."""
    import faust

    from postback.eventloop import install_uvloop
    from processors.app import create_app

    install_uvloop()  # before faust creates its loop
    app = create_app(settings, bootstrap, load_partners(settings), opts, data_root / f"processor-{index}", index)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, console_port=0, redirect_stdouts=False)
    print(f"processor worker {index} started (pid {os.getpid()}, web 127.0.0.1:{opts.web_port + index})",
          flush=True)
    worker.execute_from_commandline()


def serve(settings: Settings, bootstrap: str, opts: ProcessOptions, workers: int, data_root: Path,
          loglevel: str = "WARNING") -> int:
    from confluent_kafka.admin import AdminClient

    load_partners(settings)  # fail fast on a broken partner file
    from processors.app import changelog_topics

    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, Topics(settings.topic_prefix).all() + changelog_topics(settings, opts))
    data_root.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        run_worker(settings, bootstrap, opts, 0, data_root, loglevel)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=run_worker, args=(settings, bootstrap, opts, i, data_root, loglevel),
                         name=f"processor-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    codes = [proc.exitcode for proc in procs]
    if any(code not in (0, None, -signal.SIGTERM) for code in codes):
        print(f"processor workers exited with {codes}", file=sys.stderr)
        return 1
    return 0
