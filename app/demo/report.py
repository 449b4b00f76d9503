"""The demo's results: read back from ClickHouse, kept as plain data, summarised for marketers.

`wait_for_outcomes` polls until every accepted postback has its outcome row,
`collect_report` reads this run's rows into a `DemoReport`, and `format_report` and
`verdict` are pure functions of it (tested on fixed rows).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from app.demo.send import ProgressBar, Submission


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


def _quantiles(row: tuple[Any, ...]) -> Quantiles | None:
    count = int(row[0])
    if not count:
        return None
    qs = list(row[1])
    return Quantiles(count, float(qs[0]), float(qs[1]), float(row[2]) if len(row) > 2 and row[2] is not None
                     else None)


def collect_report(client: Any, database: str, submission: Submission, found: int,
                   timeout_s: float) -> DemoReport:
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
        skipped=submission.skipped, timeout_s=timeout_s,
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
    return True, (f"OK: all {report.receipts_accepted} accepted postbacks have an outcome, and affiliates earned "
                  + ", ".join(f"{_amount(v)} {c}" for c, v in earned.items()) + warning)
