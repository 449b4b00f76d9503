"""The harness every benchmark in bench/ runs on (ingest_http, process, sink, e2e, expiry, ...).

Every benchmark measures processes the same way (process-tree RSS and CPU from /proc,
whole-host CPU from /proc/stat), starts and stops its subprocesses the same way (own
session, dies with the benchmark, SIGTERM then SIGKILL), repeats short comparison runs and
reports their median and spread (min/max) the same way (`median_run`, `spread`), gives the
in-run baseline ratio the same way (`ratio`), records what else ran on the host while it
ran (`HostWatch`: load average, whole-host CPU, the busiest processes that were not the
benchmark's own), and reports the same way (`run_and_report`: one JSON document on stdout
and in --json-out, its table then one `host:` line on stderr, exit codes 0/1/130).
Keeping one copy keeps their figures comparable and their fixes in one place.

The benchmarks are modules of the `bench` package: run them as `python -m bench.<name>`
from the repository root.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

from deploy.procs import children

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"

#: Crockford base32, for ULID-like receipt and click ids in generated workloads.
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# The one HMAC advertiser and offer the process and e2e benchmarks configure.
ADVERTISER = "bench"
KEY_ID = "k1"
SECRET = "bench-secret-k1-0123456789abcdef"
OFFER = "offer-1"
# No landing_url: GET /click answers 200 with the click id. No allow_ips: any source.
PARTNERS_TOML = f"""
[advertisers.{ADVERTISER}]
auth_modes = ["hmac"]
secrets = {{ {KEY_ID} = "{SECRET}" }}
timestamp_tolerance_s = 300

