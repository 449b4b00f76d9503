"""Platform presets (postback.presets): each loads, and a postback as that platform sends it
authenticates with the advertiser's token and normalises to the expected conversion.

Also: how an advertiser's own keys merge over its preset (the four maps entry by entry,
every other key as a whole), and the preset's token alias dropped for an HMAC-only
advertiser.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from ingest.validation import RejectedInput, check_postback
from postback.partners import Advertiser, PartnerConfigError, parse_partner_config
from postback.presets import PRESETS
from processors.normalize import Invalid, Normalized, normalize
from processors.signing import AuthFailed, AuthOk, authenticate, sign_query

TOKEN = "preset-test-token-0123456789"
SECRET = "preset-test-secret-0123456789"
AT_MS = 1_800_000_000_000
NAMES = ("everflow", "tune", "affise", "voluum", "redtrack", "keitaro", "binom", "cake")


def load(body: str, name: str = "a") -> Advertiser:
    cfg = parse_partner_config(f"[advertisers.{name}]\n{body}\n", "presets-test.toml")
    return cfg.advertisers[name]


def preset(name: str, extra: str = "") -> Advertiser:
    return load(f'preset = "{name}"\ntoken = "{TOKEN}"\n{extra}')


def accept(adv: Advertiser, params: list[tuple[str, str]], headers: dict[str, str] | None = None) -> Normalized:
    """authenticate() then normalize(), as the verify stage does; the postback must pass both."""
    result = authenticate(adv, params, headers or {}, b"", None, "198.51.100.7", AT_MS)
    assert isinstance(result, AuthOk), result
    assert (result.mode, result.key_id) == ("token", None)
    return normalize(params, adv)


def test_the_presets_are_the_documented_platforms_and_read_only() -> None:
    assert tuple(PRESETS) == NAMES
    with pytest.raises(TypeError):
        PRESETS["x"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["affise"]["aliases"]["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_loads_with_a_token(name: str) -> None:
    adv = preset(name)
    assert adv.preset == name
    assert adv.auth_modes == ("token",) and adv.token == TOKEN and dict(adv.secrets) == {}
    assert dict(adv.aliases) == dict(PRESETS[name]["aliases"])
    assert dict(adv.status_map) == dict(PRESETS[name].get("status_map", {}))
    assert dict(adv.defaults) == {"event": "purchase", "currency": "USD"}
    assert adv.map_event("purchase") == "purchase"


@pytest.mark.parametrize("name", NAMES)
def test_a_preset_needs_its_token(name: str) -> None:
    with pytest.raises(PartnerConfigError) as info:
        load(f'preset = "{name}"')
    assert (info.value.path, info.value.problem) == ("advertisers.a.token", "required when 'token' is in auth_modes")


# --------------------------------------------------------------------------- typical postbacks


def test_everflow_verification_token() -> None:
    adv = preset("everflow")
    n = accept(adv, [("advertiser_id", "a"), ("transaction_id", "EF1a2b"), ("order_id", "EF-O1"),
                     ("amount", "12.50"), ("verification_token", TOKEN)])
    assert (n.event, n.status, n.click_id, n.order_id) == ("purchase", "approved", "EF1a2b", "EF-O1")
    assert (n.amount, n.currency, n.extras) == (Decimal("12.500000"), "USD", ())
    lead = accept(adv, [("advertiser_id", "a"), ("transaction_id", "EF1a2b"), ("adv_event_id", "lead"),
                        ("verification_token", TOKEN)])
    assert (lead.event, lead.amount, lead.currency) == ("lead", None, "USD")
    forged = authenticate(adv, [("advertiser_id", "a"), ("verification_token", TOKEN + "x")], {}, b"", None,
                          "198.51.100.7", AT_MS)
    assert isinstance(forged, AuthFailed) and forged.reason == "bad_signature"
    assert "verification_token" in forged.detail


def test_tune_security_token() -> None:
    adv = preset("tune")
    n = accept(adv, [("advertiser_id", "a"), ("transaction_id", "102abc"), ("adv_sub", "ORD-7"),
                     ("amount", "3.00"), ("offer_id", "77"), ("security_token", TOKEN)])
    assert (n.event, n.click_id, n.order_id, n.amount, n.currency) == ("purchase", "102abc", "ORD-7",
                                                                         Decimal("3.000000"), "USD")
    # TUNE's own offer id is kept as an extra, never read as one of our offers.
    assert n.offer_id is None and n.extras == (("tune_offer_id", "77"),)
    goal = accept(adv, [("advertiser_id", "a"), ("transaction_id", "102abc"), ("goal_id", "signup"),
                        ("security_token", TOKEN)])
    assert goal.event == "signup"


@pytest.mark.parametrize(("status", "expected"), [("1", "approved"), ("2", "pending"), ("3", "rejected"),
                                                   ("5", "pending")])
def test_affise_secure_and_statuses(status: str, expected: str) -> None:
    adv = preset("affise")
    n = accept(adv, [("advertiser_id", "a"), ("clickid", "5f2b9c"), ("action_id", "AF-9"), ("sum", "1.25"),
                     ("status", status), ("goal", "lead"), ("secure", TOKEN)])
    assert (n.event, n.status, n.click_id, n.order_id) == ("lead", expected, "5f2b9c", "AF-9")
    assert (n.amount, n.currency) == (Decimal("1.250000"), "USD")


def test_affise_unknown_status_is_refused() -> None:
    with pytest.raises(Invalid) as info:
        accept(preset("affise"), [("advertiser_id", "a"), ("clickid", "5f2b9c"), ("status", "4"),
                                  ("secure", TOKEN)])
    assert info.value.reason == "invalid_status"


def test_voluum_et_cid_txid_payout() -> None:
    adv = preset("voluum")
    n = accept(adv, [("advertiser_id", "a"), ("cid", "VLM123"), ("txid", "V-1"), ("payout", "4.20"),
                     ("et", "signup"), ("token", TOKEN)])
    assert (n.event, n.click_id, n.order_id, n.amount, n.currency) == ("signup", "VLM123", "V-1",
                                                                         Decimal("4.200000"), "USD")
    plain = accept(adv, [("advertiser_id", "a"), ("cid", "VLM123"), ("payout", "4.20"), ("token", TOKEN)])
    assert plain.event == "purchase"


@pytest.mark.parametrize(("status", "expected"), [("Approved", "approved"), ("Pending", "pending"),
                                                   ("Declined", "rejected"), ("Other", "approved"),
                                                   (None, "approved")])
def test_redtrack_type_clickid_sum_and_statuses(status: str | None, expected: str) -> None:
    adv = preset("redtrack")
    params = [("advertiser_id", "a"), ("clickid", "RT77"), ("rdtk_event_id", "RTE-1"), ("sum", "8"),
              ("type", "lead"), ("token", TOKEN)] + ([("status", status)] if status else [])
    n = accept(adv, params)
    assert (n.event, n.status, n.click_id, n.order_id, n.amount) == ("lead", expected, "RT77", "RTE-1",
                                                                       Decimal("8.000000"))


@pytest.mark.parametrize(("status", "expected"), [("lead", "pending"), ("sale", "approved"),
                                                   ("rejected", "rejected"), ("rebill", "approved")])
def test_keitaro_subid_status_payout_tid(status: str, expected: str) -> None:
    adv = preset("keitaro")
    n = accept(adv, [("advertiser_id", "a"), ("subid", "kt9x"), ("tid", "K-1"), ("status", status),
                     ("payout", "15.5"), ("token", TOKEN)])
    assert (n.event, n.status, n.click_id, n.order_id) == ("purchase", expected, "kt9x", "K-1")
    assert (n.amount, n.currency) == (Decimal("15.500000"), "USD")


def test_keitaro_revenue_is_the_amount_too() -> None:
    n = accept(preset("keitaro"), [("advertiser_id", "a"), ("subid", "kt9x"), ("revenue", "2"), ("token", TOKEN)])
    assert n.amount == Decimal("2.000000") and "purchase" in preset("keitaro").one_time_events


@pytest.mark.parametrize(("status", "expected"), [("approve", "approved"), ("sale", "approved"),
                                                   ("decline", "rejected"), ("hold", "pending"),
                                                   ("lead", "pending")])
def test_binom_cnv_id_status_currency(status: str, expected: str) -> None:
    adv = preset("binom")
    n = accept(adv, [("advertiser_id", "a"), ("cnv_id", "BN-55"), ("cnv_status", status), ("payout", "7.10"),
                     ("cnv_currency", "eur"), ("token", TOKEN)])
    assert (n.event, n.status, n.click_id, n.order_id) == ("purchase", expected, "BN-55", None)
    assert (n.amount, n.currency) == (Decimal("7.100000"), "EUR")


def test_cake_r_t_p_e() -> None:
    adv = preset("cake")
    n = accept(adv, [("advertiser_id", "a"), ("r", "CK-1"), ("t", "CT-9"), ("p", "0.99"), ("e", "install"),
                     ("token", TOKEN)])
    assert (n.event, n.click_id, n.order_id, n.amount, n.currency) == ("install", "CK-1", "CT-9",
                                                                         Decimal("0.990000"), "USD")
    assert accept(adv, [("advertiser_id", "a"), ("r", "CK-1"), ("token", TOKEN)]).event == "purchase"


@pytest.mark.parametrize(("name", "token_param"), [("everflow", "verification_token"), ("tune", "security_token"),
                                                    ("affise", "secure"), ("voluum", "token"),
                                                    ("redtrack", "token"), ("keitaro", "token"),
                                                    ("binom", "token"), ("cake", "token")])
def test_forged_or_absent_token_is_refused(name: str, token_param: str) -> None:
    adv = preset(name)

    def reason(params: list[tuple[str, str]]) -> str:
        result = authenticate(adv, params, {}, b"", None, "198.51.100.7", AT_MS)
        assert isinstance(result, AuthFailed), result
        return result.reason

    assert reason([("advertiser_id", "a"), (token_param, "forged-token-0123456789")]) == "bad_signature"
    assert reason([("advertiser_id", "a")]) == "missing_signature"


# --------------------------------------------------------------------------- merging


def test_explicit_map_entries_override_the_preset_entry_by_entry() -> None:
    adv = preset("redtrack", 'aliases = { clickid = "order_id", cost = "amount" }\n'
                             'status_map = { Other = "pending", Hold = "pending" }\n'
                             'event_map = { Upsell = "custom:upsell" }\n'
                             'defaults = { event = "lead" }')
    assert dict(adv.aliases) == {"clickid": "order_id", "rdtk_event_id": "order_id", "sum": "amount",
                                 "type": "event", "cost": "amount"}
    assert dict(adv.status_map) == {"Approved": "approved", "Pending": "pending", "Declined": "rejected",
                                    "Other": "pending", "Hold": "pending"}
    assert dict(adv.event_map) == {"Upsell": "custom:upsell"}
    assert dict(adv.defaults) == {"event": "lead", "currency": "USD"}
    n = accept(adv, [("advertiser_id", "a"), ("clickid", "X1"), ("status", "Other"), ("token", TOKEN)])
    assert (n.event, n.status, n.order_id, n.click_id) == ("lead", "pending", "X1", None)


def test_explicit_auth_modes_and_one_time_events_replace_the_preset_whole() -> None:
    adv = load(f'preset = "keitaro"\nauth_modes = ["hmac", "token"]\nsecrets = {{ k1 = "{SECRET}" }}\n'
               f'token = "{TOKEN}"\none_time_events = ["lead"]')
    assert adv.auth_modes == ("hmac", "token") and adv.one_time_events == ("lead",)
    assert adv.default_key_id == "k1"
    # Both modes work, under the preset's names.
    params = [("advertiser_id", "a"), ("subid", "kt9x"), ("tid", "K-1"), ("status", "sale")]
    signed = sign_query(params, SECRET, AT_MS // 1000, "k1")
    ok = authenticate(adv, signed, {}, b"", None, "198.51.100.7", AT_MS)
    assert isinstance(ok, AuthOk) and (ok.mode, ok.key_id) == ("hmac", "k1")
    assert accept(adv, params + [("token", TOKEN)]).status == "approved"


def test_preset_token_alias_is_dropped_for_an_hmac_only_advertiser() -> None:
    adv = load(f'preset = "affise"\nauth_modes = ["hmac"]\nsecrets = {{ k1 = "{SECRET}" }}')
    assert adv.auth_modes == ("hmac",) and adv.token is None
    assert dict(adv.aliases) == {"clickid": "click_id", "action_id": "order_id", "sum": "amount", "goal": "event"}
    assert dict(adv.status_map) == dict(PRESETS["affise"]["status_map"])
    # `secure` is now an ordinary (signed) extra parameter, not a token.
    params = [("advertiser_id", "a"), ("clickid", "5f2b9c"), ("status", "3"), ("secure", "whatever")]
    unsigned = authenticate(adv, params, {}, b"", None, "198.51.100.7", AT_MS)
    assert isinstance(unsigned, AuthFailed) and unsigned.reason == "missing_signature"
    signed = sign_query(params, SECRET, AT_MS // 1000)
    ok = authenticate(adv, signed, {}, b"", None, "198.51.100.7", AT_MS)
    assert isinstance(ok, AuthOk) and ok.mode == "hmac"
    n = normalize(signed, adv)
    assert (n.status, n.click_id, n.extras) == ("rejected", "5f2b9c", (("secure", "whatever"),))


def test_an_explicit_token_alias_for_an_hmac_only_advertiser_is_still_an_error() -> None:
    with pytest.raises(PartnerConfigError) as info:
        load(f'preset = "affise"\nauth_modes = ["hmac"]\nsecrets = {{ k1 = "{SECRET}" }}\n'
             'aliases = { secure = "token" }')
    assert info.value.path == "advertisers.a.aliases"
    assert "alias 'secure' -> 'token' can have no effect" in info.value.problem


def test_merged_values_are_validated_like_written_ones() -> None:
    with pytest.raises(PartnerConfigError) as info:
        preset("affise", 'status_map = { "4" = "lost" }')
    assert info.value.path == "advertisers.a.status_map" and "'lost' is not a status" in info.value.problem
    with pytest.raises(PartnerConfigError) as info:
        preset("cake", 'defaults = { event = "sale" }')
    assert info.value.path == "advertisers.a.defaults"
    assert "default event 'sale' is neither canonical nor in event_map" in info.value.problem
    assert preset("cake", 'defaults = { event = "sale" }\nevent_map = { sale = "purchase" }').defaults["event"] == \
        "sale"


def test_keitaro_payout_and_revenue_together_are_one_amount_sent_twice() -> None:
    """Both are aliases of `amount`: never guessed, refused at the door and by the normaliser."""
    adv = preset("keitaro")
    params = [("advertiser_id", "a"), ("subid", "kt9x"), ("payout", "10"), ("revenue", "10"), ("token", TOKEN)]
    with pytest.raises(RejectedInput) as door:
        check_postback(params, adv)
    assert [(e.field, e.reason) for e in door.value.errors] == [("amount", "duplicate")]
    with pytest.raises(Invalid) as info:
        normalize(params, adv)
    assert (info.value.reason, info.value.detail) == ("invalid_field",
                                                      "amount: given more than once (after alias mapping)")
