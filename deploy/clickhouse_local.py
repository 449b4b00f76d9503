"""Real ClickHouse 26.9 on loopback, served from the chdb-core wheel, and the embedded client.

Two ways to get ClickHouse without a Docker engine:

- `LocalClickHouse`: a server process (`deploy.chserver`) speaking HTTP and native TCP,
  for several processes at once (ingester, workers, an analyst's client). Ready when
  `GET /ping` answers `Ok.`.
- `embedded_client(path)`: clickhouse-connect's in-process `chdb://PATH` client, for
  one process that wants no server. Note that one data directory must not be opened by
  a server and an embedded client at the same time.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.procs import die_with_parent, resolve_port, tail, terminate, wait_until


class ClickHouseStartError(RuntimeError):
    """The server did not answer /ping in time; the message carries the end of its log."""


@dataclass(frozen=True)
class ClickHouseOptions:
    host: str = "127.0.0.1"
    http_port: int = 18123
    tcp_port: int = 19000
    #: Tests set this so the server dies with the process that started it.
    die_with_parent: bool = False


@dataclass(frozen=True)
class ClickHouseProcess:
    pid: int
    url: str
    tcp_port: int
    log_file: Path


def ping(url: str, timeout: float = 1.0) -> bool:
    """True when `url`/ping answers `Ok.`."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=timeout) as resp:
            return resp.status == 200 and resp.read().strip() == b"Ok."
    except OSError:
        return False


class LocalClickHouse:
    """Runs one ClickHouse server process whose data lives under `state_dir`."""

    def __init__(self, state_dir: Path, opts: ClickHouseOptions = ClickHouseOptions()) -> None:
        self.state_dir = state_dir
        self.opts = opts
        self.log_file = state_dir / "clickhouse.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ClickHouseProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        http_port = resolve_port(self.opts.http_port, self.opts.host)
        tcp_port = resolve_port(self.opts.tcp_port, self.opts.host)
        cmd = [
            sys.executable, "-m", "deploy.chserver", "--root", str(self.state_dir),
            "--host", self.opts.host, "--http-port", str(http_port), "--tcp-port", str(tcp_port),
        ]
        log = open(self.log_file, "ab")
        try:
            self._popen = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent if self.opts.die_with_parent else None,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        finally:
            log.close()
        url = f"http://{self.opts.host}:{http_port}"
        popen = self._popen
        try:
            wait_until(lambda: popen.poll() is not None or ping(url), timeout, f"ClickHouse at {url}/ping")
        except TimeoutError as exc:
            self.stop()
            raise ClickHouseStartError(f"{exc}; last log lines:\n{tail(self.log_file)}") from exc
        if popen.poll() is not None:
            raise ClickHouseStartError(f"ClickHouse exited during start:\n{tail(self.log_file)}")
        return ClickHouseProcess(popen.pid, url, tcp_port, self.log_file)

    def stop(self, timeout: float = 20.0) -> None:
        if self._popen is not None:
            terminate(self._popen.pid, timeout)
            self._popen.wait(timeout=10)
            self._popen = None


def embedded_client(path: Path, database: str | None = None, **kwargs: Any) -> Any:
    """clickhouse-connect's in-process client over chDB, storing data under `path`."""
    import clickhouse_connect

    path.mkdir(parents=True, exist_ok=True)
    dsn = f"chdb://{path.absolute()}"
    return clickhouse_connect.get_client(dsn=dsn, database=database, **kwargs) if database else \
        clickhouse_connect.get_client(dsn=dsn, **kwargs)
