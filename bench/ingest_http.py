"""Ingester throughput, latency, memory and durability under load, against a real Kafka.

What it answers: how many signed postbacks per second one ingester setup accepts, at
what latency and memory, compared with a bare aiohttp server on the same host in the
same run, and whether every 202 it answered is in Kafka (no loss, no duplicates).

Why it is built this way:

- The machine is shared and noisy, so absolute numbers drift between runs. A baseline
  (`bench/bare_server.py`: the same aiohttp/uvloop setup, no Kafka) is measured in the
  *same* run, interleaved with the ingester at each concurrency, and the report gives
  `ratio_rps = ingester / baseline`. Compare ratios, not absolute figures.
- Load comes from `wrk` (a separate C process, one thread) with `bench/postback.lua`,
  which sends a realistic form-encoded postback with a unique order id per request.
- The ingester runs exactly as in production (`python -m app.cli ingest`) against a
  real broker from `deploy.providers.kafka_service`: `KAFKA_BOOTSTRAP_SERVERS` if set,
  else a local Apache Kafka process in a scratch directory, stopped at the end.
- Durability: the ingester promises a 202 only after Kafka acknowledged the record. After
  all runs (warm-ups included, since their 202s land in Kafka too) the ingester is
  stopped gracefully, then the 2xx answers wrk saw are compared with the records in
  the raw-postbacks topic. wrk stops with requests still in flight and never counts
  their answers, so up to `unseen_in_flight` (requests sent minus answers seen) extra
  records are expected; anything beyond that, any loss, or any order id present twice
  fails the check.

Progress and a markdown table go to stderr; stdout carries exactly one JSON document,
also written to `--json-out`. Exit status: 0 when the durability check passed and the
ingester exited 0 on SIGTERM, 1 otherwise, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.harness import (
    BENCH_DIR, REPO, RssSampler, add_output_args, child_env, host_busy_pct, host_cpu_ticks, host_info, http_get,
    log, loop_name, mb, positive_int, run_and_report, settled_count, spawn, start_kafka, stop_process,
    tree_cpu_s,
)
from deploy.procs import tail, wait_until
from deploy.providers import KafkaService, unique_name
from postback.config import Settings
from postback.topics import Topics

LUA_SCRIPT = BENCH_DIR / "postback.lua"
BARE_SERVER = "bench.bare_server"
PARTNERS = REPO / "deploy" / "partners.example.toml"
DEFAULT_JSON_OUT = BENCH_DIR / "results" / "ingest.json"
LISTENING = re.compile(r"listening on http://([0-9.]+):(\d+)")
WRK_JSON = re.compile(r"^WRK_JSON (\{.*\})\s*$", re.MULTILINE)


# -- servers under test ---------------------------------------------------------------
def healthy(url: str) -> bool:
    try:
        return http_get(f"{url}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


@dataclass
class Server:
    """A server subprocess in its own session (Ctrl-C reaches only the benchmark, which
    then stops it deliberately), dying with the benchmark even if that is SIGKILLed."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str], log_path: Path,
              timeout: float = 90.0) -> Server:
        """Start `argv` and return once it announced its port and answers /healthz."""
        with open(log_path, "wb") as out:
            proc = spawn(argv, env, out)
        server = cls(name, proc, log_path)
        try:
            wait_until(server._ready, timeout, f"{name} to answer /healthz")
        except BaseException:
            server.stop()
            raise
        log(f"{name} ready at {server.url} (pid {proc.pid})")
        return server

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}")
        if not self.url:
            found = LISTENING.search(self.log_path.read_text(errors="replace"))
            if not found:
                return False
            self.url = f"http://{found[1]}:{found[2]}"
        return healthy(self.url)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (the graceful path under test); SIGKILL the whole process
        group only if it does not exit in time. Idempotent; returns the exit code
        (negative: killed by that signal)."""
        return stop_process(self.proc, self.name, timeout=timeout)


# -- load generation ------------------------------------------------------------------
@dataclass(frozen=True)
class WrkResult:
    """One wrk run, from the `WRK_JSON` line printed by bench/postback.lua's done()."""

    requests: int  # answers received (any status)
    sent: int  # requests generated, including those unanswered when wrk stopped
    duration_s: float
    non2xx: int  # wrk's "status errors": answers with status > 399 (POST /postback never answers 1xx/3xx)
    connect: int
    read: int
    write: int
    timeout: int  # answers slower than wrk's --timeout (still counted in `requests`)
    latency_ms: dict[str, float]
    #: CPU the server's process tree used during the run, in % of one core (100 = one core
    #: busy). Near 100 per worker means the server is CPU-bound; well below, it waits.
    server_cpu_pct: float = 0.0
    #: Whole-host CPU busy during the run, in % of all CPUs (wrk, Kafka and neighbours
    #: included). Near 100 means everything competed for CPU and figures are pessimistic.
    host_cpu_busy_pct: float = 0.0

    @classmethod
    def parse(cls, stdout: str) -> WrkResult:
        found = WRK_JSON.search(stdout)
        if not found:
            raise RuntimeError(f"no WRK_JSON line in wrk output:\n{stdout}")
        raw = json.loads(found[1])
        errors = raw["errors"]
        return cls(requests=int(raw["requests"]), sent=int(raw["sent"]), duration_s=raw["duration_us"] / 1e6,
                   non2xx=int(errors["status"]), connect=int(errors["connect"]), read=int(errors["read"]),
                   write=int(errors["write"]), timeout=int(errors["timeout"]),
                   latency_ms={k: round(v / 1000, 3) for k, v in raw["latency_us"].items()})

    @property
    def ok(self) -> int:
        """2xx answers (202 for the ingester: each one a record Kafka acknowledged)."""
        return self.requests - self.non2xx

    @property
    def unseen(self) -> int:
        """Requests sent whose answer wrk never saw (in flight at the stop, or socket errors)."""
        return max(0, self.sent - self.requests)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def summary(self) -> dict[str, Any]:
        lat = self.latency_ms
        return {"requests": self.requests, "rps": round(self.rps, 1), "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                "p99_ms": lat["p99"], "p999_ms": lat["p999"], "max_ms": lat["max"], "mean_ms": lat["mean"],
                "non2xx": self.non2xx, "errors": self.connect + self.read + self.write + self.timeout,
                "server_cpu_pct": self.server_cpu_pct, "host_cpu_busy_pct": self.host_cpu_busy_pct,
                "errors_detail": {"connect": self.connect, "read": self.read, "write": self.write,
                                  "timeout": self.timeout}}


