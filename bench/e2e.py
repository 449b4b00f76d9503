"""End-to-end: sustained signed postbacks at a fixed rate through the whole pipeline.

What it answers: when partners send N postbacks per second for a while, does the
pipeline (`postback run`: ingester -> Kafka -> faust processors -> sink -> ClickHouse)
keep up; how long from the ingester's 202 until the row is in ClickHouse; how far the
processors fall behind and how long they take to catch up after the load; how much
memory each service takes; and whether every 202 ends up as exactly one outcome row
(no loss, no duplicates).

How:

1. Kafka and ClickHouse from `deploy.providers` (`KAFKA_BOOTSTRAP_SERVERS` /
   `CLICKHOUSE_URL` if set, else a local Apache Kafka and a local ClickHouse server in a
   temp dir). A partner file with one HMAC advertiser and one offer without landing URL
   or allow_ips. `python -m app.cli run` against them with a unique topic prefix,
   database, state dir and free ports; ready when its run.json says so and lists its
   children (ingest, process, sink).
2. Warm-up (not measured): --clicks clicks through GET /click; wait until the processors
   have consumed all of them (their consumer group has no lag on the clicks topic), so
   the clicks precede the conversions that name them; then one signed postback, waited
   for until its outcome row is in ClickHouse (the whole path is up).
3. The load: `bench/e2e_load.py` in its own process (its CPU is not the ingester's):
   open-loop, request i due at t0 + i/rate, unique order ids, ~--click-fraction naming a
   warm-up click, HMAC query-signed GET /postback, every 202's receipt id recorded.
   Latency is taken from the scheduled time, so a slow ingester shows up in it. If the
   generator itself cannot keep the rate, it says so (`generator.kept_rate`, `unsent`,
   `send_lag_ms`).
4. Every second, from ready until the end: the processor's consumer lag on
   raw-postbacks (group `<prefix>-processor`: sum of high watermark - committed), its
   lag on its internal topics, the sink's lag, the rows in postback_outcomes (no FINAL),
   RSS and CPU of each child's process tree (ingest, process, sink from run.json, with
   their workers), of the generator, and of the local Kafka/ClickHouse when started here.
5. After the load: the 202 receipt ids go into a scratch table in the run's database;
   wait (bounded, --drain-timeout) until every one has a row in postback_outcomes FINAL.
   `drain_s` runs from the last answer the generator got until then. Then, for exactly
   these receipts, from ClickHouse:
   - receipt-to-row latency: min(conversions.inserted_at) - received_at per receipt
     (postback_outcomes has no insertion time; the sink writes a batch's conversions
     just before its outcomes); p50/p99/max;
   - received->processed: postback_outcomes.latency_ms; and processed->row;
   - lost: 202 receipts without an outcome row; missing_conversions: accepted outcomes
     without a conversion row;
   - duplicates: outcome rows beyond one per receipt, receipts with several conversion
     rows, conversion_ids twice, orders (each sent once) with several conversions, all
     in FINAL; the outcome rows must number exactly the 202s.
6. `postback run` gets SIGTERM and must exit 0; anything of its tree still alive after
   that is killed; then Kafka and ClickHouse (if started here) are stopped.

Progress and a markdown table go to stderr; stdout carries exactly one JSON document,
also written to --json-out. Exit status: 0 when nothing was lost or duplicated, every
receipt was accepted with its conversion, and `postback run` exited 0 on SIGTERM; 1
otherwise; 130 on Ctrl-C/SIGTERM (everything started is stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from bench.e2e_load import create_clicks
from bench.harness import (
    ADVERTISER, BENCH_DIR, KEY_ID, OFFER, PARTNERS_TOML, SECRET, KafkaOffsets, add_output_args, checked_number,
    child_env, delete_topics_with_prefix, descendants, host_cpu_ticks, host_info, http_get, log, mb, positive_int,
    run_and_report, spawn, tree_cpu_s, tree_hwm_kb, tree_rss_kb,
)
from deploy.procs import alive_since, children, cmdline, free_port, start_time, tail
from deploy.providers import ClickHouseService, clickhouse_service, kafka_service, unique_name
from postback.config import Settings
from postback.topics import Topics
from postback.signing import sign_query

LOAD_MODULE = "bench.e2e_load"
DEFAULT_JSON_OUT = BENCH_DIR / "results" / "e2e.json"
CHILDREN = ("ingest", "process", "sink")
RECEIPTS_TABLE = "bench_e2e_receipts"


# -- processes ------------------------------------------------------------------------
def infra_pids() -> dict[str, int]:
    """The local Kafka broker and ClickHouse server, when the providers started them (our children)."""
    found: dict[str, int] = {}
    for pid in children(os.getpid()):
        line = cmdline(pid)
        if "kafka.Kafka" in line:
            found["kafka"] = pid
        elif "deploy.chserver" in line:
            found["clickhouse"] = pid
    return found


@dataclass
class Pipeline:
    """One `postback run` subprocess and every process of its tree ever seen (pid -> start time)."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path
    known: dict[int, str | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "run.json").read_text())
        except (OSError, ValueError):
            return {}

    def children(self) -> dict[str, int]:
        return {k: v for k, v in (self.info().get("children") or {}).items() if v}

    def track(self) -> None:
        """Remember every process now in the tree (the children run in sessions of their own, so a
        `postback run` that died abruptly would leave them: they are killed at the end)."""
        pids = set(descendants(self.proc.pid)) | set(self.children().values())
        for child in list(self.children().values()):
            pids |= set(descendants(child))
        with self.lock:
            for pid in pids:
                if self.known.get(pid) is None:
                    self.known[pid] = start_time(pid)

    def logs(self, lines: int = 25) -> str:
        parts = [f"--- postback run ({self.log_path}):\n{tail(self.log_path, lines)}"]
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            parts.append(f"--- {path.name}:\n{tail(path, lines)}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"postback run exited with {self.proc.returncode}:\n{self.logs()}")

    def stop(self, timeout: float) -> tuple[int | None, list[str]]:
        """SIGTERM, wait (bounded), then SIGKILL whatever of its tree is left. Returns
        (exit code, None if it had to be killed; the leftovers found). Idempotent."""
        self.track()
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"postback run did not exit {timeout:.0f}s after SIGTERM: SIGKILL")
            self.proc.kill()
            self.proc.wait(timeout=30)
            code = None
        with self.lock:
            known = dict(self.known)
        deadline = time.monotonic() + 15
        left = [p for p, s in known.items() if alive_since(p, s)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p, s in known.items() if alive_since(p, s)]
        leftovers = [f"{p} {cmdline(p)[:100]}" for p in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return code, leftovers


def start_pipeline(args: argparse.Namespace, scratch: Path, bootstrap: str, clickhouse_url: str,
                   prefix: str, database: str) -> Pipeline:
    partners = scratch / "partners.toml"
    partners.write_text(PARTNERS_TOML)
    state = scratch / "state"
    env = child_env(("POSTBACK_SINK_FAULT",), KAFKA_BOOTSTRAP_SERVERS=bootstrap, CLICKHOUSE_URL=clickhouse_url,
                    POSTBACK_STATE_DIR=str(state), POSTBACK_TOPIC_PREFIX=prefix, POSTBACK_CONFIG=str(partners))
    argv = [sys.executable, "-m", "app.cli", "run", "--port", str(free_port()),
            "--process-web-port", str(free_port()), "--sink-metrics-port", str(free_port()),
            "--late-click-wait", f"{args.late_click_wait:g}", "--database", database,
            "--ingest-workers", str(args.ingest_workers), "--process-workers", str(args.process_workers)]
    log_path = scratch / "run.log"
    log("starting: " + " ".join(argv[1:]))
    with open(log_path, "wb") as out:
        # Own session: Ctrl-C reaches only the benchmark, which then stops it with SIGTERM.
        proc = spawn(argv, env, out)
    pipe = Pipeline(proc, state, log_path)
    deadline = time.monotonic() + args.ready_timeout
    while True:
        pipe.check_alive()
        pipe.track()
        info = pipe.info()
        if info.get("ready") and all(info.get("children", {}).get(c) for c in CHILDREN):
            return pipe
        if time.monotonic() > deadline:
            raise TimeoutError(f"postback run not ready after {args.ready_timeout:.0f}s:\n{pipe.logs()}")
        time.sleep(0.25)


# -- probes ---------------------------------------------------------------------------
class LagProbe:
    """Consumer lag of consumer groups (`KafkaOffsets.lag`) under the names of `lag_groups`;
    None where a request failed (a gap in the timeline, not a failure). At one sample a
    second: about 0.07 of a core of the local broker (36 partitions)."""

    def __init__(self, bootstrap: str, groups: dict[str, tuple[str, list[str]]]) -> None:
        self._group = {name: group for name, (group, _topics) in groups.items()}
        self._offsets = KafkaOffsets(bootstrap, {name: topics for name, (_group, topics) in groups.items()})

    def lags(self, timeout: float = 5.0) -> dict[str, int | None]:
        """Lag per name given at construction; None where a request failed."""
        out: dict[str, int | None] = dict.fromkeys(self._group)
        for name, group in self._group.items():
            with contextlib.suppress(Exception):
                out[name] = self._offsets.lag(group, name, timeout)
        return out

    def lag(self, name: str) -> int | None:
        return self.lags()[name]

    def close(self) -> None:
        """Close the consumers while the broker still runs."""
        self._offsets.close()


def lag_groups(prefix: str) -> dict[str, tuple[str, list[str]]]:
    t = Topics(prefix)
    processor, sink = t.processor_group, t.sink_clickhouse_group
    return {"raw": (processor, [t.raw_postbacks.name]),
            "internal": (processor, [t.processor_dedupe.name, t.processor_attribute.name]),
            "clicks": (processor, [t.clicks.name]),
            "sink": (sink, [t.conversions.name, t.rejections.name, t.duplicates.name, t.clicks.name])}


class Sampler(threading.Thread):
    """Once a second: lags, outcome rows, RSS and CPU of each watched process tree, host CPU."""

    def __init__(self, pipe: Pipeline, lags: LagProbe, clickhouse: ClickHouseService, database: str,
                 extra: dict[str, int], interval_s: float = 1.0) -> None:
        super().__init__(name="e2e-sampler", daemon=True)
        self.pipe = pipe
        self.lags = lags
        self.clickhouse = clickhouse
        self.database = database
        self.extra = dict(extra)  # name -> pid (kafka, clickhouse, later the generator)
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.pids_seen: dict[str, list[int]] = {c: [] for c in CHILDREN}
        self.errors: list[str] = []
        self._stop_event = threading.Event()
        self._client: Any = None

    def watch(self, name: str, pid: int) -> None:
        self.extra[name] = pid

    def unwatch(self, name: str) -> None:
        self.extra.pop(name, None)

    def _rows(self) -> int | None:
        try:
            if self._client is None:
                self._client = self.clickhouse.client(self.database)
            return int(self._client.query("SELECT count() FROM postback_outcomes").result_rows[0][0])
        except Exception as exc:  # noqa: BLE001
            self._client = None
            if len(self.errors) < 5:
                self.errors.append(f"rows: {exc}")
            return None

    def sample(self) -> None:
        now = time.monotonic()
        self.pipe.track()
        pids = dict(self.pipe.children())
        for name, pid in pids.items():
            seen = self.pids_seen.setdefault(name, [])
            if not seen or seen[-1] != pid:
                seen.append(pid)
        pids.update(self.extra)
        busy, total = host_cpu_ticks()
        lags = self.lags.lags()
        self.samples.append({
            "t": now,
            "lag_raw": lags["raw"],
            "lag_internal": lags["internal"],
            "lag_clicks": lags["clicks"],
            "lag_sink": lags["sink"],
            "rows": self._rows(),
            "pids": pids,
            "rss_kb": {name: tree_rss_kb(pid) for name, pid in pids.items()},
            "cpu_s": {name: tree_cpu_s(pid) for name, pid in pids.items()},
            "host": (busy, total),
        })

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - keep sampling
                if len(self.errors) < 5:
                    self.errors.append(f"sample: {exc}")
            self._stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=30)


