"""`postback fx backfill`: conversions stored with fx_missing are recomputed once their rate is loaded.

The broker test runs a real faust worker: a GBP conversion with no GBP rate comes out
fx_missing (held: its revshare part cannot be converted into the USD payout); the GBP rate
is then published to fx-rates (the worker follows that topic), and the backfill message is
sent through the very function the command uses; the conversion comes out again as the
same version, fx ok and payable.
"""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal

import pytest

from app.commands.fx import backfill_envelopes, publish_backfill, publish_rates
from postback.fx import FxRate
from processors.handlers import BACKFILL, commission_key
from processors.runtime.publish import decode_envelope, partition_for

from .conftest import SECRET, Pipeline, click, raw_postback

PARTNERS = f"""
[account]
reporting_currency = "USD"

[advertisers.demo]
auth_modes = ["hmac"]
secrets = {{ k1 = "{SECRET}" }}

[offers.offer-1]
advertiser_id = "demo"
attribution_window_days = 7
[offers.offer-1.payouts.purchase]
type = "cpa_plus_revshare"
amount = "2.00"
currency = "USD"
percent = "10"
"""


@pytest.mark.parametrize("partitions", [1, 6, 7, 32])
def test_the_command_places_backfills_where_the_processors_place_conversions(partitions: int) -> None:
    pairs = [(f"conv-{i}", f"adv-{i % 7}") for i in range(60)]
    placed: dict[str, int] = {}
    for partition, envelope in backfill_envelopes(pairs, partitions):
        for message in decode_envelope(envelope):
            placed[message[BACKFILL]] = partition
    assert set(placed) == {cid for cid, _ in pairs}
    for cid, advertiser in pairs:
        key = commission_key({"advertiser_id": advertiser, "conversion_id": cid})
        assert placed[cid] == partition_for(key, partitions)  # the processors' publisher


def test_backfill_help() -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "fx", "backfill", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "--limit" in done.stdout and "fx_missing" in done.stdout


def _conversions(pipeline: Pipeline, receipt: str) -> list[dict]:
    return [record for kind, record in pipeline.outputs().get(receipt, []) if kind == "Conversion"]


def test_a_conversion_waiting_for_a_rate_is_recomputed_after_the_rate_is_loaded(pipeline: Pipeline, tmp_path) -> None:
    pipeline.partners.write_text(PARTNERS)
    now = int(time.time() * 1000)
    today = time.strftime("%Y-%m-%d", time.gmtime(now / 1000))
    pipeline.send_click(click("BF-1", now - 60_000))
    params = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", "BF-1"), ("order_id", "BFO-1"),
              ("amount", "100.00"), ("currency", "GBP")]
    pipeline.send_raw(raw_postback(params, "RBF1", now), key="demo|purchase|BFO-1")
    pipeline.flush()
    pipeline.start_worker(tmp_path / "w0")

    first = pipeline.wait_for({"RBF1"}, timeout=120)["RBF1"][0][1]
    assert (first["fx_status"], first["payout_status"], first["payout_reason"]) == ("fx_missing", "hold", "fx_missing")
    assert first["revenue_reporting"] is None

    assert publish_rates(pipeline.kafka.bootstrap_servers, pipeline.topics.prefix,
                         [FxRate(today, "GBP", Decimal("1.50"))], "USD") == 0

    # The worker follows fx-rates in the background: until it has read the rate, a backfill
    # leaves the conversion as it is, so send it again (idempotent) until the record comes.
    pairs = [(first["conversion_id"], first["advertiser_id"])]
    deadline = time.monotonic() + 90
    again: list[dict] = []
    while not again:
        assert time.monotonic() < deadline, f"no backfilled record; worker logs:\n{pipeline.logs()[-3000:]}"
        assert publish_backfill(pipeline.kafka.bootstrap_servers, pipeline.topics.processor_commission.name, pairs,
                                progress=lambda _line: None) == 0
        time.sleep(3.0)
        again = [r for r in _conversions(pipeline, "RBF1") if r["fx_status"] == "ok"]

    out = again[0]
    assert (out["conversion_id"], out["version"], out["receipt_id"]) == \
        (first["conversion_id"], first["version"], "RBF1")
    assert out["processed_at_ms"] >= first["processed_at_ms"]
    # 2.00 USD + 10 % of 100 GBP at 1.50 USD/GBP
    assert (out["payout_status"], out["payout_reason"], out["payout"], out["payout_currency"]) == \
        ("payable", None, Decimal("17.00"), "USD")
    assert (out["revenue_reporting"], out["revenue_fx_rate"], out["revenue_fx_date"]) == \
        (Decimal("150.00"), Decimal("1.50"), today)
    assert all(r == out for r in again), "a repeated backfill re-emits the identical record"
