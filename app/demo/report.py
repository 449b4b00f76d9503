"""The demo's results: read back from ClickHouse, kept as plain data, summarised for marketers.

`wait_for_outcomes` polls until every accepted postback has its outcome row,
`collect_report` reads this run's rows into a `DemoReport`, and `format_report` and
`verdict` are pure functions of it (tested on fixed rows).

The payout part reads the commission columns through the `v_payouts` view (one row per
conversion, so it can be limited to this run's conversions), in the account's reporting
currency. Cap usage is counted by the account timezone's day, as the engine counts it,
over every run of that day (a cap is shared by all of them). `payout_checks` compares
what the engine decided with what the plan and the partner file imply
(`app.demo.plan.payout_facts`), computed without the engine.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from app.demo.affiliates import DeliveryCheck, DeliveryRow, format_deliveries
from app.demo.plan import PayoutFacts
from app.demo.send import ProgressBar, Submission
from postback.fx import FxRates, round_money


# --------------------------------------------------------------------------- ClickHouse


def _ch_rows(client: Any, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in client.query(sql).result_rows]


def _upload_ids(client: Any, table: str, column: str, ids: Sequence[str]) -> None:
    """A session-scoped temporary table of ids: queries filter with `IN table` (no huge query text)."""
    client.command(f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({column} String)")
    client.command(f"TRUNCATE TABLE {table}")
    for start in range(0, len(ids), 50_000):
        client.insert(table, [[i] for i in ids[start:start + 50_000]], column_names=[column])


def wait_for_outcomes(client: Any, database: str, receipts: Sequence[str], timeout_s: float,
                      progress: ProgressBar | None = None, poll_s: float = 1.0) -> int:
    """Poll `postback_outcomes FINAL` until every receipt has its row or `timeout_s` passes; how many do."""
    _upload_ids(client, "_demo_receipts", "receipt_id", receipts)
    deadline = time.monotonic() + timeout_s
    db = _q(database)
    found = 0
    while True:
        found = int(_ch_rows(client, f"SELECT count() FROM {db}.postback_outcomes FINAL "
                                     "WHERE receipt_id IN _demo_receipts")[0][0])
        if progress:
            progress.update(found)
        if found >= len(receipts) or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if progress:
        progress.finish(f"{len(receipts) - found} still missing" if found < len(receipts) else "all in ClickHouse")
    return found


def _q(name: str) -> str:
    from sinks.migrations import quote_identifier

    return quote_identifier(name)


@dataclass(frozen=True)
class RevenueRow:
    """Approved conversions of this run for one (affiliate, offer, currency, attributed)."""

    affiliate_id: str          # '' when the conversion has no click
    offer_id: str
    currency: str              # '' for conversions without money (leads, trials)
    attributed: bool
    conversions: int           # sign > 0
    reversals: int             # refunds, chargebacks
    gross: Decimal
    net: Decimal


@dataclass(frozen=True)
class Quantiles:
    count: int
    p50: float
    p99: float
    max: float | None = None


@dataclass(frozen=True)
class PayoutRow:
    """This run's payout decisions for one (affiliate, offer), in the reporting currency (v_payouts)."""

    affiliate_id: str          # '' when not attributed
    offer_id: str
    conversions: int           # approved, sign > 0
    revenue: Decimal           # net approved revenue (refunds subtract)
    payout: Decimal            # net payout of the same rows (clawbacks subtract)
    pending_payout: Decimal    # payable already for pending conversions
    payable: int               # sign > 0, payout_status payable (pending included)
    held: int
    rejected: int
    fx_missing: int = 0

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.payout


@dataclass(frozen=True)
class HoldRow:
    """This run's conversions held or rejected for one reason."""

    payout_status: str         # hold | rejected
    reason: str
    conversions: int
    revenue: Decimal           # their net revenue, reporting currency (approved only)


@dataclass(frozen=True)
class CapRow:
    """Usage of one offer's daily conversions cap on one day of the account timezone (all runs that day)."""

    offer_id: str
    day: str
    limit: int
    payable: int
    payout: Decimal
    held_by_cap: int
    this_run: int              # this run's conversions of the offer that day


