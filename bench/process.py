"""Processor throughput, memory and correctness: one faust worker against a real Kafka.

What it answers: how many raw postbacks per second one processor worker
(`python -m app.cli process`) turns into conversions, rejections and duplicates,
how much memory it takes, whether every receipt got exactly the outcome it should, and
how that throughput compares with a bare confluent-kafka consume -> produce loop and with
a faust app that only reads the records (the faust floor), over the same records on the
same broker in the same run.

Crash recovery (SIGKILL, state deleted, restart: still exactly one outcome per receipt) is
not measured here; it is a test: tests/processors/test_crash_recovery.py.

How:

1. Kafka from `deploy.providers.kafka_service` (`KAFKA_BOOTSTRAP_SERVERS` if set, else a
   local Apache Kafka in a temp dir); a `bench_<hex>` topic prefix; `ensure_topics`.
2. The input is written *before* the worker starts, with the project's producer settings
   (`postback.kafka.producer_config`: murmur2_random, so partitions match the ingester's
   and faust's), and flushed:
   - clicks for every `valid` postback (so the click precedes its conversion),
   - N raw postbacks as the ingester writes them (POST form body, keyed by the order),
     shuffled, with the `--mix` of kinds:
       valid          a purchase with a unique order id, HMAC query-signed (ts, kid, sig);
       duplicate      a repeat of an earlier valid order, re-signed later (another ts, so
                      another replay key): must become a Duplicate (`order_repeat`);
       bad_signature  a forged sig (64 random hex digits): must become a Rejection;
       late_click     like valid, but its click is written to the clicks topic only
                      after all raw postbacks, so it may reach the worker after the
                      conversion (then the conversion waits up to --late-click-wait).
3. One worker subprocess is started and timed from `Popen` until the records in
   conversions + rejections + duplicates reach N (sum of high watermarks, polled every
   0.2 s with one long-lived consumer). Also reported: the time from its first output
   record (start-up, group join and table recovery excluded), faust's "Ready" when it
   is logged, its CPU use, and its peak RSS (process tree: VmHWM, or the highest VmRSS
   sampled 5 times a second if that is higher).
   Then SIGTERM: it must exit 0.
4. Correctness: every output record is read back. Each receipt must have exactly one
   distinct outcome (identical repeats would be allowed by at-least-once, and are
   counted); one conversion per valid/late_click order; the duplicates are exactly the
   `duplicate` receipts; the rejections exactly the `bad_signature` ones. And, before
   the SIGTERM, the worker's consumer group must have committed to the end of its inputs
   (a few ticks aside) within 20 s: a commit stalled behind a record that was never
   processed fails the run (`details.uncommitted_when_done`).
5. Baseline, in the same run after the worker stopped: `bench/bare_forwarder.py` reads the
   same raw-postbacks topic in a fresh group and writes every record unchanged to a
   scratch topic; timed from `Popen` to its last record acknowledged. It takes well
   under a second, so it runs `--baseline-runs` times (fresh group and topic each) and
   the median run is reported. The report's `ratio` is worker events/s / baseline
   events/s. CPU milliseconds per event are reported for both: on a shared host they
   vary less than wall-clock rates.
6. Faust floor, after the baseline (`--no-faust-floor` skips it): `bench/faust_floor.py`, a
   faust app with the processor app's settings (uvloop, at-least-once, the same commit
   interval and producer settings, a memory store) whose one agent only counts the
   events of the same raw-postbacks topic (`--faust-floor-mode send`: and sends each one
   unchanged to a scratch topic). Timed like the baseline, `--baseline-runs` times, each
   with a fresh app id (group), median run reported. `ratio_to_faust_floor` is worker
   events/s / faust floor events/s: how close the worker gets to what faust itself can
   consume on this host.

Commission (`--payout-rules`): every conversion goes through the commission stage. By
default (`off`) the partner file has no payout rules, so each conversion gets
payout_status `none`. `on` gives the offer a realistic commission set-up (a
cpa_plus_revshare rule with a tier for purchases, daily and monthly conversion caps, a daily
cap per affiliate, a minimum click-to-conversion time, an `[account]` in USD, affiliates,
one paid in EUR and one paused; see `payout_rules_toml`) and publishes FX rates to the
fx-rates topic before the worker starts. `compare` runs the worker over the same records
`--payout-rules-runs` times without and with them, each run under a fresh topic prefix (its
own topics, consumer group and state), and reports each variant's median run and
`ratio_payout_rules_to_none` (events/s with / without; the goal of issue 13 is >= 0.85). In
every mode each conversion must carry a payout_status: with rules some must be payable,
none may lack a rule or an FX rate; without, all are `none`.

Optional `--profile`: py-spy samples the worker (non-blocking) from its first output to
the end of the timed run and the report lists the top self-time frames. Sampling costs
the worker some CPU on a small host, so profile in a separate run from the one you quote.

Progress and a summary go to stderr; stdout carries exactly one JSON document, also
written to `--json-out`. Exit status: 0 when the outcomes were correct, the worker
exited 0 on SIGTERM, 1 otherwise, 130 on
Ctrl-C/SIGTERM (everything started is stopped).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

from bench.harness import (
    ADVERTISER, BENCH_DIR, CROCKFORD, KEY_ID, OFFER, PARTNERS_TOML, SECRET, Child, KafkaOffsets, RssSampler,
    add_output_args, add_profile_args, child_env, finish_py_spy, host_busy_pct, host_cpu_ticks, host_info, log, mb,
    median_run, positive_int, produce_records, profile_lines, ratio, run_and_report, settled_count, spread,
    start_kafka, start_py_spy, thin, tree_cpu_s, tree_hwm_kb,
)
from app.commands.fx import publish_rates
from deploy.procs import free_port, tail
from deploy.providers import KafkaService, unique_name
from postback.config import Settings
from postback.fx import FxRate
from postback.partner_view import order_key
from postback.topics import Topics, ensure_topics

FORWARDER = "bench.bare_forwarder"
FAUST_FLOOR = "bench.faust_floor"
DEFAULT_JSON_OUT = BENCH_DIR / "results" / "process.json"
KINDS = ("valid", "duplicate", "bad_signature", "late_click")
DEFAULT_MIX = "valid=0.8,duplicate=0.1,bad_signature=0.05,late_click=0.05"
FORM = "application/x-www-form-urlencoded"
READY = re.compile(r"\bReady\b")
STARTED = re.compile(r"processor worker \d+ started")
POLL_S = 0.2
PAYOUT_RULES_MODES = ("off", "on", "compare")
#: The issue 13 goal: throughput with payout rules at least this fraction of the run without them.
PAYOUT_RULES_GOAL_RATIO = 0.85
REPORTING_CURRENCY = "USD"
#: Rates published to the fx-rates topic for the runs with payout rules: units of USD for 1 unit.
#: The traffic is in USD; EUR is the currency of an affiliate's payout override (so payouts are
#: converted), GBP is loaded as an operator would load it although no record uses it.
FX_RATES = {"EUR": "1.0850", "GBP": "1.2710"}
FX_DAYS = 40
PAYOUT_STATUSES = ("payable", "hold", "rejected", "none")


# -- the workload ---------------------------------------------------------------------
def parse_mix(text: str) -> dict[str, float]:
    """`valid=0.8,duplicate=0.1,...` -> fractions of the four kinds (missing kinds: 0); they must sum to 1."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in KINDS:
            raise argparse.ArgumentTypeError(f"expected KIND=FRACTION with KIND in {', '.join(KINDS)}, got {part!r}")
        try:
            mix[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: not a number: {value!r}") from None
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"{name}: must be >= 0")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"fractions must sum to 1, got {total:g}")
    if mix["duplicate"] > 0 and mix["valid"] == 0:
        raise argparse.ArgumentTypeError("duplicate needs valid > 0 (a duplicate repeats an earlier valid order)")
    return mix


