"""FX rates file, in-memory lookup and money rounding."""

from __future__ import annotations

import pickle
from dataclasses import FrozenInstanceError
from decimal import Decimal

import pytest

from postback.fx import FxFileError, FxRate, FxRates, minor_units, parse_fx_csv, round_money


def test_parse() -> None:
    text = "date,currency,rate\n2026-12-07,EUR,1.0842\n\n2026-12-07,JPY,0.006712\r\n"
    assert parse_fx_csv(text, "rates.csv") == [
        FxRate("2026-12-07", "EUR", Decimal("1.0842")),
        FxRate("2026-12-07", "JPY", Decimal("0.006712")),
    ]
    assert parse_fx_csv("\ufeffdate,currency,rate\n", "rates.csv") == []


@pytest.mark.parametrize("text, line, fragment", [
    ("", 0, "empty"),
    ("day,currency,rate\n", 1, "header"),
    ("date,currency,rate\n2026-12-07,EUR\n", 2, "3 columns"),
    ("date,currency,rate\n2026-12-07,EUR,1,2\n", 2, "3 columns"),
    ("date,currency,rate\n07.12.2026,EUR,1.1\n", 2, "date"),
    ("date,currency,rate\n2026-02-30,EUR,1.1\n", 2, "date"),
    ("date,currency,rate\n2026-12-07,eur,1.1\n", 2, "currency"),
    ("date,currency,rate\n2026-12-07,EURO,1.1\n", 2, "currency"),
    ("date,currency,rate\n2026-12-07,EUR,0\n", 2, "> 0"),
    ("date,currency,rate\n2026-12-07,EUR,-1.1\n", 2, "> 0"),
    ("date,currency,rate\n2026-12-07,EUR,abc\n", 2, "> 0"),
    ("date,currency,rate\n2026-12-07,EUR,NaN\n", 2, "> 0"),
    ("date,currency,rate\n2026-12-07,EUR,Infinity\n", 2, "> 0"),
    ("date,currency,rate\n2026-12-07,EUR,0.0000000000001\n", 2, "12 decimal"),
    ("date,currency,rate\n2026-12-07,EUR,1.1\n\n2026-12-07,EUR,1.2\n", 4, "line 2"),
])
def test_parse_errors_name_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(FxFileError) as info:
        parse_fx_csv(text, "rates.csv")
    e = info.value
    assert e.source == "rates.csv" and e.line == line and fragment in str(e)
    assert str(e).startswith(f"rates.csv:{line}: " if line else "rates.csv: ")
    assert isinstance(e, ValueError)
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_lookup_newest_on_or_before() -> None:
    rates = FxRates()
    assert len(rates) == 0 and rates.lookup("EUR", "2026-12-07") is None
    for day, rate in (("2026-12-08", "1.3"), ("2026-12-01", "1.1"), ("2026-12-05", "1.2")):
        rates.add(FxRate(day, "EUR", Decimal(rate)))
    rates.add(FxRate("2026-12-01", "GBP", Decimal("1.5")))
    assert len(rates) == 4
    assert rates.lookup("EUR", "2026-11-30") is None
    assert rates.lookup("EUR", "2026-12-01").rate == Decimal("1.1")
    assert rates.lookup("EUR", "2026-12-04").date == "2026-12-01"
    assert rates.lookup("EUR", "2026-12-07").rate == Decimal("1.2")
    assert rates.lookup("EUR", "2027-01-01").rate == Decimal("1.3")
    assert rates.lookup("CHF", "2027-01-01") is None
    # the same currency and day again replaces (a correction, or the topic replayed)
    rates.add(FxRate("2026-12-05", "EUR", Decimal("1.25")))
    assert len(rates) == 4 and rates.lookup("EUR", "2026-12-06").rate == Decimal("1.25")


def test_rate_is_frozen_and_has_the_topic_key() -> None:
    rate = FxRate("2026-12-07", "EUR", Decimal("1.08"))
    assert rate.key == "EUR|2026-12-07"
    with pytest.raises(FrozenInstanceError):
        rate.rate = Decimal(1)  # type: ignore[misc]


@pytest.mark.parametrize("currency, units", [("USD", 2), ("EUR", 2), ("JPY", 0), ("KRW", 0), ("KWD", 3),
                                             ("BHD", 3), ("CLF", 4), ("XYZ", 2)])
def test_minor_units(currency: str, units: int) -> None:
    assert minor_units(currency) == units


@pytest.mark.parametrize("value, currency, expected", [
    ("0.125", "USD", "0.12"), ("0.135", "USD", "0.14"), ("-0.125", "USD", "-0.12"), ("5", "USD", "5.00"),
    ("2.5", "JPY", "2"), ("3.5", "JPY", "4"), ("1.0005", "KWD", "1.000"), ("1.0015", "KWD", "1.002"),
])
def test_round_money_half_even(value: str, currency: str, expected: str) -> None:
    assert str(round_money(Decimal(value), currency)) == expected