@dataclass(frozen=True)
class ScenarioRow:
    """What the engine decided for one scenario conversion (read by order id)."""

    advertiser_id: str
    order_id: str
    event: str
    payout_status: str
    payout_reason: str
    payout: Decimal | None
    payout_currency: str
    payout_reporting: Decimal | None
    day: str                   # account-timezone day of the conversion


@dataclass(frozen=True)
class PayoutCheck:
    label: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DemoReport:
    """Everything the summary shows: plain data, so formatting is a pure, tested function."""

    receipts_accepted: int                              # postbacks answered 202
    receipts_with_outcome: int
    outcomes: tuple[tuple[str, str, int], ...]          # (outcome, reason, receipts) from ClickHouse
    expected: tuple[tuple[str, str, int], ...]          # the same, as the plan intended, for the 202s
    conversions: tuple[tuple[str, str, int], ...]       # (status, attribution, conversions) of this run
    revenue: tuple[RevenueRow, ...]
    decision_latency_ms: Quantiles | None               # received_at -> processed_at (latency_ms)
    sink_latency_ms: Quantiles | None                   # processed_at -> inserted_at (conversions)
    row_latency_ms: Quantiles | None                    # received_at -> inserted_at (conversions)
    clicks_sent: int = 0
    clicks_recorded: int | None = None
    requests: int = 0
    elapsed_s: float = 0.0
    failures: tuple[tuple[str, int], ...] = ()
    answers: tuple[tuple[str, int], ...] = ()            # ("GET /click 302", n): every HTTP answer seen
    skipped: int = 0
    timeout_s: float = 0.0
    reporting_currency: str = ""
    payouts: tuple[PayoutRow, ...] = ()
    holds: tuple[HoldRow, ...] = ()
    caps: tuple[CapRow, ...] = ()
    checks: tuple[PayoutCheck, ...] = ()
    deliveries: tuple[DeliveryRow, ...] = ()             # outbound postbacks to the demo's endpoints
    delivery_checks: tuple[DeliveryCheck, ...] = ()