def mix_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Whole counts summing to `n` (largest remainder)."""
    exact = {k: mix[k] * n for k in KINDS}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(KINDS, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


@dataclass
class Workload:
    """Everything written to Kafka before the worker starts, and what each receipt must become."""

    counts: dict[str, int]
    raw: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value), in topic order
    clicks_first: list[tuple[bytes, bytes]] = field(default_factory=list)
    clicks_last: list[tuple[bytes, bytes]] = field(default_factory=list)
    kind_of: dict[str, str] = field(default_factory=dict)  # receipt -> kind
    order_of: dict[str, str] = field(default_factory=dict)  # receipt -> order id (valid, late_click, duplicate)
    raw_bytes: int = 0


def build_workload(n: int, mix: dict[str, float], seed: int, tag: str) -> Workload:
    from postback.signing import sign_query
    from schemas.codec import Codec

    rng = random.Random(seed)
    raw_codec, click_codec = Codec.for_record("RawPostback"), Codec.for_record("Click")

    def ulid_like() -> str:  # 26 Crockford base32 characters, the first one 0-7, like a ULID
        return rng.choice(CROCKFORD[:8]) + "".join(rng.choices(CROCKFORD, k=25))

    counts = mix_counts(mix, n)
    if counts["duplicate"] and not counts["valid"]:
        raise ValueError(f"{n} postbacks with this mix give {counts}: a duplicate needs a valid order to repeat")
    kinds = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    first_valid = kinds.index("valid") if "valid" in kinds else len(kinds)
    for i, kind in enumerate(kinds[:first_valid]):  # a duplicate needs an earlier valid order
        if kind == "duplicate":
            kinds[i], kinds[first_valid] = "valid", "duplicate"
            first_valid = i
            break

    # One receipt second per postback, all in the past: ts (and so the replay key) of a
    # re-signed repeat always differs from its original's, and no timestamp is stale
    # (tolerance is checked against the ingester's receipt time, not the clock).
    base_ms = (int(time.time()) - n - 120) * 1000
    clicked_at_ms = base_ms - 60_000
    work = Workload(counts)
    valid_orders: list[tuple[str, str, str]] = []  # (click_id, order_id, amount)

    def click(click_id: str) -> tuple[bytes, bytes]:
        record = {"click_id": click_id, "clicked_at_ms": clicked_at_ms, "offer_id": OFFER,
                  "affiliate_id": f"aff-{rng.randrange(50)}", "campaign_id": None, "sub1": "s1", "sub2": None,
                  "sub3": None, "sub4": None, "sub5": None, "ip": "203.0.113.9", "user_agent": "Mozilla/5.0",
                  "referer": None, "source": "redirect", "extras": []}
        return click_id.encode(), click_codec.encode(record)

    for i, kind in enumerate(kinds):
        received_at_ms = base_ms + i * 1000 + rng.randrange(1000)
        receipt = ulid_like()
        if kind == "duplicate":
            click_id, order_id, amount = rng.choice(valid_orders)
        else:
            amount = f"{rng.randrange(1, 500)}.{rng.randrange(100):02d}"
            click_id, order_id = ulid_like(), f"ORD-{tag}-{i}"
        params = [("advertiser_id", ADVERTISER), ("event", "purchase"), ("click_id", click_id),
                  ("order_id", order_id), ("amount", amount), ("currency", "USD")]
        params = sign_query(params, SECRET, received_at_ms // 1000, KEY_ID)
        if kind == "bad_signature":
            params[-1] = ("sig", f"{rng.getrandbits(256):064x}")
        body = urlencode(params).encode()
        record = {"receipt_id": receipt, "received_at_ms": received_at_ms, "remote_ip": "198.51.100.7",
                  "method": "POST", "path": "/postback", "content_type": FORM,
                  "params": [{"key": k, "value": v} for k, v in params], "body": body, "headers": [],
                  "ingester_id": "bench"}
        value = raw_codec.encode(record)
        key, _kind = order_key(ADVERTISER, "purchase", order_id, None, click_id, ())  # as the ingester keys it
        work.raw.append((key.encode(), value))
        work.raw_bytes += len(value)
        work.kind_of[receipt] = kind
        if kind != "bad_signature":
            work.order_of[receipt] = order_id
        if kind == "valid":
            valid_orders.append((click_id, order_id, amount))
            work.clicks_first.append(click(click_id))
        elif kind == "late_click":
            work.clicks_last.append(click(click_id))
    return work


def produce_all(bootstrap: str, topics: Topics, work: Workload) -> float:
    """Clicks of valid postbacks, then the raw postbacks, then the late clicks; flushed. Returns seconds."""
    return produce_records(bootstrap, ((topics.clicks.name, work.clicks_first), (topics.raw_postbacks.name, work.raw),
                                       (topics.clicks.name, work.clicks_last)), 60.0, 120)


# -- payout rules -------------------------------------------------------------------
def payout_rules_toml(work: Workload) -> str:
    """The benchmark's partner file plus a realistic commission set-up on its offer.

    Sized from the workload so the caps and the tier bite on part of the traffic only:
    the offer's daily cap (hold) at 95 % of the conversions (the traffic spans less than a
    day for the default sizes, so a few percent are held), a monthly cap no run reaches, a
    daily cap per affiliate (reject) about 1.5 times an affiliate's average share (50
    affiliates), and a purchase tier from half an affiliate's average approved count on.
    The quality rule (10 s minimum from click to conversion) holds none: every click is a
    minute older than its postbacks. aff-0 has an override paid in EUR (converted through
    the FX rates), aff-1 is paused (its conversions are held), aff-2..aff-9 are listed."""
    conversions = work.counts["valid"] + work.counts["late_click"]
    per_affiliate = max(1, conversions // 50)
    lines = [PARTNERS_TOML,
             "[account]", f'reporting_currency = "{REPORTING_CURRENCY}"', 'timezone = "Europe/Berlin"', "",
             f"[offers.{OFFER}.payouts.purchase]", 'type = "cpa_plus_revshare"', 'amount = "2.50"',
             'currency = "USD"', 'percent = "8"',
             f'tiers = [ {{ min_approved = {max(1, per_affiliate // 2)}, amount = "3.00", percent = "10" }} ]', "",
             f"[offers.{OFFER}.caps]", f"daily_conversions = {max(1, conversions * 95 // 100)}",
             f"monthly_conversions = {max(2, conversions * 10)}", 'on_cap = "hold"', "",
             f"[offers.{OFFER}.affiliate_caps]", f"daily_conversions = {max(1, per_affiliate * 3 // 2)}",
             'on_cap = "reject"', "",
             f"[offers.{OFFER}.quality]", "min_click_to_conversion_s = 10", "",
             "[affiliates.aff-0]", 'name = "Affiliate Zero"',
             f"[affiliates.aff-0.payouts.{OFFER}.purchase]", 'type = "cpa"', 'amount = "2.80"', 'currency = "EUR"', "",
             "[affiliates.aff-1]", 'name = "Affiliate One"', 'status = "paused"', ""]
    lines += [f'[affiliates.aff-{i}]\nname = "Affiliate {i}"\n' for i in range(2, 10)]
    return "\n".join(lines)


def fx_rates(now_s: float) -> list[FxRate]:
    """One rate per currency of FX_RATES and day, for the last FX_DAYS days (UTC dates)."""
    return [FxRate(time.strftime("%Y-%m-%d", time.gmtime(now_s - day * 86400)), currency, Decimal(rate))
            for day in range(FX_DAYS, -1, -1) for currency, rate in FX_RATES.items()]


def check_payouts(found: dict[str, list[Output]], work: Workload, rules: bool) -> dict[str, Any]:
    """Every conversion carries a payout_status; with payout rules some are payable, none lacks a
    rule (the offer has one for the purchase event) and none misses an FX rate; without rules
    every one is `none`."""
    statuses: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    fx: collections.Counter[str] = collections.Counter()
    tier = 0
    for receipt, outs in found.items():
        if receipt not in work.kind_of or outs[0].name != "Conversion":
            continue
        rec = outs[0].record
        statuses[str(rec.get("payout_status") or "null")] += 1
        reasons[str(rec.get("payout_reason") or "null")] += 1
        fx[str(rec.get("fx_status") or "null")] += 1
        tier += "tier" in (rec.get("payout_rule") or "")
    checks = {"every_conversion_has_a_payout_status": set(statuses) <= set(PAYOUT_STATUSES)}
    if rules:
        checks.update(some_conversions_payable=statuses["payable"] > 0,
                      no_conversion_without_a_rule=reasons["no_payout_rule"] == 0,
                      no_conversion_missing_an_fx_rate=fx["fx_missing"] == 0)
    else:
        checks["every_conversion_none"] = set(statuses) <= {"none"}
    return {"correct": all(checks.values()), "checks": checks, "payout_status": dict(statuses),
            "payout_reason": dict(reasons), "fx_status": dict(fx), "paid_by_a_tier": tier}


# -- measuring ------------------------------------------------------------------------
@dataclass
class WorkerRun:
    elapsed_s: float
    first_output_s: float | None
    started_line_s: float | None
    ready_s: float | None
    outputs_at_done: int
    cpu_s: float
    cpu_s_from_first_output: float
    cpu_pct: float
    host_cpu_busy_pct: float
    rss_kb_peak: int
    exit_code: int
    profile: dict[str, Any] | None
    #: [seconds since start, outcomes, records in the internal dedupe topic, in the internal attribute topic]
    progress: list[list[float]]
    #: records the processor group had not committed when the run was done, per topic group (see wait_for_commits)
    uncommitted: dict[str, int] = field(default_factory=dict)


def run_worker(args: argparse.Namespace, kafka: KafkaService, topics: Topics, env: dict[str, str],
               scratch: Path, work: Workload, name: str = "worker") -> WorkerRun:
    """Start one worker, time it until N outcome records exist, SIGTERM it. `name` names its log
    (`<name>.log`) and state directory (`<name>-state`) in `scratch`."""
    n = len(work.kind_of)
    counter = KafkaOffsets(kafka.bootstrap_servers, {
        "outcomes": [topics.conversions.name, topics.rejections.name, topics.duplicates.name],
        "to_dedupe": [topics.processor_dedupe.name], "to_attribute": [topics.processor_attribute.name],
        "to_commission": [topics.processor_commission.name],
        "inputs": [topics.raw_postbacks.name, topics.clicks.name]})
    argv = [sys.executable, "-m", "app.cli", "process", "--data-dir", str(scratch / f"{name}-state"),
            "--web-port", str(free_port()), "--late-click-wait", str(args.late_click_wait),
            "--loglevel", args.worker_loglevel]
    host_before = host_cpu_ticks()
    worker = Child(name, argv, env, scratch / f"{name}.log")
    t0 = worker.started
    profiler: Child | None = None
    sampler: RssSampler | None = None
    try:
        sampler = RssSampler({"worker": worker.proc.pid})
        sampler.start()
        started_line_s = ready_s = first_output_s = None
        cpu_at_first_output = 0.0
        last_log = 0.0
        progress: list[list[float]] = []
        deadline = t0 + args.timeout
        while True:
            worker.check_alive()
            now = time.monotonic()
            counts = counter.totals()
            total = counts["outcomes"]
            elapsed = now - t0
            if started_line_s is None or ready_s is None:
                text = worker.log_path.read_text(errors="replace")
                if started_line_s is None and STARTED.search(text):
                    started_line_s = elapsed
                if ready_s is None and READY.search(text):
                    ready_s = elapsed
            if first_output_s is None and total > 0:
                first_output_s = elapsed
                cpu_at_first_output = tree_cpu_s(worker.proc.pid)
                if args.profile:
                    profiler = start_py_spy(worker.proc.pid, args.timeout, scratch)
                    log(f"py-spy sampling the worker (pid {worker.proc.pid}) ...")
            progress.append([round(elapsed, 2), total, counts["to_dedupe"], counts["to_attribute"],
                             counts["to_commission"]])
            if total >= n:
                break
            if now - last_log >= 2.0:
                last_log = now
                log(f"{worker.name}: {elapsed:5.1f}s, {total:,}/{n:,} outcomes ({counts['to_dedupe']:,} records in "
                    f"the internal dedupe topic, {counts['to_attribute']:,} in the attribute topic, "
                    f"{counts['to_commission']:,} in the commission topic)")
            if now > deadline:
                raise RuntimeError(f"only {total} of {n} outcomes after {args.timeout:.0f}s:\n{tail(worker.log_path)}")
            time.sleep(POLL_S)
        elapsed_s = time.monotonic() - t0
        cpu_s = tree_cpu_s(worker.proc.pid)
        hwm_kb = tree_hwm_kb(worker.proc.pid)
        host_after = host_cpu_ticks()
        sampler.stop()
        log(f"{worker.name}: {n:,} outcomes after {elapsed_s:.2f}s ({n / elapsed_s:,.0f}/s from start)")
        profile = None
        if profiler is not None:
            profile = finish_py_spy(profiler, scratch, args.profile_top, "first output -> N outcomes")
        uncommitted = wait_for_commits(counter, topics.processor_group, worker)
        log(f"stopping {worker.name} (SIGTERM) ...")
        exit_code = worker.stop()
        if exit_code != 0:
            log(f"{worker.name} exited {exit_code}:\n{tail(worker.log_path)}")
        return WorkerRun(
            elapsed_s=elapsed_s, first_output_s=first_output_s, started_line_s=started_line_s, ready_s=ready_s,
            outputs_at_done=total, cpu_s=cpu_s, cpu_s_from_first_output=cpu_s - cpu_at_first_output,
            cpu_pct=round(100 * cpu_s / elapsed_s, 1), host_cpu_busy_pct=host_busy_pct(host_before, host_after),
            rss_kb_peak=max(hwm_kb, sampler.peak_kb["worker"]), exit_code=exit_code, profile=profile,
            progress=progress, uncommitted=uncommitted)
    finally:
        if profiler is not None:
            profiler.stop(signal.SIGINT, timeout=10)
        if sampler is not None:
            sampler.stop()
        worker.stop()
        counter.close()


#: The leader's timer sends a tick to each partition of the dedupe and attribute topics every second
#: (6 + 6), and a commit follows within a second: a few ticks may be uncommitted at any moment. The
#: commission topic gets no ticks: it must be committed to its end.
TICKS_IN_FLIGHT = 24


def committed_to_the_end(uncommitted: dict[str, int]) -> bool:
    """The processor group's commits reached the end of its inputs, a few ticks aside."""
    return uncommitted.get("inputs") == 0 and uncommitted.get("to_commission", 0) == 0 and \
        uncommitted.get("to_dedupe", 0) + uncommitted.get("to_attribute", 0) <= TICKS_IN_FLIGHT


