"""Single-object encoding of our Avro records, checked against the Avro spec independently of fastavro."""

import datetime
import io
import json
import struct
from decimal import Decimal

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint

from schemas import SCHEMA_DIR
from schemas.codec import (
    BadMarker,
    Codec,
    CodecError,
    InvalidRecord,
    SchemaMismatch,
    UnknownFingerprint,
    decode_any,
    schema_names,
)

# --- independent CRC-64-AVRO (Avro spec, "Schema Fingerprints") ---------------------------

EMPTY = 0xC15D213AA4D7A795


def _table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


TABLE = _table()


def rabin64(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ byte) & 0xFF]
    return fp


def rabin64_le(text: str) -> bytes:
    return rabin64(text.encode("utf-8")).to_bytes(8, "little")


# (canonical form, fingerprint as Java's signed long) from apache/avro share/test/data/schema-tests.txt
SPEC_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"int"', 8247732601305521295),
    ('"string"', -8142146995180207161),
    ('{"name":"x.y.foo","type":"record","fields":[]}', 5916914534497305771),
    ('{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}', 7843277075252814651),
    ('{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}', -4448647247586288245),
    ('{"type":"array","items":"null"}', -589620603366471059),
]


@pytest.mark.parametrize(("canonical", "signed"), SPEC_VECTORS)
def test_crc64_avro_matches_spec_vectors(canonical, signed):
    expected = struct.pack("<q", signed)
    assert rabin64_le(canonical) == expected
    # fastavro's helper gives the same 8 bytes (as little-endian hex), which codec.py relies on.
    assert bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO")) == expected


# --- sample records ------------------------------------------------------------------------

T0 = 1_700_000_000_123

RAW = {
    "receipt_id": "01HZY3Q4J5K6M7N8P9QRSTVWXY",
    "received_at_ms": T0,
    "remote_ip": "203.0.113.7",
    "method": "POST",
    "path": "/postback/acme",
    "content_type": "application/x-www-form-urlencoded",
    "params": [
        {"key": "click_id", "value": "01HZY3Q4J5K6M7N8P9QRSTVWXZ"},
        {"key": "sub1", "value": "a"},
        {"key": "sub1", "value": "b"},
    ],
    "body": b"order_id=A-1&revenue=19.99&currency=EUR",
    "headers": [
        {"key": "X-Postback-Timestamp", "value": "1700000000"},
        {"key": "X-Postback-Signature", "value": "deadbeef"},
    ],
    "ingester_id": "ingest-1",
}

CONVERSION = {
    "conversion_id": "cv_3f2a",
    "receipt_id": RAW["receipt_id"],
    "advertiser_id": "acme",
    "offer_id": "o1",
    "affiliate_id": "aff9",
    "campaign_id": None,
    "click_id": "01HZY3Q4J5K6M7N8P9QRSTVWXZ",
    "sub1": "a",
    "sub2": None,
    "sub3": None,
    "sub4": None,
    "sub5": None,
    "event": "purchase",
    "status": "approved",
    "order_id": "A-1",
    "customer_id": "cust-7",
    "period": None,
    "amount": Decimal("19.990000"),
    "currency": "EUR",
    "event_time_ms": T0 - 5_000,
    "received_at_ms": T0,
    "processed_at_ms": T0 + 40,
    "clicked_at_ms": T0 - 3_600_000,
    "attributed": True,
    "attribution": "attributed",
    "click_to_conversion_s": 3600,
    "dedupe_key": "acme|purchase|o1",
    "version": 3,
    "sign": -1,
    "auth_mode": "hmac",
    "extras": [{"key": "coupon", "value": "SPRING"}],
    "payout": Decimal("-5.000000"),
    "payout_currency": "USD",
    "payout_status": "payable",
    "payout_reason": "clawback",
    "payout_rule": "offer o1 purchase: cpa 5.00 USD",
    "reporting_currency": "USD",
    "revenue_reporting": Decimal("21.730000"),
    "payout_reporting": Decimal("-5.000000"),
    "revenue_fx_rate": Decimal("1.087000000000"),
    "revenue_fx_date": "2023-11-14",
    "payout_fx_rate": Decimal("1.000000000000"),
    "payout_fx_date": None,
    "fx_status": "ok",
    "cap_decision": "counted offer:o1 day 2023-11-14 3/100",
}