def _quantiles(row: tuple[Any, ...]) -> Quantiles | None:
    count = int(row[0])
    if not count:
        return None
    qs = list(row[1])
    return Quantiles(count, float(qs[0]), float(qs[1]), float(row[2]) if len(row) > 2 and row[2] is not None
                     else None)


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def collect_payouts(client: Any, database: str, run_conversions: str, facts: PayoutFacts,
                    fx: FxRates | None = None) -> dict[str, Any]:
    """The payout part of the report: this run's payouts, holds, cap usage, and the checks of `facts`."""
    db = _q(database)
    tz = _literal(facts.timezone)
    zero = "toDecimal64(0, 6)"
    rows = _ch_rows(client, f"""
        SELECT ifNull(affiliate_id, '') AS aff, ifNull(offer_id, '') AS off,
               countIf(status = 'approved' AND sign > 0) AS conv_n,
               sumIf(ifNull(signed_revenue_reporting, {zero}), status = 'approved') AS revenue_total,
               sumIf(ifNull(payout_reporting, {zero}), status = 'approved') AS payout_total,
               sumIf(ifNull(payout_reporting, {zero}), status = 'pending') AS pending_total,
               countIf(payout_status = 'payable' AND sign > 0) AS payable_n,
               countIf(payout_status = 'hold') AS held_n, countIf(payout_status = 'rejected') AS rejected_n,
               countIf(fx_status = 'fx_missing') AS fx_missing_n
        FROM {db}.v_payouts WHERE {run_conversions}
        GROUP BY aff, off ORDER BY aff, off""")
    holds = _ch_rows(client, f"""
        SELECT payout_status, ifNull(payout_reason, '') AS reason, count() AS n,
               sumIf(ifNull(signed_revenue_reporting, {zero}), status = 'approved') AS revenue_total
        FROM {db}.v_payouts WHERE {run_conversions} AND payout_status IN ('hold', 'rejected')
        GROUP BY payout_status, reason ORDER BY n DESC, payout_status, reason""")
    caps: list[CapRow] = []
    for offer_id, limit in facts.capped_offers:
        offer = _literal(offer_id)
        local_day = f"toString(toDate(reported_at, {tz}))"
        for day, payable, payout, held, this_run in _ch_rows(client, f"""
                SELECT {local_day} AS d, countIf(payout_status = 'payable' AND sign > 0),
                       sumIf(ifNull(payout_reporting, {zero}), payout_status = 'payable' AND sign > 0),
                       countIf(payout_reason IN ('cap_daily_conversions', 'cap_monthly_conversions',
                                                 'cap_daily_payout', 'cap_monthly_payout')),
                       countIf({run_conversions})
                FROM {db}.v_payouts
                WHERE offer_id = {offer} AND {local_day} IN
                      (SELECT {local_day} FROM {db}.v_payouts WHERE offer_id = {offer} AND {run_conversions})
                GROUP BY d ORDER BY d"""):
            caps.append(CapRow(offer_id, str(day), int(limit), int(payable), Decimal(payout), int(held),
                               int(this_run)))
    scenario: list[ScenarioRow] = []
    orders = sorted({e.order_id for e in facts.conversions})
    if orders:
        for adv, order, event, status, reason, payout, cur, reporting, day in _ch_rows(client, f"""
                SELECT advertiser_id, ifNull(order_id, ''), event, ifNull(payout_status, ''),
                       ifNull(payout_reason, ''), payout, ifNull(payout_currency, ''), payout_reporting,
                       toString(toDate(reported_at, {tz}))
                FROM {db}.v_payouts
                WHERE {run_conversions} AND order_id IN ({', '.join(_literal(o) for o in orders)})"""):
            scenario.append(ScenarioRow(str(adv), str(order), str(event), str(status), str(reason), _dec(payout),
                                        str(cur), _dec(reporting), str(day)))
    paused: dict[str, tuple[int, int, int]] = {}
    for affiliate in facts.paused_affiliates:
        n, payable, held = _ch_rows(client, f"""
            SELECT countIf(sign > 0), countIf(payout_status = 'payable' AND sign > 0),
                   countIf(payout_status = 'hold' AND payout_reason = 'affiliate_paused')
            FROM {db}.v_payouts WHERE {run_conversions} AND affiliate_id = {_literal(affiliate)}""")[0]
        paused[affiliate] = (int(n), int(payable), int(held))
    return {
        "reporting_currency": facts.reporting_currency,
        "payouts": tuple(PayoutRow(str(a), str(o), int(c), Decimal(r), Decimal(p), Decimal(pp), int(pn), int(h),
                                   int(rj), int(fm)) for a, o, c, r, p, pp, pn, h, rj, fm in rows),
        "holds": tuple(HoldRow(str(s), str(r), int(n), Decimal(v)) for s, r, n, v in holds),
        "caps": tuple(caps),
        "checks": payout_checks(facts, scenario, tuple(caps), paused, fx),
    }