def wait_for_commits(counter: KafkaOffsets, consumer_group: str, worker: Child,
                     timeout: float = 20.0) -> dict[str, int]:
    """Once every receipt has an outcome, the processor group's offsets must reach the end of its
    inputs (a few ticks aside) within a few commit intervals. A commit stalled behind a record
    that was never processed would not, and a restart would process everything after it again.
    Returns the uncommitted records per topic group when they did, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        worker.check_alive()
        left = {group: counter.lag(consumer_group, group)
                for group in ("inputs", "to_dedupe", "to_attribute", "to_commission")}
        if committed_to_the_end(left):
            log(f"the processor group committed to the end of its inputs ({left})")
            return left
        if time.monotonic() > deadline:
            log(f"the processor group's commits did NOT reach the end after {timeout:.0f}s: uncommitted {left}")
            return left
        time.sleep(0.5)


class Output(NamedTuple):
    """One output record read back: its record name (Conversion, Rejection, Duplicate), the
    decoded record, and where it is."""

    name: str
    record: dict[str, Any]
    topic: str
    partition: int
    offset: int


def read_outcomes(kafka: KafkaService, topics: Topics) -> dict[str, list[Output]]:
    """Every record now in the conversions, rejections and duplicates topics, per receipt."""
    from schemas.codec import decode_any

    found: dict[str, list[Output]] = collections.defaultdict(list)
    for spec in (topics.conversions, topics.rejections, topics.duplicates):
        for msg in kafka.read(spec.name, timeout=120):
            name, record = decode_any(msg.value())
            found[record["receipt_id"]].append(Output(name, record, spec.name, msg.partition(), msg.offset()))
    return found


def check_outcomes(found: dict[str, list[Output]], work: Workload) -> dict[str, Any]:
    """Compare the output records read back (`read_outcomes`) with what each receipt must become."""
    expected_kind = {"valid": "Conversion", "late_click": "Conversion", "duplicate": "Duplicate",
                     "bad_signature": "Rejection"}
    records = sum(len(outs) for outs in found.values())
    unknown = set(found) - set(work.kind_of)
    missing = set(work.kind_of) - set(found)
    conflicting = 0
    wrong_kind: collections.Counter[str] = collections.Counter()
    conversions_per_order: collections.Counter[str] = collections.Counter()
    reasons: dict[str, collections.Counter[str]] = {"Duplicate": collections.Counter(),
                                                     "Rejection": collections.Counter()}
    attribution: dict[str, collections.Counter[str]] = {"valid": collections.Counter(),
                                                         "late_click": collections.Counter()}
    seen_conversion_ids: set[str] = set()
    for receipt, outs in found.items():
        distinct = {(o.name, o.record.get("conversion_id"), o.record.get("version"), o.record.get("reason"),
                     o.record.get("attribution")) for o in outs}
        if len(distinct) != 1:
            conflicting += 1
        kind = work.kind_of.get(receipt)
        if kind is None:
            continue
        name, rec = outs[0].name, outs[0].record
        if name != expected_kind[kind]:
            wrong_kind[f"{kind}->{name}"] += 1
        if name == "Conversion":
            if rec["conversion_id"] not in seen_conversion_ids:
                seen_conversion_ids.add(rec["conversion_id"])
                conversions_per_order[rec["order_id"]] += 1
            if kind in attribution:
                attribution[kind][rec["attribution"]] += 1
        else:
            reasons[name][rec["reason"]] += 1
    kinds_found = collections.Counter(outs[0].name for r, outs in found.items() if r in work.kind_of)
    orders = {work.order_of[r] for r, k in work.kind_of.items() if k in ("valid", "late_click")}
    c = work.counts
    checks = {
        "every_receipt_has_an_outcome": not missing,
        "no_unknown_receipts": not unknown,
        "one_distinct_outcome_per_receipt": conflicting == 0,
        "outcome_kind_as_expected": not wrong_kind,
        "one_conversion_per_valid_order": set(conversions_per_order) == orders
        and set(conversions_per_order.values()) <= {1},
        "duplicates_equal_mix": kinds_found["Duplicate"] == c["duplicate"]
        and reasons["Duplicate"] == collections.Counter({"order_repeat": c["duplicate"]}) if c["duplicate"]
        else kinds_found["Duplicate"] == 0,
        "rejections_equal_bad_signatures": kinds_found["Rejection"] == c["bad_signature"]
        and reasons["Rejection"] == collections.Counter({"bad_signature": c["bad_signature"]}) if c["bad_signature"]
        else kinds_found["Rejection"] == 0,
    }
    return {
        "correct": all(checks.values()),
        "checks": checks,
        "output_records": records,
        "repeated_identical_records": records - len(found) if conflicting == 0 else None,
        "receipts_with_outcome": len(found),
        "missing_receipts": len(missing),
        "unknown_receipts": len(unknown),
        "conflicting_receipts": conflicting,
        "wrong_kind": dict(wrong_kind),
        "outcomes": {"conversions": kinds_found["Conversion"], "duplicates": kinds_found["Duplicate"],
                     "rejections": kinds_found["Rejection"]},
        "expected": {"conversions": c["valid"] + c["late_click"], "duplicates": c["duplicate"],
                     "rejections": c["bad_signature"]},
        "distinct_orders_converted": len(conversions_per_order),
        "duplicate_reasons": dict(reasons["Duplicate"]),
        "rejection_reasons": dict(reasons["Rejection"]),
        "attribution": {k: dict(v) for k, v in attribution.items()},
    }


def run_baseline(args: argparse.Namespace, kafka: KafkaService, topics: Topics, env: dict[str, str],
                 scratch: Path, n: int) -> dict[str, Any]:
    """`--baseline-runs` runs (each a fresh group and output topic); the median run by events/s."""
    return median_run([run_baseline_once(args, kafka, topics, env, scratch, n) for _ in range(args.baseline_runs)])


def run_faust_floor(args: argparse.Namespace, kafka: KafkaService, topics: Topics, env: dict[str, str],
                    scratch: Path, n: int) -> dict[str, Any]:
    """`--baseline-runs` runs (each a fresh app id, so a fresh group); the median run by events/s."""
    return median_run([run_faust_floor_once(args, kafka, topics, env, scratch, n)
                       for _ in range(args.baseline_runs)])


def run_timed_child(name: str, argv: list[str], env: dict[str, str], log_path: Path, n: int, timeout: float,
                    t_done: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one short-lived comparison process (bare_forwarder.py, faust_floor.py) to its end.

    It prints one JSON line with `time.monotonic()` readings `t_first_record`, `t_done` and
    `max_rss_kb`, and must exit 0. Returns that line and the timing: from `Popen` to `t_done`,
    and from its first record to `t_done`."""
    host_before = host_cpu_ticks()
    # CPU of reaped children: the worker and py-spy were reaped before, the broker is not
    # reaped until the end, so the difference is this child's own CPU time.
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = Child(name, argv, env, log_path, stdout_pipe=True)
    sampler = RssSampler({name: child.proc.pid})
    sampler.start()
    try:
        assert child.proc.stdout is not None
        out = child.proc.stdout.read().decode()  # until it exits (one JSON line)
        child.proc.wait(timeout=timeout)
    finally:
        sampler.stop()
        exit_code = child.stop()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    host_after = host_cpu_ticks()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if exit_code != 0 or not lines:
        raise RuntimeError(f"{name} exited {exit_code}: {out}\n{tail(log_path)}")
    result = json.loads(lines[-1])
    elapsed = result[t_done] - child.started
    steady = result[t_done] - result["t_first_record"]
    log(f"{name}: {n:,} records after {elapsed:.2f}s ({n / elapsed:,.0f}/s from start)")
    return result, {
        "events_per_s": round(n / elapsed, 1),
        "elapsed_s": round(elapsed, 3),
        "elapsed_from_first_record_s": round(steady, 3),
        "events_per_s_from_first_record": round(n / steady, 1) if steady > 0 else None,
        "first_record_s": round(result["t_first_record"] - child.started, 3),
        "cpu_pct": round(100 * cpu_s / elapsed, 1),
        "cpu_ms_per_event": round(1000 * cpu_s / n, 4),
        "host_cpu_busy_pct": host_busy_pct(host_before, host_after),
        # ru_maxrss (KB on Linux) from the child itself: it lives too briefly for sampling.
        "rss_mb_peak": mb(max(int(result.get("max_rss_kb", 0)), sampler.peak_kb[name])),
        "exit_code": exit_code,
    }