#: The Conversion fields appended for the commission engine (schemas/history/Conversion.1.avsc predates them).
PAYOUT_FIELDS = (
    "payout", "payout_currency", "payout_status", "payout_reason", "payout_rule", "reporting_currency",
    "revenue_reporting", "payout_reporting", "revenue_fx_rate", "revenue_fx_date", "payout_fx_rate",
    "payout_fx_date", "fx_status", "cap_decision",
)

RECORDS = {
    "KeyValue": {"key": "k", "value": "v"},
    "Click": {
        "click_id": "01HZY3Q4J5K6M7N8P9QRSTVWXZ",
        "clicked_at_ms": T0 - 3_600_000,
        "offer_id": "o1",
        "affiliate_id": "aff9",
        "campaign_id": "c5",
        "sub1": "a",
        "sub2": None,
        "sub3": None,
        "sub4": None,
        "sub5": "é✓",
        "ip": "198.51.100.2",
        "user_agent": "Mozilla/5.0",
        "referer": None,
        "source": "redirect",
        "extras": [{"key": "utm_source", "value": "x"}, {"key": "utm_source", "value": "y"}],
    },
    "RawPostback": RAW,
    "Conversion": CONVERSION,
    "Rejection": {
        "receipt_id": RAW["receipt_id"],
        "received_at_ms": T0,
        "processed_at_ms": T0 + 3,
        "advertiser_id": "acme",
        "event": None,
        "reason": "bad_signature",
        "detail": "HMAC mismatch for key k1",
        "raw": dict(RAW, body=b""),
    },
    "Duplicate": {
        "receipt_id": "01HZY3Q4J5K6M7N8P9QRSTVWY0",
        "first_receipt_id": RAW["receipt_id"],
        "received_at_ms": T0 + 1000,
        "processed_at_ms": T0 + 1002,
        "advertiser_id": "acme",
        "event": "purchase",
        "order_id": "A-1",
        "dedupe_key": "acme|purchase|A-1",
        "reason": "order_repeat",
    },
    "FxRate": {
        "date": "2023-11-14",
        "currency": "EUR",
        "rate": "1.0870",
        "reporting_currency": "USD",
        "loaded_at_ms": T0,
    },
    "OutboundDelivery": {
        "conversion_id": "cv_3f2a",
        "version": 3,
        "affiliate_id": "aff9",
        "endpoint": "aff9/main",
        "url": "https://aff.example/pb?cid=01HZY3Q4J5K6M7N8P9QRSTVWXZ&sig=REDACTED",
        "method": "GET",
        "attempt": 2,
        "status": 503,
        "latency_ms": 187,
        "error_class": "http_5xx",
        "response_head": "Service Unavailable \ufffd",
        "outcome": "retry",
        "attempted_at_ms": T0 + 60_000,
        "idempotency_key": "cv_3f2a:3",
    },
}


def test_every_schema_has_a_sample():
    assert set(schema_names()) == set(RECORDS)
    assert {p.stem for p in SCHEMA_DIR.glob("*.avsc")} == set(RECORDS)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_round_trip(name):
    codec = Codec.for_record(name)
    data = codec.encode(RECORDS[name])
    assert codec.decode(data) == RECORDS[name]
    assert decode_any(data) == (name, RECORDS[name])


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_header_is_marker_plus_fingerprint_of_canonical_form(name):
    codec = Codec.for_record(name)
    data = codec.encode(RECORDS[name])
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == codec.fingerprint == rabin64_le(codec.canonical_form)
    assert len(codec.fingerprint) == 8


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_canonical_form_is_self_contained_and_independent_of_file_layout(name):
    """Another implementation given the fully expanded schema must compute the same fingerprint."""
    codec = Codec.for_record(name)
    canonical = codec.canonical_form
    assert '"doc"' not in canonical and '"default"' not in canonical and " " not in canonical
    # Named types are defined once (at first use), then referenced by full name.
    if "KeyValue" in canonical:
        assert canonical.count('{"name":"io.postback.v1.KeyValue","type":"record"') == 1
    standalone = fastavro.parse_schema(json.loads(canonical))  # no named_schemas needed
    assert rabin64_le(fastavro.schema.to_parsing_canonical_form(standalone)) == codec.fingerprint