def payout_checks(facts: PayoutFacts, rows: Sequence[ScenarioRow], caps: Sequence[CapRow],
                  paused: dict[str, tuple[int, int, int]], fx: FxRates | None = None) -> tuple[PayoutCheck, ...]:
    """Compare the engine's decisions with the facts the plan and the partner file imply (to the cent).

    - each scenario conversion: its payout status, reason and payout (the clawback: minus
      the purchase's payout, in the payout currency and, in the reporting currency, minus
      what the purchase was worth; the purchase's reporting amount is checked against
      the loaded rate of its day when `fx` is given);
    - the capped offer: on the busiest day of this run exactly `limit` payable
      conversions (never more on any day), paying `limit * amount` for a fixed cpa;
    - the paused affiliates: none of their conversions payable, all held `affiliate_paused`.
    """
    out: list[PayoutCheck] = []
    found = {(r.advertiser_id, r.order_id, r.event): r for r in rows}
    reporting = facts.reporting_currency
    for e in facts.conversions:
        row = found.get((e.advertiser_id, e.order_id, e.event))
        if row is None:
            out.append(PayoutCheck(e.label, False, "no payout decision in ClickHouse"))
            continue
        want = f"{e.payout_status}" + (f" {e.payout_reason}" if e.payout_reason else "")
        seen = f"{row.payout_status}" + (f" {row.payout_reason}" if row.payout_reason else "")
        problems: list[str] = []
        if want != seen:
            problems.append(f"{seen}, expected {want}")
        if e.payout is not None and (row.payout is None or row.payout != e.payout
                                     or (e.payout != 0 and row.payout_currency != e.payout_currency)):
            problems.append(f"payout {row.payout} {row.payout_currency}, expected {e.payout:.2f} {e.payout_currency}")
        money = f"{_amount(row.payout)} {row.payout_currency}" if row.payout is not None else "no payout"
        if e.refund_of is not None:
            paid = found.get((e.advertiser_id, e.refund_of, "purchase"))
            if paid is None or paid.payout_reporting is None or row.payout_reporting is None \
                    or row.payout_reporting != -paid.payout_reporting:
                problems.append(f"clawback {row.payout_reporting} {reporting} does not undo the purchase's "
                                f"{paid.payout_reporting if paid else None} {reporting}")
            else:
                money += f" = {_amount(row.payout_reporting)} {reporting}"
        elif e.payout and row.payout is not None and e.payout_currency and fx is not None:
            rate = Decimal(1) if e.payout_currency == reporting else \
                getattr(fx.lookup(e.payout_currency, row.day), "rate", None)
            expected = round_money(e.payout * rate, reporting) if rate is not None else None
            if expected is None or row.payout_reporting != expected:
                problems.append(f"{row.payout_reporting} {reporting}, expected {expected} {reporting} "
                                f"(rate {rate} of {row.day})")
            else:
                money += f" = {_amount(expected)} {reporting}"
        out.append(PayoutCheck(e.label, not problems, "; ".join(problems) or f"{seen}, {money}"))
    for cap in facts.caps:
        days = [c for c in caps if c.offer_id == cap.offer_id and c.this_run]
        busiest = max(days, key=lambda c: (c.this_run, c.day), default=None)
        label = f"cap {cap.offer_id} daily_conversions {cap.limit}"
        problems = []
        over = [c for c in days if c.payable > cap.limit]
        if over:
            problems.append(", ".join(f"{c.day}: {c.payable} payable" for c in over) + f", above the cap {cap.limit}")
        if busiest is None:
            problems.append("no conversions of the offer in ClickHouse")
        elif cap.exact and busiest.payable != cap.limit:
            problems.append(f"{busiest.day}: {busiest.payable} payable, expected exactly {cap.limit}")
        if busiest is not None and cap.exact and cap.payout_each is not None \
                and busiest.payout != cap.payout_each * cap.limit:
            problems.append(f"{busiest.day}: paid {busiest.payout} {reporting}, expected "
                            f"{cap.payout_each * cap.limit:.2f} {reporting}")
        if busiest is not None and cap.exact and not busiest.held_by_cap:
            problems.append(f"{busiest.day}: nothing held by the cap")
        detail = "; ".join(problems) or (f"{busiest.day}: {busiest.payable}/{cap.limit} payable, paid "
                                         f"{_amount(busiest.payout)} {reporting}, {busiest.held_by_cap} held "
                                         "by the cap" if busiest else "")
        out.append(PayoutCheck(label, not problems, detail))
    for affiliate, (n, payable, held) in sorted(paused.items()):
        ok = payable == 0 and held > 0
        out.append(PayoutCheck(f"paused {affiliate}", ok,
                               f"{n} conversions: {held} held affiliate_paused, {payable} payable"
                               + ("" if ok else " (expected none payable, some held)")))
    return tuple(out)


