"""`postback demo`: drive a running pipeline with realistic partner traffic and report what it made of it.

Against a running ingester (`--url`), processors and sink, this plays both sides of an
affiliate deal: affiliates' users click tracking links (`GET /click`), and advertisers'
servers send signed postbacks (`GET|POST /postback`) back for some of those clicks:
purchases in several currencies, leads, trials and their monthly renewals, refunds,
pending orders that are approved later. Like real partners it also misbehaves a little:
it retries requests, re-sends orders, signs with the wrong key, loses click IDs, and
delivers some clicks only after their conversion (bulk import). It then waits until
every postback the ingester accepted (202) has an outcome in ClickHouse and prints a
summary for marketers: revenue by affiliate and offer, payout and margin by affiliate
and offer in the reporting currency, payout-to-revenue, what was held and why, cap
usage, match rate, dedupe rate, rejection reasons and latency.

The partner file pays affiliates by rule (deploy/demo-partners.toml: cpa, revshare,
cpa_plus_revshare with a tier, a daily cap, a paused affiliate, a minimum
click-to-conversion time), and the plan starts with scenario journeys whose payouts
are known in advance (`app.demo.plan.payout_facts`): the verdict checks them. Before
sending, the demo publishes the FX rates of deploy/demo-fx-rates.csv the way `postback
fx load` does, so that EUR and GBP convert to the reporting currency.

Why it is built this way:

- The traffic is a *plan* computed up front from a seed and the partner file
  (`app.demo.plan.build_plan`, pure and deterministic), so a run can be replayed and
  the mix is unit-tested without a network. Signing happens only when a request is
  sent (`app.demo.send.render_postback`), with the current time, because signed
  timestamps must be within the advertiser's tolerance of the moment the ingester
  receives them.
- Submission (`app.demo.send.submit_plan`) runs each click's journey in order (a status
  update must follow its pending order, a late click must follow its postback) while
  journeys run concurrently over one aiohttp connection pool, paced to `--rate`
  requests/s.
- The summary is read back from ClickHouse (`app.demo.report.collect_report`, the real
  results), kept as plain data, and formatted by a pure function
  (`app.demo.report.format_report`) that is tested on fixed rows.

This module is the command itself: preflight checks, then plan, send, wait, report.

The secrets come from the partner file, which must be the file the running ingester
and processors loaded (POSTBACK_CONFIG); otherwise every postback is rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from app.demo.affiliates import AffiliateServers, collect_deliveries, delivery_checks, wait_for_deliveries
from app.demo.plan import build_plan, payout_facts
from app.demo.report import DemoReport, collect_report, format_report, verdict, wait_for_outcomes
from app.demo.send import ProgressBar, submit_plan
from postback.config import Settings
from postback.fx import FxRates
from postback.partners import load_partner_config

#: The partner file used when POSTBACK_CONFIG is not set (the one `postback run` uses too).
DEMO_PARTNERS = Path(__file__).resolve().parents[2] / "deploy" / "demo-partners.toml"
#: The demo's FX rates (units of USD per unit), loaded before the traffic is sent.
DEMO_FX_RATES = Path(__file__).resolve().parents[2] / "deploy" / "demo-fx-rates.csv"
#: The currency DEMO_FX_RATES converts to: loaded only for a partner file reporting in it.
DEMO_FX_REPORTING = "USD"
#: How long the demo waits for its outbound postbacks to be delivered or dead-lettered, seconds.
DELIVERY_WAIT_S = 60.0


# --------------------------------------------------------------------------- command


def _q(name: str) -> str:
    from sinks.migrations import quote_identifier

    return quote_identifier(name)


def partner_file(settings: Settings) -> Path:
    """POSTBACK_CONFIG when set (what the processors load too), else deploy/demo-partners.toml."""
    return settings.config_file or DEMO_PARTNERS


def load_fx_rates(settings: Settings, config_file: Path, path: Path, client: Any, database: str,
                  say: Callable[[str], None], wait_s: float = 15.0) -> FxRates | None:
    """Publish the rates of `path` as `postback fx load` does; wait until the sink stored them; the rates.

    The processors read the fx-rates topic at start-up and follow it, so rates published
    now reach them before this run's conversions; ClickHouse having them too is the
    sign that the topic was read. None when nothing was loaded.
    """
    from app.commands.fx import publish_rates
    from app.endpoints import kafka_bootstrap
    from postback.fx import parse_fx_csv

    rates = parse_fx_csv(path.read_text(encoding="utf-8"), str(path))
    started_ms = time.time_ns() // 1_000_000
    reporting = load_partner_config(config_file).account.reporting_currency
    if publish_rates(kafka_bootstrap(settings), settings.topic_prefix, rates, reporting) != 0:
        raise RuntimeError(f"could not load the demo's FX rates from {path}: Kafka did not acknowledge them")
    say(f"  loaded {len(rates)} FX rates ({', '.join(sorted({r.currency for r in rates}))} to {reporting})")
    fx = FxRates()
    for rate in rates:
        fx.add(rate)
    db = _q(database)
    if int(client.command(f"EXISTS TABLE {db}.fx_rates")) != 1:
        say("  (ClickHouse has no fx_rates table yet: not waiting for the rates to arrive)")
        return fx
    deadline = time.monotonic() + wait_s
    while True:
        stored = int(client.command(f"SELECT count() FROM {db}.fx_rates FINAL "
                                    f"WHERE toUnixTimestamp64Milli(loaded_at) >= {started_ms}"))
        if stored >= len(rates) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if stored < len(rates):
        say(f"  only {stored} of {len(rates)} FX rates reached ClickHouse after {wait_s:g}s; sending anyway")
    return fx


def _preflight(base_url: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/readyz", timeout=5) as resp:
            resp.read()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"the ingester at {base_url} is not ready ({err.code}): is Kafka up?") from err
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"no ingester answers at {base_url} ({getattr(err, 'reason', err)}): start "
                           "`postback ingest` (or `postback run`), or pass --url") from err


def run_demo(settings: Settings, base_url: str, clicks: int, rate: float, database: str, timeout_s: float,
             seed: int | None, out: IO[str] | None = None, err: IO[str] | None = None) -> tuple[bool, DemoReport]:
    """The whole demo: plan, submit, wait for the outcomes, report. Returns (ok, report)."""
    from ulid import ULID

    from app.endpoints import clickhouse_url
    from postback.clickhouse import client_factory

    out = out or sys.stdout
    err = err or sys.stderr
    say = lambda m: print(m, file=err, flush=True)  # noqa: E731
    path = partner_file(settings)
    config = load_partner_config(path)
    url = clickhouse_url(settings)
    if url.startswith("chdb:"):
        raise RuntimeError("the demo reads results from a ClickHouse server, but none runs: start `postback "
                           "stack up` (or set CLICKHOUSE_URL to a server)")
    client = client_factory(url)()  # every query names the database, so a missing one is reported below
    if int(client.command(f"EXISTS DATABASE {_q(database)}")) != 1 or \
            int(client.command(f"EXISTS TABLE {_q(database)}.postback_outcomes")) != 1:
        raise RuntimeError(f"ClickHouse database {database!r} has no postback_outcomes table: start `postback "
                           "sink` (it creates the schema), or pass --database")
    _preflight(base_url)
    fx: FxRates | None = None
    if config.account.reporting_currency == DEMO_FX_REPORTING:
        fx = load_fx_rates(settings, path, DEMO_FX_RATES, client, database, say)
    else:
        say(f"  FX: {DEMO_FX_RATES.name} converts to {DEMO_FX_REPORTING}, not to the partner file's "
            f"{config.account.reporting_currency}: not loaded (load yours with `postback fx load`)")

    seed = seed if seed is not None else random.SystemRandom().randrange(1, 10**6)
    plan = build_plan(config, clicks, seed, str(ULID()))
    postbacks = sum(len(j.postbacks) for j in plan.journeys)
    say(f"postback demo: {clicks} clicks and {postbacks} postbacks ({plan.requests} requests) at up to "
        f"{rate:g} requests/s -> {base_url}")
    say(f"  partner file: {path} (the running ingester and processors must use this same file)")
    say(f"  seed {seed} (--seed {seed} replays this traffic mix); run {plan.run_id}")
    with AffiliateServers(config) as servers:
        if servers.servers:
            say("  affiliate endpoints: " + ", ".join(
                f"{a} ({s.behaviour}) on 127.0.0.1:{s.server.server_address[1]}" for a, s in servers.servers.items()))
        submission = asyncio.run(submit_plan(plan, config, base_url, rate,
                                             ProgressBar("sending  ", plan.requests, err)))
        receipts = list(submission.receipts)
        say(f"  {len(receipts)} postbacks accepted (202); waiting up to {timeout_s:g}s for their outcomes in "
            f"ClickHouse ({url.split('@')[-1]}, database {database})")
        found = wait_for_outcomes(client, database, receipts, timeout_s,
                                  ProgressBar("outcomes ", len(receipts), err)) if receipts else 0
        report = collect_report(client, database, submission, found, timeout_s, payout_facts(plan, config), fx)
        if servers.servers and receipts:
            run_conversions = (f"conversion_id IN (SELECT conversion_id FROM {_q(database)}.postback_outcomes FINAL "
                               "WHERE outcome = 'accepted' AND receipt_id IN _demo_receipts)")
            say(f"  waiting up to {DELIVERY_WAIT_S:g}s for the outbound postbacks to "
                f"{', '.join(servers.servers)} to be delivered or dead-lettered")
            done, want = wait_for_deliveries(client, database, run_conversions, list(servers.servers),
                                             DELIVERY_WAIT_S)
            say(f"  {done} of {want} outbound postbacks settled")
            rows = collect_deliveries(client, database, run_conversions, servers)
            report = dataclasses.replace(report, deliveries=rows, delivery_checks=delivery_checks(rows))
    ok, message = verdict(report)
    print(format_report(report), file=out)
    print("", file=out)
    print(message, file=out, flush=True)
    return ok, report


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.clicks < 1 or args.rate <= 0 or args.timeout < 0:
        raise ValueError("--clicks must be >= 1, --rate > 0 and --timeout >= 0")
    ok, _report = run_demo(settings, args.url, args.clicks, args.rate, args.database, args.timeout, args.seed)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="simulate affiliate clicks and advertiser postbacks against the running pipeline",
        description=(
            "Send realistic traffic to a running pipeline (ingester at --url, `postback process` and "
            "`postback sink` running): affiliate clicks, then signed postbacks (purchases, leads, trials and "
            "renewals, refunds, pending->approved orders) with the usual partner mistakes (retries, repeated "
            "orders, bad signatures, lost click ids, late clicks). Then wait until every accepted postback has "
            "an outcome in ClickHouse and print revenue by affiliate and offer, payout and margin by affiliate "
            "and offer in the reporting currency, payout-to-revenue, held payouts and why, cap usage, match "
            "rate, dedupe rate, rejection reasons and latency. The demo first loads the FX rates of "
            "deploy/demo-fx-rates.csv (as `postback fx load` does). Postbacks are signed with the secrets of "
            "the partner file "
            "$POSTBACK_CONFIG, else deploy/demo-partners.toml: it MUST be the same file the running ingester "
            "and processors loaded (`postback run` uses deploy/demo-partners.toml by default), or every "
            "postback is rejected. Exit 0 when every accepted postback has an outcome, attributed revenue "
            "is positive and the payouts of the planned scenarios (cap, paused affiliate, too-fast "
            "conversion, clawback) are as the partner file says, else 1."),
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="ingester base URL (default %(default)s)")
    p.add_argument("--clicks", type=int, default=300, help="affiliate clicks to simulate (default %(default)s)")
    p.add_argument("--rate", type=float, default=200.0, help="at most this many requests/s (default %(default)s)")
    p.add_argument("--database", default="postback", help="ClickHouse database of the sink (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for every accepted postback's outcome in ClickHouse (default %(default)s)")
    p.add_argument("--seed", type=int, help="random seed of the traffic mix (default: a fresh one, printed)")
    p.set_defaults(handler=_demo)