def cpu_pct_between(samples: list[dict[str, Any]], t_from: float, t_to: float) -> dict[str, float | None]:
    """Average CPU of each watched tree (in % of one core) and of the host (in % of all
    CPUs) between the first sample at/after t_from and the last at/before t_to; None
    for a tree whose pid changed in between (a restart) or that was not watched."""
    window = [s for s in samples if t_from <= s["t"] <= t_to]
    if len(window) < 2:
        return {}
    first, last = window[0], window[-1]
    dt = last["t"] - first["t"]
    out: dict[str, float | None] = {}
    for name, pid in last["pids"].items():
        used = last["cpu_s"][name] - first["cpu_s"].get(name, 0.0)
        # A restart (another pid) or an exit (a gone process reads 0) leaves no valid figure.
        out[name] = round(100 * used / dt, 1) if first["pids"].get(name) == pid and used >= 0 else None
    (b0, t0), (b1, t1) = first["host"], last["host"]
    out["host_busy"] = round(100 * (b1 - b0) / max(1, t1 - t0), 1)
    return out


def peak(samples: list[dict[str, Any]], key: str, since: float) -> int | None:
    """The highest reading of `key` from `since` on (the warm-up's clicks are not load)."""
    values = [s[key] for s in samples if s[key] is not None and s["t"] >= since]
    return max(values) if values else None