def collect_report(client: Any, database: str, submission: Submission, found: int,
                   timeout_s: float, facts: PayoutFacts | None = None, fx: FxRates | None = None) -> DemoReport:
    """Read this run's results back from ClickHouse (the receipts are in `_demo_receipts`)."""
    db = _q(database)
    receipts = "receipt_id IN _demo_receipts"
    run_conversions = (f"conversion_id IN (SELECT conversion_id FROM {db}.postback_outcomes FINAL "
                       f"WHERE outcome = 'accepted' AND {receipts})")
    outcomes = _ch_rows(client, f"SELECT outcome, reason, count() FROM {db}.postback_outcomes FINAL "
                                f"WHERE {receipts} GROUP BY outcome, reason ORDER BY outcome, reason")
    conversions = _ch_rows(client, f"SELECT status, attribution, count() FROM {db}.conversions FINAL "
                                   f"WHERE {run_conversions} GROUP BY status, attribution "
                                   "ORDER BY status, attribution")
    zero = "toDecimal64(0, 6)"
    revenue = _ch_rows(client, f"""
        SELECT ifNull(affiliate_id, '') AS aff, ifNull(offer_id, '') AS off, ifNull(currency, '') AS cur,
               attributed AS attr, countIf(sign > 0) AS conv_n, countIf(sign < 0) AS rev_n,
               sumIf(ifNull(amount, {zero}), sign > 0) AS gross_total,
               sum(ifNull(signed_amount, {zero})) AS net_total
        FROM {db}.v_conversions_net WHERE {run_conversions}
        GROUP BY aff, off, cur, attr ORDER BY aff, off, cur, attr""")
    decision = _ch_rows(client, f"SELECT count(), quantiles(0.5, 0.99)(latency_ms), max(latency_ms) "
                                f"FROM {db}.postback_outcomes FINAL WHERE {receipts}")[0]
    ms = "toUnixTimestamp64Milli"
    rows = _ch_rows(client, f"""
        SELECT count(), quantiles(0.5, 0.99)({ms}(inserted_at) - {ms}(processed_at)),
               max({ms}(inserted_at) - {ms}(processed_at)),
               quantiles(0.5, 0.99)({ms}(inserted_at) - {ms}(received_at)), max({ms}(inserted_at) - {ms}(received_at))
        FROM {db}.conversions FINAL WHERE {receipts}""")[0]
    clicks_recorded: int | None = None
    if submission.click_ids:
        _upload_ids(client, "_demo_clicks", "click_id", submission.click_ids)
        clicks_recorded = int(_ch_rows(client, f"SELECT count() FROM {db}.clicks FINAL "
                                               "WHERE click_id IN _demo_clicks")[0][0])
    expected = Counter((s.expect, s.expect_reason) for s in submission.receipts.values())
    payouts = collect_payouts(client, database, run_conversions, facts, fx) if facts is not None else {}
    return DemoReport(
        receipts_accepted=len(submission.receipts), receipts_with_outcome=found,
        outcomes=tuple((str(o), str(r), int(n)) for o, r, n in outcomes),
        expected=tuple(sorted((o, r, n) for (o, r), n in expected.items())),
        conversions=tuple((str(s), str(a), int(n)) for s, a, n in conversions),
        revenue=tuple(RevenueRow(str(a), str(o), str(c), bool(t), int(cn), int(rn), Decimal(g), Decimal(n))
                      for a, o, c, t, cn, rn, g, n in revenue),
        decision_latency_ms=_quantiles(decision),
        sink_latency_ms=_quantiles((rows[0], rows[1], rows[2])),
        row_latency_ms=_quantiles((rows[0], rows[3], rows[4])),
        clicks_sent=len(submission.click_ids), clicks_recorded=clicks_recorded,
        requests=submission.requests, elapsed_s=submission.elapsed_s,
        failures=tuple(sorted(submission.failures.items())), answers=tuple(sorted(submission.answers.items())),
        skipped=submission.skipped, timeout_s=timeout_s, **payouts,
    )


# --------------------------------------------------------------------------- summary


def _pct(part: float, whole: float) -> str:
    return "n/a" if not whole else f"{part / whole:.1%}"


def _amount(value: Decimal) -> str:
    return f"{value:,.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return ["  " + fmt(header)] + ["  " + fmt([str(c) for c in row]) for row in rows]


def _money_table(rows: Sequence[RevenueRow], key: Callable[[RevenueRow], str], first: str,
                 total: str | None = None) -> list[str]:
    """One line per key: conversions, refunds, and net revenue in one column per currency (never mixed).

    `conversions` counts every approved conversion, with or without money (leads and
    trials too); `total` adds a line summing all keys.
    """
    currencies = sorted({r.currency for r in rows if r.currency})
    groups: dict[str, list[Any]] = {}
    for row in rows:
        for name in (key(row),) + ((total,) if total else ()):
            entry = groups.setdefault(name, [0, 0, {}])
            entry[0] += row.conversions
            entry[1] += row.reversals
            if row.currency:
                entry[2][row.currency] = entry[2].get(row.currency, Decimal(0)) + row.net
    order = lambda name: (name == total, name.startswith("("), name)  # noqa: E731
    body = [[name, str(conv), str(refunds)] + [_amount(nets[c]) if c in nets else "-" for c in currencies]
            for name, (conv, refunds, nets) in sorted(groups.items(), key=lambda kv: order(kv[0]))]
    header = [first, "conversions", "refunds"] + [f"net {c}" for c in currencies]
    return _table(header, body, set(range(1, len(header))))