def test_keyvalue_canonical_form_literal():
    assert Codec.for_record("KeyValue").canonical_form == (
        '{"name":"io.postback.v1.KeyValue","type":"record","fields":'
        '[{"name":"key","type":"string"},{"name":"value","type":"string"}]}'
    )


#: ``_ms`` fields that are durations (plain longs), not timestamp-millis.
DURATIONS_MS = frozenset({"latency_ms"})


def _ms_to_datetime(value):
    """What plain fastavro makes of our records: timestamp-millis fields become aware datetimes."""
    if isinstance(value, dict):
        return {
            k: datetime.datetime.fromtimestamp(v / 1000, datetime.timezone.utc)
            if k.endswith("_ms") and k not in DURATIONS_MS and v is not None
            else _ms_to_datetime(v)
            for k, v in value.items()
        }
    return value


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_plain_fastavro_reads_our_bytes(name):
    """A consumer that only has the .avsc files and strips the 10-byte header reads the record."""
    named = {}
    for dep in {"KeyValue": [], "Rejection": ["KeyValue", "RawPostback"]}.get(name, ["KeyValue"]):
        fastavro.parse_schema(json.loads((SCHEMA_DIR / f"{dep}.avsc").read_text()), named_schemas=named)
    schema = fastavro.parse_schema(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()), named_schemas=named)
    data = Codec.for_record(name).encode(RECORDS[name])
    assert fastavro.schemaless_reader(io.BytesIO(data[10:]), schema) == _ms_to_datetime(RECORDS[name])


def test_timestamps_accept_datetime_and_decode_as_int_millis():
    codec = Codec.for_record("Duplicate")
    when = datetime.datetime.fromtimestamp(T0 / 1000, datetime.timezone.utc)
    decoded = codec.decode(codec.encode(dict(RECORDS["Duplicate"], received_at_ms=when)))
    assert decoded["received_at_ms"] == T0
    assert type(decoded["received_at_ms"]) is int


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        (Decimal("19.990000"), Decimal("19.990000")),
        (Decimal("19.99"), Decimal("19.990000")),
        (Decimal("0.000001"), Decimal("0.000001")),
        (Decimal("-5.5"), Decimal("-5.500000")),
        (Decimal("999999999999.999999"), Decimal("999999999999.999999")),
        (None, None),
    ],
)
def test_decimal_amount_is_exact(sent, received):
    codec = Codec.for_record("Conversion")
    amount = codec.decode(codec.encode(dict(CONVERSION, amount=sent)))["amount"]
    assert amount == received
    if received is not None:
        assert isinstance(amount, Decimal) and str(amount) == str(received)


@pytest.mark.parametrize("amount", [19.99, "19.99", Decimal("0.0000001")])
def test_amount_must_be_a_decimal_within_scale(amount):
    with pytest.raises(InvalidRecord, match="amount") as info:
        Codec.for_record("Conversion").encode(dict(CONVERSION, amount=amount))
    assert info.value.field == "Conversion.amount"


def test_missing_required_field_names_the_field():
    record = {k: v for k, v in CONVERSION.items() if k != "advertiser_id"}
    with pytest.raises(CodecError, match="advertiser_id") as info:
        Codec.for_record("Conversion").encode(record)
    assert isinstance(info.value, InvalidRecord)
    assert info.value.field == "Conversion.advertiser_id"