[offers.{OFFER}]
advertiser_id = "{ADVERTISER}"
attribution_window_days = 7
"""


def log(message: str, source: str = "bench") -> None:
    """Progress goes to stderr (stdout carries only the JSON report), time-stamped."""
    print(f"[{source} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- argument types -------------------------------------------------------------------
N = TypeVar("N", int, float)


def checked_number(name: str, convert: Callable[[str], N], ok: Callable[[N], bool],
                   message: str) -> Callable[[str], N]:
    """An argparse `type=` that converts and range-checks; `message` is formatted with
    `value` (one factory instead of a near-identical function per range). `name` is what
    argparse calls the type in "invalid <name> value" errors."""

    def parse(text: str) -> N:
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(message.format(value=value))
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = checked_number("positive_int", int, lambda v: v >= 1, "must be >= 1, got {value}")


def add_profile_args(parser: argparse.ArgumentParser, profile_help: str, top_default: int) -> None:
    """--profile / --profile-top, as the benchmarks that can run py-spy on their subject take them."""
    parser.add_argument("--profile", action="store_true", help=profile_help)
    parser.add_argument("--profile-top", type=positive_int, default=top_default, metavar="K",
                        help=f"frames listed by --profile (default {top_default})")


def add_output_args(parser: argparse.ArgumentParser, json_default: Path, logs_help: str | None = None) -> None:
    """--logs-dir (when `logs_help` is given) and --json-out, the last options of every benchmark."""
    if logs_help is not None:
        parser.add_argument("--logs-dir", type=Path, metavar="DIR", help=logs_help)
    parser.add_argument("--json-out", type=Path, default=json_default, metavar="PATH",
                        help=f"where to write the JSON report (default {json_default.relative_to(REPO)})")


# -- processes under /proc ------------------------------------------------------------
def _status_kb(pid: int, field: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM); 0 when gone or a zombie (no such line)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a server's workers with --workers N)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children(p))
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` and its descendants."""
    ticks = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / _CLK_TCK


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def host_busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Whole-host CPU busy between two `host_cpu_ticks()` readings, in % of all CPUs."""
    return round(100 * (after[0] - before[0]) / max(1, after[1] - before[1]), 1)


def tree_rss_kb(pid: int) -> int:
    """VmRSS of `pid` plus all its descendants.

    A sum over-counts pages shared between processes (e.g. after fork); with the spawn
    start method the workers share little, so it is close to the real footprint."""
    return sum(_status_kb(p, "VmRSS:") for p in descendants(pid))


def tree_hwm_kb(pid: int) -> int:
    """VmHWM (the kernel's exact peak RSS) of `pid` plus its descendants; 0 when gone."""
    return sum(_status_kb(p, "VmHWM:") for p in descendants(pid))


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


class RssSampler(threading.Thread):
    """Samples each watched process tree's RSS a few times a second and keeps the peak."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = pids
        self.interval_s = interval_s
        self.first: dict[str, int] = {}
        self.peak_kb: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop_event = threading.Event()
        self._sample()
        self.first = dict(self.peak_kb)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak_kb[name] = max(self.peak_kb[name], tree_rss_kb(pid))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self._sample()


# -- host -----------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def host_info() -> dict[str, Any]:
    """What the figures were measured on (a report's `host`; `run_and_report` adds the end of the run)."""
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_start": loadavg(), "python": platform.python_version(),
            "kernel": platform.release()}


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# -- subprocesses ---------------------------------------------------------------------
def child_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (and `drop`), with the repository on PYTHONPATH
    and `extra` set: what every service under test is started with."""
    dropped = {"PYTHONPATH", *drop}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def spawn(argv: list[str], env: dict[str, str] | None, stdout: IO[bytes] | int | None,
          stderr: IO[bytes] | int | None = subprocess.STDOUT) -> subprocess.Popen[bytes]:
    """Start `argv` in the repository, in its own session (Ctrl-C reaches only the
    benchmark, which then stops it deliberately), dying with the benchmark even if that
    is SIGKILLed."""
    from deploy.procs import die_with_parent

    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, preexec_fn=die_with_parent)


def stop_process(proc: subprocess.Popen[bytes], name: str, sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> int:
    """Signal and wait (SIGTERM: the graceful path under test); SIGKILL the whole process
    group only if it does not exit in time. Idempotent; returns the exit code (negative:
    killed by that signal)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{name} did not exit {timeout:.0f}s after signal {sig}: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def http_get(url: str, timeout: float = 20.0) -> tuple[int, bytes]:
    """(status, body) of a GET on `url` (`http://host:port/path`)."""
    host_port, _, path = url.split("//", 1)[1].partition("/")
    conn = http.client.HTTPConnection(host_port, timeout=timeout)
    try:
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- Kafka ----------------------------------------------------------------------------
def produce_records(bootstrap: str, batches: Iterable[tuple[str, list[tuple[bytes, bytes]]]],
                    delivery_timeout_s: float, flush_timeout_s: float) -> float:
    """Produce (topic, [(key, value), ...]) in order with the project's producer settings
    (so partitions match the services'), flush, and fail on any delivery error. Returns seconds."""
    from confluent_kafka import Producer

    from postback.kafka import producer_config

    started = time.monotonic()
    producer = Producer(producer_config(bootstrap, delivery_timeout_s=delivery_timeout_s))
    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    for topic, records in batches:
        for key, value in records:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
    left = producer.flush(flush_timeout_s)
    if left or failed:
        raise RuntimeError(f"pre-fill: {left} records unflushed, {len(failed)} failed: {failed[:3]}")
    return time.monotonic() - started


def settled_count(kafka: Any, topic: str, expect: int, timeout_s: float = 10.0) -> int:
    """Records in `topic` once two readings agree and reach `expect`, or the last reading
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = kafka.count(topic)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = kafka.count(topic)
        if now == last and now >= expect:
            return now
        last = now
    return last


class KafkaOffsets:
    """Read-only offsets of named groups of topics, cheap enough to poll several times a second
    while a service runs: the sum of their partitions' high watermarks (`total`, as
    `KafkaService.count` computes it, but with one long-lived consumer), and what a consumer
    group committed on them (`committed`) or still has to read (`lag`: high watermark minus
    committed, a partition without a commit counting from 0). The consumers here never
    subscribe, so they never join or disturb the groups they read (OffsetFetch only).
    Thread-safe (a sampler thread and the main thread may both ask).

    Cost: one ListOffsets per partition and one OffsetFetch per group and question. (The admin
    API's batched list_offsets would be cheaper, but with confluent-kafka 2.16 it crashed the
    interpreter now and then.)"""

    def __init__(self, bootstrap: str, topics: dict[str, Sequence[str]]) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from deploy.providers import unique_name

        self._bootstrap = bootstrap
        self._lock = threading.Lock()
        self._closed = False
        self._watermarks = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("bench-offsets"),
                                     "enable.auto.commit": False})
        self._groups: dict[str, Any] = {}  # consumer group -> a consumer that only asks for its commits
        self._parts: dict[str, list[Any]] = {}
        for name, names in topics.items():
            self._parts[name] = []
            for topic in names:
                meta = self._watermarks.list_topics(topic, timeout=10).topics[topic]
                self._parts[name] += [TopicPartition(topic, p) for p in sorted(meta.partitions)]

    def ends(self, name: str, timeout: float = 10.0) -> dict[tuple[str, int], int]:
        """(topic, partition) -> high watermark, for the partitions of one named group of topics."""
        with self._lock:
            return {(tp.topic, tp.partition): self._watermarks.get_watermark_offsets(tp, timeout=timeout,
                                                                                     cached=False)[1]
                    for tp in self._parts[name]}

    def total(self, name: str) -> int:
        return sum(self.ends(name).values())

    def totals(self) -> dict[str, int]:
        return {name: self.total(name) for name in self._parts}

    def _committed(self, group: str, name: str, timeout: float) -> dict[tuple[str, int], int]:
        from confluent_kafka import Consumer

        with self._lock:
            if group not in self._groups:  # committed() answers for its own consumer's group
                self._groups[group] = Consumer({"bootstrap.servers": self._bootstrap, "group.id": group,
                                                "enable.auto.commit": False})
            return {(tp.topic, tp.partition): max(tp.offset, 0)
                    for tp in self._groups[group].committed(self._parts[name], timeout=timeout)}

    def committed(self, group: str, name: str, timeout: float = 10.0) -> int:
        """The offsets `group` committed on one named group of topics, summed."""
        return sum(self._committed(group, name, timeout).values())

    def lag(self, group: str, name: str, timeout: float = 10.0) -> int:
        """High watermarks minus `group`'s committed offsets: what a restart would read again."""
        committed = self._committed(group, name, timeout)
        return sum(end - committed.get(key, 0) for key, end in self.ends(name, timeout).items())

    def close(self) -> None:
        """Close the consumers (while the broker still runs); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for consumer in (self._watermarks, *self._groups.values()):
                with contextlib.suppress(Exception):
                    consumer.close()


def delete_topics_with_prefix(kafka: Any, prefix: str) -> None:
    """On a shared cluster, remove this run's topics (ours, faust's changelogs, a baseline's);
    a failure is logged, not fatal: the measurements are valid either way."""
    try:
        names = [t for t in kafka.admin().list_topics(timeout=30).topics if t.startswith(prefix)]
        for future in kafka.admin().delete_topics(names, operation_timeout=30).values():
            future.result(timeout=30)
        log(f"deleted {len(names)} topics {prefix}*")
    except Exception as exc:  # noqa: BLE001 - the measurements are valid either way
        log(f"could not delete topics {prefix}*: {exc}")


def start_kafka(stack: contextlib.ExitStack, settings: Any, scratch: Path, prefix: str,
                delete_topics: bool = True) -> Any:
    """Kafka for one benchmark run (`KAFKA_BOOTSTRAP_SERVERS` if set, else a local broker in
    `scratch`, stopped when `stack` closes). With `delete_topics`, on an external cluster the
    run's topics (`prefix`*) are deleted when `stack` closes."""
    from deploy.providers import kafka_service

    log("starting Kafka (KAFKA_BOOTSTRAP_SERVERS if set, else a local broker) ...")
    kafka = stack.enter_context(kafka_service(settings, scratch / "kafka"))
    log(f"Kafka ({kafka.provider}) at {kafka.bootstrap_servers}; topic prefix {prefix}")
    if delete_topics and kafka.provider == "external":
        stack.callback(delete_topics_with_prefix, kafka, prefix)
    return kafka