def attributed_net(report: DemoReport) -> dict[str, Decimal]:
    """Net revenue credited to affiliates (attributed conversions), per currency."""
    out: dict[str, Decimal] = {}
    for row in report.revenue:
        if row.attributed and row.currency:
            out[row.currency] = out.get(row.currency, Decimal(0)) + row.net
    return out


def _share(part: Decimal, whole: Decimal) -> str:
    return "n/a" if not whole else f"{part / whole:.1%}"


def _payout_table(rows: Sequence[PayoutRow], key: Callable[[PayoutRow], str], first: str,
                  total: str | None = None) -> list[str]:
    """One line per key: approved conversions, revenue, payout, margin, payout/revenue, and the decisions."""
    groups: dict[str, list[Any]] = {}
    for row in rows:
        for name in (key(row),) + ((total,) if total else ()):
            entry = groups.setdefault(name, [0, Decimal(0), Decimal(0), Decimal(0), 0, 0, 0])
            entry[0] += row.conversions
            entry[1] += row.revenue
            entry[2] += row.payout
            entry[3] += row.pending_payout
            entry[4] += row.payable
            entry[5] += row.held
            entry[6] += row.rejected
    order = lambda name: (name == total, name.startswith("("), name)  # noqa: E731
    body = [[name, str(conv), _amount(revenue), _amount(payout), _amount(revenue - payout), _share(payout, revenue),
             _amount(pending), str(payable), str(held + rejected)]
            for name, (conv, revenue, payout, pending, payable, held, rejected)
            in sorted(groups.items(), key=lambda kv: order(kv[0]))]
    header = [first, "approved", "revenue", "payout", "margin", "payout/rev", "pending payout", "payable", "held"]
    return _table(header, body, set(range(1, len(header))))


def format_payouts(report: DemoReport) -> list[str]:
    """The payout part of the summary, in the reporting currency."""
    cur = report.reporting_currency
    lines = [f"== Payouts in {cur} (approved conversions net of refunds and clawbacks; pending shown apart)"]
    if not report.payouts:
        lines.append("  (no payout decisions: is the commission stage running?)")
        return lines
    lines.extend(_payout_table(report.payouts, lambda r: r.affiliate_id or "(no click)", "affiliate",
                               total="= all affiliates"))
    lines.append("")
    lines.extend(_payout_table(report.payouts, lambda r: r.offer_id or "(no offer)", "offer"))
    revenue = sum((r.revenue for r in report.payouts), Decimal(0))
    payout = sum((r.payout for r in report.payouts), Decimal(0))
    lines.append(f"  payout-to-margin: payout {_amount(payout)} {cur} of revenue {_amount(revenue)} {cur} = "
                 f"{_share(payout, revenue)}; margin {_amount(revenue - payout)} {cur} "
                 f"({_share(revenue - payout, revenue)})")
    missing = sum(r.fx_missing for r in report.payouts)
    if missing:
        lines.append(f"  {missing} conversions had no FX rate (fx_missing): not in the {cur} sums")
    lines.append("  held or rejected, and why:")
    if report.holds:
        lines.extend(f"    {h.conversions:>5}  {h.payout_status:<8} {h.reason:<28} revenue {_amount(h.revenue)} {cur}"
                     for h in report.holds)
    else:
        lines.append("    (none)")
    if report.caps:
        lines.append("  cap usage (daily conversions, account-timezone days, all runs of the day):")
        lines.extend(f"    {c.offer_id} {c.day}: {c.payable}/{c.limit} payable ({_amount(c.payout)} {cur}), "
                     f"{c.held_by_cap} over the cap; this run: {c.this_run} conversions" for c in report.caps)
    if report.checks:
        lines.append("  payout checks (expected from the traffic plan and the partner file):")
        lines.extend(f"    {'ok  ' if c.ok else 'FAIL'}  {c.label}: {c.detail}" for c in report.checks)
    return lines


