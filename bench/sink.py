"""ClickHouse sink throughput, memory and correctness, against a real Kafka and a real ClickHouse.

What it answers: how many conversion records per second one sink process
(`python -m app.cli sink --only clickhouse`) moves from the conversions topic into
ClickHouse, how much memory it takes, whether ClickHouse then holds exactly what it
should, and how that rate compares with inserting the very same rows straight into a
copy of the same tables with clickhouse-connect (no Kafka, no Avro decoding) in the
same run.

How:

1. Kafka from `deploy.providers.kafka_service` and ClickHouse from
   `deploy.providers.clickhouse_service` (`KAFKA_BOOTSTRAP_SERVERS` / `CLICKHOUSE_URL` if
   set, else a local Apache Kafka and a local ClickHouse server from chdb-core in a temp
   dir); a `bench_<hex>` topic prefix, a `bench_sink_<hex>` database; `ensure_topics`.
2. The conversions topic is pre-filled with N `Conversion` records (Avro single-object
   encoding via `schemas.codec.Codec`, keyed by conversion_id, produced with
   `postback.kafka.producer_config`) *before* the sink starts. The mix is what the
   processors emit: 5 advertisers, 12 offers, 40 affiliates; purchase / lead / renewal /
   custom events; amounts from 0.50 to ~500 in USD/EUR/GBP; ~85 % attributed;
   ~10 % status-change versions (same conversion_id, version + 1, pending -> approved or
   approved -> rejected, a new receipt) and ~3 % refunds (event `refund`, sign -1, a new
   conversion_id for an earlier purchase). Every record is one receipt.
3. The sink subprocess is timed from `Popen` until every record is in ClickHouse: the
   sink's committed offsets on the conversions topic sum to N (polled every 0.2 s; the
   sink commits a batch only after inserting it into `conversions` and
   `postback_outcomes`). Why not `SELECT count() FROM conversions` (no FINAL) reaching
   N: background merges of the ReplacingMergeTree collapse a conversion's versions, so
   once a status change and its original are merged that count stays below N for good
   (a 5,000-record trial sat at 4,500 = the distinct conversion_ids). The count is still
   polled: the first poll that sees a row gives the rate from the first row visible to
   the last ((N - rows seen at that poll) / time between), and the time it reached N, if
   it ever did, is reported. Also reported: the sink's CPU use and peak RSS (process
   tree, sampled 5 times a second) and the ClickHouse server's CPU over the same window
   when it is a local process. Then SIGTERM: the sink must exit 0.
4. Correctness: `count() FROM conversions FINAL` must equal the number of distinct
   conversion_ids produced, `count() FROM postback_outcomes FINAL` the number of distinct
   receipts (N), and `sum(version) FROM conversions FINAL` the sum of every
   conversion's latest version (the right row survived).
5. Baseline, in the same run after the sink stopped: the N records are read back from
   Kafka and decoded, `sinks.rows.conversion_rows` builds the same rows (not timed), and
   they are inserted into a fresh copy of the tables (`sinks.migrations.apply_migrations`
   into a second database) in batches of --batch-rows, both tables per batch as the sink
   does (`conversions`, then `postback_outcomes`), with `client.insert_arrow(table,
   pyarrow_table)`. Timed: building the Arrow tables from the row tuples plus the
   inserts (the inserts alone are reported too). Without pyarrow the baseline falls back
   to `client.insert(..., column_oriented=True)` (what the sink itself calls) and says so
   in `baseline.method`. The sink's own insert call is also timed on the same rows into
   a third database (`details.native_insert`), which separates "the insert method" from
   "everything else the sink does" (consume, decode, batching, commits).
   `ratio` = sink rows/s / baseline rows/s.

Optional `--profile`: py-spy samples the sink (non-blocking, 100 Hz) from its first
visible row to the end of the timed run and the report lists the top self-time frames.
Sampling costs the sink CPU on a small host: quote rows/s from a run without it.

Progress and a summary go to stderr; stdout carries exactly one JSON document, also
written to `--json-out`. Exit status: 0 when ClickHouse held the right rows and the sink
exited 0 on SIGTERM, 1 otherwise, 130 on Ctrl-C/SIGTERM (everything started is stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.harness import (
    BENCH_DIR, CROCKFORD, Child, KafkaOffsets, RssSampler, add_output_args, add_profile_args, child_env, descendants,
    finish_py_spy, host_busy_pct, host_cpu_ticks, host_info, log, mb, positive_int, produce_records, ratio,
    profile_lines, run_and_report, start_kafka, start_py_spy, thin, tree_cpu_s,
)
from deploy.procs import tail
from deploy.providers import ClickHouseService, KafkaService, clickhouse_service, unique_name
from postback.config import Settings
from postback.topics import Topics, ensure_topics

DEFAULT_JSON_OUT = BENCH_DIR / "results" / "sink.json"
POLL_S = 0.2
GOAL_ROWS_PER_S = 100_000
TABLES = ("conversions", "postback_outcomes")  # the sink's insert order for conversion records

ADVERTISERS = ("acme", "globex", "initech", "umbrella", "hooli")
OFFERS = {f"offer-{i}": ADVERTISERS[i % len(ADVERTISERS)] for i in range(1, 13)}
AFFILIATES = tuple(f"aff-{i}" for i in range(40))
EVENTS = (("purchase", 0.60), ("lead", 0.25), ("renewal", 0.10), ("custom:signup", 0.05))
CURRENCIES = (("USD", 0.7), ("EUR", 0.2), ("GBP", 0.1))


# -- the workload ---------------------------------------------------------------------
@dataclass
class Workload:
    """The records produced, and what ClickHouse must hold afterwards."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value) in produce order
    counts: dict[str, int] = field(default_factory=lambda: {"new": 0, "status_change": 0, "refund": 0})
    latest_version: dict[str, int] = field(default_factory=dict)  # conversion_id -> highest version
    receipts: set[str] = field(default_factory=set)
    value_bytes: int = 0


