"""Run processor workers: one faust worker per process, all in one consumer group.

Each worker has its own RocksDB directory (`<state>/processor-<i>`) and its own faust web
port on 127.0.0.1 (faust would otherwise bind 0.0.0.0:6066 in every process). Wiping a
worker's directory is safe: its tables are rebuilt from their changelog topics.
SIGTERM stops a worker cleanly: faust finishes the current events and commits.
With several workers, the parent restarts a worker that died (see `serve`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from postback.config import ProcessOptions, Settings
from postback.topics import Topics, ensure_topics
from postback.workers import supervise

log = logging.getLogger("processors")

#: How long a stopping worker may take before it is killed, on top of the group session timeout (seconds).
STOP_TIMEOUT_S = 45.0


def load_partners(settings: Settings):  # noqa: ANN201 - PartnerConfig
    from postback.partners import PartnerConfig, load_partner_config

    return load_partner_config(settings.config_file) if settings.config_file else PartnerConfig.empty()


def run_worker(settings: Settings, bootstrap: str, opts: ProcessOptions, index: int, data_root: Path,
               loglevel: str = "WARNING") -> None:
    """Run one worker in this process until SIGTERM/SIGINT."""
    from postback.eventloop import install_uvloop
    from processors.app import create_app
    from processors.fx_feed import FxFeed
    from processors.runtime.worker import run_faust_worker

    install_uvloop()  # before faust creates its loop
    # Every FX rate in the topic is read before the first conversion is processed (processors.fx_feed).
    fx = FxFeed(bootstrap, Topics(settings.topic_prefix).fx_rates.name).start()
    app = create_app(settings, bootstrap, load_partners(settings), opts, data_root / f"processor-{index}", index,
                     fx_rates=fx.rates)
    run_faust_worker(app, loglevel, started=f"processor worker {index} started (pid {os.getpid()}, "
                                            f"web 127.0.0.1:{opts.web_port + index})")


def serve(settings: Settings, bootstrap: str, opts: ProcessOptions, workers: int, data_root: Path,
          loglevel: str = "WARNING") -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; returns the exit code.

    A worker that exits (an agent failure exits it on purpose, see processors.app; or a
    crash, an OOM kill) is restarted with the same index, so the same state directory and
    web port, after a backoff (`postback.workers`). Its partitions move to the others in
    the meantime and come back on the next rebalance.
    """
    from confluent_kafka.admin import AdminClient

    load_partners(settings)  # fail fast on a broken partner file
    from processors.app import changelog_topics

    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, Topics(settings.topic_prefix).all() + changelog_topics(settings, opts))
    data_root.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        run_worker(settings, bootstrap, opts, 0, data_root, loglevel)
        return 0
    # faust finishes its current events, commits and leaves the group on SIGTERM: bounded, but not instant.
    stop_timeout_s = STOP_TIMEOUT_S + opts.session_timeout_s
    return supervise("processor", run_worker, lambda i: (settings, bootstrap, opts, i, data_root, loglevel),
                     workers, stop_timeout_s=stop_timeout_s)
