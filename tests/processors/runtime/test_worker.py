"""`processors.runtime.worker.exit_for_restart`: the process ends at once, non-zero, for its supervisor."""

from __future__ import annotations

import subprocess
import sys

from processors.runtime.worker import EXIT_FOR_RESTART


def test_exit_for_restart_ends_the_process_with_its_status_and_runs_nothing_after() -> None:
    code = ("import atexit, logging; from processors.runtime.worker import exit_for_restart; "
            "atexit.register(print, 'atexit ran'); logging.getLogger('x').error('flushed'); "
            "exit_for_restart(); print('went on')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_FOR_RESTART == 70
    assert "flushed" in done.stderr and "went on" not in done.stdout and "atexit ran" not in done.stdout
