"""Versioned, idempotent ClickHouse schema for the sinks and the analysts' views.

`apply_migrations(client, database)` brings a database up to the schema in `MIGRATIONS`:

1. `CREATE DATABASE IF NOT EXISTS`, then the bookkeeping table `schema_migrations`
   (one row per applied version: version, name, applied_at, checksum).
2. Every recorded version is checked against the code: a recorded checksum that differs
   from the code's means someone edited a migration that already ran somewhere, and the
   database no longer matches what the code says it is. That raises `MigrationError`
   before anything is changed, as does a recorded version the code does not know (the
   database is newer than this code).
3. The versions not yet recorded are applied in order, each statement in turn, and the
   version is recorded only after its last statement succeeded.

Rules for writing a migration (so a half-applied one can simply be run again):

- Never edit or renumber a migration once it is merged: add a new version instead.
- Every statement is idempotent: `CREATE TABLE IF NOT EXISTS`, `CREATE OR REPLACE VIEW`,
  `ALTER TABLE ... ADD COLUMN IF NOT EXISTS`, `DROP ... IF EXISTS`.
- Name the database as `{db}` (it is substituted, quoted, at apply time) and always
  qualify table names with it, so views keep working from any client session.

The checksum covers the version's name and statements with whitespace runs collapsed,
so re-indenting a statement is not an edit, but any change of a token is.

There is no cross-process lock: run migrations from one place (a deploy step or the
stack start-up), not from every worker. Two concurrent runs do no harm beyond a version
being recorded twice, since every statement is idempotent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIGRATIONS_TABLE = "schema_migrations"

#: Engine settings of every sink table. `non_replicated_deduplication_window` makes a
#: plain (non-replicated) MergeTree remember the last N insert blocks, so that a retried
#: insert with the same `insert_deduplication_token` is dropped instead of written twice.
_DEDUP = "SETTINGS non_replicated_deduplication_window = 1000"

_TS = "DateTime64(3, 'UTC')"
_MONEY = "Decimal(18, 6)"


class MigrationError(RuntimeError):
    """The database's recorded migrations do not match the code; nothing was applied."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        """sha256 of the name and the whitespace-normalised statements (not of the version's db)."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        for statement in self.statements:
            digest.update(b"\x00")
            digest.update(" ".join(statement.split()).encode())
        return digest.hexdigest()


_SUBS = ",\n".join(f"    sub{i} Nullable(String)" for i in range(1, 6))

_CLICKS = f"""
CREATE TABLE IF NOT EXISTS {{db}}.clicks
(
    click_id String,
    clicked_at {_TS},
    offer_id LowCardinality(String),
    affiliate_id LowCardinality(String),
    campaign_id Nullable(String),
{_SUBS},
    ip Nullable(String),
    user_agent Nullable(String),
    referer Nullable(String),
    source LowCardinality(String),
    extras Map(String, String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(clicked_at)
ORDER BY click_id
{_DEDUP}
"""

# No PARTITION BY: the versions of one conversion_id can carry different receipt and
# event times, and ReplacingMergeTree only collapses rows inside one partition.
_CONVERSIONS = f"""
CREATE TABLE IF NOT EXISTS {{db}}.conversions
(
    conversion_id String,
    version UInt64,
    receipt_id String,
    advertiser_id LowCardinality(String),
    offer_id Nullable(String),
    affiliate_id Nullable(String),
    campaign_id Nullable(String),
    click_id Nullable(String),
{_SUBS},
    event LowCardinality(String),
    status LowCardinality(String),
    order_id Nullable(String),
    customer_id Nullable(String),
    period Nullable(String),
    amount Nullable({_MONEY}),
    currency LowCardinality(Nullable(String)),
    sign Int8,
    signed_amount Nullable({_MONEY}) MATERIALIZED amount * sign,
    event_time Nullable({_TS}),
    received_at {_TS},
    processed_at {_TS},
    clicked_at Nullable({_TS}),
    attributed Bool,
    attribution LowCardinality(String),
    click_to_conversion_s Nullable(Int64),
    dedupe_key String,
    auth_mode LowCardinality(String),
    extras Map(String, String),
    inserted_at {_TS} DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY conversion_id
{_DEDUP}
"""