# -- reporting ------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median (the lower middle value for an even count: one that was measured), min and max of repeated
    measurements of one figure, and how many there were."""
    return {"median": statistics.median_low(values), "min": min(values), "max": max(values), "runs": len(values)}


def median_run(runs: list[dict[str, Any]], key: str = "events_per_s") -> dict[str, Any]:
    """The median run by `key` (the lower middle one for an even count: a run that happened), with
    how many runs there were, each one's `key` and their spread."""
    median = sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]
    values = [r[key] for r in runs]
    return dict(median, runs=len(runs), **{f"{key}_all_runs": values, f"{key}_spread": spread(values)})


def ratio(numerator: float | None, denominator: float | None, digits: int = 4) -> float | None:
    """The subject's figure over the in-run baseline's (None when either is missing or zero)."""
    return round(numerator / denominator, digits) if numerator and denominator else None


def spread_text(s: dict[str, Any], fmt: str = ",.0f") -> str:
    """`median 5,100 (min 4,900, max 5,300, 3 runs)`: repeated runs, as every benchmark prints them."""
    return f"median {s['median']:{fmt}} (min {s['min']:{fmt}}, max {s['max']:{fmt}}, {s['runs']} runs)"


class HostWatch(threading.Thread):
    """What else ran on the host while a benchmark ran: CPU per process from /proc, sampled
    once a second, for every process outside the benchmark's own tree (its Kafka, servers and
    workers are its descendants), plus the load average and whole-host CPU over the run."""

    def __init__(self, interval_s: float = 1.0) -> None:
        super().__init__(name="host-watch", daemon=True)
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._own: set[tuple[int, str]] = set()
        self._first: dict[tuple[int, str], tuple[str, int]] = {}  # (pid, start) -> (name, ticks)
        self._last: dict[tuple[int, str], int] = {}
        self.loadavg_start = loadavg()
        self._host_before = host_cpu_ticks()
        self._t0 = time.monotonic()
        self._sample()

    def _sample(self) -> None:
        own = set(descendants(os.getpid()))
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            name = text[text.find("(") + 1:text.rfind(")")]
            fields = text.rsplit(")", 1)[1].split()
            key = (int(entry.name), fields[19])  # pid and start time (field 22): a reused pid is another process
            ticks = int(fields[11]) + int(fields[12])
            if key[0] in own:
                self._own.add(key)
            if key not in self._first:
                self._first[key] = (_process_label(key[0], name), ticks)
            self._last[key] = ticks

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def stop(self) -> dict[str, Any]:
        """Stop sampling; `loadavg_end`, `host_busy_pct` and `other_processes` (the busiest `top`)."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self._sample()
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        others = sorted(((self._last[k] - ticks, name, k[0]) for k, (name, ticks) in self._first.items()
                         if k not in self._own), reverse=True)
        pct = [(round(100 * t / _CLK_TCK / elapsed, 1), name, pid) for t, name, pid in others]
        return {"loadavg_end": loadavg(), "host_busy_pct": host_busy_pct(self._host_before, host_cpu_ticks()),
                "others_cpu_pct": round(sum(p for p, _, _ in pct), 1),
                "other_processes": [{"name": name, "pid": pid, "cpu_pct": p} for p, name, pid in pct[:5] if p >= 1.0]}


def _process_label(pid: int, comm: str) -> str:
    """`java`, or `python -m deploy.chserver` for a Python module: enough to tell neighbours apart."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return comm
    if b"-m" in argv[:3] and argv.index(b"-m") + 1 < len(argv):
        return f"{comm} -m {argv[argv.index(b'-m') + 1].decode(errors='replace')}"
    return comm


