"""``schemas.fastreader.compile_reader`` must return exactly what ``fastavro.schemaless_reader`` returns."""

import importlib.util
import io
import random
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from schemas.codec import HEADER_LEN, Codec, schema_names
from schemas.fastreader import ZERO_SIZE_ITEM_LIMIT, compile_reader, generate_source


def _load_writer_tests() -> Any:
    """The random-record generators of ``test_fastwriter.py`` (tests are not a package)."""
    name = "_fastwriter_tests_for_fastreader"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_fastwriter.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_w = _load_writer_tests()
RandomRecords, OTHER, other_record, DECIMALS = _w.RandomRecords, _w.OTHER, _w.other_record, _w.DECIMALS

RECORDS_PER_SCHEMA = 300
#: Generous per-decode bound for garbage input (a hang or a quadratic blow-up fails it).
GARBAGE_DECODE_SECONDS = 0.5


def write(schema: Any, record: Any) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema, record)
    return out.getvalue()


def fastavro_read(data: bytes, schema: Any, pos: int = 0) -> tuple[Any, int]:
    buf = io.BytesIO(data)
    buf.seek(pos)
    return schemaless_reader(buf, schema), buf.tell()


def assert_same(ours: Any, theirs: Any, where: str = "record") -> None:
    """Equal, with the same types, dict key order and (for Decimals) the same repr."""
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{where}: keys differ"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, Decimal):
        assert repr(ours) == repr(theirs), f"{where}: {ours!r} != {theirs!r}"
    elif isinstance(theirs, float) and theirs != theirs:
        assert ours != ours, f"{where}: NaN expected"
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def decode_or_error(read: Any, data: bytes, pos: int = 0) -> Any:
    """``read(data, pos)`` or the ValueError it raised; anything else (or a hang) fails."""
    start = time.perf_counter()
    try:
        result = read(data, pos)
    except ValueError as exc:  # truncated/corrupt: IndexError etc. are re-raised as ValueError
        result = exc
    elapsed = time.perf_counter() - start
    assert elapsed < GARBAGE_DECODE_SECONDS, f"decoding {len(data)} bytes took {elapsed:.2f}s"
    return result


def samples(name: str, count: int = RECORDS_PER_SCHEMA, seed: int = 0) -> list[bytes]:
    """Encodings of ``count`` random valid records of schema ``name``."""
    schema = Codec.for_record(name).schema
    gen = RandomRecords(seed=seed + sum(map(ord, name)), named=schema["__named_schemas"])
    return [write(schema, gen.value(schema)) for _ in range(count)]


# -- our schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", schema_names())
def test_random_records_match_fastavro(name: str) -> None:
    reader_schema = Codec.for_record(name)._reader_schema
    read = compile_reader(reader_schema)
    for i, data in enumerate(samples(name)):
        theirs, their_end = fastavro_read(data, reader_schema)
        assert their_end == len(data)
        ours, end = read(data, 0)
        assert end == len(data), f"{name} record #{i}: end {end} != {len(data)}"
        assert_same(ours, theirs, f"{name}#{i}")
        # At an offset, after other bytes, and followed by more: only the record is read.
        framed = b"\xc3\x01" + bytes(8) + data + b"\xff\x00"
        ours, end = read(framed, HEADER_LEN)
        assert end == HEADER_LEN + len(data)
        assert_same(ours, theirs, f"{name}#{i} at offset")


@pytest.mark.parametrize("name", schema_names())
def test_codec_messages(name: str) -> None:
    """What ``Codec.decode`` would return through ``read(data, HEADER_LEN)``."""
    codec = Codec.for_record(name)
    read = compile_reader(codec._reader_schema)
    schema = codec.schema
    gen = RandomRecords(seed=5, named=schema["__named_schemas"])
    for _ in range(50):
        message = codec.encode(gen.value(schema), validated=False)
        record, end = read(message, HEADER_LEN)
        assert end == len(message)
        assert_same(record, codec.decode(message))