@pytest.mark.parametrize(
    ("field", "value"),
    [("attributed", "no"), ("version", 1.5), ("status", "maybe"), ("event", 7), ("body", "text")],
)
def test_wrongly_typed_field_is_rejected_not_coerced(field, value):
    name = "RawPostback" if field == "body" else "Conversion"
    with pytest.raises(InvalidRecord, match=field):
        Codec.for_record(name).encode(dict(RECORDS[name], **{field: value}))


def test_error_message_does_not_echo_values():
    with pytest.raises(InvalidRecord) as info:
        Codec.for_record("RawPostback").encode(dict(RAW, remote_ip=b"secret-bytes"))
    assert "secret" not in str(info.value)


def test_missing_optional_fields_take_defaults():
    codec = Codec.for_record("Click")
    minimal = {k: RECORDS["Click"][k] for k in ("click_id", "clicked_at_ms", "offer_id", "affiliate_id", "source")}
    decoded = codec.decode(codec.encode(minimal))
    assert decoded["extras"] == [] and decoded["sub3"] is None and decoded["campaign_id"] is None


def test_bad_marker():
    data = Codec.for_record("Click").encode(RECORDS["Click"])
    for bad in (b"", b"\xc3", b"\xc3\x01\x00", b"\x00\x01" + data[2:], b'{"click_id":1}'):
        with pytest.raises(BadMarker):
            Codec.for_record("Click").decode(bad)
        with pytest.raises(BadMarker):
            decode_any(bad)


def test_unknown_fingerprint():
    data = Codec.for_record("Click").encode(RECORDS["Click"])
    forged = data[:2] + bytes(8) + data[10:]
    with pytest.raises(UnknownFingerprint):
        Codec.for_record("Click").decode(forged)
    with pytest.raises(UnknownFingerprint):
        decode_any(forged)


def test_wrong_schema():
    data = Codec.for_record("Duplicate").encode(RECORDS["Duplicate"])
    with pytest.raises(SchemaMismatch, match="Duplicate"):
        Codec.for_record("Click").decode(data)


def test_corrupt_body():
    codec = Codec.for_record("Conversion")
    data = codec.encode(CONVERSION)
    with pytest.raises(CodecError):
        codec.decode(data[:-3])
    with pytest.raises(CodecError, match="trailing"):
        codec.decode(data + b"\x00")


def test_error_hierarchy():
    for exc in (BadMarker, UnknownFingerprint, SchemaMismatch, InvalidRecord):
        assert issubclass(exc, CodecError)
    assert issubclass(CodecError, ValueError)


def test_codec_is_shared_and_fingerprints_are_distinct():
    assert Codec.for_record("Click") is Codec.for_record("Click")
    fingerprints = {Codec.for_record(name).fingerprint for name in schema_names()}
    assert len(fingerprints) == len(schema_names())


def test_unknown_schema_name():
    with pytest.raises(CodecError, match="Nope"):
        Codec.for_record("Nope")


def test_a_duplicate_written_before_the_superseded_reason_still_decodes() -> None:
    """Records on the topics keep their writer's fingerprint: the schema before `superseded` was appended."""
    import io

    import fastavro

    from schemas import SCHEMA_DIR

    old = fastavro.parse_schema(json.loads((SCHEMA_DIR / "history" / "Duplicate.1.avsc").read_text()))
    codec = Codec.for_record("Duplicate")
    old_fingerprint = bytes.fromhex(fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(old), "CRC-64-AVRO"))
    assert old_fingerprint != codec.fingerprint and old_fingerprint in codec.earlier_fingerprints
    record = {"receipt_id": "r1", "first_receipt_id": "r0", "received_at_ms": 1_767_225_600_000,
              "processed_at_ms": 1_767_225_600_500, "advertiser_id": "acme", "event": "purchase",
              "order_id": "o-1", "dedupe_key": "acme|purchase|o-1", "reason": "one_time_event_repeat"}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, old, record)
    message = b"\xc3\x01" + old_fingerprint + body.getvalue()
    assert codec.decode(message) == record
    assert decode_any(message) == ("Duplicate", record)
    assert codec.decode(codec.encode(dict(record, reason="superseded")))["reason"] == "superseded"


