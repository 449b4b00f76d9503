"""`postback stack up | down | status`: the local Kafka broker and ClickHouse server.

State lives under one directory (`Settings.state_dir`, default `./.postback`):
`kafka/` and `clickhouse/` hold each service's data and log, `stack.json` records the
pids and addresses of what runs. `up` is idempotent: a service whose recorded pid is
alive and which answers is reused, not restarted. A service is *external* when
`KAFKA_BOOTSTRAP_SERVERS` / `CLICKHOUSE_URL` is set; the stack then never starts or
stops it, and only checks that it answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.clickhouse_local import ClickHouseOptions, LocalClickHouse, ping
from deploy.kafka_jars import ensure_jars
from deploy.kafka_local import KafkaOptions, LocalKafka, kafka_ready
from deploy.procs import pid_alive, port_open, terminate
from postback.config import Settings

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | stopped | external | unreachable
    address: str | None
    pid: int | None = None

    def line(self) -> str:
        where = f" at {self.address}" if self.address else ""
        pid = f" (pid {self.pid})" if self.pid else ""
        return f"{self.name:<10} {self.state}{where}{pid}"


class Stack:
    """Starts, reuses, reports and stops the local services for one state directory."""

    def __init__(
        self,
        settings: Settings,
        kafka_opts: KafkaOptions = KafkaOptions(),
        clickhouse_opts: ClickHouseOptions = ClickHouseOptions(),
    ) -> None:
        self.settings = settings
        self.kafka_opts = kafka_opts
        self.clickhouse_opts = clickhouse_opts
        self.state_file = settings.state_dir / "stack.json"

    # -- recorded state ------------------------------------------------------------
    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict[str, dict]) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)

    # -- commands ------------------------------------------------------------------
    def up(self, progress: Progress = print) -> list[ServiceStatus]:
        """Start what is not running; return the status of both services."""
        state = self._load()
        current = {s.name: s for s in self.status()}
        if current["kafka"].state == "stopped":
            jars = ensure_jars(self.settings.cache_dir, self.settings.kafka_version, progress)
            progress(f"starting Apache Kafka {self.settings.kafka_version} (KRaft) ...")
            kafka = LocalKafka(self.settings.state_dir / "kafka", jars, self.kafka_opts)
            proc = kafka.start()
            state["kafka"] = {"pid": proc.pid, "bootstrap_servers": proc.bootstrap_servers,
                              "controller_port": proc.controller_port, "log": str(proc.log_file),
                              "version": self.settings.kafka_version}
            self._save(state)
        if current["clickhouse"].state == "stopped":
            progress("starting ClickHouse (chdb-core) ...")
            ch = LocalClickHouse(self.settings.state_dir / "clickhouse", self.clickhouse_opts)
            proc_ch = ch.start()
            state["clickhouse"] = {"pid": proc_ch.pid, "url": proc_ch.url, "tcp_port": proc_ch.tcp_port,
                                   "log": str(proc_ch.log_file)}
            self._save(state)
        return self.status()

    def down(self, progress: Progress = print) -> list[ServiceStatus]:
        """Stop the services this stack started (never external ones)."""
        state = self._load()
        for name in ("clickhouse", "kafka"):
            entry = state.pop(name, None)
            if entry and pid_alive(entry.get("pid")):
                progress(f"stopping {name} (pid {entry['pid']}) ...")
                clean = terminate(entry["pid"], timeout=30.0)
                if not clean:
                    progress(f"  {name} did not stop on SIGTERM in 30s and was killed")
        self._save(state)
        return self.status()

    def status(self) -> list[ServiceStatus]:
        state = self._load()
        return [self._kafka_status(state.get("kafka")), self._clickhouse_status(state.get("clickhouse"))]

    def _kafka_status(self, entry: dict | None) -> ServiceStatus:
        if self.settings.kafka_bootstrap_servers:
            addr = self.settings.kafka_bootstrap_servers
            return ServiceStatus("kafka", "external" if kafka_ready(addr) else "unreachable", addr)
        if entry and pid_alive(entry.get("pid")):
            addr = entry["bootstrap_servers"]
            host, _, port = addr.rpartition(":")
            return ServiceStatus("kafka", "running" if port_open(host, int(port)) else "starting", addr,
                                 entry["pid"])
        return ServiceStatus("kafka", "stopped", None)

    def _clickhouse_status(self, entry: dict | None) -> ServiceStatus:
        if self.settings.clickhouse_url:
            url = self.settings.clickhouse_url
            if url.startswith("chdb:"):
                return ServiceStatus("clickhouse", "external", url)
            return ServiceStatus("clickhouse", "external" if ping(url) else "unreachable", url)
        if entry and pid_alive(entry.get("pid")):
            url = entry["url"]
            return ServiceStatus("clickhouse", "running" if ping(url) else "starting", url, entry["pid"])
        return ServiceStatus("clickhouse", "stopped", None)

    def endpoints(self) -> dict[str, str | None]:
        """The addresses other commands should use: external settings first, else the stack's."""
        found = {s.name: s.address for s in self.status() if s.state in ("running", "external")}
        return {"kafka": found.get("kafka"), "clickhouse": found.get("clickhouse")}


def status_json(statuses: list[ServiceStatus]) -> str:
    return json.dumps([asdict(s) for s in statuses], indent=2)