def build_workload(n: int, seed: int, status_change: float, refund: float) -> Workload:
    """N conversion records: new conversions, later status-change versions of them, and refunds."""
    from schemas.codec import Codec

    rng = random.Random(seed)
    codec = Codec.for_record("Conversion")
    n_change, n_refund = round(n * status_change), round(n * refund)
    n_new = n - n_change - n_refund
    # The first 5 % are new conversions so that updates and refunds have something to refer to.
    head = min(n_new, max(1, n // 20))
    rest = ["new"] * (n_new - head) + ["status_change"] * n_change + ["refund"] * n_refund
    rng.shuffle(rest)
    kinds = ["new"] * head + rest
    now_ms = int(time.time() * 1000)
    base_ms = now_ms - 3 * 24 * 3600 * 1000  # three days of traffic, one record every few ms
    step_ms = max(1, (now_ms - base_ms) // max(1, n))
    events, event_w = zip(*EVENTS)
    currencies, currency_w = zip(*CURRENCIES)
    offers = list(OFFERS)
    work = Workload()
    live: list[dict[str, Any]] = []  # conversions that may still change status
    purchases: list[dict[str, Any]] = []  # purchases not refunded yet

    def ulid_like() -> str:
        return rng.choice(CROCKFORD[:8]) + "".join(rng.choices(CROCKFORD, k=25))

    def amount() -> Decimal:
        return Decimal(f"{min(4999.99, rng.lognormvariate(3.3, 1.0)) + 0.5:.2f}")

    for i, kind in enumerate(kinds):
        received = base_ms + i * step_ms + rng.randrange(step_ms)
        processed = received + rng.randrange(5, 400)
        if kind == "status_change" and not live or kind == "refund" and not purchases:
            kind = "new"
        if kind == "new":
            event = rng.choices(events, event_w)[0]
            offer = rng.choice(offers)
            advertiser = OFFERS[offer]
            order = f"ORD-{i}-{rng.randrange(10**6):06d}"
            attributed = rng.random() < 0.85
            clicked = received - rng.randrange(60_000, 7 * 24 * 3600 * 1000) if attributed else None
            period = "monthly" if event == "renewal" else None
            key = "|".join([advertiser, event, order] + ([period] if period else []))
            record = {
                "conversion_id": hashlib.sha256(key.encode()).hexdigest()[:32], "receipt_id": ulid_like(),
                "advertiser_id": advertiser, "offer_id": offer,
                "affiliate_id": rng.choice(AFFILIATES) if attributed else None,
                "campaign_id": f"camp-{rng.randrange(200)}" if attributed and rng.random() < 0.5 else None,
                "click_id": ulid_like() if attributed else None,
                "sub1": f"s1-{rng.randrange(1000)}" if attributed else None,
                "sub2": f"s2-{rng.randrange(50)}" if attributed and rng.random() < 0.4 else None,
                "sub3": None, "sub4": None, "sub5": None, "event": event,
                "status": "approved" if rng.random() < 0.7 else "pending", "order_id": order,
                "customer_id": f"cust-{rng.randrange(max(1, n // 3))}" if rng.random() < 0.6 else None,
                "period": period,
                "amount": None if event == "lead" and rng.random() < 0.5 else amount(),
                "currency": rng.choices(currencies, currency_w)[0], "event_time_ms": received - rng.randrange(5000),
                "received_at_ms": received, "processed_at_ms": processed, "clicked_at_ms": clicked,
                "attributed": attributed, "attribution": "attributed" if attributed else "no_click_id",
                "click_to_conversion_s": (received - clicked) // 1000 if clicked else None, "dedupe_key": key,
                "version": 1, "sign": 1, "auth_mode": "hmac" if rng.random() < 0.8 else "token",
                "extras": [{"key": "coupon", "value": f"C{rng.randrange(30)}"}] if rng.random() < 0.2 else [],
            }
            live.append(record)
            if event == "purchase":
                purchases.append(record)
        elif kind == "status_change":
            j = rng.randrange(len(live))
            previous = live[j]
            status = "approved" if previous["status"] == "pending" else "rejected"
            record = dict(previous, receipt_id=ulid_like(), status=status, version=previous["version"] + 1,
                          received_at_ms=received, processed_at_ms=processed)
            if status == "rejected":  # final: no further changes
                live[j] = live[-1]
                live.pop()
            else:
                live[j] = record
        else:  # a refund of an earlier purchase: its own dedupe key and conversion_id, sign -1
            j = rng.randrange(len(purchases))
            original = purchases[j]
            purchases[j] = purchases[-1]
            purchases.pop()
            key = "|".join([original["advertiser_id"], "refund", original["order_id"]])
            record = dict(original, conversion_id=hashlib.sha256(key.encode()).hexdigest()[:32],
                          receipt_id=ulid_like(), event="refund", status="approved", dedupe_key=key, version=1,
                          sign=-1, event_time_ms=received, received_at_ms=received, processed_at_ms=processed,
                          amount=original["amount"] or amount())
        work.counts[kind] += 1
        value = codec.encode(record)
        work.records.append((record["conversion_id"].encode(), value))
        work.value_bytes += len(value)
        work.receipts.add(record["receipt_id"])
        work.latest_version[record["conversion_id"]] = max(record["version"],
                                                           work.latest_version.get(record["conversion_id"], 0))
    return work


def produce_all(bootstrap: str, topic: str, work: Workload) -> float:
    """Produce every record with the project's producer settings and flush. Returns seconds."""
    return produce_records(bootstrap, [(topic, work.records)], 120.0, 180)


# -- measuring the sink ---------------------------------------------------------------
def clickhouse_server_pid() -> int | None:
    """The local ClickHouse server started by `clickhouse_service` (a child of ours), if any."""
    for pid in descendants(os.getpid())[1:]:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"deploy.chserver" in cmdline or Path(f"/proc/{pid}/comm").read_text().startswith("clickhouse"):
                return pid
    return None


def table_counts(client: Any, database: str) -> tuple[int, int]:
    """(rows in conversions, rows in postback_outcomes), no FINAL; (-1, -1) before the tables exist."""
    try:
        row = client.query(f"SELECT (SELECT count() FROM {database}.conversions), "
                           f"(SELECT count() FROM {database}.postback_outcomes)").result_rows[0]
        return int(row[0]), int(row[1])
    except Exception:  # noqa: BLE001 - the sink creates the database and tables after it starts
        return -1, -1


def run_sink(args: argparse.Namespace, kafka: KafkaService, clickhouse: ClickHouseService, topics: Topics,
             database: str, env: dict[str, str], scratch: Path, n: int) -> dict[str, Any]:
    """Start the sink, time it until all N records are inserted (and committed), SIGTERM it."""
    client = clickhouse.client()
    # The sink commits a batch only after inserting it into every table, so its group's committed
    # offsets on the conversions topic reaching N means every record is in ClickHouse.
    offsets = KafkaOffsets(kafka.bootstrap_servers, {"conversions": [topics.conversions.name]})
    group = f"{topics.prefix}-sink-clickhouse"

    def committed() -> int:
        try:
            return offsets.committed(group, "conversions", timeout=5)
        except Exception:  # noqa: BLE001 - coordinator not ready yet: nothing committed as far as we know
            return 0

    ch_pid = clickhouse_server_pid()
    argv = [sys.executable, "-m", "app.cli", "sink", "--only", "clickhouse", "--database", database,
            "--batch-rows", str(args.batch_rows), "--batch-seconds", str(args.batch_seconds)]
    log_path = scratch / "sink.log"
    ch_cpu_before = tree_cpu_s(ch_pid) if ch_pid else 0.0
    host_before = host_cpu_ticks()
    sink = Child("sink", argv, env, log_path)
    profiler: Child | None = None
    sampler = RssSampler({"sink": sink.proc.pid})
    sampler.start()
    try:
        first_s = first_rows = visible_s = None
        progress: list[list[float]] = []
        last_log = 0.0
        while True:
            sink.check_alive()
            conv, outcomes = table_counts(client, database)
            done = committed()
            now = time.monotonic()
            elapsed = now - sink.started
            progress.append([round(elapsed, 2), conv, outcomes, done])
            if conv > 0 and first_s is None:
                first_s, first_rows = elapsed, conv
                if args.profile:
                    profiler = start_py_spy(sink.proc.pid, args.timeout, scratch)
                    log(f"py-spy sampling the sink (pid {sink.proc.pid}) ...")
            if conv >= n and visible_s is None:
                visible_s = elapsed
            if done >= n:
                done_s = elapsed
                sink_cpu_s = tree_cpu_s(sink.proc.pid)
                ch_cpu_s = tree_cpu_s(ch_pid) - ch_cpu_before if ch_pid else None
                host_after = host_cpu_ticks()
                if first_s is None:  # everything landed between two polls
                    first_s, first_rows = elapsed, conv
                log(f"sink: all {n:,} records inserted and committed after {elapsed:.2f}s "
                    f"({n / elapsed:,.0f} rows/s from start)")
                break
            if now - last_log >= 2.0:
                last_log = now
                log(f"sink: {elapsed:5.1f}s, {done:,}/{n:,} records committed; {max(conv, 0):,} conversion rows, "
                    f"{max(outcomes, 0):,} outcome rows (no FINAL)")
            if elapsed > args.timeout:
                raise RuntimeError(f"{done} of {n} records committed ({conv} conversion rows, {outcomes} outcome "
                                   f"rows) after {args.timeout:.0f}s:\n{tail(log_path)}")
            time.sleep(POLL_S)
        sampler.stop()
        profile = None
        if profiler is not None:
            profile = finish_py_spy(profiler, scratch, args.profile_top, "first visible row -> all records committed")
        log("stopping the sink (SIGTERM) ...")
        exit_code = sink.stop()
        if exit_code != 0:
            log(f"sink exited {exit_code}:\n{tail(log_path)}")
    finally:
        if profiler is not None:
            profiler.stop(signal.SIGINT, timeout=10)
        sampler.stop()
        sink.stop()
        client.close()
        offsets.close()
    steady_s = done_s - first_s
    result = {
        "rows_per_s": round(n / done_s, 1),
        "elapsed_s": round(done_s, 3),
        "rows_per_s_after_first_row": round((n - first_rows) / steady_s, 1) if steady_s > 0 else None,
        "first_row_s": round(first_s, 3),
        "rows_at_first_row_poll": first_rows,
        "done_when": "the sink's committed offsets on the conversions topic summed to N (it commits a batch "
                     "only after inserting it into conversions and postback_outcomes)",
        "conversions_count_reached_n_s": None if visible_s is None else round(visible_s, 3),
        "rss_mb_peak": mb(sampler.peak_kb["sink"]),
        "cpu_pct": round(100 * sink_cpu_s / done_s, 1),
        "cpu_ms_per_row": round(1000 * sink_cpu_s / n, 4),
        "clickhouse_server_cpu_pct": round(100 * ch_cpu_s / done_s, 1) if ch_cpu_s is not None else None,
        "host_cpu_busy_pct": host_busy_pct(host_before, host_after),
        "batch_rows": args.batch_rows,
        "batch_seconds": args.batch_seconds,
        "profiled": bool(args.profile),
        "exit_code": exit_code,
    }
    return {"result": result, "profile": profile, "progress": thin(progress, 1.0)}


def check_clickhouse(clickhouse: ClickHouseService, database: str, work: Workload) -> dict[str, Any]:
    client = clickhouse.client()
    try:
        def one(sql: str) -> int:
            return int(client.query(sql).result_rows[0][0])

        found = {
            "conversions_final": one(f"SELECT count() FROM {database}.conversions FINAL"),
            "outcomes_final": one(f"SELECT count() FROM {database}.postback_outcomes FINAL"),
            "sum_latest_version": one(f"SELECT sum(version) FROM {database}.conversions FINAL"),
        }
        # Informative only: merges collapse versions, so this lies anywhere from the FINAL count to N.
        rows_no_final = one(f"SELECT count() FROM {database}.conversions")
    finally:
        client.close()
    expected = {
        "conversions_final": len(work.latest_version),
        "outcomes_final": len(work.receipts),
        "sum_latest_version": sum(work.latest_version.values()),
    }
    checks = {k: found[k] == expected[k] for k in expected}
    return {"correct": all(checks.values()), "checks": checks, "found": found, "expected": expected,
            "conversions_rows_no_final": rows_no_final}


# -- the baseline ---------------------------------------------------------------------
def decoded_rows(kafka: KafkaService, topic: str, n: int) -> tuple[dict[str, list[tuple]], float]:
    """Every record in `topic`, decoded and turned into the sink's rows; and the seconds that took
    (decode + `conversion_rows` only, not the Kafka read)."""
    from schemas.codec import decode_any
    from sinks.rows import ROWS_BY_SCHEMA

    messages = kafka.read(topic, timeout=300)
    if len(messages) != n:
        raise RuntimeError(f"read {len(messages)} records back from {topic}, expected {n}")
    rows: dict[str, list[tuple]] = {table: [] for table in TABLES}
    started = time.perf_counter()
    for msg in messages:
        name, record = decode_any(msg.value())
        for table, row in ROWS_BY_SCHEMA[name](record).items():
            rows[table].append(row)
    return rows, time.perf_counter() - started


def arrow_type(ch_type: str) -> Any:
    """ClickHouse column type -> the Arrow type that ClickHouse's Arrow input reads into it."""
    import pyarrow as pa

    t = ch_type.strip()
    for wrapper in ("LowCardinality(", "Nullable("):
        while t.startswith(wrapper):
            t = t[len(wrapper):-1].strip()
    simple = {"String": pa.string(), "UInt64": pa.uint64(), "Int64": pa.int64(), "Int8": pa.int8(),
              "Bool": pa.bool_(), "UInt8": pa.uint8(), "Int32": pa.int32(), "Float64": pa.float64()}
    if t in simple:
        return simple[t]
    if t.startswith("Decimal("):
        precision, scale = (int(x) for x in t[len("Decimal("):-1].split(","))
        return pa.decimal128(precision, scale)
    if t.startswith("DateTime64("):
        return pa.timestamp("ms", tz="UTC")  # the sink's ints are epoch milliseconds
    if t.startswith("Map("):
        key, value = (arrow_type(x) for x in t[len("Map("):-1].split(",", 1))
        return pa.map_(key, value)
    raise ValueError(f"no Arrow type for ClickHouse type {ch_type!r}")


def arrow_schema(client: Any, database: str, table: str, columns: Sequence[str]) -> Any:
    import pyarrow as pa

    types = dict(client.query("SELECT name, type FROM system.columns WHERE database = {db:String} AND "
                              "table = {t:String}", parameters={"db": database, "t": table}).result_rows)
    return pa.schema([(c, arrow_type(types[c])) for c in columns])


def insert_batches(client: Any, database: str, rows: dict[str, list[tuple]], batch_rows: int,
                   method: str) -> dict[str, float]:
    """Insert the rows, batch by batch, both tables per batch (conversions, then outcomes).

    Returns seconds spent building the insert payloads (Arrow tables) and inserting, and the
    rows ClickHouse reported written per table (a later `count()` could be lower: merges of
    the ReplacingMergeTree collapse the status-change versions)."""
    from sinks.rows import COLUMNS

    schemas = {}
    if method == "insert_arrow":
        import pyarrow as pa

        schemas = {t: arrow_schema(client, database, t, COLUMNS[t]) for t in TABLES}
    build_s = insert_s = 0.0
    written = dict.fromkeys(TABLES, 0)
    n = len(rows[TABLES[0]])
    for start in range(0, n, batch_rows):
        for table in TABLES:
            batch = rows[table][start:start + batch_rows]
            t0 = time.perf_counter()
            columns = [list(col) for col in zip(*batch)]
            if method == "insert_arrow":
                schema = schemas[table]
                payload = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, schema)],
                                               schema=schema)
            t1 = time.perf_counter()
            if method == "insert_arrow":
                answer = client.insert_arrow(f"{database}.{table}", payload)
            else:
                answer = client.insert(f"{database}.{table}", columns, column_names=COLUMNS[table],
                                        column_oriented=True)
            t2 = time.perf_counter()
            build_s += t1 - t0
            insert_s += t2 - t1
            written[table] += int(answer.written_rows)
    return {"build_s": build_s, "insert_s": insert_s, "written": written}