def run_baseline_once(args: argparse.Namespace, kafka: KafkaService, topics: Topics, env: dict[str, str],
                      scratch: Path, n: int) -> dict[str, Any]:
    out_topic = kafka.create_topic(f"{topics.prefix}.bare-out", partitions=topics.raw_postbacks.partitions)
    argv = [sys.executable, "-m", FORWARDER, "--bootstrap", kafka.bootstrap_servers, "--topic-in",
            topics.raw_postbacks.name, "--topic-out", out_topic, "--count", str(n), "--timeout", str(args.timeout)]
    result, timing = run_timed_child("baseline", argv, env, scratch / "baseline.log", n, args.timeout, "t_last_ack")
    return dict(timing, records_in_output_topic=settled_count(kafka, out_topic, n),
                delivery_errors=result["delivery_errors"])


def run_faust_floor_once(args: argparse.Namespace, kafka: KafkaService, topics: Topics, env: dict[str, str],
                         scratch: Path, n: int) -> dict[str, Any]:
    # The app id starts with the run's topic prefix, so faust's assignor topic is deleted with the others.
    argv = [sys.executable, "-m", FAUST_FLOOR, "--bootstrap", kafka.bootstrap_servers, "--topic-in",
            topics.raw_postbacks.name, "--count", str(n), "--timeout", str(args.timeout), "--mode",
            args.faust_floor_mode, "--app-id-prefix", f"{topics.prefix}-faust-floor"]
    out_topic = None
    if args.faust_floor_mode == "send":
        out_topic = kafka.create_topic(f"{topics.prefix}.faust-floor-out", partitions=topics.raw_postbacks.partitions)
        argv += ["--topic-out", out_topic]
    result, timing = run_timed_child("faust floor", argv, env, scratch / "faust-floor.log", n, args.timeout,
                                     "t_last")
    extra: dict[str, Any] = {"mode": result["mode"], "loop": result["loop"]}
    if out_topic is not None:
        extra.update(records_in_output_topic=settled_count(kafka, out_topic, n), acked=result["acked"])
    return dict(timing, **extra)


