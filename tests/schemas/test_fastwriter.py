"""``schemas.fastwriter.compile_writer`` must write exactly the bytes of ``fastavro.schemaless_writer``."""

import datetime
import decimal
import io
import random
import uuid
from decimal import Decimal
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.logical_writers import LOGICAL_WRITERS

from schemas.codec import MARKER, Codec, schema_names
from schemas.fastwriter import LEN_LIMIT, compile_writer, decimal_to_bytes, encode_long

RECORDS_PER_SCHEMA = 300
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))


def fastavro_bytes(schema: Any, record: Any) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema, record)
    return out.getvalue()


# -- random valid records -------------------------------------------------------------------

STRINGS = [
    "", "a", "receipt", "01J8ZQ4Y7K3M9X2B5N6P8R0T1V", "203.0.113.42", "/postback", "héllo wörld",
    "日本語テキスト",
    "emoji 🎉🚀", "e\u0301 combining", "nul\x00inside", "tab\tnew\nline", "ß" * 40, "x" * 63, "x" * 64, "é" * 32,
]
BOUNDARY_LONGS = [
    0, 1, -1, 63, -64, 64, -65, 8191, -8192, 8192, -8193, 2**27 - 1, -(2**27), 2**27, -(2**27) - 1,
    2**41 - 1, -(2**41), 2**41, -(2**41) - 1, 2**62, -(2**62), 2**63 - 1, -(2**63),
    1_726_000_000_123, -1_726_000_000_123, 253_402_300_799_999,
]
DECIMALS = [Decimal(s) for s in (
    "0", "-0", "19.99", "-5.5", "999999999999.999999", "-999999999999.999999", "0.000001", "-0.000001",
    "1E+5", "128", "-128", "-1.28", "1.000000", "127.999999", "-128.000000", "0E-3", "42",
)]


