"""Running one faust worker in this process, and leaving it so that it is restarted.

`processors.worker` decides how many workers run and where their state lives; this
module is the only place that builds a `faust.Worker`.
"""

from __future__ import annotations

import logging
import os
from typing import NoReturn

import faust

from processors.runtime import compat

log = logging.getLogger("processors")

#: Exit status of a worker that stopped itself on an error, for its supervisor to restart it
#: (EX_SOFTWARE: an internal error, not a usage error or a signal).
EXIT_FOR_RESTART = 70


def run_faust_worker(app: faust.App, loglevel: str, started: str | None = None) -> None:
    """Run `app`'s faust worker in this process until SIGTERM/SIGINT (faust then finishes the
    current events and commits). `started` is printed once the worker is built, before it runs.

    The runtime's internals are verified first (`compat`): a worker on an incompatible
    faust or aiokafka refuses to start instead of losing records.
    """
    installed = compat.check_installed()
    log.info("processor runtime: %s", ", ".join(f"{name} {version}" for name, version in installed.items()))
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, console_port=0, redirect_stdouts=False)
    if started:
        print(started, flush=True)
    worker.execute_from_commandline()


def exit_for_restart() -> NoReturn:
    """End this worker process at once with `EXIT_FOR_RESTART`, for its supervisor to restart it.

    Why: when an agent fails (a bug or a lost broker, never bad input), faust logs the agent
    as crashed and keeps the worker alive, consuming nothing on its partitions while still
    holding them in the group. Exiting non-zero makes the supervisor (`postback process`,
    systemd, the orchestrator) start a new worker; the failed batch was never acked, so it
    is processed again there. `os._exit` rather than raising `SystemExit`: raised inside an
    agent's task it would only end that task, the crash described above. Logs are flushed first.
    """
    logging.shutdown()
    os._exit(EXIT_FOR_RESTART)
