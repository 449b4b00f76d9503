"""Currency conversion: daily FX rates into the account's reporting currency, and money rounding.

Why here, in the core: the commission engine (``processors.commission``) converts
revenue and payouts into the reporting currency, the loader of the rates file and the
``fx-rates`` topic share the same record, and reports round the same way. Everything in
this module is pure and exact: ``Decimal`` only, never a float.

Rates file (CSV, UTF-8)::

    date,currency,rate
    2026-12-07,EUR,1.0842
    2026-12-07,JPY,0.006712

``rate`` is how many units of the REPORTING currency one unit of ``currency`` is worth
(so ``amount * rate`` is the amount in the reporting currency). The reporting currency
itself needs no row: callers treat it as rate 1. ``FxRates.lookup`` answers with the
newest rate dated on or before the day asked for, so a weekend or a holiday uses the
last business day's rate and a missing rate is never invented.

Rounding is ``ROUND_HALF_EVEN`` (banker's rounding, no upward drift over many
conversions) to the currency's ISO 4217 minor unit: 0 decimals for JPY, KRW, ..., 3 for
BHD, KWD, ..., 2 otherwise.
"""

from __future__ import annotations

import bisect
import csv
import io
import re
from dataclasses import dataclass
from datetime import date as _date
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = ["MAX_RATE_DECIMALS", "FxFileError", "FxRate", "FxRates", "minor_units", "parse_fx_csv", "round_money"]

_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_HEADER = ["date", "currency", "rate"]
#: Decimal places a rate may have: the Conversion record stores rates as decimal(28, 12).
MAX_RATE_DECIMALS = 12

#: ISO 4217 currencies whose minor unit is not 2 decimals.
_MINOR_UNITS: dict[str, int] = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI",
                     "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}


def minor_units(currency: str) -> int:
    """Decimal places of ``currency``'s minor unit (ISO 4217): JPY 0, KWD 3, USD 2; 2 when unknown."""
    return _MINOR_UNITS.get(currency, 2)


def round_money(value: Decimal, currency: str) -> Decimal:
    """``value`` rounded half-even to ``currency``'s minor unit: 0.125 USD -> 0.12, 0.135 USD -> 0.14."""
    return value.quantize(Decimal(1).scaleb(-minor_units(currency)), rounding=ROUND_HALF_EVEN)


class FxFileError(ValueError):
    """A rates file cannot be used. ``str()`` is ``<source>:<line>: <problem>`` (line 0: the whole file)."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        super().__init__(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.source, self.line, self.problem))


@dataclass(frozen=True)
class FxRate:
    """One day's rate: 1 ``currency`` = ``rate`` units of the reporting currency, from ``date`` (YYYY-MM-DD)."""

    date: str
    currency: str
    rate: Decimal

    @property
    def key(self) -> str:
        """The ``fx-rates`` topic key, ``"{currency}|{date}"``."""
        return f"{self.currency}|{self.date}"


def _valid_date(text: str) -> bool:
    if not _DATE_RE.fullmatch(text):
        return False
    try:
        _date.fromisoformat(text)
    except ValueError:
        return False
    return True


def parse_fx_csv(text: str, source: str) -> list[FxRate]:
    """The rates in CSV ``text`` (header ``date,currency,rate``), in file order.

    Raises FxFileError naming ``source`` and the line for a wrong header, a bad date
    (YYYY-MM-DD), currency (upper-case ISO 4217) or rate (decimal text > 0, at most 12 decimal places), a wrong
    number of columns, or the same currency and date twice. Blank lines are skipped.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    rows = csv.reader(io.StringIO(text))
    rates: list[FxRate] = []
    seen: dict[tuple[str, str], int] = {}
    header_seen = False
    for row in rows:
        line = rows.line_num
        cells = [c.strip() for c in row]
        if not cells or cells == [""]:
            continue
        if not header_seen:
            if [c.lower() for c in cells] != _HEADER:
                raise FxFileError(source, line, f"the header must be {','.join(_HEADER)!r}, got {','.join(row)!r}")
            header_seen = True
            continue
        if len(cells) != 3:
            raise FxFileError(source, line, f"expected 3 columns (date,currency,rate), got {len(cells)}")
        day, currency, rate_text = cells
        if not _valid_date(day):
            raise FxFileError(source, line, f"date {day!r} is not a date YYYY-MM-DD")
        if not _CURRENCY_RE.fullmatch(currency):
            raise FxFileError(source, line, f"currency {currency!r} is not an upper-case ISO 4217 code")
        try:
            rate = Decimal(rate_text)
        except InvalidOperation:
            rate = None
        if rate is None or not rate.is_finite() or rate <= 0:
            raise FxFileError(source, line, f"rate {rate_text!r} is not a decimal number > 0")
        if -rate.as_tuple().exponent > MAX_RATE_DECIMALS:  # type: ignore[operator]
            raise FxFileError(source, line, f"rate {rate_text!r} has more than {MAX_RATE_DECIMALS} decimal "
                                            "places (the Conversion record keeps 12)")
        first = seen.get((currency, day))
        if first is not None:
            raise FxFileError(source, line, f"{currency} on {day} is given twice (first on line {first})")
        seen[(currency, day)] = line
        rates.append(FxRate(date=day, currency=currency, rate=rate))
    if not header_seen:
        raise FxFileError(source, 0, f"empty: expected the header {','.join(_HEADER)!r}")
    return rates


class FxRates:
    """The rates one worker knows, per currency, sorted by date. Not thread-safe; one per worker.

    ``add`` replaces a rate of the same currency and date (a corrected rate, or the
    compacted topic replayed), so loading the same rates twice changes nothing.
    """

    def __init__(self, rates: list[FxRate] | None = None) -> None:
        self._dates: dict[str, list[str]] = {}
        self._rates: dict[str, list[FxRate]] = {}
        for rate in rates or ():
            self.add(rate)

    def add(self, rate: FxRate) -> None:
        """Remember ``rate`` (replacing one of the same currency and date)."""
        dates = self._dates.setdefault(rate.currency, [])
        rates = self._rates.setdefault(rate.currency, [])
        i = bisect.bisect_left(dates, rate.date)
        if i < len(dates) and dates[i] == rate.date:
            rates[i] = rate
        else:
            dates.insert(i, rate.date)
            rates.insert(i, rate)

    def lookup(self, currency: str, on_date: str) -> FxRate | None:
        """The newest rate of ``currency`` dated on or before ``on_date`` (YYYY-MM-DD), or None."""
        dates = self._dates.get(currency)
        if not dates:
            return None
        i = bisect.bisect_right(dates, on_date)
        return self._rates[currency][i - 1] if i else None

    def __len__(self) -> int:
        return sum(len(d) for d in self._dates.values())

    def __repr__(self) -> str:
        return f"FxRates({len(self)} rates, {len(self._dates)} currencies)"