def run_insert_baseline(clickhouse: ClickHouseService, rows: dict[str, list[tuple]], batch_rows: int,
                        method: str) -> dict[str, Any]:
    """Insert the rows into a fresh database migrated like the sink's; time it; check the counts."""
    from sinks.migrations import apply_migrations

    database = unique_name("bench_base")
    client = clickhouse.client()
    try:
        apply_migrations(client, database, lambda _m: None)
        ch_pid = clickhouse_server_pid()
        ch_before = tree_cpu_s(ch_pid) if ch_pid else 0.0
        cpu_before = time.process_time()
        t = insert_batches(client, database, rows, batch_rows, method)
        cpu_s = time.process_time() - cpu_before
        ch_cpu_s = tree_cpu_s(ch_pid) - ch_before if ch_pid else None
        n = len(rows[TABLES[0]])
        counts = t["written"]
        if clickhouse.provider == "external":
            client.command(f"DROP DATABASE IF EXISTS {database}")
    finally:
        client.close()
    total_s = t["build_s"] + t["insert_s"]
    return {
        "method": method,
        "rows_per_s": round(n / total_s, 1),
        "elapsed_s": round(total_s, 3),
        "build_s": round(t["build_s"], 3),
        "insert_s": round(t["insert_s"], 3),
        "rows_per_s_inserts_only": round(n / t["insert_s"], 1),
        "python_cpu_pct": round(100 * cpu_s / total_s, 1),
        "clickhouse_server_cpu_pct": round(100 * ch_cpu_s / total_s, 1) if ch_cpu_s is not None else None,
        "rows_inserted": counts,
        "complete": all(c == n for c in counts.values()),
    }