def format_report(report: DemoReport) -> str:
    """The marketer-facing summary of one run."""
    lines: list[str] = []
    total = report.receipts_with_outcome
    by_outcome = Counter()
    for outcome, _reason, n in report.outcomes:
        by_outcome[outcome] += n
    rate = report.requests / report.elapsed_s if report.elapsed_s else 0.0
    lines.append("== Traffic")
    lines.append(f"  {report.requests} requests in {report.elapsed_s:.1f}s ({rate:.0f}/s); "
                 f"clicks issued: {report.clicks_sent}"
                 + (f", in ClickHouse: {report.clicks_recorded}" if report.clicks_recorded is not None else ""))
    lines.append(f"  postbacks accepted by the ingester (202): {report.receipts_accepted}; "
                 f"with an outcome in ClickHouse: {report.receipts_with_outcome}"
                 + ("" if total >= report.receipts_accepted
                    else f"  ({report.receipts_accepted - total} MISSING)"))
    if report.answers:
        lines.append("  HTTP answers: " + ", ".join(f"{what} x{n}" for what, n in report.answers))
    if report.skipped or report.failures:
        lines.append(f"  not sent: {report.skipped} postbacks (their click failed)" if report.skipped else
                     "  requests that failed:")
        if report.skipped and report.failures:
            lines.append("  requests that failed:")
        lines.extend(f"    {n:>5}  {what}" for what, n in report.failures)

    lines.append("")
    lines.append("== Net revenue by affiliate (approved conversions; refunds subtracted)")
    if report.revenue:
        lines.extend(_money_table(report.revenue, lambda r: r.affiliate_id or "(no click)", "affiliate",
                                  total="= all affiliates"))
    else:
        lines.append("  (no approved conversions)")
    lines.append("")
    lines.append("== Net revenue by offer")
    if report.revenue:
        lines.extend(_money_table(report.revenue, lambda r: r.offer_id or "(no offer)", "offer"))
    else:
        lines.append("  (no approved conversions)")
    credited = attributed_net(report)
    lines.append("  attributed to affiliates: " + (", ".join(f"{_amount(v)} {c}" for c, v in sorted(credited.items()))
                                                   or "nothing"))
    if report.reporting_currency:
        lines.append("")
        lines.extend(format_payouts(report))

    lines.append("")
    lines.append("== Quality")
    conv_total = sum(n for _, _, n in report.conversions)
    by_attr = Counter()
    by_status = Counter()
    for status, attribution, n in report.conversions:
        by_attr[attribution] += n
        by_status[status] += n
    named = conv_total - by_attr["no_click_id"]
    lines.append(f"  match rate: {_pct(by_attr['attributed'], conv_total)} of {conv_total} conversions attributed "
                 f"to a click ({_pct(by_attr['attributed'], named)} of those that named a click)"
                 + "".join(f"; {k}: {by_attr[k]}" for k in ("no_click_id", "no_click", "expired") if by_attr[k]))
    if by_status["pending"] or by_status["rejected"]:
        lines.append(f"  not counted as revenue: {by_status['pending']} pending, {by_status['rejected']} rejected "
                     "by the advertiser")
    dup_reasons = ", ".join(f"{r} {n}" for o, r, n in report.outcomes if o == "duplicate")
    lines.append(f"  dedupe rate: {_pct(by_outcome['duplicate'], total)} ({by_outcome['duplicate']} duplicates"
                 + (f": {dup_reasons}" if dup_reasons else "") + ")")
    lines.append(f"  rejection rate: {_pct(by_outcome['rejected'], total)} ({by_outcome['rejected']} rejected)")
    rejected = sorted(((n, r) for o, r, n in report.outcomes if o == "rejected"), reverse=True)
    if rejected:
        lines.append("  rejection reasons:")
        lines.extend(f"    {n:>5}  {reason}" for n, reason in rejected)
    lines.append("  outcomes (seen / expected by the traffic plan):")
    seen = {(o, r): n for o, r, n in report.outcomes}
    expected = {(o, r): n for o, r, n in report.expected}
    for key in sorted(set(seen) | set(expected)):
        outcome, reason = key
        mark = "" if seen.get(key, 0) == expected.get(key, 0) else "   <- differs"
        lines.append(f"    {outcome + (' ' + reason if reason else ''):<26} {seen.get(key, 0):>5} / "
                     f"{expected.get(key, 0):<5}{mark}".rstrip())

    lines.append("")
    lines.append("== Latency")

    def q(label_: str, value: Quantiles | None, note: str = "") -> None:
        if value is None:
            lines.append(f"  {label_}: n/a")
            return
        worst = f", max {value.max:,.0f} ms" if value.max is not None else ""
        lines.append(f"  {label_}: p50 {value.p50:,.0f} ms, p99 {value.p99:,.0f} ms{worst} "
                     f"(n={value.count}){note}")

    q("receipt -> outcome decided (postback_outcomes.latency_ms)", report.decision_latency_ms,
      " - includes late clicks' wait")
    q("decided -> row in ClickHouse (conversions processed_at -> inserted_at)", report.sink_latency_ms)
    q("receipt -> row in ClickHouse (conversions received_at -> inserted_at)", report.row_latency_ms)
    lines.extend(format_deliveries(report.deliveries))
    if report.delivery_checks:
        lines.append("  delivery checks:")
        lines.extend(f"    {'ok  ' if c.ok else 'FAIL'}  {c.label}: {c.detail}" for c in report.delivery_checks)
    return "\n".join(lines)