class RandomRecords:
    """Random values valid under a (fastavro-parsed) schema; tracks what it covered."""

    def __init__(self, seed: int, named: dict[str, Any]) -> None:
        self.rng = random.Random(seed)
        self.named = named
        self.enum_symbols: dict[str, set[str]] = {}
        self.seen: set[str] = set()  # "null", "missing", "empty-array", "multi-array", "datetime", ...

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in PRIMITIVES:
            return self.named[schema]
        return schema

    def string(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(STRINGS)
        if r < 0.97:
            # Random code points from several planes, no surrogates.
            pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
            return "".join(chr(self.rng.randint(*self.rng.choice(pools))) for _ in range(self.rng.randint(0, 80)))
        self.seen.add("long-string")
        return self.rng.choice(["y", "ü", "€"]) * self.rng.randint(LEN_LIMIT - 10, LEN_LIMIT + 3000)

    def long(self) -> int:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(BOUNDARY_LONGS)
        if r < 0.7:
            return 1_700_000_000_000 + self.rng.randint(0, 10**11)
        bits = self.rng.randint(1, 63)
        return self.rng.randint(-(2**bits), 2**bits - 1)

    def timestamp(self) -> Any:
        if self.rng.random() < 0.15:
            self.seen.add("datetime")
            base = datetime.datetime(1970, 1, 1, tzinfo=UTC) + datetime.timedelta(
                milliseconds=self.rng.randint(-(10**12), 4 * 10**12), microseconds=self.rng.randint(0, 999)
            )
            return base.astimezone(self.rng.choice([UTC, IST]))
        return self.long()

    def decimal(self, precision: int, scale: int) -> Decimal:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.choice(DECIMALS)
        places = self.rng.randint(0, scale)
        digits = self.rng.randint(1, precision - (scale - places))
        return Decimal(self.rng.randint(-(10**digits) + 1, 10**digits - 1)).scaleb(-places)

    def value(self, schema: Any) -> Any:
        schema = self.resolve(schema)
        if isinstance(schema, list):
            if "null" in schema and self.rng.random() < 0.35:
                self.seen.add("null")
                return None
            return self.value(self.rng.choice([b for b in schema if b != "null"]))
        kind = schema if isinstance(schema, str) else schema["type"]
        logical = None if isinstance(schema, str) else schema.get("logicalType")
        if logical == "timestamp-millis":
            return self.timestamp()
        if logical == "decimal":
            return self.decimal(schema["precision"], schema.get("scale", 0))
        if kind == "string":
            return self.string()
        if kind == "long":
            return self.long()
        if kind == "int":
            return self.rng.choice([1, -1, 0, 2**31 - 1, -(2**31), self.rng.randint(-(2**31), 2**31 - 1)])
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "bytes":
            n = self.rng.choice([0, 1, 150, self.rng.randint(0, 300), self.rng.randint(LEN_LIMIT - 5, 70_000)])
            data = self.rng.randbytes(n)
            return bytearray(data) if self.rng.random() < 0.1 else data
        if kind == "enum":
            symbol = self.rng.choice(schema["symbols"])
            self.enum_symbols.setdefault(schema["name"], set()).add(symbol)
            return symbol
        if kind == "array":
            n = self.rng.choice([0, 0, 1, 2, 3, 8, self.rng.randint(0, 12), 70])
            self.seen.add("empty-array" if n == 0 else "multi-array" if n > 1 else "one-item-array")
            return [self.value(schema["items"]) for _ in range(n)]
        if kind == "record":
            record = {}
            for field in schema["fields"]:
                optional = "default" in field or (isinstance(field["type"], list) and "null" in field["type"])
                if optional and self.rng.random() < 0.15:
                    self.seen.add("missing")
                    continue
                record[field["name"]] = self.value(field["type"])
            return record
        raise AssertionError(f"no generator for {schema!r}")


# -- what a reader must get back ----------------------------------------------------------------


def plain_timestamps(schema: Any) -> Any:
    """The schema without fastavro's bookkeeping and with timestamp-millis as plain long."""
    if isinstance(schema, list):
        return [plain_timestamps(s) for s in schema]
    if isinstance(schema, dict):
        if schema.get("logicalType") == "timestamp-millis":
            return schema["type"]
        return {k: plain_timestamps(v) for k, v in schema.items() if not k.startswith("__")}
    return schema


def expected(value: Any, schema: Any, named: dict[str, Any]) -> Any:
    """``value`` as a reader of ``plain_timestamps(schema)`` returns it (defaults filled in)."""
    if isinstance(schema, str) and schema not in PRIMITIVES:
        schema = named[schema]
    if isinstance(schema, list):
        if value is None:
            return None
        (branch,) = [b for b in schema if b != "null"]
        return expected(value, branch, named)
    if isinstance(schema, str):
        return bytes(value) if schema == "bytes" else value
    kind, logical = schema["type"], schema.get("logicalType")
    if logical == "timestamp-millis":
        if isinstance(value, datetime.datetime):
            return (value - datetime.datetime(1970, 1, 1, tzinfo=UTC)) // datetime.timedelta(milliseconds=1)
        return value
    if kind == "array":
        return [expected(v, schema["items"], named) for v in value]
    if kind == "record":
        return {
            f["name"]: expected(value.get(f["name"], f.get("default")), f["type"], named) for f in schema["fields"]
        }
    if kind == "bytes" and logical != "decimal":
        return bytes(value)
    return value


# -- the schemas of schemas/ --------------------------------------------------------------------


@pytest.mark.parametrize("name", schema_names())
def test_random_records_match_fastavro_and_round_trip(name: str) -> None:
    schema = Codec.for_record(name).schema
    named = schema["__named_schemas"]
    reader_schema = parse_schema(plain_timestamps(schema))
    write = compile_writer(schema)
    gen = RandomRecords(seed=sum(map(ord, name)), named=named)
    for i in range(RECORDS_PER_SCHEMA):
        record = gen.value(schema)
        data = write(record)
        assert data == fastavro_bytes(schema, record), f"{name} record #{i} differs from fastavro"
        buf = io.BytesIO(data)
        decoded = schemaless_reader(buf, reader_schema)
        assert buf.tell() == len(data)
        assert decoded == expected(record, schema, named), f"{name} record #{i} does not round-trip"
    # The generator really exercised what it is meant to.
    for enum in _enums(schema):
        assert gen.enum_symbols.get(enum["name"]) == set(enum["symbols"]), f"{enum['name']}: not every symbol"
    if name != "KeyValue":
        assert "long-string" in gen.seen
    if _has(schema, lambda s: isinstance(s, dict) and any("default" in f for f in s.get("fields", ()))):
        assert "missing" in gen.seen
    if _has(schema, lambda s: isinstance(s, list)):
        assert "null" in gen.seen
    if _has(schema, lambda s: isinstance(s, dict) and s.get("type") == "array"):
        assert {"empty-array", "multi-array"} <= gen.seen
    if _has(schema, lambda s: isinstance(s, dict) and s.get("logicalType") == "timestamp-millis"):
        assert "datetime" in gen.seen


def _walk(schema: Any):
    yield schema
    if isinstance(schema, list):
        for branch in schema:
            yield from _walk(branch)
    elif isinstance(schema, dict):
        for field in schema.get("fields", ()):
            yield from _walk(field["type"])
        if "items" in schema:
            yield from _walk(schema["items"])


def _has(schema: Any, predicate) -> bool:
    return any(predicate(s) for s in _walk(schema))


def _enums(schema: Any) -> list[dict[str, Any]]:
    return [s for s in _walk(schema) if isinstance(s, dict) and s.get("type") == "enum"]


def _every_nullable_null(schema: dict[str, Any]) -> dict[str, Any]:
    record = RandomRecords(seed=1, named=schema["__named_schemas"]).value(schema)
    for field in schema["fields"]:
        if isinstance(field["type"], list):
            record[field["name"]] = None
    return record


@pytest.mark.parametrize("name", schema_names())
def test_all_nulls_and_all_missing(name: str) -> None:
    schema = Codec.for_record(name).schema
    write = compile_writer(schema)
    record = _every_nullable_null(schema)
    assert write(record) == fastavro_bytes(schema, record)
    required = {f["name"] for f in schema["fields"] if "default" not in f and not isinstance(f["type"], list)}
    minimal = {k: v for k, v in record.items() if k in required}  # every optional field left out
    assert write(minimal) == fastavro_bytes(schema, minimal)


@pytest.mark.parametrize("name", schema_names())
def test_missing_required_field_raises(name: str) -> None:
    schema = Codec.for_record(name).schema
    write = compile_writer(schema)
    record = _every_nullable_null(schema)
    for field in schema["fields"]:
        if "default" in field or isinstance(field["type"], list):
            continue
        incomplete = {k: v for k, v in record.items() if k != field["name"]}
        with pytest.raises((KeyError, ValueError)):
            write(incomplete)


def raw_postback(**overrides: Any) -> dict[str, Any]:
    record = {
        "receipt_id": "01J8ZQ4Y7K3M9X2B5N6P8R0T1V", "received_at_ms": 1_726_000_000_123, "remote_ip": "203.0.113.42",
        "method": "POST", "path": "/postback", "content_type": "application/json",
        "params": [{"key": f"k{i}", "value": f"välue {i}"} for i in range(8)], "body": b"{}" * 75,
        "headers": [{"key": "X-Postback-Signature", "value": "ab" * 32}], "ingester_id": "ingest-1",
    }
    record.update(overrides)
    return record


def test_lengths_and_counts_beyond_the_lookup_table() -> None:
    schema = Codec.for_record("RawPostback").schema
    write = compile_writer(schema)
    for record in (
        raw_postback(path="/" + "p" * (LEN_LIMIT + 1)),
        raw_postback(path="/" + "€" * LEN_LIMIT),
        raw_postback(params=[{"key": "k", "value": str(i)} for i in range(LEN_LIMIT + 5)]),
        raw_postback(headers=[{"key": "h", "value": "v"}] * (3 * LEN_LIMIT)),
        raw_postback(body=bytes(range(256)) * 300),
        raw_postback(body=b"b" * (LEN_LIMIT - 1)),
        raw_postback(body=b"b" * LEN_LIMIT),
    ):
        assert write(record) == fastavro_bytes(schema, record)


def test_prefix_is_written_first() -> None:
    codec = Codec.for_record("RawPostback")
    header = MARKER + codec.fingerprint
    record = raw_postback()
    with_header = compile_writer(codec.schema, prefix=header)(record)
    assert with_header == header + compile_writer(codec.schema)(record)
    assert codec.decode(with_header) == codec.decode(codec.encode(record, validated=False))
    assert with_header == codec.encode(record)


def test_errors_instead_of_silent_garbage() -> None:
    rejection = Codec.for_record("Rejection").schema
    conversion = Codec.for_record("Conversion").schema
    record = _every_nullable_null(rejection)
    record["raw"] = raw_postback()
    write = compile_writer(rejection)
    assert write(record) == fastavro_bytes(rejection, record)
    with pytest.raises(ValueError, match="not a symbol"):
        write({**record, "reason": "no_such_reason"})
    with pytest.raises(OverflowError):
        write({**record, "received_at_ms": 2**63})
    with pytest.raises(OverflowError):
        write({**record, "raw": raw_postback(received_at_ms=-(2**63) - 1)})
    with pytest.raises(TypeError):
        write({**record, "detail": b"bytes, not str"})
    with pytest.raises(TypeError):
        write({**record, "raw": raw_postback(body="str, not bytes")})
    with pytest.raises(TypeError):
        write({**record, "processed_at_ms": 1.5})  # fastavro would silently write 1
    conv = _every_nullable_null(conversion)
    write_conv = compile_writer(conversion)
    for bad in ("0.0000001", "1234567890123456789", "NaN", "-Infinity"):
        with pytest.raises((ValueError, TypeError)) as ours:
            write_conv({**conv, "amount": Decimal(bad)})
        with pytest.raises((ValueError, TypeError)) as theirs:
            fastavro_bytes(conversion, {**conv, "amount": Decimal(bad)})
        assert ours.type is theirs.type, bad


def test_decimals_byte_for_byte() -> None:
    bytes_decimal = LOGICAL_WRITERS["bytes-decimal"]
    rng = random.Random(7)
    values = DECIMALS + [
        Decimal(rng.randint(-(10**18) + 1, 10**18 - 1)).scaleb(-rng.randint(0, 6)) for _ in range(2000)
    ]
    values += [Decimal(2**k).scaleb(-6) for k in range(60)] + [Decimal(-(2**k)).scaleb(-6) for k in range(60)]
    for precision, scale in ((18, 6), (4, 2), (38, 0), (30, 10)):
        schema = {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}
        for value in values:
            try:
                theirs = bytes_decimal(value, schema)
            except (ValueError, TypeError) as exc:
                with pytest.raises(type(exc)):
                    decimal_to_bytes(value, precision, scale)
            else:
                assert decimal_to_bytes(value, precision, scale) == theirs, (value, precision, scale)
    # A tiny decimal context does not change the result (no rounding on the way).
    with decimal.localcontext(decimal.Context(prec=3)):
        assert decimal_to_bytes(Decimal("999999999999.999999"), 18, 6) == bytes_decimal(
            Decimal("999999999999.999999"), {"precision": 18, "scale": 6}
        )


def test_varints() -> None:
    out = io.BytesIO()
    for n in BOUNDARY_LONGS + [random.Random(n).randint(-(2**63), 2**63 - 1) for n in range(3000)]:
        out.seek(0)
        out.truncate()
        schemaless_writer(out, "long", n)
        assert encode_long(n) == out.getvalue(), n


# -- types our schemas do not use (yet) -----------------------------------------------------------

OTHER = {
    "type": "record",
    "name": "Other",
    "namespace": "test",
    "fields": [
        {"name": "i", "type": "int"},
        {"name": "f", "type": "float"},
        {"name": "g", "type": "double"},
        {"name": "flag", "type": "boolean"},
        {"name": "n", "type": "null"},
        {"name": "m", "type": {"type": "map", "values": ["null", "long"]}},
        {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {"name": "fx2", "type": "Four"},
        {"name": "late_null", "type": ["string", "null"], "default": "dflt"},
        {"name": "one", "type": ["string"]},
        {"name": "dec0", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 0}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "nested", "type": ["null", {"type": "array", "items": {"type": "map", "values": "string"}}]},
        {
            "name": "list",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Node",
                    "fields": [{"name": "v", "type": "long"}, {"name": "next", "type": ["null", "Node"]}],
                },
            ],
        },
        {"name": "nodes", "type": {"type": "array", "items": "Node"}, "default": []},
        {"name": "mood", "type": {"type": "enum", "name": "Mood", "symbols": ["ok", "meh"]}, "default": "meh"},
    ],
}