def host_line(host: dict[str, Any]) -> str:
    """`host: ...`, the last line of every benchmark's summary: what else ran while it ran."""
    others = ", ".join(f"{o['name']} {o['cpu_pct']:g}%" for o in host.get("other_processes", [])) or "none above 1%"
    return (f"host: {host.get('cpus')} CPUs; load {' '.join(map(str, host.get('loadavg_start', [])))} -> "
            f"{' '.join(map(str, host.get('loadavg_end', [])))}; busy {host.get('host_busy_pct')}% of all CPUs; "
            f"other processes {host.get('others_cpu_pct')}% of one core: {others}")


def thin(progress: list[list[float]], every_s: float) -> list[list[float]]:
    """About one progress sample per `every_s` seconds, always keeping the last."""
    out: list[list[float]] = []
    for row in progress:
        if not out or row[0] - out[-1][0] >= every_s or row is progress[-1]:
            out.append(row)
    return out


def profile_lines(details: dict[str, Any]) -> list[str]:
    """The summary's "top self-time frames" block when a py-spy profile was taken."""
    if "profile" not in details or "self" not in details["profile"]:
        return []
    return ["", f"top self-time frames ({details['profile']['samples']} samples):",
            *(f"  {row['pct']:5.1f}%  {row['frame']}" for row in details["profile"]["self"])]


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_and_report(benchmark: Callable[[], dict[str, Any]], json_out: Path,
                   table: Callable[[dict[str, Any]], str], ok: Callable[[dict[str, Any]], bool]) -> int:
    """Every benchmark's contract: run it with SIGTERM as Ctrl-C and library prints kept off
    stdout, with a `HostWatch` around it (its figures go into the report's `host`, unless the
    benchmark set them); write the JSON report to `json_out`, the table and the `host:` line
    to stderr, the JSON to stdout.
    Exit status 0 when `ok(report)`, 1 otherwise, 130 when interrupted."""
    real_stdout = sys.stdout
    watch = HostWatch()
    watch.start()
    try:
        # Anything a library prints (e.g. Kafka jar download progress) must not corrupt the JSON.
        with sigterm_as_interrupt(), contextlib.redirect_stdout(sys.stderr):
            report = benchmark()
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        during = watch.stop()
    host = report.setdefault("host", dict(host_info(), loadavg_start=watch.loadavg_start))
    for key, value in during.items():
        host.setdefault(key, value)
    text = json.dumps(report, indent=2)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(text + "\n")
    print(table(report), file=sys.stderr)
    print(host_line(host), file=sys.stderr)
    log(f"report written to {json_out}")
    print(text, file=real_stdout, flush=True)
    return 0 if ok(report) else 1