def _history_schema(name: str, version: int):
    return fastavro.parse_schema(
        json.loads((SCHEMA_DIR / "history" / f"{name}.{version}.avsc").read_text()), named_schemas={})


def _fingerprint_of(parsed) -> bytes:
    return bytes.fromhex(fastavro_fingerprint(fastavro.schema.to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


def _full_schema(name: str):
    """The current schema as fastavro parses it from the .avsc files (defaults and logical types kept)."""
    return Codec.for_record(name).schema


def test_conversion_history_is_the_schema_before_the_payout_fields():
    old = _history_schema("Conversion", 1)
    new = Codec.for_record("Conversion").schema
    old_names = [f["name"] for f in old["fields"]]
    new_names = [f["name"] for f in new["fields"]]
    assert new_names == old_names + list(PAYOUT_FIELDS)  # appended at the end, nothing else changed
    for field in new["fields"][len(old_names):]:
        assert field["type"][0] == "null" and "default" in field and field["default"] is None
    kinds = {f["name"]: f["type"][1] for f in new["fields"][len(old_names):]}
    for name in ("payout", "revenue_reporting", "payout_reporting"):
        assert (kinds[name]["logicalType"], kinds[name]["precision"], kinds[name]["scale"]) == ("decimal", 18, 6)
    for name in ("revenue_fx_rate", "payout_fx_rate"):
        assert (kinds[name]["logicalType"], kinds[name]["precision"], kinds[name]["scale"]) == ("decimal", 28, 12)
    codec = Codec.for_record("Conversion")
    assert _fingerprint_of(old) in codec.earlier_fingerprints and _fingerprint_of(old) != codec.fingerprint


def test_a_conversion_written_before_the_payout_fields_decodes_with_them_null():
    old = _history_schema("Conversion", 1)
    record = {k: v for k, v in CONVERSION.items() if k not in PAYOUT_FIELDS}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, old, record)
    message = b"\xc3\x01" + _fingerprint_of(old) + body.getvalue()
    expected = dict(record, **dict.fromkeys(PAYOUT_FIELDS))
    codec = Codec.for_record("Conversion")
    decoded = codec.decode(message)
    assert decoded == expected and list(decoded) == list(expected)  # the current schema's field order
    assert decode_any(message) == ("Conversion", expected)
    # The same as Avro schema resolution (writer = old, reader = new) gives.
    resolved = fastavro.schemaless_reader(io.BytesIO(body.getvalue()), old, _full_schema("Conversion"))
    assert _ms_to_datetime(decoded) == resolved
    # Each decode gets its own defaults (a mutable default is never shared).
    decoded["extras"].append({"key": "x", "value": "y"})
    assert codec.decode(message)["extras"] == record["extras"]


def test_a_truncated_old_conversion_is_still_refused():
    old = _history_schema("Conversion", 1)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, old, {k: v for k, v in CONVERSION.items() if k not in PAYOUT_FIELDS})
    message = b"\xc3\x01" + _fingerprint_of(old) + body.getvalue()
    with pytest.raises(CodecError):
        Codec.for_record("Conversion").decode(message[:-2])
    with pytest.raises(CodecError, match="trailing"):
        Codec.for_record("Conversion").decode(message + b"\x00")


def test_an_old_reader_reads_new_conversions_ignoring_the_payout_fields():
    """Avro resolution the other way: a consumer still on the old schema reads what we write now."""
    data = Codec.for_record("Conversion").encode(CONVERSION)
    old = _history_schema("Conversion", 1)
    read = fastavro.schemaless_reader(io.BytesIO(data[10:]), _full_schema("Conversion"), old)
    assert read == _ms_to_datetime({k: v for k, v in CONVERSION.items() if k not in PAYOUT_FIELDS})