# -- ClickHouse -----------------------------------------------------------------------
def scalar(client: Any, sql: str) -> Any:
    return client.query(sql).result_rows[0][0]


def store_receipts(client: Any, receipts: list[str]) -> None:
    client.command(f"CREATE TABLE {RECEIPTS_TABLE} (receipt_id String) ENGINE = MergeTree ORDER BY receipt_id")
    for i in range(0, len(receipts), 50_000):
        client.insert(RECEIPTS_TABLE, [[r] for r in receipts[i:i + 50_000]], column_names=["receipt_id"])


IN_RECEIPTS = f"receipt_id IN (SELECT receipt_id FROM {RECEIPTS_TABLE})"


def present_count(client: Any) -> int:
    return int(scalar(client, f"SELECT uniqExact(receipt_id) FROM postback_outcomes FINAL WHERE {IN_RECEIPTS}"))


def quantile_ms(client: Any, expr_sql: str) -> dict[str, float | None]:
    """p50/p99/max of a per-receipt millisecond figure given as `SELECT <ms> FROM ...`."""
    row = client.query(f"SELECT quantilesExact(0.5, 0.99)(ms), max(ms), count() FROM ({expr_sql})").result_rows[0]
    if not row[2]:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    return {"p50": float(row[0][0]), "p99": float(row[0][1]), "max": float(row[1]), "n": int(row[2])}