def _frame_function(frame: str) -> str:
    """py-spy raw frame `fn (path/file.py:123)` -> `fn (path/file.py)`."""
    return re.sub(r":\d+\)$", ")", frame)


_BOOT_FRAME = re.compile(r"\((<frozen runpy>|app/cli\.py|app/commands/\w+\.py|processors/worker\.py"
                         r"|postback/workers\.py|mode/worker\.py)\)$"
                         r"|^BaseEventLoop\.(run_forever|run_until_complete|_run_once) |^Handle\._run ")


def _frame_package(frame: str) -> str:
    """`fn (faust/streams.py)` -> `faust`; `fn (<frozen runpy>)` -> `<frozen runpy>`."""
    found = re.search(r"\(([^()]*)\)$", frame)
    where = found[1] if found else frame
    return where if where.startswith("<") else where.split("/", 1)[0].removesuffix(".py")


def top_frames(raw_path: Path, limit: int = 10) -> dict[str, Any]:
    """Where the worker spends its time, from py-spy's raw (collapsed stack) output.

    - `self`: the functions (line numbers merged) on top of the stack most often.
    - `self_by_package`: the same, summed per top-level package of the file (asyncio,
      faust, aiokafka, json, schemas, processors, ...).
    - `inclusive`: functions anywhere on the stack, leaving out the start-up chain every
      sample shares (runpy, the CLIs, mode's worker, the event loop's run/_run_once/Handle._run).
    Percentages are of all samples; py-spy only counts threads that are not idle.
    """
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_function(f) for f in stack.split(";")]
        total += n
        self_counts[frames[-1]] += n
        for f in set(frames):
            incl_counts[f] += n
    by_package: collections.Counter[str] = collections.Counter()
    for frame, n in self_counts.items():
        by_package[_frame_package(frame)] += n

    def rows(counter: collections.Counter[str], key: str = "frame") -> list[dict[str, Any]]:
        return [{key: f, "samples": c, "pct": round(100 * c / total, 1)} for f, c in counter.most_common(limit)]

    inclusive = collections.Counter({f: c for f, c in incl_counts.items() if not _BOOT_FRAME.search(f)})
    return {"samples": total, "self": rows(self_counts), "self_by_package": rows(by_package, "package"),
            "inclusive": rows(inclusive)}


class Child:
    """A subprocess (see `spawn`) with its log file and start time, for the benchmarks
    that time a service from `Popen`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self.started = time.monotonic()
        with open(log_path, "wb") as out:
            self.proc = spawn(argv, env, subprocess.PIPE if stdout_pipe else out,
                              out if stdout_pipe else subprocess.STDOUT)

    def check_alive(self) -> None:
        from deploy.procs import tail

        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited early with {self.proc.returncode}:\n{tail(self.log_path)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal and wait; SIGKILL the process group only if it does not exit in time."""
        code = stop_process(self.proc, self.name, sig, timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def start_py_spy(pid: int, duration_s: float, scratch: Path) -> Child:
    """py-spy sampling `pid` (non-blocking, 100 Hz, raw output in scratch/py-spy.txt)."""
    return Child("py-spy", [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid), "-d",
                            str(int(duration_s)), "-r", "100", "-f", "raw", "-o", str(scratch / "py-spy.txt"),
                            "--nonblocking"], dict(os.environ), scratch / "py-spy.log")


def finish_py_spy(profiler: Child, scratch: Path, top: int, window: str) -> dict[str, Any]:
    """Stop py-spy (it writes its output on Ctrl-C) and summarise it with `top_frames`."""
    from deploy.procs import tail

    profiler.stop(signal.SIGINT, timeout=30)
    raw = scratch / "py-spy.txt"
    if not raw.exists():
        return {"error": tail(scratch / "py-spy.log")}
    profile = top_frames(raw, top)
    profile["window"] = window
    return profile