@dataclass
class Measured:
    """One worker run over its own topic prefix: its timing, the check of its outcomes and of their payouts."""

    label: str  # "none" (the partner file without payout rules) or "rules"
    topics: Topics
    env: dict[str, str]
    run: WorkerRun
    details: dict[str, Any]
    payouts: dict[str, Any]
    prefill_s: float

    @property
    def correct(self) -> bool:
        return self.details["correct"] and committed_to_the_end(self.run.uncommitted) and self.payouts["correct"]


def measure(args: argparse.Namespace, kafka: KafkaService, scratch: Path, work: Workload, prefix: str,
            rules: bool, name: str = "worker") -> Measured:
    """Create the topics of `prefix`, pre-fill them with `work` (and, with payout rules, the FX
    rates), run one worker over them with the partner file with or without payout rules, and
    check every outcome."""
    n = len(work.kind_of)
    topics = Topics(prefix)
    ensure_topics(kafka.admin(), topics)
    log(f"pre-filling {prefix}: {len(work.clicks_first):,} clicks, {n:,} raw postbacks "
        f"({work.raw_bytes / n:.0f} B avg), then {len(work.clicks_last):,} late clicks ...")
    prefill_s = produce_all(kafka.bootstrap_servers, topics, work)
    raw_count = kafka.count(topics.raw_postbacks.name)
    clicks_count = kafka.count(topics.clicks.name)
    if raw_count != n or clicks_count != len(work.clicks_first) + len(work.clicks_last):
        raise RuntimeError(f"pre-fill: {raw_count} raw postbacks and {clicks_count} clicks in Kafka")
    log(f"pre-filled in {prefill_s:.1f}s")
    if rules:
        fx = fx_rates(time.time())
        if publish_rates(kafka.bootstrap_servers, topics.prefix, fx, REPORTING_CURRENCY, 60.0):
            raise RuntimeError(f"FX rates not acknowledged by Kafka on {topics.fx_rates.name}")
        log(f"published {len(fx)} FX rates ({', '.join(FX_RATES)}, {FX_DAYS + 1} days) to {topics.fx_rates.name}")

    partners = scratch / ("partners-payout-rules.toml" if rules else "partners.toml")
    partners.write_text(payout_rules_toml(work) if rules else PARTNERS_TOML)
    env = child_env(KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, POSTBACK_TOPIC_PREFIX=prefix,
                    POSTBACK_CONFIG=str(partners))
    worker_env = dict(env, **dict(args.worker_env))

    log(f"starting one worker ({'with' if rules else 'without'} payout rules, late-click-wait "
        f"{args.late_click_wait:g}s), timing until {n:,} outcomes ...")
    w = run_worker(args, kafka, topics, worker_env, scratch, work, name)
    log("reading all outcomes back ...")
    found = read_outcomes(kafka, topics)
    details = check_outcomes(found, work)
    log(f"outcomes {'correct' if details['correct'] else 'NOT correct'}: {details['outcomes']} "
        f"(expected {details['expected']}; {details['repeated_identical_records']} identical repeats)")
    payouts = check_payouts(found, work, rules)
    log(f"payouts {'as expected' if payouts['correct'] else 'NOT as expected'}: {payouts['payout_status']}, "
        f"reasons {payouts['payout_reason']}, fx {payouts['fx_status']}")
    return Measured("rules" if rules else "none", topics, env, w, details, payouts, prefill_s)


