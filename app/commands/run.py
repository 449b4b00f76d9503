"""`postback run` and `postback stop`: the whole pipeline with one command.

`run` starts the local stack (unless KAFKA_BOOTSTRAP_SERVERS / CLICKHOUSE_URL point at
existing clusters), creates the topics, applies the ClickHouse migrations, then
supervises the ingester, the processor, the sink and the outbound delivery service
(`deploy.supervisor`) and prints a status line: requests/s, processor lag, rows written.
Ctrl-C or SIGTERM stops the children in order, then the stack if this command started
it. With `--detach` it runs in the background and returns once everything is ready;
`postback stop` ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from postback.config import Settings
from postback.topics import Topics

DEMO_PARTNERS = Path(__file__).resolve().parents[2] / "deploy" / "demo-partners.toml"


def _run_file(settings: Settings) -> Path:
    return settings.state_dir / "run.json"


def _write_run_file(settings: Settings, info: dict[str, Any]) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = _run_file(settings).with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, _run_file(settings))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


class StatusProbe:
    """Numbers for the status line, each best-effort (a failing probe shows '?')."""

    def __init__(self, bootstrap: str, clickhouse: str, database: str, prefix: str, ingest_url: str) -> None:
        from confluent_kafka import Consumer

        topics = Topics(prefix)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topics.processor_group,
                                  "enable.auto.commit": False})
        self.raw_topic = topics.raw_postbacks.name
        self.clickhouse = clickhouse
        self.database = database
        self.ingest_url = ingest_url
        self.client: Any = None
        self.last: tuple[float, float] | None = None

    def requests_per_s(self) -> str:
        try:
            with urllib.request.urlopen(self.ingest_url + "/metrics", timeout=1) as resp:
                text = resp.read().decode()
        except OSError:
            return "?"
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("postback_ingest_requests_total{"))
        now = time.monotonic()
        rate = "…" if self.last is None else f"{(total - self.last[1]) / max(now - self.last[0], 1e-6):.0f}"
        self.last = (now, total)
        return rate

    def lag(self) -> str:
        from confluent_kafka import TopicPartition

        try:
            parts = self.consumer.list_topics(self.raw_topic, timeout=2).topics[self.raw_topic].partitions
            tps = [TopicPartition(self.raw_topic, p) for p in parts]
            committed = {tp.partition: tp.offset for tp in self.consumer.committed(tps, timeout=2)}
            lag = 0
            for tp in tps:
                high = self.consumer.get_watermark_offsets(tp, timeout=2)[1]
                done = committed.get(tp.partition, -1)
                lag += high - (done if done >= 0 else 0)
            return str(lag)
        except Exception:  # noqa: BLE001
            return "?"

    def rows(self) -> str:
        try:
            if self.client is None:
                import clickhouse_connect

                self.client = clickhouse_connect.get_client(dsn=self.clickhouse, database=self.database)
            return str(self.client.query("SELECT count() FROM postback_outcomes").result_rows[0][0])
        except Exception:  # noqa: BLE001
            self.client = None
            return "?"

    def line(self) -> str:
        return f"requests/s {self.requests_per_s():>6}  processor lag {self.lag():>6}  outcome rows {self.rows():>8}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka.admin import AdminClient

    from deploy.stack import Stack
    from deploy.supervisor import Child, Supervisor
    from postback.topics import ensure_topics
    from sinks.service import migrate

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    stack = Stack(settings)
    # External services report "external"; only what is "stopped" here is ours to start (and stop).
    started_stack = any(s.state == "stopped" for s in stack.status())
    if started_stack:
        stack.up(progress=say)
    endpoints = stack.endpoints()
    bootstrap, clickhouse = endpoints["kafka"], endpoints["clickhouse"]
    if not bootstrap or not clickhouse:
        raise RuntimeError(f"Kafka or ClickHouse is not reachable: {endpoints}")
    if clickhouse.startswith("chdb:"):
        raise RuntimeError("`postback run` needs a served ClickHouse (several processes use it), not chdb://")
    config = settings.config_file or DEMO_PARTNERS
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), Topics(settings.topic_prefix))
    migrate(clickhouse, args.database, lambda m: say(f"clickhouse: {m}"))

    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, CLICKHOUSE_URL=clickhouse,
               POSTBACK_CONFIG=str(config), POSTBACK_STATE_DIR=str(settings.state_dir),
               POSTBACK_TOPIC_PREFIX=settings.topic_prefix)
    cli = [sys.executable, "-m", "app.cli"]
    logs = settings.state_dir / "logs"
    children = [
        Child("ingest", cli + ["ingest", "--host", args.host, "--port", str(args.port), "--workers",
                               str(args.ingest_workers), "--clickhouse-database", args.database], logs / "ingest.log"),
        Child("process", cli + ["process", "--workers", str(args.process_workers), "--web-port",
                                str(args.process_web_port), "--late-click-wait", str(args.late_click_wait),
                                "--data-dir", str(settings.state_dir / "processors")], logs / "process.log"),
        Child("sink", cli + ["sink", "--database", args.database, "--metrics-port", str(args.sink_metrics_port)],
              logs / "sink.log"),
        # Affiliate postbacks of $POSTBACK_CONFIG (idle when no affiliate has `postbacks`).
        Child("outbound", cli + ["outbound", "run"], logs / "outbound.log"),
    ]
    supervisor = Supervisor(children, env)
    stop = {"now": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor.start_all()
    ingest_url = f"http://{args.host}:{args.port}"
    info = {"pid": os.getpid(), "ingest_url": ingest_url, "kafka": bootstrap, "clickhouse": clickhouse,
            "database": args.database, "config": str(config), "logs": str(logs), "ready": False,
            "started_stack": started_stack}
    _write_run_file(settings, info)
    deadline = time.monotonic() + args.ready_timeout
    while not stop["now"] and not _http_ok(ingest_url + "/readyz"):
        if time.monotonic() > deadline:
            say(f"the ingester did not become ready in {args.ready_timeout:.0f}s; see {logs}/ingest.log")
            stop["now"] = True
            break
        for event in supervisor.check():
            say(event)
        time.sleep(0.5)
    if not stop["now"]:
        info["ready"] = True
        _write_run_file(settings, info)
        say(f"pipeline ready: ingest {ingest_url}  kafka {bootstrap}  clickhouse {clickhouse} "
            f"(database {args.database})  config {config}")
        say(f"logs in {logs}; try `postback demo`; Ctrl-C stops")
    probe = StatusProbe(bootstrap, clickhouse, args.database, settings.topic_prefix, ingest_url)
    tty = sys.stdout.isatty()
    last_status = 0.0
    while not stop["now"]:
        events = supervisor.check()
        for event in events:
            say(("\n" if tty else "") + event)
        if events or info.get("children") is None:
            info["children"] = {c.name: c.proc.pid if c.proc else None for c in supervisor.children}
            _write_run_file(settings, info)
        if time.monotonic() - last_status >= (2.0 if tty else 10.0):
            line = probe.line()
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last_status = time.monotonic()
        time.sleep(0.25)
    say("\nstopping: ingest, process, sink ...")
    codes = supervisor.stop_all()
    say("stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items()))
    if started_stack and not args.keep_stack:
        stack.down(progress=say)
    _run_file(settings).unlink(missing_ok=True)
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes.values()) else 1


def run_detached(args: argparse.Namespace, settings: Settings) -> int:
    """Start `postback run` in the background; return once it reports ready."""
    argv = [a for a in sys.argv[1:] if a not in ("-d", "--detach")]
    logs = settings.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_file = _run_file(settings)
    run_file.unlink(missing_ok=True)
    with open(logs / "run.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *argv],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + args.ready_timeout + 180  # includes a first jar download
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"postback run exited with {proc.returncode}; see {logs / 'run.log'}", file=sys.stderr)
            return 1
        try:
            info = json.loads(run_file.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("ready"):
            print(f"pipeline running in the background (pid {proc.pid}): ingest {info['ingest_url']}, "
                  f"clickhouse {info['clickhouse']}, logs {logs}")
            print("next: `postback demo`; stop with `postback stop`")
            return 0
        time.sleep(0.5)
    print(f"postback run did not become ready; see {logs / 'run.log'}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    return run_detached(args, settings) if args.detach else run(args, settings)


def _stop(args: argparse.Namespace, settings: Settings) -> int:
    try:
        info = json.loads(_run_file(settings).read_text())
    except (OSError, ValueError):
        print("no `postback run` is recorded in this state directory")
        return 0
    from deploy.procs import pid_alive, wait_until

    pid = int(info["pid"])
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 90, f"postback run (pid {pid}) to stop")
    print(f"stopped postback run (pid {pid})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run the whole pipeline: stack, ingester, processor, sink (supervised)",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("-d", "--detach", action="store_true", help="run in the background; return when ready")
    p.add_argument("--host", default="127.0.0.1", help="ingester bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="ingester port (default 8080)")
    p.add_argument("--ingest-workers", type=int, default=1)
    p.add_argument("--process-workers", type=int, default=1)
    p.add_argument("--process-web-port", type=int, default=16066)
    p.add_argument("--sink-metrics-port", type=int, default=9464)
    p.add_argument("--late-click-wait", type=float, default=600.0,
                   help="seconds a conversion waits for a late click (default 600)")
    p.add_argument("--database", default="postback", help="ClickHouse database (default postback)")
    p.add_argument("--keep-stack", action="store_true", help="leave Kafka/ClickHouse running on exit")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.set_defaults(handler=_run)
    s = sub.add_parser("stop", help="stop a `postback run --detach` (and the stack it started)",
                       description="Send SIGTERM to the background `postback run` of this state directory and "
                                   "wait until it has stopped its processes (and the stack, if it started it).")
    s.set_defaults(handler=_stop)