def clickhouse_figures(client: Any, accepted_202: int) -> dict[str, Any]:
    """Latency, loss and duplicates for exactly the receipts in the scratch table."""
    outcome_rows = int(scalar(client, f"SELECT count() FROM postback_outcomes FINAL WHERE {IN_RECEIPTS}"))
    receipts_with_outcome = present_count(client)
    kinds = {f"{o}:{r}" if r else o: int(n) for o, r, n in client.query(
        f"SELECT outcome, reason, count() FROM postback_outcomes FINAL WHERE {IN_RECEIPTS} "
        f"GROUP BY outcome, reason ORDER BY outcome, reason").result_rows}
    ms = "toUnixTimestamp64Milli"
    receipt_to_row = quantile_ms(client, (
        f"SELECT min({ms}(inserted_at)) - any({ms}(received_at)) AS ms FROM conversions "
        f"WHERE {IN_RECEIPTS} GROUP BY receipt_id"))
    processed_to_row = quantile_ms(client, (
        f"SELECT min({ms}(inserted_at)) - any({ms}(processed_at)) AS ms FROM conversions "
        f"WHERE {IN_RECEIPTS} GROUP BY receipt_id"))
    received_to_processed = quantile_ms(client, (
        f"SELECT latency_ms AS ms FROM postback_outcomes FINAL WHERE {IN_RECEIPTS}"))
    attribution = {a: int(n) for a, n in client.query(
        f"SELECT attribution, count() FROM conversions FINAL WHERE {IN_RECEIPTS} GROUP BY attribution").result_rows}
    dup = {
        "outcome_rows_beyond_one_per_receipt": outcome_rows - receipts_with_outcome,
        "receipts_with_several_conversions": int(scalar(client, (
            f"SELECT count() FROM (SELECT receipt_id FROM conversions FINAL WHERE {IN_RECEIPTS} "
            f"GROUP BY receipt_id HAVING count() > 1)"))),
        "conversion_ids_twice": int(scalar(client, (
            f"SELECT count() FROM (SELECT conversion_id FROM conversions FINAL WHERE {IN_RECEIPTS} "
            f"GROUP BY conversion_id HAVING count() > 1)"))),
        "orders_with_several_conversions": int(scalar(client, (
            f"SELECT count() FROM (SELECT order_id FROM conversions FINAL WHERE {IN_RECEIPTS} "
            f"GROUP BY order_id HAVING uniqExact(conversion_id) > 1)"))),
    }
    missing_conversions = int(scalar(client, (
        f"SELECT count() FROM postback_outcomes FINAL WHERE {IN_RECEIPTS} AND outcome = 'accepted' "
        f"AND receipt_id NOT IN (SELECT receipt_id FROM conversions WHERE {IN_RECEIPTS})")))
    return {
        "outcome_rows": outcome_rows,
        "receipts_with_outcome": receipts_with_outcome,
        "outcome_rows_equal_202s": outcome_rows == accepted_202,
        "outcomes": kinds,
        "not_accepted": sum(n for k, n in kinds.items() if k != "accepted"),
        "attribution": attribution,
        "latency_receipt_to_row_ms": receipt_to_row,
        "latency_received_to_processed_ms": received_to_processed,
        "latency_processed_to_row_ms": processed_to_row,
        "duplicates_detail": dup,
        "duplicates": sum(dup.values()),
        "missing_conversions": missing_conversions,
        # Outcome rows for receipts nobody got a 202 for (the warm-up postback is one; a
        # request whose answer was lost, e.g. a client timeout, may add more).
        "outcome_rows_without_202": int(scalar(
            client, f"SELECT count() FROM postback_outcomes FINAL WHERE receipt_id NOT IN "
                    f"(SELECT receipt_id FROM {RECEIPTS_TABLE})")),
    }


# -- the ingester's own view -----------------------------------------------------------
def postback_histogram(url: str) -> dict[str, float] | None:
    """Cumulative buckets (le -> count, plus "sum") of the ingester's latency histogram for
    /postback, from its /metrics; None when unavailable. With --ingest-workers > 1 each
    scrape reaches one worker only, so this is used with one worker."""
    try:
        status, body = http_get(f"{url}/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if 'route="/postback"' not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("postback_ingest_request_seconds_bucket"):
            out[name.split('le="', 1)[1].split('"', 1)[0]] = float(value)
        elif name.startswith("postback_ingest_request_seconds_sum"):
            out["sum"] = float(value)
    return out or None


def server_latency(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """The ingester's request latency for /postback between two scrapes: count, mean, and the
    histogram bucket bounds that hold p50 and p99 (upper bounds, in ms; "+Inf" above 10 s)."""
    if not before or not after or "+Inf" not in after:
        return None
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    total = delta["+Inf"]
    if total <= 0:
        return None
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("+Inf", "sum"))

    def upper(q: float) -> float | str:
        for le, cum in bounds:
            if cum >= q * total:
                return round(le * 1000, 1)
        return "+Inf"

    return {"count": int(total), "mean_ms": round(1000 * delta.get("sum", 0.0) / total, 1),
            "p50_at_most_ms": upper(0.5), "p99_at_most_ms": upper(0.99)}


# -- warm-up --------------------------------------------------------------------------
def wait_for(predicate: Any, timeout: float, what: str, pipe: Pipeline, interval: float = 0.5) -> float:
    """Seconds until `predicate()` is truthy (exceptions count as "not yet"); TimeoutError after `timeout`."""
    started = time.monotonic()
    last: Any = None
    while True:
        pipe.check_alive()
        try:
            if predicate():
                return time.monotonic() - started
        except Exception as exc:  # noqa: BLE001
            last = exc
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})\n"
                               f"{pipe.logs()}")
        time.sleep(interval)