@pytest.mark.parametrize("name", schema_names())
def test_truncated_input_raises(name: str) -> None:
    reader_schema = Codec.for_record(name)._reader_schema
    read = compile_reader(reader_schema)
    small = [data for data in samples(name, count=60, seed=1) if len(data) < 1500][:4]
    assert small
    for data in small:
        framed = b"\xc3\x01" + bytes(8) + data
        for cut in range(len(data)):
            with pytest.raises(ValueError):
                read(data[:cut], 0)
            with pytest.raises(ValueError):
                read(framed[: HEADER_LEN + cut], HEADER_LEN)
    # A large record cut near its end, inside its big string/bytes fields.
    big = max(samples(name, count=60, seed=2), key=len)
    for cut in (len(big) - 1, len(big) // 2, len(big) // 3):
        with pytest.raises(ValueError):
            read(big[:cut], 0)


@pytest.mark.parametrize("name", schema_names())
def test_garbage_never_hangs(name: str) -> None:
    """Random bytes and mutated records: a ValueError, or exactly fastavro's record."""
    reader_schema = Codec.for_record(name)._reader_schema
    read = compile_reader(reader_schema)
    rng = random.Random(sum(map(ord, name)))
    inputs = [rng.randbytes(rng.randint(0, 300)) for _ in range(400)]
    inputs += [bytes([0xFF]) * n for n in (1, 9, 10, 11, 50)] + [bytes([0x80]) * 20, b"\xfe" * 100, b"\x01" * 50]
    for data in samples(name, count=40, seed=3):
        for _ in range(15):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            inputs.append(bytes(mutated))
        inputs.append(data[: rng.randrange(len(data))] + rng.randbytes(rng.randint(1, 40)))
    succeeded = 0
    for data in inputs:
        result = decode_or_error(read, data)
        if isinstance(result, ValueError):
            continue
        succeeded += 1
        record, end = result
        assert 0 < end <= len(data)
        # Whenever we accept bytes, fastavro reads the very same record from them.
        theirs, their_end = fastavro_read(data, reader_schema)
        assert end == their_end
        assert_same(record, theirs)
    assert succeeded  # some mutations (inside strings, of enum/bool bytes) stay valid


def _varint(n: int) -> bytes:
    return write("long", n)


def test_hostile_lengths_and_counts() -> None:
    """Lengths/counts far beyond the data, negative, or overlong varints: fast ValueErrors."""
    codec = Codec.for_record("RawPostback")
    read = compile_reader(codec._reader_schema)
    head = _varint(2) + b"id" + _varint(1_726_000_000_123) + _varint(2) + b"ip"  # receipt_id, received_at_ms, remote_ip
    tail = _varint(3) + b"GET" + _varint(1) + b"/" + b"\x00"  # method, path, content_type null
    for params in (
        _varint(2**62),  # 2**62 items
        _varint(-(2**62)) + _varint(10),  # negative block count, then a block size
        _varint(10**6) + b"\x02a\x02b",
        b"\xff" * 10 + b"\x01",  # overlong varint
        b"\xff" * 9 + b"\x7f",  # 10 bytes, more than 64 bits
        _varint(1) + _varint(-2) + b"ab",  # negative string length
        _varint(1) + _varint(2**40) + b"ab",  # huge string length
        _varint(1) + _varint(2) + b"\xff\xfe" + _varint(0),  # invalid UTF-8
    ):
        data = head + tail + params + _varint(0) + _varint(0) + _varint(1) + b"x"
        assert isinstance(decode_or_error(read, data), ValueError), params
        assert isinstance(decode_or_error(read, data * 1000), ValueError), params
    # Huge body length: refused without allocating it.
    ok = head + tail + _varint(0) + _varint(2**60) + b"xx"
    assert isinstance(decode_or_error(read, ok), ValueError)
    # Enum/union indexes out of range (fastavro wraps a negative enum index around).
    conversion = compile_reader(Codec.for_record("Conversion")._reader_schema)
    rejection = compile_reader(Codec.for_record("Rejection")._reader_schema)
    for data in (b"\x00" * 3 + b"\x04", b"\x00\x00\x00\x01", b"\x00" * 3 + b"\x03"):
        assert isinstance(decode_or_error(conversion, data), ValueError)
    base = _varint(1) + b"r" + _varint(5) + _varint(6) + b"\x00\x00"
    for reason in (_varint(-1), _varint(15), b"\x80\x01"):
        assert isinstance(decode_or_error(rejection, base + reason + b"\x00" * 40), ValueError)


def test_offsets_and_input_types() -> None:
    codec = Codec.for_record("Click")
    read = compile_reader(codec._reader_schema)
    data = samples("Click", count=1)[0]
    record, end = read(data, 0)
    assert read(bytearray(data), 0) == (record, end)
    assert read(memoryview(b"??" + data), 2) == (record, end + 2)
    assert read(data) == (record, end)
    for pos in (-1, len(data) + 1):
        with pytest.raises(ValueError):
            read(data, pos)
    with pytest.raises(ValueError):
        read(data, len(data))


# -- decimals ---------------------------------------------------------------------------------------


def test_decimals_exactly_as_fastavro() -> None:
    rng = random.Random(3)
    values = DECIMALS + [Decimal(rng.randint(-(10**d), 10**d)).scaleb(-rng.randint(0, 6)) for d in range(1, 19) for _ in range(30)]
    for precision, scale in ((18, 6), (4, 2), (38, 0), (30, 10)):
        schema = parse_schema({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
        read = compile_reader(schema)
        for value in values:
            try:
                data = write(schema, value)
            except ValueError:
                continue
            theirs, _ = fastavro_read(data, schema)
            ours, end = read(data, 0)
            assert end == len(data)
            assert_same(ours, theirs, f"{value} ({precision}, {scale})")
        # Unscaled values with more digits than the precision (another writer): rounded the same.
        for unscaled in (10**precision + 7, -(10**precision) - 5, 2 ** (precision * 3) + 1, 0, -1):
            raw = unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)
            for body in (raw, b"\x00" * 3 + raw if unscaled >= 0 else b"\xff" * 3 + raw):
                data = _varint(len(body)) + body
                theirs, _ = fastavro_read(data, schema)
                assert_same(read(data, 0)[0], theirs, f"unscaled {unscaled}")
        # Absurdly long ones are refused instead of converted.
        with pytest.raises(ValueError):
            read(_varint(5000) + b"\x01" * 5000, 0)


# -- types our schemas do not use (yet) -----------------------------------------------------------


def test_other_types_match_fastavro() -> None:
    schema = parse_schema(OTHER)
    read = compile_reader(schema)
    assert generate_source(OTHER)[0] == generate_source(schema)[0]
    rng = random.Random(11)
    for i in range(RECORDS_PER_SCHEMA):
        data = write(schema, other_record(rng))
        theirs, _ = fastavro_read(data, schema)
        ours, end = read(data, 0)
        assert end == len(data)
        assert_same(ours, theirs, f"Other#{i}")
        for cut in range(0, len(data), 7):
            with pytest.raises(ValueError):
                read(data[:cut], 0)
    for top, value in (("string", "ab"), ("long", -5), (["null", "bytes"], b"x"), (["null", "bytes"], None),
                       ({"type": "array", "items": "int"}, [1, -2, 3]), ("boolean", True), ("null", None),
                       ({"type": "map", "values": "double"}, {"a": 1.5, "b": float("inf")}), (["string"], "one")):
        parsed = parse_schema(top)
        data = write(parsed, value)
        assert_same(compile_reader(parsed)(data, 0), (fastavro_read(data, parsed)[0], len(data)))


def test_multi_block_arrays_and_maps() -> None:
    """Blocks as other writers (e.g. Java's buffered encoder) write them, negative counts included."""
    schema = parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": {"type": "array", "items": "long"}},
        {"name": "m", "type": {"type": "map", "values": "string"}},
        {"name": "n", "type": {"type": "array", "items": "null"}},
    ]})
    read = compile_reader(schema)
    a = _varint(2) + _varint(1) + _varint(2) + _varint(-1) + _varint(1) + _varint(3) + _varint(0)
    m = _varint(-1) + _varint(4) + _varint(1) + b"k" + _varint(1) + b"v" + _varint(1) + _varint(1) + b"k" + _varint(1) + b"w" + _varint(0)
    n = _varint(3) + _varint(-2) + _varint(0) + _varint(0)
    data = a + m + n
    theirs, their_end = fastavro_read(data, schema)
    assert theirs == {"a": [1, 2, 3], "m": {"k": "w"}, "n": [None] * 5}
    assert_same(read(data, 0), (theirs, their_end))
    # Items that take no bytes cannot make a count of 2**62 spin forever.
    with pytest.raises(ValueError):
        read(_varint(0) + _varint(0) + _varint(2**62) + _varint(0), 0)
    with pytest.raises(ValueError):
        read(_varint(0) + _varint(0) + _varint(ZERO_SIZE_ITEM_LIMIT) * 2 + _varint(0), 0)