def run_wrk(wrk: str, server: Server, concurrency: int, duration_s: int, tag: str, timeout_s: int) -> WrkResult:
    """One wrk run: one thread (the host is small and shared), `concurrency` keep-alive
    connections. subprocess.run kills wrk if we are interrupted."""
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--latency", f"--timeout={timeout_s}s",
           "-s", str(LUA_SCRIPT), f"{server.url}/postback", "--", tag]
    cpu_before, host_before = tree_cpu_s(server.proc.pid), host_cpu_ticks()
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
    cpu_pct = 100 * (tree_cpu_s(server.proc.pid) - cpu_before) / (time.monotonic() - started)
    host_pct = host_busy_pct(host_before, host_cpu_ticks())
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return replace(WrkResult.parse(done.stdout), server_cpu_pct=round(cpu_pct, 1),
                   host_cpu_busy_pct=host_pct)


# -- durability -----------------------------------------------------------------------
def duplicate_order_ids(kafka: KafkaService, topic: str) -> int:
    """Records whose order id was already seen in `topic`: each request carries a unique
    order id, so anything above 0 means a record was written twice (a retry without
    idempotence)."""
    from schemas.codec import Codec

    codec = Codec.for_record("RawPostback")
    seen: collections.Counter[str | None] = collections.Counter()
    for message in kafka.read(topic, timeout=120):
        record = codec.decode(message.value())
        seen[next((p["value"] for p in record["params"] if p["key"] == "order_id"), None)] += 1
    return sum(n - 1 for n in seen.values())


def delete_topics(kafka: KafkaService, topics: Topics) -> None:
    """Remove this run's topics from a shared cluster; a failure is logged, not fatal."""
    names = [spec.name for spec in topics.all()]
    try:
        for future in kafka.admin().delete_topics(names, operation_timeout=30).values():
            future.result(timeout=30)
        log(f"deleted topics {topics.prefix}.*")
    except Exception as exc:  # noqa: BLE001 - the measurements are valid either way
        log(f"could not delete topics {topics.prefix}.*: {exc}")