def warm_up(args: argparse.Namespace, pipe: Pipeline, url: str, lags: LagProbe, client: Any, tag: str,
            scratch: Path) -> dict[str, Any]:
    """Clicks (consumed by the processors before the load) and one postback through to ClickHouse."""
    started = time.monotonic()
    click_ids, statuses = asyncio.run(create_clicks(url, args.clicks, OFFER))
    clicks_s = time.monotonic() - started
    log(f"warm-up: {len(click_ids):,} clicks in {clicks_s:.1f}s (answers {statuses})")
    if args.clicks and not click_ids:
        raise RuntimeError(f"no click was accepted: {statuses}\n{pipe.logs()}")
    consumed = True
    try:
        waited = wait_for(lambda: lags.lag("clicks") == 0, args.ready_timeout, "the processors to consume the "
                          "clicks", pipe)
        log(f"warm-up: the processors consumed every click after {waited:.1f}s more")
    except TimeoutError:
        consumed = False
        log(f"warm-up: WARNING the processors still lag {lags.lag('clicks')} clicks; going on")
    ids_file = scratch / "click_ids.json"
    ids_file.write_text(json.dumps(click_ids))

    params = [("advertiser_id", ADVERTISER), ("event", "purchase"), ("order_id", f"{tag}-warmup"),
              ("amount", "1.00"), ("currency", "USD")]
    if click_ids:
        params.insert(2, ("click_id", click_ids[0]))
    query = urlencode(sign_query(params, SECRET, int(time.time()), KEY_ID), quote_via=quote)
    t = time.monotonic()
    status, body = http_get(f"{url}/postback?{query}")
    if status != 202:
        raise RuntimeError(f"warm-up postback answered {status}: {body[:300]!r}")
    receipt = json.loads(body)["receipt_id"]
    wait_for(lambda: scalar(client, f"SELECT count() FROM postback_outcomes WHERE receipt_id = '{receipt}'"),
             args.ready_timeout, "the warm-up postback's outcome row", pipe)
    postback_s = time.monotonic() - t
    log(f"warm-up: one postback reached postback_outcomes after {postback_s:.2f}s")
    return {"clicks": len(click_ids), "click_answers": statuses, "clicks_s": round(clicks_s, 2),
            "clicks_consumed_before_load": consumed, "postback_to_row_s": round(postback_s, 2),
            "click_ids_file": ids_file}


# -- the benchmark --------------------------------------------------------------------
def run_generator(args: argparse.Namespace, url: str, ids_file: Path, tag: str, scratch: Path,
                  sampler: Sampler) -> dict[str, Any]:
    out = scratch / "load.json"
    argv = [sys.executable, "-m", LOAD_MODULE, "--url", url, "--rate", f"{args.rate:g}", "--duration",
            f"{args.duration:g}", "--advertiser-id", ADVERTISER, "--secret", SECRET, "--key-id", KEY_ID,
            "--tag", tag, "--click-ids-file", str(ids_file), "--click-fraction", f"{args.click_fraction:g}",
            "--connections", str(args.connections), "--request-timeout", f"{args.request_timeout:g}",
            "--seed", str(args.seed), "--out", str(out)]
    proc = spawn(argv, None, subprocess.DEVNULL, None)
    sampler.watch("load", proc.pid)
    try:
        code = proc.wait(timeout=args.duration + args.request_timeout + 120)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    sampler.unwatch("load")
    if code != 0 or not out.exists():
        raise RuntimeError(f"the load generator exited with {code}")
    return json.loads(out.read_text())


def timeline(samples: list[dict[str, Any]], t0: float) -> list[list[Any]]:
    rows = []
    prev = None
    for s in samples:
        cpu: dict[str, float | None] = {}
        if prev is not None:
            dt = s["t"] - prev["t"]
            for name in TIMELINE_CPU:
                same = name in s["pids"] and prev["pids"].get(name) == s["pids"][name]
                used = s["cpu_s"][name] - prev["cpu_s"][name] if same else -1.0
                cpu[name] = round(100 * used / dt) if used >= 0 and dt > 0 else None
        rows.append([round(s["t"] - t0, 1), s["lag_raw"], s["lag_internal"], s["lag_sink"], s["rows"],
                     *(mb(s["rss_kb"].get(c, 0)) for c in CHILDREN),
                     *(cpu.get(c) for c in TIMELINE_CPU)])
        prev = s
    return rows