_OUTCOMES = f"""
CREATE TABLE IF NOT EXISTS {{db}}.postback_outcomes
(
    receipt_id String,
    outcome LowCardinality(String),
    reason LowCardinality(String),
    advertiser_id LowCardinality(String),
    event LowCardinality(String),
    conversion_id String,
    received_at {_TS},
    processed_at {_TS},
    latency_ms Int64 MATERIALIZED toUnixTimestamp64Milli(processed_at) - toUnixTimestamp64Milli(received_at)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY receipt_id
{_DEDUP}
"""

_REJECTIONS = f"""
CREATE TABLE IF NOT EXISTS {{db}}.rejections
(
    receipt_id String,
    received_at {_TS},
    processed_at {_TS},
    advertiser_id LowCardinality(String),
    event LowCardinality(String),
    reason LowCardinality(String),
    detail String,
    remote_ip String,
    params Map(String, String),
    body String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY receipt_id
{_DEDUP}
"""

_DUPLICATES = f"""
CREATE TABLE IF NOT EXISTS {{db}}.duplicates
(
    receipt_id String,
    first_receipt_id String,
    received_at {_TS},
    processed_at {_TS},
    advertiser_id LowCardinality(String),
    event LowCardinality(String),
    order_id Nullable(String),
    dedupe_key String,
    reason LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY receipt_id
{_DEDUP}
"""

_SUB_COLS = ", ".join(f"sub{i}" for i in range(1, 6))

_V_CONVERSIONS_NET = f"""
CREATE OR REPLACE VIEW {{db}}.v_conversions_net AS
SELECT
    conversion_id, version, receipt_id, advertiser_id, offer_id, affiliate_id, campaign_id, click_id,
    {_SUB_COLS},
    event, status, order_id, customer_id, period,
    amount, currency, sign, signed_amount, toBool(sign < 0) AS is_reversal,
    event_time, received_at, processed_at, clicked_at,
    coalesce(event_time, received_at) AS reported_at,
    attributed, attribution, click_to_conversion_s, dedupe_key, auth_mode, extras, inserted_at
FROM {{db}}.conversions FINAL
WHERE status = 'approved'
"""

# gross/reversals/net in the group's currency; amounts never mix currencies.
_MONEY_AGGREGATES = """
    count() AS conversions_total,
    countIf(sign > 0) AS conversions,
    countIf(sign < 0) AS reversals_count,
    sumIf(ifNull(amount, toDecimal64(0, 6)), sign > 0) AS gross,
    sumIf(ifNull(amount, toDecimal64(0, 6)), sign < 0) AS reversals,
    sum(ifNull(signed_amount, toDecimal64(0, 6))) AS net,
    if(gross = 0, NULL, toFloat64(reversals) / toFloat64(gross)) AS reversal_rate
"""

_V_REVENUE_DAILY = f"""
CREATE OR REPLACE VIEW {{db}}.v_revenue_daily AS
SELECT
    toDate(reported_at) AS day,
    advertiser_id, affiliate_id, offer_id, currency,
{_MONEY_AGGREGATES}
FROM {{db}}.v_conversions_net
GROUP BY day, advertiser_id, affiliate_id, offer_id, currency
"""

_V_REVENUE_BY_CLICK_DAY = f"""
CREATE OR REPLACE VIEW {{db}}.v_revenue_by_click_day AS
SELECT
    toDate(clicked_at) AS click_day,
    attributed,
    advertiser_id, affiliate_id, offer_id, currency,
{_MONEY_AGGREGATES}
FROM {{db}}.v_conversions_net
GROUP BY click_day, attributed, advertiser_id, affiliate_id, offer_id, currency
"""

