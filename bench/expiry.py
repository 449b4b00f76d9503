"""Expiry ticks: how long one tick holds a processor worker's event loop, now and before.

What it answers: a worker runs expiry on ticks, on its one event loop, between batches.
How long does one tick take when a table partition is large, with the chunked sweep
(`processors/sweep.py`, dedupe and clicks) and the deadline index (`processors/pending_index.py`,
late clicks), against the baseline of the same run: the whole-partition scan every tick
that the processor did before (still what one sweep pass costs in total).

How (in process, no broker: only the real faust app, its RocksDB store and the stages):

1. `processors.app.create_app` in a temp dir; N entries written straight into partition 0
   of the `dedupe` table's RocksDB store, and N waiting conversions into the `pending`
   table's, encoded as the tables encode them. No entry is due: a tick only reads, which
   is the part that blocks (deletes are as many as there are expired entries either way).
2. Dedupe, baseline: `stages.expire_dedupe` over the whole partition (`partition_items`),
   `--repeat` times; now: `Sweep.next_chunk` (2,000 entries) + `expire_dedupe`, every tick
   of one full pass. Reported: the median whole scan, the slowest and median chunk tick,
   and the ticks per pass.
3. Pending, baseline: decoding every pending entry of the partition and `stages.expire_pending`
   over them (what each 1 s tick did before); now: `PendingIndex.due` + `expire_pending` over
   the due entries (none). Also the index rebuild (once per partition after a rebalance).
4. Ratios: the slowest chunk tick / the whole scan, and the indexed tick / the scanning tick.

Prints one JSON document (stdout and --json-out) and a table (stderr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, add_output_args, log, positive_int, ratio, run_and_report, spread, spread_text
from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from processors import stages
from processors.app import create_app
from processors.pending_index import PendingIndex
from processors.sweep import Sweep

DEFAULT_JSON_OUT = REPO / "bench" / "results" / "expiry.json"
DAY_MS = 86_400_000


def dedupe_entry(i: int, now: int) -> dict[str, Any]:
    """Shaped like `stages.dedupe` writes it: first receipt, versions, a replay key, time."""
    return {"first": f"R{i:020d}", "status": "approved", "version": 1, "receipts": {f"R{i:020d}": 1},
            "rk": {f"{i:064x}": [f"R{i:020d}", now - 1000, None]}, "t": now - 1000, "p": 0, "h": 90 * DAY_MS}


def pending_entry(i: int, now: int) -> dict[str, Any]:
    conversion = stages.encode_internal({"receipt_id": f"R{i:020d}", "click_id": f"C{i}", "amount": "10.50",
                                         "currency": "USD", "event": "purchase", "advertiser_id": "bench"})
    return {"p": 0, "items": {f"R{i:020d}": {"deadline": now + 600_000, "conversion": conversion}}}


def fill(table: Any, entries: int, make: Any, now: int) -> None:
    store = table.data
    db = store._db_for_partition(0)
    for i in range(entries):
        db.put(store._encode_key(f"d:{i:010d}" if table.name == "dedupe" else f"C{i}"),
               store._encode_value(make(i, now)))


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    now = int(time.time() * 1000)
    n = args.entries
    with tempfile.TemporaryDirectory(prefix="bench-expiry-") as tmp:
        app = create_app(Settings.from_env({}), "127.0.0.1:1", PartnerConfig.empty(), ProcessOptions(), Path(tmp))
        dedupe, pending = app.tables["dedupe"], app.tables["pending"]
        log(f"writing {n:,} dedupe entries and {n:,} pending conversions into partition 0 ...")
        fill(dedupe, n, dedupe_entry, now)
        fill(pending, n, pending_entry, now)
        horizon = 90 * DAY_MS

        log("dedupe: whole-partition scans (the baseline) ...")
        whole = [timed(lambda: stages.expire_dedupe(dedupe.partition_items(0)[0], {}, now, horizon))
                 for _ in range(args.repeat)]
        log(f"dedupe: sweep ticks of {ProcessOptions().cleanup_chunk:,} entries, one full pass ...")
        sweep = Sweep(dedupe.partition_items, ProcessOptions().cleanup_chunk, pass_interval_ms=10**9)
        ticks: list[float] = []
        while not ticks or sweep.in_pass(0):
            ticks.append(timed(lambda: stages.expire_dedupe(sweep.next_chunk(0, now), {}, now, horizon)))

        log("pending: scanning ticks (the baseline), index rebuild, indexed ticks ...")
        scanning = [timed(lambda: stages.expire_pending(pending.partition_items(0)[0], {}, PartnerConfig.empty(),
                                                        now, "tick")) for _ in range(args.repeat)]
        index = PendingIndex()
        rebuild = timed(lambda: index.rebuild(0, pending.partition_items(0)[0], now))
        indexed = [timed(lambda: stages.expire_pending([(c, pending.get(c)) for c in index.due(0, now, 5_000)], {},
                                                       PartnerConfig.empty(), now, "tick"))
                   for _ in range(args.repeat)]

    ms = lambda seconds: round(seconds * 1000, 3)  # noqa: E731
    whole_ms, worst_tick_ms = ms(statistics.median(whole)), ms(max(ticks))
    scan_ms, indexed_ms = ms(statistics.median(scanning)), ms(statistics.median(indexed))
    return {
        "benchmark": "expiry", "entries_per_partition": n, "repeat": args.repeat,
        "dedupe": {"whole_scan_ms": whole_ms, "sweep_tick_ms_max": worst_tick_ms,
                   "sweep_tick_ms_median": ms(statistics.median(ticks)), "sweep_ticks_per_pass": len(ticks),
                   "sweep_pass_total_ms": ms(sum(ticks)),
                   "ratio_worst_tick_to_whole_scan": ratio(worst_tick_ms, whole_ms),
                   "whole_scan_ms_spread": spread([ms(x) for x in whole])},
        "pending": {"scanning_tick_ms": scan_ms, "indexed_tick_ms": indexed_ms, "index_rebuild_ms": ms(rebuild),
                    "ratio_indexed_to_scanning": ratio(indexed_ms, scan_ms, 6),
                    "scanning_tick_ms_spread": spread([ms(x) for x in scanning]),
                    "indexed_tick_ms_spread": spread([ms(x) for x in indexed])},
    }


def table(report: dict[str, Any]) -> str:
    d, p = report["dedupe"], report["pending"]
    return "\n".join([
        f"expiry benchmark: {report['entries_per_partition']:,} entries in one partition, one tick at a time",
        "",
        "| table | baseline: whole partition per tick | now: one tick | ratio |",
        "|---|---:|---:|---:|",
        f"| dedupe (sweep) | {d['whole_scan_ms']} ms | worst {d['sweep_tick_ms_max']} ms, median "
        f"{d['sweep_tick_ms_median']} ms ({d['sweep_ticks_per_pass']} ticks per pass) | "
        f"{d['ratio_worst_tick_to_whole_scan']} |",
        f"| pending (deadline index) | {p['scanning_tick_ms']} ms | {p['indexed_tick_ms']} ms (rebuild once per "
        f"rebalance: {p['index_rebuild_ms']} ms) | {p['ratio_indexed_to_scanning']} |",
        "",
        f"baseline, {report['repeat']} runs each: dedupe whole scan "
        f"{spread_text(d['whole_scan_ms_spread'], '.1f')} ms; "
        f"pending scanning tick {spread_text(p['scanning_tick_ms_spread'], '.1f')} ms",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.expiry",
        description="Time one expiry tick of a processor worker over a large table partition: the chunked sweep "
                    "and the late-click deadline index against the whole-partition scan they replaced, in the same "
                    "run. In process, real RocksDB store, no broker. The JSON report goes to stdout (and "
                    "--json-out), a table to stderr.")
    parser.add_argument("--entries", type=positive_int,
                        default=100_000, metavar="N", help="entries per table partition (default 100,000)")
    parser.add_argument("--repeat", type=positive_int,
                        default=3, metavar="K", help="timed repetitions of the whole scans (median; default 3)")
    add_output_args(parser, DEFAULT_JSON_OUT)
    args = parser.parse_args(argv)
    return run_and_report(lambda: benchmark(args), args.json_out, table, lambda report: True)


if __name__ == "__main__":
    sys.exit(main())