TIMELINE_CPU = ("ingest", "process", "sink", "load", "kafka", "clickhouse")
TIMELINE_COLUMNS = ["s_since_load_start", "lag_raw", "lag_internal", "lag_sink", "outcome_rows",
                    "rss_mb_ingest", "rss_mb_process", "rss_mb_sink", *(f"cpu_pct_{c}" for c in TIMELINE_CPU)]


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    host = host_info()
    settings = Settings.from_env()
    prefix = unique_name("bench")
    database = unique_name("bench_e2e")
    tag = "E2E-" + prefix.rsplit("_", 1)[1]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, contextlib.ExitStack() as stack:
        scratch = Path(tmp)
        log("starting Kafka and ClickHouse (KAFKA_BOOTSTRAP_SERVERS / CLICKHOUSE_URL if set, else local) ...")
        kafka = stack.enter_context(kafka_service(settings, scratch / "kafka"))
        clickhouse = stack.enter_context(clickhouse_service(settings, scratch / "clickhouse"))
        log(f"Kafka ({kafka.provider}) at {kafka.bootstrap_servers}, ClickHouse ({clickhouse.provider}) at "
            f"{clickhouse.url}; prefix {prefix}, database {database}")
        if kafka.provider == "external":
            stack.callback(delete_topics_with_prefix, kafka, prefix)
        if clickhouse.provider == "external":
            stack.callback(clickhouse.drop_database, database)
        if args.logs_dir:
            stack.callback(copy_logs, scratch, args.logs_dir)

        started = time.monotonic()
        pipe = start_pipeline(args, scratch, kafka.bootstrap_servers, clickhouse.url, prefix, database)
        stopped: dict[str, Any] = {}

        def stop_pipeline() -> None:
            if "code" not in stopped:
                log("stopping postback run (SIGTERM) ...")
                stopped["code"], stopped["leftovers"] = pipe.stop(args.stop_timeout)

        stack.callback(stop_pipeline)
        url = pipe.info()["ingest_url"]
        ready_s = time.monotonic() - started
        log(f"postback run ready after {ready_s:.1f}s at {url}; children {pipe.children()}")

        lags = LagProbe(kafka.bootstrap_servers, lag_groups(prefix))
        stack.callback(lags.close)
        sampler = Sampler(pipe, lags, clickhouse, database, infra_pids())
        sampler.start()
        stack.callback(sampler.stop)
        client = clickhouse.client(database)

        warm = warm_up(args, pipe, url, lags, client, tag, scratch)
        hwm_before = {c: tree_hwm_kb(pid) for c, pid in pipe.children().items()}

        log(f"load: {args.rate:g} postbacks/s for {args.duration:g}s ({args.click_fraction:.0%} with a click_id), "
            f"generator in its own process ...")
        histogram_before = postback_histogram(url) if args.ingest_workers == 1 else None
        gen = run_generator(args, url, warm["click_ids_file"], tag, scratch, sampler)
        ingester_latency = server_latency(histogram_before, postback_histogram(url)) \
            if args.ingest_workers == 1 else None
        t0, t_end, t_last = gen["t_start_monotonic"], gen["t_window_end_monotonic"], gen["t_last_answer_monotonic"]
        receipts = gen.pop("receipts")
        log(f"load: sent {gen['sent']:,} ({gen['send_rate']:,.0f}/s), 202 {gen['accepted_202']:,}, non-202 "
            f"{gen['non_202']:,}, errors {gen['errors']:,}; HTTP latency from schedule p50 "
            f"{gen['latency_from_scheduled_ms']['p50']} ms, p99 {gen['latency_from_scheduled_ms']['p99']} ms; "
            f"generator CPU {gen['cpu_pct']}%, kept rate: {gen['kept_rate']}")
        if len(set(receipts)) != len(receipts):
            raise RuntimeError("the ingester gave one receipt id to two requests")
        store_receipts(client, receipts)

        log(f"drain: waiting (at most {args.drain_timeout:.0f}s) for {len(receipts):,} outcome rows ...")
        present = 0
        drained_at: float | None = None
        last_log = 0.0
        deadline = time.monotonic() + args.drain_timeout
        while True:
            pipe.check_alive()
            with contextlib.suppress(Exception):
                present = present_count(client)
            now = time.monotonic()
            if present >= len(receipts):
                drained_at = now
                break
            if now > deadline:
                log(f"drain: gave up after {args.drain_timeout:.0f}s with {present:,} of {len(receipts):,}")
                break
            if now - last_log >= 10:
                last_log = now
                latest = sampler.samples[-1] if sampler.samples else {}
                log(f"drain: {now - t_last:5.0f}s after the last answer: {present:,}/{len(receipts):,} outcome "
                    f"rows; processor lag {latest.get('lag_raw')} raw + {latest.get('lag_internal')} internal, "
                    f"sink lag {latest.get('lag_sink')}")
            time.sleep(0.5)
        drain_s = None if drained_at is None else max(0.0, drained_at - t_last)
        if drain_s is not None:
            log(f"drain: every 202 has its outcome row {drain_s:.1f}s after the last answer "
                f"({drained_at - t0:.1f}s after the load started)")
        t_done = time.monotonic()
        figures = clickhouse_figures(client, len(receipts))
        time.sleep(min(1.0, args.duration))  # one more sample after the drain
        sampler.stop()
        hwm = {c: max(hwm_before.get(c, 0), tree_hwm_kb(pid)) for c, pid in pipe.children().items()}
        stop_pipeline()
        log(f"postback run exited {stopped['code']}" + (f"; killed leftovers {stopped['leftovers']}"
                                                         if stopped["leftovers"] else ""))
        if stopped["code"] != 0:
            log(pipe.logs(40))
        samples = list(sampler.samples)
        restarts = {name: len(pids) - 1 for name, pids in sampler.pids_seen.items() if pids}
        kafka_provider, clickhouse_provider = kafka.provider, clickhouse.provider

    lost = len(receipts) - figures["receipts_with_outcome"]
    window = [s for s in samples if s["t"] <= t_done]
    rss_peak = {c: mb(max((s["rss_kb"].get(c, 0) for s in window), default=0)) for c in CHILDREN}
    load_samples = [s for s in samples if t0 <= s["t"] <= t_end]
    rows_during = [s["rows"] for s in load_samples if s["rows"] is not None]
    rows_rate = None
    if len(rows_during) >= 2:
        rows_rate = round((rows_during[-1] - rows_during[0]) / (load_samples[-1]["t"] - load_samples[0]["t"]), 1)
    answered_s = max(t_last - t0, 1e-9)
    ok = (lost == 0 and figures["duplicates"] == 0 and figures["outcome_rows_equal_202s"]
          and figures["missing_conversions"] == 0 and figures["not_accepted"] == 0 and stopped["code"] == 0
          and not stopped["leftovers"])
    report = {
        "benchmark": "e2e",
        "rate_target": args.rate,
        "duration_s": args.duration,
        "ingest_workers": args.ingest_workers,
        "process_workers": args.process_workers,
        "sent": gen["sent"],
        "send_rate": gen["send_rate"],
        "generator_kept_rate": gen["kept_rate"],
        "generator_limited_by": gen["limited_by"],
        "accepted_202": gen["accepted_202"],
        "non_202": gen["non_202"],
        "errors": gen["errors"],
        "accepted_per_s": round(gen["accepted_202"] / answered_s, 1),
        "http_latency_ms": gen["latency_from_scheduled_ms"],
        "ingester_latency": ingester_latency,
        "latency_receipt_to_row_ms": figures["latency_receipt_to_row_ms"],
        "latency_received_to_processed_ms": figures["latency_received_to_processed_ms"],
        "latency_processed_to_row_ms": figures["latency_processed_to_row_ms"],
        "lag_peak": peak(samples, "lag_raw", t0),
        "lag_internal_peak": peak(samples, "lag_internal", t0),
        "sink_lag_peak": peak(samples, "lag_sink", t0),
        "outcome_rows_per_s_during_load": rows_rate,
        "drain_s": None if drain_s is None else round(drain_s, 1),
        "load_start_to_all_rows_s": None if drained_at is None else round(drained_at - t0, 1),
        "rss_mb_peak": rss_peak,
        "rss_mb_hwm": {c: mb(v) for c, v in hwm.items()},
        "rss_mb_at_ready": {c: mb(samples[0]["rss_kb"].get(c, 0)) for c in CHILDREN} if samples else {},
        "cpu_pct_during_load": cpu_pct_between(samples, t0, t_end),
        "cpu_pct_during_drain": cpu_pct_between(samples, t_last, t_done) if drained_at else {},
        "lost": lost,
        "duplicates": figures["duplicates"],
        "ok": ok,
        "checks": {
            "lost": lost,
            "duplicates": figures["duplicates"],
            "duplicates_detail": figures["duplicates_detail"],
            "outcome_rows_for_202s": figures["outcome_rows"],
            "outcome_rows_equal_202s": figures["outcome_rows_equal_202s"],
            "missing_conversions": figures["missing_conversions"],
            "not_accepted": figures["not_accepted"],
            "outcomes": figures["outcomes"],
            "attribution": figures["attribution"],
            "outcome_rows_without_202": figures["outcome_rows_without_202"],
            "postback_run_exit_code": stopped["code"],
            "leftover_processes": stopped["leftovers"],
            "child_restarts": restarts,
        },
        "generator": gen,
        "warmup": {k: v for k, v in warm.items() if k != "click_ids_file"},
        "late_click_wait_s": args.late_click_wait,
        "click_fraction": args.click_fraction,
        "kafka": kafka_provider,
        "clickhouse": clickhouse_provider,
        "ready_s": round(ready_s, 1),
        "sampler_errors": sampler.errors,
        "timeline_columns": TIMELINE_COLUMNS,
        "timeline": timeline(samples, t0),
        "host": host,
    }
    return report