_V_POSTBACK_HEALTH_HOURLY = f"""
CREATE OR REPLACE VIEW {{db}}.v_postback_health_hourly AS
SELECT
    toStartOfHour(received_at) AS hour,
    advertiser_id,
    count() AS received,
    countIf(outcome = 'accepted') AS accepted,
    countIf(outcome = 'duplicate') AS duplicates,
    countIf(outcome = 'rejected') AS rejected,
    accepted / received AS success_rate,
    duplicates / received AS dedupe_rate,
    rejected / received AS rejection_rate,
    quantiles(0.5, 0.99)(latency_ms) AS latency_quantiles,
    latency_quantiles[1] AS p50_latency_ms,
    latency_quantiles[2] AS p99_latency_ms,
    max(latency_ms) AS max_latency_ms
FROM {{db}}.postback_outcomes FINAL
GROUP BY hour, advertiser_id
"""

_V_REJECTION_REASONS_DAILY = f"""
CREATE OR REPLACE VIEW {{db}}.v_rejection_reasons_daily AS
SELECT
    toDate(received_at) AS day,
    advertiser_id,
    reason,
    count() AS rejections,
    uniqExact(remote_ip) AS remote_ips,
    rejections / sum(rejections) OVER (PARTITION BY day, advertiser_id) AS share_of_day,
    any(detail) AS sample_detail,
    argMax(receipt_id, received_at) AS last_receipt_id
FROM {{db}}.rejections FINAL
GROUP BY day, advertiser_id, reason
"""

_V_MATCH_RATE_DAILY = f"""
CREATE OR REPLACE VIEW {{db}}.v_match_rate_daily AS
SELECT
    toDate(received_at) AS day,
    advertiser_id,
    offer_id,
    count() AS accepted,
    countIf(attribution = 'attributed') AS attributed,
    countIf(attribution = 'expired') AS expired,
    countIf(attribution = 'no_click') AS no_click,
    countIf(attribution = 'no_click_id') AS no_click_id,
    attributed / accepted AS match_rate,
    if(accepted = no_click_id, NULL, attributed / (accepted - no_click_id)) AS click_id_match_rate
FROM {{db}}.conversions FINAL
GROUP BY day, advertiser_id, offer_id
"""

_V_AFFILIATE_CONVERSION_RATE_DAILY = f"""
CREATE OR REPLACE VIEW {{db}}.v_affiliate_conversion_rate_daily AS
SELECT
    click_day,
    affiliate_id,
    offer_id,
    sum(clicks_n) AS clicks,
    sum(conversions_n) AS conversions,
    sum(converted_clicks_n) AS converted_clicks,
    if(clicks = 0, NULL, conversions / clicks) AS conversion_rate,
    if(clicks = 0, NULL, converted_clicks / clicks) AS click_conversion_rate
FROM
(
    SELECT toDate(clicked_at) AS click_day, toString(affiliate_id) AS affiliate_id,
           toString(offer_id) AS offer_id,
           count() AS clicks_n, toUInt64(0) AS conversions_n, toUInt64(0) AS converted_clicks_n
    FROM {{db}}.clicks FINAL
    GROUP BY click_day, affiliate_id, offer_id
    UNION ALL
    SELECT toDate(assumeNotNull(clicked_at)) AS click_day, ifNull(affiliate_id, '') AS affiliate_id,
           ifNull(offer_id, '') AS offer_id,
           toUInt64(0) AS clicks_n, count() AS conversions_n, uniqExact(click_id) AS converted_clicks_n
    FROM {{db}}.conversions FINAL
    WHERE attributed AND status = 'approved' AND sign > 0 AND clicked_at IS NOT NULL
    GROUP BY click_day, affiliate_id, offer_id
)
GROUP BY click_day, affiliate_id, offer_id
"""

_RATE = "Decimal(28, 12)"