def pyarrow_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


# -- the benchmark --------------------------------------------------------------------
def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    host = host_info()
    settings = Settings.from_env()
    prefix = unique_name("bench")
    topics = Topics(prefix)
    database = unique_name("bench_sink")
    n = args.rows
    with tempfile.TemporaryDirectory(prefix="bench-sink-") as tmp, contextlib.ExitStack() as stack:
        scratch = Path(tmp)
        kafka = start_kafka(stack, settings, scratch, prefix)
        ensure_topics(kafka.admin(), topics)
        log("starting ClickHouse (CLICKHOUSE_URL if set, else a local server) ...")
        clickhouse = stack.enter_context(clickhouse_service(settings, scratch / "clickhouse"))
        log(f"ClickHouse ({clickhouse.provider}) at {clickhouse.url.split('@')[-1]}; database {database}")
        if clickhouse.provider == "external":
            stack.callback(clickhouse.drop_database, database)

        log(f"building {n:,} conversion records ...")
        work = build_workload(n, args.seed, args.status_changes, args.refunds)
        log(f"pre-filling {topics.conversions.name}: {n:,} records ({work.value_bytes / n:.0f} B avg; "
            f"{work.counts}) ...")
        prefill_s = produce_all(kafka.bootstrap_servers, topics.conversions.name, work)
        in_topic = kafka.count(topics.conversions.name)
        if in_topic != n:
            raise RuntimeError(f"pre-fill: {in_topic} records in {topics.conversions.name}, expected {n}")
        log(f"pre-filled in {prefill_s:.1f}s")

        env = child_env(KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, CLICKHOUSE_URL=clickhouse.url,
                        POSTBACK_TOPIC_PREFIX=prefix)
        log(f"starting the sink (--only clickhouse --batch-rows {args.batch_rows} --batch-seconds "
            f"{args.batch_seconds:g}), timing until all {n:,} records are inserted and committed ...")
        sink_run = run_sink(args, kafka, clickhouse, topics, database, env, scratch, n)
        sink = sink_run["result"]
        details = check_clickhouse(clickhouse, database, work)
        log(f"ClickHouse {'correct' if details['correct'] else 'NOT correct'}: {details['found']} "
            f"(expected {details['expected']})")

        log("baseline: reading the records back and building the rows (not timed) ...")
        rows, decode_s = decoded_rows(kafka, topics.conversions.name, n)
        method = "insert_arrow" if pyarrow_available() else "insert_native"
        if method != "insert_arrow":
            log("pyarrow is not installed in this environment: the baseline falls back to "
                "client.insert(..., column_oriented=True) (the sink's own insert call); baseline.method says so")
        log(f"baseline: {method} into a fresh copy of the tables, batches of {args.batch_rows:,} ...")
        baseline = run_insert_baseline(clickhouse, rows, args.batch_rows, method)
        log(f"baseline: {n:,} records in {baseline['elapsed_s']}s ({baseline['rows_per_s']:,.0f} rows/s)")
        native = None
        if method == "insert_arrow":
            log("also timing the sink's own insert call (insert, column_oriented) on the same rows ...")
            native = run_insert_baseline(clickhouse, rows, args.batch_rows, "insert_native")
            log(f"insert_native: {native['rows_per_s']:,.0f} rows/s")
        if args.logs_dir:
            import shutil

            args.logs_dir.mkdir(parents=True, exist_ok=True)
            for name in ("sink.log", "py-spy.txt", "py-spy.log"):
                if (scratch / name).exists():
                    shutil.copy(scratch / name, args.logs_dir / name)
            log(f"logs copied to {args.logs_dir}")

    baseline["timed"] = ("building the Arrow tables from the row tuples + insert_arrow" if method == "insert_arrow"
                         else "transposing the row tuples to columns + client.insert(column_oriented=True)")
    baseline["tables_per_batch"] = list(TABLES)
    details.update({
        "kafka": kafka.provider,
        "clickhouse": clickhouse.provider,
        "topic_prefix": prefix,
        "database": database,
        "seed": args.seed,
        "mix": work.counts,
        "distinct_conversion_ids": len(work.latest_version),
        "record_bytes_avg": round(work.value_bytes / n, 1),
        "prefill_s": round(prefill_s, 2),
        "goal_rows_per_s": GOAL_ROWS_PER_S,
        "ratio_after_first_row": ratio(sink["rows_per_s_after_first_row"], baseline["rows_per_s"]),
        "python_decode_and_rows": {"seconds": round(decode_s, 3), "rows_per_s": round(n / decode_s, 1),
                                   "note": "decode_any + conversion_rows over the N records in this process, "
                                           "single-threaded: a ceiling for any sink doing this in Python"},
        "native_insert": native,
        "progress_columns": ["s_since_start", "conversion_rows_no_final", "outcome_rows_no_final",
                             "records_committed"],
        "progress": sink_run["progress"],
    })
    if sink_run["profile"] is not None:
        details["profile"] = sink_run["profile"]
    return {"benchmark": "sink", "rows": n, "sink": sink, "baseline": baseline,
            "ratio": ratio(sink["rows_per_s"], baseline["rows_per_s"]),
            "correct": details["correct"] and baseline["complete"], "details": details, "host": host}