def copy_logs(scratch: Path, logs_dir: Path) -> None:
    logs_dir.mkdir(parents=True, exist_ok=True)
    for path in [scratch / "run.log", *sorted((scratch / "state" / "logs").glob("*.log"))]:
        if path.exists():
            shutil.copy(path, logs_dir / path.name)
    log(f"logs copied to {logs_dir}")


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(r: dict[str, Any]) -> str:
    g, rt, rp, rss, cpu = (r["generator"], r["latency_receipt_to_row_ms"], r["latency_received_to_processed_ms"],
                           r["rss_mb_peak"], r["cpu_pct_during_load"])
    lines = [
        f"e2e benchmark: {fmt(r['rate_target'])}/s for {fmt(r['duration_s'])} s, {r['ingest_workers']} ingest / "
        f"{r['process_workers']} process worker(s), Kafka {r['kafka']}, ClickHouse {r['clickhouse']}, "
        f"{r['host']['cpus']} CPUs",
        "",
        "| target/s | sent/s | accepted/s | 202 | non-202 | errors | HTTP p50 / p99 ms | receipt→row p50 / p99 ms | "
        "received→processed p50 / p99 ms | lag peak | drain s | RSS peak MB ingest / process / sink | lost | dup |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {fmt(r['rate_target'])} | {fmt(r['send_rate'])} | {fmt(r['accepted_per_s'])} | {fmt(r['accepted_202'])} | "
        f"{fmt(r['non_202'])} | {fmt(r['errors'])} | {fmt(r['http_latency_ms']['p50'])} / "
        f"{fmt(r['http_latency_ms']['p99'])} | {fmt(rt['p50'])} / {fmt(rt['p99'])} | {fmt(rp['p50'])} / "
        f"{fmt(rp['p99'])} | {fmt(r['lag_peak'])} | {fmt(r['drain_s'])} | {rss['ingest']} / {rss['process']} / "
        f"{rss['sink']} | {fmt(r['lost'])} | {fmt(r['duplicates'])} |",
        "",
        "CPU during the load (% of one core): " + ", ".join(f"{k} {fmt(v)}" for k, v in cpu.items()),
        f"generator: kept the rate: {g['kept_rate']} (limited by {g['limited_by']}; unsent {fmt(g['unsent'])}, send "
        f"lag p99 {g['send_lag_ms']['p99']} ms, in flight max {fmt(g['inflight_max'])}, CPU {g['cpu_pct']}%)",
        f"ingester's own /postback latency: {r['ingester_latency']}; outcome rows/s during the load: "
        f"{fmt(r['outcome_rows_per_s_during_load'])}",
        f"checks: {json.dumps(r['checks']['duplicates_detail'])}, outcomes {r['checks']['outcomes']}, missing "
        f"conversions {r['checks']['missing_conversions']}, postback run exit {r['checks']['postback_run_exit_code']}"
        f" -> {'OK' if r['ok'] else 'FAILED'}",
    ]
    return "\n".join(lines)