def test_deep_recursion_is_a_value_error() -> None:
    schema = parse_schema({"type": "record", "name": "Node", "fields": [
        {"name": "v", "type": "long"}, {"name": "next", "type": ["null", "Node"]},
    ]})
    read = compile_reader(schema)
    chain = (_varint(1) + _varint(1)) * 100 + _varint(1) + b"\x00"
    assert read(chain, 0) == fastavro_read(chain, schema)
    assert isinstance(decode_or_error(read, (_varint(1) + _varint(1)) * 100_000), ValueError)


def test_unsupported_unions_are_refused_at_compile_time() -> None:
    with pytest.raises(NotImplementedError):
        compile_reader(parse_schema({"type": "record", "name": "U", "fields": [{"name": "u", "type": ["int", "long"]}]}))


def test_conversion_payout_decimals_and_rates_exactly_as_fastavro() -> None:
    """The commission fields: decimal(18,6) payouts and decimal(28,12) FX rates, each nullable."""
    codec = Codec.for_record("Conversion")
    read = compile_reader(codec._reader_schema)
    rng = random.Random(13)
    base = {"conversion_id": "c", "receipt_id": "r", "advertiser_id": "a", "event": "purchase", "status": "approved",
            "received_at_ms": 1, "processed_at_ms": 2, "attributed": True, "version": 1, "sign": 1,
            "auth_mode": "hmac"}
    rates = [Decimal("1"), Decimal("0.000000000001"), Decimal("-0.000000000001"), Decimal("1.087"),
             Decimal("9999999999999999.999999999999"), Decimal("-9999999999999999.999999999999"), None]
    # d digits, at most 16 of them before the point (precision 28 - scale 12)
    rates += [Decimal(rng.randint(-(10**d) + 1, 10**d - 1)).scaleb(-rng.randint(max(0, d - 16), 12))
              for d in range(1, 29) for _ in range(5)]
    for rate in rates:
        payout = None if rate is None else Decimal(rng.randint(-(10**17), 10**17)).scaleb(-6)
        record = dict(base, revenue_fx_rate=rate, payout_fx_rate=rate, payout=payout, payout_reporting=payout)
        data = codec.encode(record)
        assert data == codec.encode(record, validated=False)
        theirs, end = fastavro_read(data, codec._reader_schema, HEADER_LEN)
        assert end == len(data)
        assert_same(read(data, HEADER_LEN), (theirs, len(data)))
        assert (theirs["revenue_fx_rate"] is None) is (rate is None)
        if rate is not None:
            assert theirs["revenue_fx_rate"] == rate and theirs["revenue_fx_rate"].as_tuple().exponent == -12
