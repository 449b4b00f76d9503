"""`app.explain`: one postback URL read as an advertiser's configuration reads it, with no secret printed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import murmur2

from app.cli import main
from app.explain import explain, render
from postback.partner_view import order_key
from postback.partners import parse_partner_config
from postback.signing import sign_query
from processors.dedupe import conversion_id

TOKEN = "explain-test-token-0123456789"
SECRET = "explain-test-secret-0123456789"
PARTNERS_TOML = f"""
[advertisers.kt]
preset = "keitaro"
token = "{TOKEN}"
defaults = {{ currency = "EUR" }}

[advertisers.hdr]
auth_modes = ["token"]
token = "{TOKEN}"
token_header = "X-Api-Token"
aliases = {{ et = "event", txid = "order_id" }}

[advertisers.signed]
secrets = {{ k1 = "{SECRET}" }}
aliases = {{ signature = "sig", timestamp = "ts" }}
"""
PARTNERS = parse_partner_config(PARTNERS_TOML, "explain.toml")
NOW_MS = 1_800_000_000_000


def test_a_keitaro_url_is_read_through_the_preset_and_defaults() -> None:
    url = f"https://pb.example.com/postback?advertiser_id=kt&subid=CLK1&tid=T-9&status=sale&payout=10&token={TOKEN}"
    e = explain(PARTNERS, "kt", url, 6, now_ms=NOW_MS)
    assert e.ingest_status == 202 and e.preset == "keitaro"
    read_as = {p["sent"]: p["as"] for p in e.parameters}
    assert read_as["subid"] == "click_id" and read_as["tid"] == "order_id" and read_as["payout"] == "amount"
    defaults = {p["as"]: p["value"] for p in e.parameters if p["sent"] == "(default)"}
    assert defaults == {"event": "purchase", "currency": "EUR"}  # the file's currency overrides the preset's
    key = order_key("kt", "purchase", "T-9", None, "CLK1", ())[0]
    assert e.kafka == {"key": key, "partition": murmur2(key.encode(), 6), "partitions": 6}
    assert e.auth == {"verdict": "accepted", "mode": "token", "key_id": None, "read_from": "token"}
    o = e.outcome
    assert (o["event"], o["status"], o["raw_status"], o["amount"], o["currency"]) == \
        ("purchase", "approved", "sale", "10.000000", "EUR")
    assert (o["dedupe_key"], o["conversion_id"]) == (key, conversion_id(key))
    text = render(e)
    assert TOKEN not in text and TOKEN not in json.dumps(e.as_dict())
    assert "status         approved (sent 'sale')" in text
    assert f"partition      {murmur2(key.encode(), 6)} of 6 (raw-postbacks)" in text


def test_a_forged_token_is_explained_as_bad_signature_without_printing_it() -> None:
    e = explain(PARTNERS, "kt", f"advertiser_id=kt&subid=C&tid=T&status=lead&token=forged-{TOKEN}", 6, now_ms=NOW_MS)
    assert e.auth["verdict"] == "rejected" and e.auth["reason"] == "bad_signature"
    assert e.outcome == {"outcome": "rejection", "reason": "bad_signature"}
    assert TOKEN not in render(e) and TOKEN not in json.dumps(e.as_dict())


def test_the_token_header_is_named_as_the_source_and_never_printed() -> None:
    e = explain(PARTNERS, "hdr", "?advertiser_id=hdr&et=lead&txid=O-1", 3, headers={"X-Api-Token": TOKEN},
                now_ms=NOW_MS)
    assert e.auth["read_from"] == "header X-Api-Token"
    assert (e.outcome["event"], e.outcome["order_id"]) == ("lead", "O-1")
    assert TOKEN not in json.dumps(e.as_dict())


def test_an_aliased_signature_is_masked_and_checked_against_now() -> None:
    params = [("advertiser_id", "signed"), ("event", "purchase"), ("order_id", "S-1"), ("amount", "5"),
              ("currency", "USD")]
    signed = sign_query(params, SECRET, NOW_MS // 1000, "k1")
    renamed = [("signature" if k == "sig" else "timestamp" if k == "ts" else k, v) for k, v in signed]
    # The partner signs the names it sends: re-sign over the renamed parameters.
    import hashlib
    import hmac

    from postback.signing import canonical_query
    unsigned = [p for p in renamed if p[0] != "signature"]
    digest = hmac.new(SECRET.encode(), canonical_query(unsigned).encode(), hashlib.sha256).hexdigest()
    query = "&".join(f"{k}={v}" for k, v in unsigned + [("signature", digest)])
    e = explain(PARTNERS, "signed", query, 6, now_ms=NOW_MS)
    assert e.auth == {"verdict": "accepted", "mode": "hmac", "key_id": "k1", "read_from": "signature"}
    assert digest not in json.dumps(e.as_dict())
    assert {"sent": "signature", "value": "(hidden)", "as": "sig", "used": "yes"} in e.parameters
    stale = explain(PARTNERS, "signed", query, 6, now_ms=NOW_MS + 3_600_000)
    assert stale.auth["reason"] == "stale_timestamp" and "parameter timestamp" in stale.auth["detail"]


def test_what_the_ingester_refuses_is_a_400_with_its_reasons() -> None:
    e = explain(PARTNERS, "hdr", "advertiser_id=hdr&txid=O-1", 6, now_ms=NOW_MS)  # no event, no default
    assert e.ingest_status == 400
    assert {"field": "event", "reason": "missing"} in e.ingest_errors
    assert "ingester       400 rejected (event: missing" in render(e)


def test_a_missing_advertiser_id_is_added_with_a_note_and_another_one_is_flagged() -> None:
    e = explain(PARTNERS, "kt", f"subid=C&tid=T&status=lead&token={TOKEN}", 6, now_ms=NOW_MS)
    assert e.ingest_status == 202 and any("carries no advertiser_id" in n for n in e.notes)
    other = explain(PARTNERS, "kt", f"advertiser_id=hdr&subid=C&tid=T&token={TOKEN}", 6, now_ms=NOW_MS)
    assert any("it would be read as that advertiser" in n for n in other.notes)


def test_an_unknown_advertiser_is_an_error() -> None:
    with pytest.raises(ValueError, match="'nope' is not configured"):
        explain(PARTNERS, "nope", "event=lead", 6)


# ------------------------------------------------------------------------------------------- the command


def _cli(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    config = tmp_path / "partners.toml"
    config.write_text(PARTNERS_TOML, encoding="utf-8")
    code = main(["partners", "explain", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_explains_and_exits_0_for_a_conversion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(["kt", f"advertiser_id=kt&subid=C&tid=T-1&status=sale&token={TOKEN}"], tmp_path, capsys)
    assert code == 0 and "status         approved (sent 'sale')" in out and TOKEN not in out


def test_cli_json_and_exit_1_for_a_rejection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ts = int(time.time())
    code, out, _ = _cli(["--json", "--partitions", "12", "kt", f"subid=C&tid=T&ts={ts}&token=wrong"], tmp_path,
                        capsys)
    doc = json.loads(out)
    assert code == 1 and doc["auth"]["reason"] == "bad_signature" and doc["kafka"]["partitions"] == 12


def test_cli_header_option_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(["--header", f"X-Api-Token: {TOKEN}", "hdr", "et=lead&txid=O-2"], tmp_path, capsys)
    assert code == 0 and "(header X-Api-Token): matches" in out and TOKEN not in out
    code, _, err = _cli(["nope", "event=lead"], tmp_path, capsys)
    assert code == 2 and "'nope' is not configured (known: kt, hdr, signed)" in err
    with pytest.raises(SystemExit) as exc:
        _cli(["--partitions", "0", "kt", "event=lead"], tmp_path, capsys)
    assert exc.value.code == 2 and "partitions >= 1" in capsys.readouterr().err