def worker_figures(args: argparse.Namespace, w: WorkerRun, n: int) -> dict[str, Any]:
    steady_s = w.elapsed_s - w.first_output_s if w.first_output_s is not None else None
    ready_to_done = w.elapsed_s - w.ready_s if w.ready_s is not None else None
    return {
        "events_per_s": round(n / w.elapsed_s, 1),
        "elapsed_s": round(w.elapsed_s, 3),
        "elapsed_from_first_output_s": None if steady_s is None else round(steady_s, 3),
        "events_per_s_from_first_output": round(n / steady_s, 1) if steady_s else None,
        "first_output_s": None if w.first_output_s is None else round(w.first_output_s, 2),
        "ready_s": None if w.ready_s is None else round(w.ready_s, 2),
        "elapsed_from_ready_s": None if ready_to_done is None else round(ready_to_done, 3),
        "started_line_s": None if w.started_line_s is None else round(w.started_line_s, 2),
        "rss_mb_peak": mb(w.rss_kb_peak),
        "cpu_pct": w.cpu_pct,
        "cpu_ms_per_event": round(1000 * w.cpu_s / n, 4),
        "cpu_ms_per_event_from_first_output": round(1000 * w.cpu_s_from_first_output / n, 4),
        "host_cpu_busy_pct": w.host_cpu_busy_pct,
        "late_click_wait_s": args.late_click_wait,
        "loglevel": args.worker_loglevel,
        "profiled": bool(args.profile),
        "extra_env": dict(args.worker_env),
        "exit_code": w.exit_code,
    }