# -- the benchmark --------------------------------------------------------------------
@dataclass
class IngesterTotals:
    """What wrk saw from the ingester over all its runs, warm-up included."""

    ok: int = 0
    sent: int = 0
    unseen: int = 0
    runs: list[WrkResult] = field(default_factory=list)

    def add(self, result: WrkResult) -> WrkResult:
        self.ok += result.ok
        self.sent += result.sent
        self.unseen += result.unseen
        self.runs.append(result)
        return result


def benchmark(args: argparse.Namespace, wrk: str) -> dict[str, Any]:
    """Start Kafka and both servers, run the load, check durability, stop everything."""
    host = host_info()
    settings = Settings.from_env()
    prefix = unique_name("bench")
    topic = Topics(prefix).raw_postbacks.name
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, contextlib.ExitStack() as stack:
        scratch = Path(tmp)
        kafka = start_kafka(stack, settings, scratch, prefix, delete_topics=False)

        env = child_env(KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, POSTBACK_TOPIC_PREFIX=prefix,
                        POSTBACK_CONFIG=str(PARTNERS))
        baseline = Server.start("baseline", [sys.executable, "-m", BARE_SERVER, "--port", "0"], env,
                                scratch / "baseline.log")
        stack.callback(baseline.stop)
        ingester = Server.start("ingester", [sys.executable, "-m", "app.cli", "ingest", "--port", "0",
                                             "--workers", str(args.workers)], env, scratch / "ingester.log")
        stack.callback(ingester.stop)

        sampler = RssSampler({"ingester": ingester.proc.pid, "baseline": baseline.proc.pid})
        sampler.start()
        stack.callback(sampler.stop)
        totals = IngesterTotals()

        def load(server: Server, concurrency: int, duration_s: int, tag: str) -> WrkResult:
            log(f"{server.name}: {concurrency} connections for {duration_s}s ...")
            result = run_wrk(wrk, server, concurrency, duration_s, tag, args.wrk_timeout)
            log(f"{server.name}: {result.rps:,.0f} req/s, p50 {result.latency_ms['p50']} ms, "
                f"p99 {result.latency_ms['p99']} ms, non-2xx {result.non2xx}, "
                f"socket errors {result.summary()['errors']}, server CPU {result.server_cpu_pct}%, "
                f"host CPU busy {result.host_cpu_busy_pct}%")
            return result

        if args.warmup > 0:  # not reported, but the ingester's 202s count for durability
            first = args.concurrency[0]
            load(baseline, first, args.warmup, "bw")
            totals.add(load(ingester, first, args.warmup, "iw"))
        runs = []
        for c in args.concurrency:
            # Interleaved per concurrency so both sides of a ratio see the same host noise.
            base = load(baseline, c, args.duration, f"b{c}")
            ing = totals.add(load(ingester, c, args.duration, f"i{c}"))
            runs.append({"concurrency": c, "ingester": ing.summary(), "baseline": base.summary(),
                         "ratio_rps": round(ing.rps / base.rps, 3) if base.rps else None})

        sampler.stop()
        log("stopping the ingester (SIGTERM: finish in-flight requests, flush Kafka) ...")
        ingester_code = ingester.stop()
        if ingester_code != 0:
            log(f"ingester exited {ingester_code}:\n{tail(ingester.log_path)}")
        baseline_code = baseline.stop()

        log(f"counting records in {topic} ...")
        records = settled_count(kafka, topic, totals.ok)
        duplicates = duplicate_order_ids(kafka, topic)
        if kafka.provider == "external":  # a local broker goes away with its scratch dir
            delete_topics(kafka, Topics(prefix))
        lost = max(0, totals.ok - records)
        extra = max(0, records - totals.ok)
        return {
            "benchmark": "ingest",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "loop": loop_name(),
            "kafka": kafka.provider,
            "runs": runs,
            "ingester_rss_mb_start": mb(sampler.first["ingester"]),
            "ingester_rss_mb_peak": mb(sampler.peak_kb["ingester"]),
            "baseline_rss_mb_start": mb(sampler.first["baseline"]),
            "baseline_rss_mb_peak": mb(sampler.peak_kb["baseline"]),
            "sent_to_ingester": totals.sent,
            "accepted_202": totals.ok,
            "records_in_topic": records,
            "lost": lost,
            "extra": extra,
            "unseen_in_flight": totals.unseen,
            "duplicate_order_ids": duplicates,
            "durable": lost == 0 and extra <= totals.unseen and duplicates == 0,
            "ingester_exit_code": ingester_code,
            "baseline_exit_code": baseline_code,
            "host": host,
        }


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"ingest benchmark: {report['duration_s']} s per run, {report['workers']} worker(s), "
        f"Kafka {report['kafka']}, {report['host']['cpus']} CPUs",
        "",
        "| connections | ingester req/s | baseline req/s | ratio | ingester p50 / p99 ms | "
        "baseline p50 / p99 ms | ingester non-2xx / errors | CPU % ingester / baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        i, b = run["ingester"], run["baseline"]
        lines.append(f"| {run['concurrency']} | {i['rps']:,.0f} | {b['rps']:,.0f} | {run['ratio_rps']} | "
                     f"{i['p50_ms']} / {i['p99_ms']} | {b['p50_ms']} / {b['p99_ms']} | "
                     f"{i['non2xx']} / {i['errors']} | {i['server_cpu_pct']} / {b['server_cpu_pct']} |")
    lines += [
        "",
        f"RSS peak: ingester {report['ingester_rss_mb_peak']} MB, baseline {report['baseline_rss_mb_peak']} MB",
        f"durability: {report['accepted_202']} x 2xx, {report['records_in_topic']} records, lost "
        f"{report['lost']}, extra {report['extra']} (<= {report['unseen_in_flight']} unseen in flight allowed), "
        f"duplicate order ids {report['duplicate_order_ids']} -> {'OK' if report['durable'] else 'FAILED'}",
    ]
    return "\n".join(lines)


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest_http",
        description="Benchmark the postback ingester against a real Kafka and, in the same run, a bare "
                    "aiohttp server (bench/bare_server.py), both driven by wrk with realistic signed "
                    "form-encoded postbacks. Reports req/s, p50/p99 latency, non-2xx and socket errors "
                    "per concurrency, ingester/baseline ratio, peak RSS, and checks that every 202 is in "
                    "the raw-postbacks topic. One JSON document goes to stdout (and --json-out); progress "
                    "and a markdown table go to stderr.",
        epilog="Kafka: KAFKA_BOOTSTRAP_SERVERS if set, else a local Apache Kafka started in a temp dir. "
               "On a shared machine compare ratio_rps within one run, not absolute req/s across runs. "
               "Exit status: 0 ok, 1 durability check failed or ingester did not exit 0 on SIGTERM, 130 "
               "interrupted.")
    parser.add_argument("--duration", type=positive_int, default=10, metavar="S",
                        help="seconds per measured wrk run (default 10)")
    parser.add_argument("--concurrency", type=concurrency_list, default=[16, 64], metavar="C[,C...]",
                        help="wrk connection counts, one measured run per target each (default 16,64)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="ingester processes (postback ingest --workers; default 1)")
    parser.add_argument("--warmup", type=int, default=2, metavar="S",
                        help="seconds of unreported warm-up per server at the first concurrency (default 2, "
                             "0 = none); the ingester's warm-up 202s still count for durability")
    parser.add_argument("--wrk-timeout", type=positive_int, default=10, metavar="S",
                        help="wrk per-request timeout; slower answers count as timeouts (default 10, "
                             "above the ingester's 5 s Kafka delivery timeout)")
    parser.add_argument("--wrk", default="wrk", help="wrk executable (default: wrk on PATH)")
    add_output_args(parser, DEFAULT_JSON_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which(args.wrk)
    if wrk is None:
        print(f"python -m bench.ingest_http: error: {args.wrk!r} not found (apt-get install wrk)", file=sys.stderr)
        return 2
    return run_and_report(lambda: benchmark(args, wrk), args.json_out, markdown_table,
                          lambda report: report["durable"] and report["ingester_exit_code"] == 0)


if __name__ == "__main__":
    raise SystemExit(main())