@pytest.mark.parametrize(
    ("field", "sent", "received"),
    [
        ("payout", Decimal("7.5"), Decimal("7.500000")),
        ("payout", Decimal("-123456789012.123456"), Decimal("-123456789012.123456")),
        ("payout_reporting", Decimal("0"), Decimal("0.000000")),
        ("revenue_fx_rate", Decimal("1.087"), Decimal("1.087000000000")),
        ("revenue_fx_rate", Decimal("0.000000000001"), Decimal("0.000000000001")),
        ("payout_fx_rate", Decimal("9999999999999999.999999999999"), Decimal("9999999999999999.999999999999")),
        ("payout_fx_rate", None, None),
    ],
)
def test_payout_and_rate_decimals_are_exact(field, sent, received):
    codec = Codec.for_record("Conversion")
    value = codec.decode(codec.encode(dict(CONVERSION, **{field: sent})))[field]
    assert value == received
    if received is not None:
        assert isinstance(value, Decimal) and str(value) == str(received)


@pytest.mark.parametrize(("field", "value"), [("revenue_fx_rate", Decimal("1.0000000000001")),
                                               ("payout", Decimal("0.0000001")), ("payout", 5.0)])
def test_payout_decimals_beyond_their_scale_are_refused(field, value):
    with pytest.raises(InvalidRecord, match=field) as info:
        Codec.for_record("Conversion").encode(dict(CONVERSION, **{field: value}))
    assert info.value.field == f"Conversion.{field}"


def test_a_conversion_without_the_payout_fields_encodes_them_as_null():
    codec = Codec.for_record("Conversion")
    record = {k: v for k, v in CONVERSION.items() if k not in PAYOUT_FIELDS}
    assert codec.decode(codec.encode(record)) == dict(record, **dict.fromkeys(PAYOUT_FIELDS))
    assert codec.decode(codec.encode(record, validated=False)) == dict(record, **dict.fromkeys(PAYOUT_FIELDS))


def test_fx_rate_round_trip_keeps_the_rate_text():
    codec = Codec.for_record("FxRate")
    record = dict(RECORDS["FxRate"], rate="0.000123456789")
    assert codec.decode(codec.encode(record)) == record
    assert decode_any(codec.encode(record)) == ("FxRate", record)
    with pytest.raises(InvalidRecord, match="rate"):
        codec.encode(dict(record, rate=Decimal("1.1")))


# --- OutboundDelivery: one record per delivery attempt ------------------------------------------

def test_outbound_delivery_field_types_are_the_contract():
    fields = {f["name"]: f["type"] for f in json.loads((SCHEMA_DIR / "OutboundDelivery.avsc").read_text())["fields"]}
    assert fields == {
        "conversion_id": "string", "version": "long", "affiliate_id": "string", "endpoint": "string",
        "url": "string", "method": "string", "attempt": "int", "status": ["null", "int"],
        "latency_ms": ["null", "long"], "error_class": ["null", "string"], "response_head": ["null", "string"],
        "outcome": "string", "attempted_at_ms": {"type": "long", "logicalType": "timestamp-millis"},
        "idempotency_key": "string",
    }
    assert Codec.for_record("OutboundDelivery").schema["name"] == "io.postback.v1.OutboundDelivery"


def test_outbound_delivery_without_a_response_round_trips_with_nulls():
    codec = Codec.for_record("OutboundDelivery")
    sent = {k: v for k, v in RECORDS["OutboundDelivery"].items()
            if k not in ("status", "latency_ms", "error_class", "response_head")}
    sent.update(error_class="timeout", outcome="dead", attempt=9)
    decoded = codec.decode(codec.encode(sent))
    assert decoded == dict(sent, status=None, latency_ms=None, response_head=None)
    assert list(decoded) == [f["name"] for f in codec.schema["fields"]]


@pytest.mark.parametrize(("field", "value"), [("status", "503"), ("attempt", None), ("latency_ms", 1.5),
                                              ("outcome", None)])
def test_outbound_delivery_wrong_types_are_refused(field, value):
    with pytest.raises(InvalidRecord, match=field):
        Codec.for_record("OutboundDelivery").encode(dict(RECORDS["OutboundDelivery"], **{field: value}))