_MISMATCH = ("the processors probably loaded a different partner file than this demo (POSTBACK_CONFIG must "
             "name the same file for the demo, the ingester and the processors)")


def _unplanned_rejections(report: DemoReport) -> tuple[int, str]:
    """Rejections beyond what the plan asked for, and the most common reason among them."""
    seen = Counter({r: n for o, r, n in report.outcomes if o == "rejected"})
    seen.subtract(Counter({r: n for o, r, n in report.expected if o == "rejected"}))
    extra = +seen
    return sum(extra.values()), (extra.most_common(1)[0][0] if extra else "")


def verdict(report: DemoReport) -> tuple[bool, str]:
    """Exit status and its reason: every 202 has an outcome, and affiliates earned something.

    Rejections the plan did not ask for do not fail the run (token-mode postbacks still
    earn), but they are called out: they nearly always mean mismatched partner files.
    """
    if report.receipts_accepted == 0:
        return False, ("FAILED: the ingester accepted no postback (no 202 answers); see the failed requests "
                       "above")
    missing = report.receipts_accepted - report.receipts_with_outcome
    if missing > 0:
        return False, (f"FAILED: {missing} of {report.receipts_accepted} accepted postbacks have no outcome in "
                       f"ClickHouse after {report.timeout_s:g}s: are `postback process` and `postback sink` "
                       "running against this stack (same Kafka, same ClickHouse database)?")
    extra, reason = _unplanned_rejections(report)
    warning = ""
    if extra > max(2, report.receipts_with_outcome // 20):
        warning = f"\nWARNING: {extra} postbacks were rejected that the plan signed correctly (mostly {reason}): " \
                  + _MISMATCH
    earned = {c: v for c, v in sorted(attributed_net(report).items()) if v > 0}
    if not earned:
        return False, "FAILED: no attributed revenue was recorded." + (warning.replace("\nWARNING:", "") or "")
    failed = [c for c in report.checks if not c.ok]
    if failed:
        return False, (f"FAILED: {len(failed)} of {len(report.checks)} payout checks: "
                       + "; ".join(f"{c.label}: {c.detail}" for c in failed) + warning)
    failed_out = [c for c in report.delivery_checks if not c.ok]
    if failed_out:
        return False, (f"FAILED: {len(failed_out)} of {len(report.delivery_checks)} outbound delivery checks: "
                       + "; ".join(f"{c.label}: {c.detail}" for c in failed_out) + warning)
    checked = f"; all {len(report.checks)} payout checks passed" if report.checks else ""
    if report.delivery_checks:
        checked += f"; all {len(report.delivery_checks)} outbound delivery checks passed"
    return True, (f"OK: all {report.receipts_accepted} accepted postbacks have an outcome, and affiliates earned "
                  + ", ".join(f"{_amount(v)} {c}" for c, v in earned.items()) + checked + warning)