def summary(report: dict[str, Any]) -> str:
    s, b, d = report["sink"], report["baseline"], report["details"]
    native = d.get("native_insert")
    lines = [
        f"sink benchmark: {report['rows']:,} conversion records, one sink process, Kafka {d['kafka']}, "
        f"ClickHouse {d['clickhouse']}, {report['host']['cpus']} CPUs",
        "",
        "| | rows/s | elapsed s | rows/s after first row | CPU % | ClickHouse CPU % | RSS peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| sink | {s['rows_per_s']:,.0f} | {s['elapsed_s']} | {s['rows_per_s_after_first_row'] or 0:,.0f} | "
        f"{s['cpu_pct']} | {s['clickhouse_server_cpu_pct']} | {s['rss_mb_peak']} |",
        f"| baseline ({b['method']}) | {b['rows_per_s']:,.0f} | {b['elapsed_s']} | | {b['python_cpu_pct']} | "
        f"{b['clickhouse_server_cpu_pct']} | |",
    ]
    if native:
        lines.append(f"| insert_native (the sink's call) | {native['rows_per_s']:,.0f} | {native['elapsed_s']} | | "
                     f"{native['python_cpu_pct']} | {native['clickhouse_server_cpu_pct']} | |")
    lines += [
        "",
        f"ratio {report['ratio']} (after first row: {d['ratio_after_first_row']}); goal {d['goal_rows_per_s']:,} "
        f"rows/s; first row after {s['first_row_s']}s; decode+rows alone "
        f"{d['python_decode_and_rows']['rows_per_s']:,.0f} rows/s; sink exit code {s['exit_code']}",
        f"ClickHouse {d['found']} expected {d['expected']} -> {'OK' if report['correct'] else 'FAILED'}",
    ]
    lines += profile_lines(d)
    return "\n".join(lines)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5), got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sink",
        description="Benchmark one ClickHouse sink process (python -m app.cli sink --only clickhouse) "
                    "against a real Kafka and a real ClickHouse: pre-fill the conversions topic with N Avro "
                    "Conversion records (new conversions, ~10% status-change versions, ~3% refunds), time the "
                    "sink from start until N rows are in the conversions table, check the FINAL counts, and, "
                    "in the same run, time inserting the same rows directly with clickhouse-connect "
                    "insert_arrow (the baseline). One JSON document goes to stdout (and --json-out); progress "
                    "and a summary go to stderr.",
        epilog="Kafka: KAFKA_BOOTSTRAP_SERVERS if set, else a local Apache Kafka in a temp dir. ClickHouse: "
               "CLICKHOUSE_URL if set (not chdb:), else a local ClickHouse server (chdb-core) in a temp dir. On a "
               "shared machine compare the ratio within one run, not absolute rows/s across runs. Exit status: "
               "0 ok, 1 ClickHouse rows not correct or the sink did not exit 0 on SIGTERM, 130 interrupted.")
    parser.add_argument("--rows", type=positive_int, default=200_000, metavar="N",
                        help="conversion records to produce and sink (default 200000)")
    parser.add_argument("--batch-rows", type=positive_int, default=10_000, metavar="R",
                        help="the sink's --batch-rows, and the baseline's insert batch size (default 10000)")
    parser.add_argument("--batch-seconds", type=float, default=1.0, metavar="S",
                        help="the sink's --batch-seconds (default 1.0, the sink's default)")
    parser.add_argument("--status-changes", type=fraction, default=0.10, metavar="F",
                        help="fraction of records that are a new version of an earlier conversion (default 0.10)")
    parser.add_argument("--refunds", type=fraction, default=0.03, metavar="F",
                        help="fraction of records that are refunds of an earlier purchase (default 0.03)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the workload (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="S",
                        help="give up when the sink has not written every row after this long (default 900)")
    add_profile_args(parser, "sample the sink with py-spy (non-blocking, 100 Hz) from its first visible row to "
                     "the end; adds the top self-time and inclusive frames to details.profile. It costs "
                     "the sink CPU: quote rows/s from a run without it",
                     12)
    add_output_args(parser, DEFAULT_JSON_OUT, "copy the sink's log (and py-spy's raw output) here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_report(lambda: benchmark(args), args.json_out, summary,
                          lambda report: report["correct"] and report["sink"]["exit_code"] == 0)


if __name__ == "__main__":
    raise SystemExit(main())