def median_index(values: Sequence[float]) -> int:
    """The index of the median value (the lower middle one for an even count), as `median_run` picks it."""
    return sorted(range(len(values)), key=lambda i: values[i])[(len(values) - 1) // 2]


def payout_rules_report(args: argparse.Namespace, runs: list[Measured], n: int) -> dict[str, Any]:
    """`--payout-rules on|compare`: each worker run's figures and payouts; with compare, the median
    run of each variant and `ratio_payout_rules_to_none` (rules events/s / none events/s)."""
    rows = [dict(worker_figures(args, m.run, n), variant=m.label, topic_prefix=m.topics.prefix,
                 correct=m.correct, outcomes_correct=m.details["correct"],
                 uncommitted_when_done=m.run.uncommitted, payouts=m.payouts) for m in runs]
    out: dict[str, Any] = {"mode": args.payout_rules, "goal_min_ratio": PAYOUT_RULES_GOAL_RATIO,
                           "fx_rates": dict(FX_RATES), "reporting_currency": REPORTING_CURRENCY,
                           "runs_in_order": rows}
    by = {label: [r for r in rows if r["variant"] == label] for label in ("none", "rules")}
    if by["rules"]:
        out["rules"] = median_run(by["rules"])
    if by["none"]:
        out["none"] = median_run(by["none"])
        none, rules = out["none"], out["rules"]
        # Runs 2k and 2k+1 are one pair: adjacent in time, so host drift affects both alike.
        pairs = [(a, b) if a["variant"] == "rules" else (b, a) for a, b in zip(rows[::2], rows[1::2])]
        per_pair = [ratio(r["events_per_s"], z["events_per_s"]) for r, z in pairs]
        out.update(
            ratio_payout_rules_to_none=ratio(rules["events_per_s"], none["events_per_s"]),
            ratio_payout_rules_to_none_from_first_output=ratio(rules["events_per_s_from_first_output"],
                                                               none["events_per_s_from_first_output"]),
            ratio_payout_rules_to_none_per_pair=spread([x for x in per_pair if x is not None]),
            cpu_ms_per_event_ratio=ratio(rules["cpu_ms_per_event"], none["cpu_ms_per_event"]),
        )
        out["within_goal"] = (out["ratio_payout_rules_to_none"] or 0) >= PAYOUT_RULES_GOAL_RATIO
    return out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    host = host_info()
    settings = Settings.from_env()
    prefix = unique_name("bench")
    n = args.postbacks
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp, contextlib.ExitStack() as stack:
        scratch = Path(tmp)
        kafka = start_kafka(stack, settings, scratch, prefix)
        if args.logs_dir:  # also when the run fails: that is when the logs matter most
            stack.callback(copy_logs, scratch, args.logs_dir)

        log(f"building {n:,} postbacks ({', '.join(f'{k}={v:g}' for k, v in args.mix.items())}) ...")
        work = build_workload(n, args.mix, args.seed, prefix.rsplit("_", 1)[1])
        runs: list[Measured] = []
        if args.payout_rules == "compare":
            from postback.partner_loader import parse_partner_config

            parse_partner_config(payout_rules_toml(work), "payout rules")  # a bad file fails before any run
            # The same records under a fresh topic prefix (so a fresh consumer group and state) per run;
            # the prefixes start with the run's, so an external cluster's cleanup deletes them too. The
            # order alternates per pair (none, rules), (rules, none), ... against drift of the host.
            for k in range(args.payout_rules_runs):
                for label in (("none", "rules") if k % 2 == 0 else ("rules", "none")):
                    log(f"comparison run {k + 1}/{args.payout_rules_runs}: {label} ...")
                    runs.append(measure(args, kafka, scratch, work, f"{prefix}-{label}{k + 1}", label == "rules",
                                        f"worker-{label}-{k + 1}"))
            nones = [m for m in runs if m.label == "none"]
            main = nones[median_index([n / m.run.elapsed_s for m in nones])]
        else:
            main = measure(args, kafka, scratch, work, prefix, args.payout_rules == "on")
            runs.append(main)
        topics, env, w, details = main.topics, main.env, main.run, main.details

        log("baseline: bare consume -> produce loop over the same raw postbacks ...")
        baseline = run_baseline(args, kafka, topics, env, scratch, n)
        faust_floor = None
        if not args.no_faust_floor:
            log(f"faust floor: a faust app that only reads the same raw postbacks ({args.faust_floor_mode}) ...")
            faust_floor = run_faust_floor(args, kafka, topics, env, scratch, n)

    worker = worker_figures(args, w, n)
    base, floor = baseline or {}, faust_floor or {}
    details.update({
        "counts": work.counts,
        "kafka": kafka.provider,
        "topic_prefix": topics.prefix,
        "seed": args.seed,
        "raw_record_bytes_avg": round(work.raw_bytes / n, 1),
        "clicks": {"before_postbacks": len(work.clicks_first), "after_postbacks": len(work.clicks_last)},
        "prefill_s": round(main.prefill_s, 2),
        "ratio_from_first_output": ratio(worker["events_per_s_from_first_output"],
                                              base.get("events_per_s_from_first_record")),
        "ratio_to_faust_floor_from_first_output": ratio(worker["events_per_s_from_first_output"],
                                                             floor.get("events_per_s_from_first_record")),
        "outputs_when_timed": w.outputs_at_done,
        "progress_columns": ["s_since_start", "outcomes", "internal_dedupe_records", "internal_attribute_records",
                             "internal_commission_records"],
        "progress": thin(w.progress, 1.0),
        "uncommitted_when_done": w.uncommitted,
        "payouts": main.payouts,
        "goal_events_per_s": 10_000,
    })
    if w.profile is not None:
        details["profile"] = w.profile
    report = {"benchmark": "process", "postbacks": n, "mix": args.mix, "worker": worker, "baseline": baseline,
              "ratio": ratio(worker["events_per_s"], base.get("events_per_s")), "faust_floor": faust_floor,
              "ratio_to_faust_floor": ratio(worker["events_per_s"], floor.get("events_per_s")),
              "correct": all(m.correct for m in runs),
              "details": details, "host": host}
    if args.payout_rules != "off":
        report["payout_rules"] = payout_rules_report(args, runs, n)
        report["worker_exit_codes"] = [m.run.exit_code for m in runs]
        if args.payout_rules == "compare":
            report["ratio_payout_rules_to_none"] = report["payout_rules"]["ratio_payout_rules_to_none"]
    return report


def copy_logs(scratch: Path, logs_dir: Path) -> None:
    logs_dir.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in scratch.glob("worker-*.log"))  # restarts, --payout-rules compare runs
    for name in ("worker.log", *others, "baseline.log", "faust-floor.log", "py-spy.txt", "py-spy.log",
                 "partners.toml", "partners-payout-rules.toml"):
        if (scratch / name).exists():
            shutil.copy(scratch / name, logs_dir / name)
    log(f"logs copied to {logs_dir}")


def comparison_row(label: str, r: dict[str, Any]) -> str:
    """A summary table row for the baseline or the faust floor (the median of short runs, and their spread)."""
    s = r["events_per_s_spread"]
    return (f"| {label} (median of {r['runs']}, min {s['min']:,.0f}, max {s['max']:,.0f}) | "
            f"{r['events_per_s']:,.0f} | {r['elapsed_s']} | "
            f"{r['events_per_s_from_first_record'] or 0:,.0f} | {r['cpu_pct']} | {r['cpu_ms_per_event']} | "
            f"{r['rss_mb_peak']} |")


def summary(report: dict[str, Any]) -> str:
    w, b, f, d = report["worker"], report["baseline"], report["faust_floor"], report["details"]
    lines = [
        f"process benchmark: {report['postbacks']:,} postbacks, one worker, Kafka {d['kafka']}, "
        f"{report['host']['cpus']} CPUs",
        "",
        "| | events/s from start | elapsed s | events/s from first output | CPU % | CPU ms/event | RSS peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| worker | {w['events_per_s']:,.0f} | {w['elapsed_s']} | "
        f"{w['events_per_s_from_first_output'] or 0:,.0f} | {w['cpu_pct']} | {w['cpu_ms_per_event']} | "
        f"{w['rss_mb_peak']} |",
        *([comparison_row("baseline", b)] if b else []),
        *([comparison_row(f"faust floor, {f['mode']}", f)] if f else []),
        "",
        *([f"ratio {report['ratio']} (from first output: {d['ratio_from_first_output']})"
           + (f"; ratio to faust floor {report['ratio_to_faust_floor']} (from first output: "
              f"{d['ratio_to_faust_floor_from_first_output']})" if f else "")] if b else []),
        f"worker first output after {w['first_output_s']}s, Ready after {w['ready_s']}s; exit code {w['exit_code']}",
        f"outcomes {d['outcomes']} expected {d['expected']} -> {'OK' if report['correct'] else 'FAILED'}; "
        f"{d['repeated_identical_records']} identical repeats; attribution {d['attribution']}",
        f"uncommitted by the processor group when done: {d['uncommitted_when_done']} "
        f"({'at the end' if committed_to_the_end(d['uncommitted_when_done']) else 'NOT at the end: FAILED'})",
        f"payouts: {d['payouts']['payout_status']} -> {'OK' if d['payouts']['correct'] else 'FAILED'}",
    ]
    if "payout_rules" in report:
        lines += payout_rules_lines(report["payout_rules"])
    lines += profile_lines(d)
    return "\n".join(lines)


