"""A real Apache Kafka 4 broker in KRaft mode (combined broker+controller) on loopback.

Used by `postback stack` and by the test fixtures alike, so tests run against exactly
what users run. The broker is a child JVM in its own session with a bounded heap;
`stop()` sends SIGTERM (a controlled shutdown) and only escalates to SIGKILL after a
timeout. Ports of 0 are replaced by free ephemeral ports at start.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from deploy.procs import die_with_parent, pid_alive, port_open, resolve_port, tail, terminate, wait_until

LOG4J_CONFIG = Path(__file__).with_name("kafka") / "log4j2.xml"


class KafkaStartError(RuntimeError):
    """The broker did not become ready; the message carries the end of its log."""


@dataclass(frozen=True)
class KafkaOptions:
    host: str = "127.0.0.1"
    port: int = 19092
    controller_port: int = 19093
    heap_mb: int = 768
    #: Local, single-node defaults that keep first use fast (fewer internal partitions).
    offsets_partitions: int = 6
    transaction_partitions: int = 3
    #: Tests set this so the broker dies with the process that started it.
    die_with_parent: bool = False


@dataclass(frozen=True)
class KafkaProcess:
    """A started broker: where it listens and which process it is."""

    pid: int
    bootstrap_servers: str
    controller_port: int
    log_file: Path


def java_executable() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaStartError("`java` (17+) is not on PATH and JAVA_HOME is not set")
    return java


def server_properties(opts: KafkaOptions, port: int, controller_port: int, log_dir: Path) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{opts.host}:{controller_port}",
        f"listeners=PLAINTEXT://{opts.host}:{port},CONTROLLER://{opts.host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{opts.host}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={log_dir}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        f"offsets.topic.num.partitions={opts.offsets_partitions}",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        f"transaction.state.log.num.partitions={opts.transaction_partitions}",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "log.retention.hours=168",
        "",
    ])


class LocalKafka:
    """Formats (once) and runs one KRaft broker whose data lives under `state_dir`."""

    def __init__(self, state_dir: Path, jars_dir: Path, opts: KafkaOptions = KafkaOptions()) -> None:
        self.state_dir = state_dir
        self.jars_dir = jars_dir
        self.opts = opts
        self.data_dir = state_dir / "data"
        self.log_file = state_dir / "kafka.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def _java(self, main: str, *args: str, heap_mb: int = 256) -> list[str]:
        return [
            java_executable(), f"-Xmx{heap_mb}m", f"-Xms{min(heap_mb, 256)}m", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp", f"{self.jars_dir}/*", main, *args,
        ]

    def _format(self, props: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        cmd = self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props), "--ignore-formatted")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise KafkaStartError(f"formatting KRaft storage failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")

    def start(self, timeout: float = 120.0) -> KafkaProcess:
        """Start the broker and return once an AdminClient can list topics."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port = resolve_port(self.opts.port, self.opts.host)
        controller_port = resolve_port(self.opts.controller_port, self.opts.host)
        props = self.state_dir / "server.properties"
        props.write_text(server_properties(self.opts, port, controller_port, self.data_dir))
        self._format(props)
        log = open(self.log_file, "ab")
        try:
            self._popen = subprocess.Popen(
                self._java("kafka.Kafka", str(props), heap_mb=self.opts.heap_mb),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent if self.opts.die_with_parent else None,
            )
        finally:
            log.close()
        bootstrap = f"{self.opts.host}:{port}"
        proc = KafkaProcess(self._popen.pid, bootstrap, controller_port, self.log_file)
        try:
            wait_until(lambda: self._ready_or_dead(bootstrap), timeout, f"Kafka at {bootstrap}", interval=0.5)
        except TimeoutError as exc:
            self.stop()
            raise KafkaStartError(f"{exc}; last log lines:\n{tail(self.log_file)}") from exc
        if not pid_alive(proc.pid):
            raise KafkaStartError(f"Kafka exited during start; last log lines:\n{tail(self.log_file)}")
        return proc

    def _ready_or_dead(self, bootstrap: str) -> bool:
        assert self._popen is not None
        if self._popen.poll() is not None:
            return True
        return kafka_ready(bootstrap)

    def stop(self, timeout: float = 30.0) -> None:
        if self._popen is not None:
            terminate(self._popen.pid, timeout)
            self._popen.wait(timeout=10)
            self._popen = None


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka's `Uuid.randomUuid()` makes it: url-safe base64 of 16 random
    bytes, never starting with "-" (a command-line parser would take it for an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when an AdminClient can list topics at `bootstrap`."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not port_open(host, int(port)):
        return False
    try:
        # log_level 0: a broker that is still starting is expected, not worth a log line.
        admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(timeout * 1000), "log_level": 0})
        admin.list_topics(timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