def other_record(rng: random.Random) -> dict[str, Any]:
    def node(depth: int) -> Any:
        return None if depth == 0 else {"v": rng.choice(BOUNDARY_LONGS), "next": node(depth - 1)}

    record = {
        "i": rng.randint(-(2**31), 2**31 - 1),
        "f": rng.choice([0.0, 1.5, -2.25, 3.4e38, rng.random(), 7]),
        "g": rng.choice([0.0, -1e308, 5e-324, rng.random(), float("inf"), 3]),
        "flag": rng.random() < 0.5,
        "n": None,
        "m": {f"{rng.choice(STRINGS)}{k}": rng.choice([None, *BOUNDARY_LONGS]) for k in range(rng.randint(0, 5))},
        "fx": rng.randbytes(4),
        "fx2": b"\x00\x01\x02\x03",
        "late_null": rng.choice([None, "x", "ü"]),
        "one": rng.choice(STRINGS),
        "dec0": Decimal(rng.randint(-9999, 9999)),
        "day": datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randint(-30000, 30000)),
        "uid": uuid.UUID(int=rng.getrandbits(128)),
        "nested": rng.choice([None, [], [{}], [{"a": "b", "ç": ""}, {"x": "y" * 100}]]),
        "list": node(rng.randint(0, 4)),
        "nodes": [node(rng.randint(1, 3)) for _ in range(rng.randint(0, 3))],
        "mood": rng.choice(["ok", "meh"]),
    }
    for optional in ("late_null", "nodes", "mood"):
        if rng.random() < 0.2:
            del record[optional]
    return record


def test_other_types_match_fastavro() -> None:
    schema = parse_schema(OTHER)
    write = compile_writer(schema)
    assert compile_writer(OTHER)(other_record(random.Random(0))) == write(other_record(random.Random(0)))
    rng = random.Random(11)
    for i in range(RECORDS_PER_SCHEMA):
        record = other_record(rng)
        assert write(record) == fastavro_bytes(schema, record), f"record #{i}"
    for top in ("string", "long", ["null", "bytes"], {"type": "array", "items": "int"}):
        parsed = parse_schema(top)
        for value in ("ab", 5, None, b"x", [1, -2, 3]):
            try:
                theirs = fastavro_bytes(parsed, value)
            except (TypeError, ValueError, AttributeError):
                continue
            assert compile_writer(parsed)(value) == theirs, (top, value)


def test_unsupported_unions_are_refused_at_compile_time() -> None:
    with pytest.raises(NotImplementedError):
        compile_writer(parse_schema({"type": "record", "name": "U", "fields": [{"name": "u", "type": ["int", "long"]}]}))