fraction = checked_number("fraction", float, lambda v: 0 <= v <= 1, "must be between 0 and 1, got {value:g}")
positive_float = checked_number("positive_float", float, lambda v: v > 0, "must be > 0, got {value:g}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="End-to-end benchmark: start Kafka, ClickHouse and `postback run` (ingester, processors, "
                    "sink), send HMAC-signed GET /postback at a fixed rate for a fixed time from an open-loop "
                    "generator in its own process (bench/e2e_load.py), sample processor lag, RSS and outcome "
                    "rows every second, wait until every 202 has its row in postback_outcomes FINAL, and report "
                    "receipt-to-row latency, drain time, peak RSS, loss and duplicates. One JSON document goes to "
                    "stdout (and --json-out); progress and a markdown table go to stderr.",
        epilog="Kafka / ClickHouse: KAFKA_BOOTSTRAP_SERVERS / CLICKHOUSE_URL if set (this run's topics and "
               "database are deleted at the end), else a local Apache Kafka and a local ClickHouse server in a "
               "temp dir. Everything shares this host's CPUs: when the processors fall behind, lag_peak "
               "grows during the load and drain_s says how long catching up took (docs/benchmarks.md has "
               "measured figures). "
               "Exit status: 0 ok; 1 a 202 without its outcome row, a duplicate, an accepted outcome without "
               "its conversion, a postback not accepted, or `postback run` not exiting 0 on SIGTERM; 130 "
               "interrupted.")
    parser.add_argument("--rate", type=positive_float, default=2000.0, metavar="N",
                        help="postbacks per second to send (default 2000)")
    parser.add_argument("--duration", type=positive_float, default=60.0, metavar="S",
                        help="seconds of load (default 60)")
    parser.add_argument("--ingest-workers", type=positive_int, default=1, metavar="N",
                        help="postback run --ingest-workers (default 1)")
    parser.add_argument("--process-workers", type=positive_int, default=1, metavar="N",
                        help="postback run --process-workers (default 1)")
    parser.add_argument("--clicks", type=int, default=2000, metavar="N",
                        help="clicks created through GET /click before the load (default 2000)")
    parser.add_argument("--click-fraction", type=fraction, default=0.9, metavar="F",
                        help="share of postbacks naming one of those clicks; the rest carry no click_id "
                             "(default 0.9)")
    parser.add_argument("--connections", type=positive_int, default=256, metavar="N",
                        help="the generator's keep-alive connections (default 256). Each carries one request "
                             "at a time, and a 202 waits for Kafka's acknowledgement: rate x latency must stay "
                             "well below this, or requests queue in the generator")
    parser.add_argument("--request-timeout", type=positive_float, default=30.0, metavar="S",
                        help="the generator's per-request timeout; a timeout counts as an error (default 30)")
    parser.add_argument("--late-click-wait", type=float, default=5.0, metavar="S",
                        help="postback run --late-click-wait (default 5; every named click exists before the load)")
    parser.add_argument("--drain-timeout", type=positive_float, default=300.0, metavar="S",
                        help="how long after the load to wait for every 202's outcome row; the rest count as "
                             "lost (default 300)")
    parser.add_argument("--ready-timeout", type=positive_float, default=180.0, metavar="S",
                        help="bound of each warm-up wait: pipeline ready, clicks consumed, first row (default 180)")
    parser.add_argument("--stop-timeout", type=positive_float, default=150.0, metavar="S",
                        help="how long postback run may take to exit after SIGTERM (default 150)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator's click choice (default 1)")
    add_output_args(parser, DEFAULT_JSON_OUT, "copy postback run's log and the ingest/process/sink logs here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_report(lambda: benchmark(args), args.json_out, markdown_table, lambda report: report["ok"])


if __name__ == "__main__":
    raise SystemExit(main())