# Commission (issue 13): the payout decided by the commission engine, the amounts in the
# account's reporting currency and the FX rates behind them. Rows written before the
# engine existed keep NULL in every one of these columns. FX dates are `Date` (the
# records carry YYYY-MM-DD text; the sink converts), so they compare with fx_rates.date.
_COMMISSION_COLUMNS = (
    ("payout", f"Nullable({_MONEY})"),
    ("payout_currency", "LowCardinality(Nullable(String))"),
    ("payout_status", "LowCardinality(Nullable(String))"),
    ("payout_reason", "LowCardinality(Nullable(String))"),
    ("payout_rule", "Nullable(String)"),
    ("reporting_currency", "LowCardinality(Nullable(String))"),
    ("revenue_reporting", f"Nullable({_MONEY})"),
    ("payout_reporting", f"Nullable({_MONEY})"),
    ("revenue_fx_rate", f"Nullable({_RATE})"),
    ("revenue_fx_date", "Nullable(Date)"),
    ("payout_fx_rate", f"Nullable({_RATE})"),
    ("payout_fx_date", "Nullable(Date)"),
    ("fx_status", "LowCardinality(Nullable(String))"),
    ("cap_decision", "Nullable(String)"),
)

# revenue_reporting converts `amount`, which is positive on a reversal too (the sign
# says it is one); payout and payout_reporting are already negative for a clawback.
_CONVERSIONS_COMMISSION = (
    "ALTER TABLE {db}.conversions\n"
    + ",\n".join(f"    ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind in _COMMISSION_COLUMNS)
    + f",\n    ADD COLUMN IF NOT EXISTS signed_revenue_reporting Nullable({_MONEY}) "
      "MATERIALIZED revenue_reporting * sign"
)

# One row per (currency, date): a reloaded rate replaces the earlier load (latest loaded_at).
_FX_RATES = f"""
CREATE TABLE IF NOT EXISTS {{db}}.fx_rates
(
    date Date,
    currency LowCardinality(String),
    rate {_RATE},
    reporting_currency LowCardinality(String),
    loaded_at {_TS}
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (currency, date)
{_DEDUP}
"""

# The latest version of every conversion the commission engine decided (FINAL, then the
# filter, as v_conversions_net does), every status. `day` is the UTC date of the event
# time (else the receipt time): ClickHouse does not know the account's timezone, so for
# other zones group by toDate(reported_at, '<zone>') on this view instead.
_V_PAYOUTS = """
CREATE OR REPLACE VIEW {db}.v_payouts AS
SELECT
    conversion_id, version, receipt_id, advertiser_id, offer_id, affiliate_id, click_id, event, status, order_id,
    sign, toBool(sign < 0) AS is_reversal,
    coalesce(event_time, received_at) AS reported_at,
    toDate(reported_at) AS day,
    amount, currency, payout, payout_currency, payout_status, payout_reason, payout_rule,
    reporting_currency, revenue_reporting, signed_revenue_reporting, payout_reporting,
    revenue_fx_rate, revenue_fx_date, payout_fx_rate, payout_fx_date, fx_status, cap_decision,
    received_at, processed_at
FROM {db}.conversions FINAL
WHERE payout_status IS NOT NULL
"""

_ZERO = "toDecimal64(0, 6)"

# What is owed to affiliates, net of clawbacks, in the reporting currency. Held, rejected
# and unpaid conversions carry payout 0, so the sums need no status filter; a clawback is
# a reversal (sign -1) with a negative payout.
_V_PAYOUTS_DAILY = f"""
CREATE OR REPLACE VIEW {{db}}.v_payouts_daily AS
SELECT
    day, reporting_currency, affiliate_id, offer_id,
    countIf(sign > 0) AS conversions,
    countIf(sign > 0 AND payout_status = 'payable') AS payable,
    countIf(payout_status = 'hold') AS held,
    countIf(payout_status = 'rejected') AS rejected,
    countIf(sign < 0 AND ifNull(payout, {_ZERO}) != 0) AS clawbacks,
    countIf(fx_status = 'fx_missing') AS fx_missing,
    sumIf(ifNull(payout_reporting, {_ZERO}), sign > 0) AS gross_payout,
    sumIf(ifNull(payout_reporting, {_ZERO}), sign < 0) AS clawed_back,
    gross_payout + clawed_back AS net_payout
FROM {{db}}.v_payouts
GROUP BY day, reporting_currency, affiliate_id, offer_id
"""

# Revenue and payout over the same rows (approved conversions and their reversals, as
# v_conversions_net counts revenue), both net and in the reporting currency; what is
# still pending is shown apart. Re-derive the ratios after rolling rows up.
_V_PAYOUT_TO_MARGIN = f"""
CREATE OR REPLACE VIEW {{db}}.v_payout_to_margin AS
SELECT
    day, reporting_currency, advertiser_id, offer_id, affiliate_id,
    countIf(status = 'approved' AND sign > 0) AS conversions,
    sumIf(ifNull(signed_revenue_reporting, {_ZERO}), status = 'approved') AS revenue,
    sumIf(ifNull(payout_reporting, {_ZERO}), status = 'approved') AS payout,
    revenue - payout AS margin,
    if(revenue = 0, NULL, toFloat64(payout) / toFloat64(revenue)) AS payout_to_revenue,
    if(revenue = 0, NULL, toFloat64(margin) / toFloat64(revenue)) AS margin_rate,
    sumIf(ifNull(signed_revenue_reporting, {_ZERO}), status = 'pending') AS pending_revenue,
    sumIf(ifNull(payout_reporting, {_ZERO}), status = 'pending') AS pending_payout,
    countIf(fx_status = 'fx_missing') AS fx_missing
FROM {{db}}.v_payouts
GROUP BY day, reporting_currency, advertiser_id, offer_id, affiliate_id
"""

# Cap usage as the engine counts it: conversions it counted as payable (sign +1), and
# their payout, per offer and affiliate, per day and per month (UTC; see v_payouts). An
# offer-wide cap's usage is the sum over its affiliates.
_CAP_AGGREGATES = f"""
    countIf(payout_status = 'payable' AND sign > 0) AS payable,
    sumIf(ifNull(payout_reporting, {_ZERO}), payout_status = 'payable' AND sign > 0) AS payable_payout,
    countIf(payout_status = 'hold') AS held,
    countIf(payout_status = 'rejected') AS rejected,
    sumMapIf(map(CAST(ifNull(payout_reason, '') AS String), toUInt64(1)), payout_status = 'hold')
        AS held_by_reason,
    sumMapIf(map(CAST(ifNull(payout_reason, '') AS String), toUInt64(1)), payout_status = 'rejected')
        AS rejected_by_reason
"""

_V_CAP_USAGE = f"""
CREATE OR REPLACE VIEW {{db}}.v_cap_usage AS
SELECT 'day' AS period, day AS period_start, reporting_currency, offer_id, affiliate_id,
{_CAP_AGGREGATES}
FROM {{db}}.v_payouts
WHERE offer_id IS NOT NULL
GROUP BY period_start, reporting_currency, offer_id, affiliate_id
UNION ALL
SELECT 'month' AS period, toStartOfMonth(day) AS period_start, reporting_currency, offer_id, affiliate_id,
{_CAP_AGGREGATES}
FROM {{db}}.v_payouts
WHERE offer_id IS NOT NULL
GROUP BY period_start, reporting_currency, offer_id, affiliate_id
"""

_V_PAYOUT_HOLDS = """
CREATE OR REPLACE VIEW {db}.v_payout_holds AS
SELECT
    day, advertiser_id, offer_id, affiliate_id, payout_status, payout_reason, reporting_currency,
    count() AS conversions,
    sum(ifNull(signed_revenue_reporting, toDecimal64(0, 6))) AS revenue,
    countIf(fx_status = 'fx_missing') AS fx_missing,
    argMax(conversion_id, reported_at) AS last_conversion_id,
    any(cap_decision) AS sample_cap_decision
FROM {db}.v_payouts
WHERE payout_status IN ('hold', 'rejected')
GROUP BY day, advertiser_id, offer_id, affiliate_id, payout_status, payout_reason, reporting_currency
"""

# Outbound postbacks (issue 14): one row per delivery attempt, from the outbound-deliveries
# topic (OutboundDelivery records). A redelivered record has the same key and collapses under
# FINAL. No PARTITION BY, as for conversions: ReplacingMergeTree only collapses rows inside one
# partition, and a re-sent attempt may carry another attempted_at than the first.
_OUTBOUND_DELIVERIES = f"""
CREATE TABLE IF NOT EXISTS {{db}}.outbound_deliveries
(
    conversion_id String,
    version UInt64,
    affiliate_id LowCardinality(String),
    endpoint LowCardinality(String),
    url String,
    method LowCardinality(String),
    attempt UInt32,
    status Nullable(UInt16),
    latency_ms Nullable(UInt32),
    error_class LowCardinality(Nullable(String)),
    response_head Nullable(String),
    outcome LowCardinality(String),
    attempted_at {_TS},
    idempotency_key String,
    inserted_at {_TS} DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (conversion_id, version, endpoint, attempt)
{_DEDUP}
"""

# Per UTC day of the attempt, affiliate and endpoint. success_rate counts requests, not
# attempts: the idempotency keys (conversion versions) with a delivered attempt that day over
# the keys attempted that day. Latency quantiles are of delivered attempts only (NULL if none).
_V_OUTBOUND_SUCCESS_DAILY = """
CREATE OR REPLACE VIEW {db}.v_outbound_success_daily AS
SELECT
    toDate(attempted_at) AS day,
    affiliate_id,
    endpoint,
    count() AS attempts,
    countIf(outcome = 'delivered') AS delivered,
    countIf(outcome = 'retry') AS retries,
    countIf(outcome = 'dead') AS dead,
    uniqExact(idempotency_key) AS keys,
    uniqExactIf(idempotency_key, outcome = 'delivered') AS delivered_keys,
    delivered_keys / keys AS success_rate,
    quantilesIf(0.5, 0.99)(latency_ms, outcome = 'delivered') AS latency_quantiles,
    if(delivered = 0, NULL, latency_quantiles[1]) AS p50_latency_ms,
    if(delivered = 0, NULL, latency_quantiles[2]) AS p99_latency_ms
FROM {db}.outbound_deliveries FINAL
GROUP BY day, affiliate_id, endpoint
"""

# Endpoints whose latest attempt (of any conversion) is within the last hour and was not
# delivered. consecutive_failures counts every not-delivered attempt after the endpoint's
# last delivered one (over all history, not just the hour); last_delivered_at is NULL when
# the endpoint never delivered. Ties in attempted_at are broken by attempt number. A NULL
# error_class/status is wrapped in a tuple, since argMax skips NULL arguments.
_V_OUTBOUND_FAILING_NOW = """
CREATE OR REPLACE VIEW {db}.v_outbound_failing_now AS
SELECT
    affiliate_id,
    endpoint,
    countIf(outcome != 'delivered' AND attempted_at > delivered_max) AS consecutive_failures,
    argMax(outcome, (attempted_at, attempt)) AS last_outcome,
    tupleElement(argMax(tuple(error_class), (attempted_at, attempt)), 1) AS last_error_class,
    tupleElement(argMax(tuple(status), (attempted_at, attempt)), 1) AS last_status,
    argMax(conversion_id, (attempted_at, attempt)) AS last_conversion_id,
    max(attempted_at) AS last_attempt_at,
    nullIf(any(delivered_max), toDateTime64(0, 3, 'UTC')) AS last_delivered_at
FROM
(
    SELECT
        affiliate_id, endpoint, conversion_id, attempt, outcome, error_class, status, attempted_at,
        maxIf(attempted_at, outcome = 'delivered') OVER (PARTITION BY affiliate_id, endpoint) AS delivered_max
    FROM {db}.outbound_deliveries FINAL
    WHERE endpoint IN (SELECT endpoint FROM {db}.outbound_deliveries
                       WHERE attempted_at >= now64(3, 'UTC') - INTERVAL 1 HOUR)
)
GROUP BY affiliate_id, endpoint
HAVING last_attempt_at >= now64(3, 'UTC') - INTERVAL 1 HOUR AND last_outcome != 'delivered'
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sink_tables", (_CLICKS, _CONVERSIONS, _OUTCOMES, _REJECTIONS, _DUPLICATES)),
    Migration(2, "analyst_views", (
        _V_CONVERSIONS_NET,
        _V_REVENUE_DAILY,
        _V_REVENUE_BY_CLICK_DAY,
        _V_POSTBACK_HEALTH_HOURLY,
        _V_REJECTION_REASONS_DAILY,
        _V_MATCH_RATE_DAILY,
        _V_AFFILIATE_CONVERSION_RATE_DAILY,
    )),
    Migration(3, "commission_columns", (_CONVERSIONS_COMMISSION, _FX_RATES)),
    Migration(4, "commission_views", (
        _V_PAYOUTS,
        _V_PAYOUTS_DAILY,
        _V_PAYOUT_TO_MARGIN,
        _V_CAP_USAGE,
        _V_PAYOUT_HOLDS,
    )),
    Migration(5, "outbound_deliveries", (_OUTBOUND_DELIVERIES,)),
    Migration(6, "outbound_views", (_V_OUTBOUND_SUCCESS_DAILY, _V_OUTBOUND_FAILING_NOW)),
)


def quote_identifier(name: str) -> str:
    """`name` as a back-quoted ClickHouse identifier."""
    if not name:
        raise ValueError("empty database name")
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def render(statement: str, database: str) -> str:
    """`statement` with `{db}` replaced by the quoted database name."""
    return statement.replace("{db}", quote_identifier(database)).strip()


def _table_exists(client: Any, database: str) -> bool:
    exists = client.command(f"EXISTS TABLE {quote_identifier(database)}.{MIGRATIONS_TABLE}")
    return int(exists) == 1


def _recorded(client: Any, database: str) -> list[tuple[int, str, str]]:
    rows = client.query(f"SELECT version, name, checksum FROM {quote_identifier(database)}.{MIGRATIONS_TABLE} "
                        "ORDER BY version, applied_at").result_rows
    return [(int(v), str(n), str(c)) for v, n, c in rows]


def current_version(client: Any, database: str) -> int:
    """The highest recorded version of `database`; 0 when it (or its bookkeeping) does not exist."""
    if not _table_exists(client, database):
        return 0
    versions = [v for v, _, _ in _recorded(client, database)]
    return max(versions, default=0)


def _check(recorded: list[tuple[int, str, str]], migrations: tuple[Migration, ...]) -> None:
    known = {m.version: m for m in migrations}
    for version, name, checksum in recorded:
        migration = known.get(version)
        if migration is None:
            raise MigrationError(f"database has migration {version} ({name!r}) that this code does not know; "
                                 "it was migrated by a newer release")
        if checksum != migration.checksum:
            raise MigrationError(f"migration {version} ({migration.name!r}) was edited after it was applied: "
                                 f"recorded checksum {checksum[:12]}..., code has {migration.checksum[:12]}...; "
                                 "add a new migration instead of changing an applied one")


def _validate(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)) or any(v <= 0 for v in versions):
        raise MigrationError(f"migration versions must be positive, unique and ascending: {versions}")


def apply_migrations(client: Any, database: str, progress: Callable[[str], Any] = print,
                     migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Create `database` if needed and apply the migrations it has not recorded; returns their versions."""
    _validate(migrations)
    db = quote_identifier(database)
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.{MIGRATIONS_TABLE} "
        f"(version UInt32, name String, applied_at {_TS}, checksum String) "
        "ENGINE = MergeTree ORDER BY version"
    )
    recorded = _recorded(client, database)
    _check(recorded, migrations)
    done = {v for v, _, _ in recorded}
    applied: list[int] = []
    for migration in migrations:
        if migration.version in done:
            continue
        progress(f"{database}: applying migration {migration.version} {migration.name} "
                 f"({len(migration.statements)} statements)")
        for statement in migration.statements:
            client.command(render(statement, database))
        client.command(
            f"INSERT INTO {db}.{MIGRATIONS_TABLE} (version, name, applied_at, checksum) "
            "SELECT {version:UInt32}, {name:String}, now64(3, 'UTC'), {checksum:String}",
            parameters={"version": migration.version, "name": migration.name, "checksum": migration.checksum},
        )
        applied.append(migration.version)
    if not applied:
        progress(f"{database}: schema is up to date at version {max(done, default=0)}")
    return applied