def payout_rules_lines(p: dict[str, Any]) -> list[str]:
    """The summary's part for --payout-rules on|compare."""
    lines = ["", f"payout rules ({p['mode']}): worker runs in order",
             "| variant | events/s from start | events/s from first output | CPU ms/event | correct | payout_status |",
             "|---|---:|---:|---:|---|---|"]
    for r in p["runs_in_order"]:
        lines.append(f"| {r['variant']} ({r['topic_prefix'].rsplit('-', 1)[-1]}) | {r['events_per_s']:,.0f} | "
                     f"{r['events_per_s_from_first_output'] or 0:,.0f} | {r['cpu_ms_per_event']} | "
                     f"{'OK' if r['correct'] else 'FAILED'} | {r['payouts']['payout_status']} |")
    if "ratio_payout_rules_to_none" in p:
        none, rules, pair = p["none"], p["rules"], p["ratio_payout_rules_to_none_per_pair"]
        lines += [
            "",
            f"median of {none['runs']}: without payout rules {none['events_per_s']:,.0f} postbacks/s, "
            f"{none['cpu_ms_per_event']} CPU ms/postback; with payout rules {rules['events_per_s']:,.0f} "
            f"postbacks/s, {rules['cpu_ms_per_event']} CPU ms/postback",
            f"ratio_payout_rules_to_none {p['ratio_payout_rules_to_none']} (from first output: "
            f"{p['ratio_payout_rules_to_none_from_first_output']}; per pair min {pair.get('min')}, max "
            f"{pair.get('max')}); CPU ms/postback ratio {p['cpu_ms_per_event_ratio']}; goal >= "
            f"{p['goal_min_ratio']}: {'met' if p['within_goal'] else 'NOT met'}",
        ]
    return lines


def env_pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.process",
        description="Benchmark one processor worker (python -m app.cli process: verify signatures, dedupe, "
                    "attribute) against a real Kafka: pre-fill clicks and N signed raw postbacks, time the worker "
                    "from start until N outcomes (conversions + rejections + duplicates) are in Kafka, check "
                    "every outcome, and time a bare confluent-kafka consume->produce loop (bench/bare_forwarder.py) "
                    "and a faust app that only counts them (bench/faust_floor.py) over the same records in the "
                    "same run. One JSON document goes to stdout (and --json-out); progress and a summary go to stderr.",
        epilog="Kafka: KAFKA_BOOTSTRAP_SERVERS if set, else a local Apache Kafka started in a temp dir. On a "
               "shared machine compare the ratio within one run, not absolute events/s across runs. Exit "
               "status: 0 ok, 1 outcomes not correct, the worker did not exit 0 on SIGTERM, 130 "
               "interrupted. Crash recovery is a test: tests/processors/test_crash_recovery.py.")
    parser.add_argument("--postbacks", type=positive_int, default=20_000, metavar="N",
                        help="raw postbacks to process (default 20000)")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), metavar="KIND=F,...",
                        help=f"fractions of valid, duplicate, bad_signature, late_click; must sum to 1 (default "
                             f"{DEFAULT_MIX})")
    parser.add_argument("--late-click-wait", type=float, default=2.0, metavar="S",
                        help="the worker's --late-click-wait (default 2)")
    parser.add_argument("--worker-loglevel", default="info", choices=["debug", "info", "warning", "error"],
                        help="the worker's --loglevel (default info: faust then logs 'Ready', and nothing per "
                             "event)")
    parser.add_argument("--baseline-runs", type=positive_int, default=3, metavar="K",
                        help="runs of the baseline and of the faust floor (each a few seconds at most for 20000 "
                             "records, so one run is noisy); the median run by events/s is reported (default 3)")
    parser.add_argument("--no-faust-floor", action="store_true",
                        help="skip the faust floor (bench/faust_floor.py: a faust app with the processor's "
                             "settings that only counts the raw postbacks)")
    parser.add_argument("--faust-floor-mode", choices=["consume", "send"], default="consume",
                        help="consume: the faust floor only counts each event (default); send: it also sends "
                             "each one unchanged to a scratch topic with faust's producer")
    parser.add_argument("--worker-env", type=env_pair, action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the worker only, repeatable; for what-if runs with faust "
                             "settings, e.g. PRODUCER_LINGER=0.005 (recorded in worker.extra_env)")
    parser.add_argument("--payout-rules", choices=PAYOUT_RULES_MODES, default="off",
                        help="off: the partner file without payout rules (default); on: with payout rules, caps, a "
                             "tier, a quality rule and affiliates on the offer, and FX rates in the fx-rates topic; "
                             "compare: the worker over the same records without and with them, each run under a "
                             "fresh topic prefix, and ratio_payout_rules_to_none = events/s with / without "
                             "(the baseline and the faust floor run once, over the records of a run without)")
    parser.add_argument("--payout-rules-runs", type=positive_int, default=3, metavar="K",
                        help="with --payout-rules compare: pairs of worker runs (without, with; then with, "
                             "without; ...); the median run of each is compared (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the workload (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="S",
                        help="give up when the worker, the baseline or the faust floor takes longer (default "
                             "900)")
    add_profile_args(parser, "sample the worker with py-spy (non-blocking, 100 Hz) from its first output to the "
                     "end; adds the top self-time and inclusive frames to details.profile. It costs the "
                     "worker some CPU: quote events/s from a run without it",
                     10)
    add_output_args(parser, DEFAULT_JSON_OUT,
                    "copy the worker's (and each restarted worker's), the baseline's and the faust floor's logs (and "
                    "py-spy's raw output) here")
    args = parser.parse_args(argv)
    if args.payout_rules == "compare" and args.profile:
        parser.error("--profile samples one worker run: use it with --payout-rules off or on, not compare")
    if args.profile and not Path(sys.executable).with_name("py-spy").exists():
        parser.error(f"--profile needs py-spy next to {sys.executable}: {Path(sys.executable).parent}/pip install py-spy")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_report(lambda: benchmark(args), args.json_out, summary,
                          lambda report: report["correct"] and report["worker"]["exit_code"] == 0
                          and not any(report.get("worker_exit_codes", ())))


if __name__ == "__main__":
    raise SystemExit(main())
