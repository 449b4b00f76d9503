"""Encode and decode our records with Avro *single-object encoding*.

Why single-object encoding: every Kafka message value is self-describing without a
schema registry. Layout (Avro spec, "Single-object encoding")::

    C3 01 | CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form (8 bytes, LE) | Avro binary body

Any Avro implementation (Java ``BinaryMessageDecoder``, ``avro`` for Python, Rust
``apache-avro``...) can read our topics from the ``.avsc`` files alone, and the
fingerprint lets a reader pick the right schema -- or refuse a message written with a
schema it does not know -- instead of misreading bytes.

Guarantees:

- ``Codec.encode`` validates the record first, so nothing malformed reaches a topic
  (fastavro's writer alone silently turns ``"no"`` into ``True`` or truncates floats).
  A bad record raises ``InvalidRecord`` (a ``CodecError``) naming the field.
- ``Codec.decode`` returns exactly what was encoded: ``timestamp-millis`` fields come
  back as ``int`` epoch milliseconds (the field names say ``_ms``; ``encode`` also
  accepts aware ``datetime``), ``decimal`` fields as ``decimal.Decimal`` with the
  schema's scale (``Decimal("19.99")`` -> ``Decimal("19.990000")``); money never
  passes through a float.
- Decoding never guesses: a wrong marker, an unknown fingerprint, another schema's
  fingerprint, or a corrupt body raises a ``CodecError`` subclass.

Named types (``KeyValue``, and ``RawPostback`` inside ``Rejection``) live in their own
``.avsc`` files and are resolved by fastavro's ``load_schema``, which inlines each one
at its first use, so the canonical form -- and hence the fingerprint -- is the one
any other implementation computes from the fully expanded schema.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from fastavro.repository import AbstractSchemaRepository, SchemaRepositoryError
from fastavro.schema import UnknownType, fingerprint, load_schema, parse_schema, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from schemas import SCHEMA_DIR
from schemas.fastreader import compile_reader
from schemas.fastwriter import compile_writer

__all__ = [
    "MARKER",
    "HEADER_LEN",
    "CodecError",
    "BadMarker",
    "UnknownFingerprint",
    "SchemaMismatch",
    "InvalidRecord",
    "Codec",
    "decode_any",
    "schema_names",
]

#: Single-object encoding marker (spec: 0xC3 0x01).
MARKER = b"\xc3\x01"
#: Marker + 8-byte fingerprint.
HEADER_LEN = 10
NAMESPACE = "io.postback.v1"


class CodecError(ValueError):
    """Anything that stops a record from being encoded or a message from being decoded."""


class BadMarker(CodecError):
    """The data does not start with the single-object marker C3 01 (or is too short)."""


class UnknownFingerprint(CodecError):
    """The fingerprint matches none of our schemas (newer writer, or foreign data)."""


class SchemaMismatch(CodecError):
    """The message was written with another of our schemas than the codec's."""


class InvalidRecord(CodecError):
    """A record does not conform to its schema; ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


class _Repository(AbstractSchemaRepository):
    """Resolves ``io.postback.v1.X`` to ``SCHEMA_DIR/X.avsc`` (fastavro wants ``<fullname>.avsc``).

    With ``plain_timestamps`` the ``timestamp-millis`` logical type is dropped, giving
    a schema with the same binary encoding that decodes those fields to ``int``.
    """

    def __init__(self, plain_timestamps: bool) -> None:
        self.plain_timestamps = plain_timestamps

    def load(self, name: str) -> Any:
        namespace, _, short = name.rpartition(".")
        path = SCHEMA_DIR / f"{short}.avsc"
        if namespace not in ("", NAMESPACE) or not path.is_file():
            raise SchemaRepositoryError(f"no schema {name!r} in {SCHEMA_DIR}")
        schema = json.loads(path.read_text(encoding="utf-8"))
        return _drop_timestamp_logical_type(schema) if self.plain_timestamps else schema


def _drop_timestamp_logical_type(node: Any) -> Any:
    if isinstance(node, list):
        return [_drop_timestamp_logical_type(n) for n in node]
    if isinstance(node, dict):
        if node.get("logicalType") == "timestamp-millis":
            return node["type"]
        return {k: _drop_timestamp_logical_type(v) for k, v in node.items()}
    return node


def schema_names() -> tuple[str, ...]:
    """Names of all our schemas (the ``.avsc`` file stems), sorted."""
    return tuple(sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc")))


def _type_label(schema: Any) -> str:
    if isinstance(schema, list):
        return " | ".join(_type_label(s) for s in schema)
    if isinstance(schema, dict):
        return str(schema.get("logicalType") or schema.get("name") or schema["type"])
    return str(schema)


class Codec:
    """Single-object encoder/decoder for one record schema. Build once, reuse: ``Codec.for_record(name)``.

    Attributes: ``name`` (e.g. ``"RawPostback"``), ``schema`` (fastavro-parsed writer
    schema), ``canonical_form`` (Parsing Canonical Form, str) and ``fingerprint``
    (8 bytes, CRC-64-AVRO little-endian, as on the wire).
    """

    __slots__ = ("name", "schema", "canonical_form", "fingerprint", "earlier_fingerprints", "_reader_schema",
                 "_header", "_write", "_read", "_earlier_readers")

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self.schema = load_schema(name, repo=_Repository(plain_timestamps=False))
            self._reader_schema = load_schema(name, repo=_Repository(plain_timestamps=True))
        except SchemaRepositoryError as exc:
            raise CodecError(str(exc)) from exc
        self.canonical_form: str = to_parsing_canonical_form(self.schema)
        # fastavro returns the 8 fingerprint bytes in little-endian order, as hex.
        self.fingerprint: bytes = bytes.fromhex(fingerprint(self.canonical_form, "CRC-64-AVRO"))
        self._header = MARKER + self.fingerprint
        # Byte-identical to fastavro's schemaless_writer, ~4x faster (schemas/fastwriter.py).
        self._write = compile_writer(self.schema, prefix=self._header)
        # Same records as fastavro's schemaless_reader, ~1.8x faster (schemas/fastreader.py).
        self._read = compile_reader(self._reader_schema)
        #: Readers of this schema's earlier versions (``schemas/history``), by their fingerprint.
        self._earlier_readers = {fp: _upgrading_reader(old, self._reader_schema)
                                 for fp, old in _earlier_versions(name)}
        #: Fingerprints of this schema's earlier versions (``schemas/history``): their records decode too.
        self.earlier_fingerprints: frozenset[bytes] = frozenset(self._earlier_readers)

    @classmethod
    def for_record(cls, name: str) -> Codec:
        """The shared codec of schema ``name`` (file stem in ``SCHEMA_DIR``)."""
        return _codec(name)

    def __repr__(self) -> str:
        return f"Codec({self.name!r}, fingerprint={self.fingerprint.hex()})"

    def encode(self, record: dict[str, Any], validated: bool = True) -> bytes:
        """Validate ``record`` and return its single-object encoding.

        Missing fields take their schema default (nullable fields default to null,
        ``extras`` to ``[]``). Raises ``InvalidRecord`` naming the first bad field.
        ``validated=False`` skips the (costly, ~2/3 of encode time) validation: only for
        hot paths whose records are built from already-checked, correctly typed values;
        fastavro's writer would otherwise coerce silently instead of failing.
        """
        if not validated:
            return self._write(record)
        try:
            validate(record, self.schema, raise_errors=True)
        except ValidationError as exc:
            raise self._invalid(exc) from None
        except (ValueError, TypeError) as exc:  # e.g. a decimal with more places than the scale
            field = self._blame(record)
            raise InvalidRecord(f"invalid {self.name} record: field {field}: {exc}", field) from exc
        return self._write(record)

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode a message written with exactly this schema.

        Raises ``BadMarker``, ``SchemaMismatch`` (another of our schemas),
        ``UnknownFingerprint``, or ``CodecError`` for a corrupt or over-long body.
        """
        read = self._read
        if not data.startswith(self._header):
            read = self._earlier_readers.get(bytes(data[2:HEADER_LEN]))  # type: ignore[assignment]
            if read is None:
                _check_header(data)  # raises the precise error
                other = _by_fingerprint()[data[2:HEADER_LEN]].name
                raise SchemaMismatch(f"expected a {self.name} message, got a {other} message")
        try:
            record, end = read(data, HEADER_LEN)
        except Exception as exc:  # fastreader raises ValueError for truncated/corrupt bodies
            raise CodecError(f"corrupt {self.name} body: {exc!r}") from exc
        if end != len(data):
            raise CodecError(f"corrupt {self.name} body: {len(data) - end} trailing bytes")
        return record

    def _invalid(self, exc: ValidationError) -> InvalidRecord:
        # Report types only, never values: bodies can be large and fields can hold secrets.
        first = exc.errors[0]
        field = first.field.removeprefix(f"{NAMESPACE}.")
        expected = " | ".join(_type_label(e.schema) for e in exc.errors if e.field == first.field)
        got = "missing/null" if first.datum is None else type(first.datum).__name__
        return InvalidRecord(f"invalid {self.name} record: field {field}: expected {expected}, got {got}", field)

    def _blame(self, record: dict[str, Any]) -> str | None:
        """Find the top-level field behind an error fastavro raised without naming one."""
        for field in self.schema["fields"]:
            value = record.get(field["name"], field.get("default"))
            try:
                validate(value, field["type"], raise_errors=True)
            except UnknownType:  # refers to a named type defined elsewhere; cannot be checked alone
                continue
            except (ValidationError, ValueError, TypeError):
                return f"{self.name}.{field['name']}"
        return None


def _check_header(data: bytes) -> None:
    """Raise ``BadMarker``/``UnknownFingerprint`` unless ``data`` starts with one of our headers."""
    if len(data) < HEADER_LEN or data[:2] != MARKER:
        raise BadMarker(f"not Avro single-object encoded (starts with {bytes(data[:2]).hex() or 'nothing'})")
    if data[2:HEADER_LEN] not in _by_fingerprint():
        raise UnknownFingerprint(f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}")


def decode_any(data: bytes) -> tuple[str, dict[str, Any]]:
    """Decode a message of any of our schemas, chosen by its fingerprint: ``(schema_name, record)``."""
    _check_header(data)
    codec = _by_fingerprint()[data[2:HEADER_LEN]]
    return codec.name, codec.decode(data)


@cache
def _codec(name: str) -> Codec:
    return Codec(name)


@cache
def _by_fingerprint() -> dict[bytes, Codec]:
    found: dict[bytes, Codec] = {}
    for codec in map(_codec, schema_names()):
        found[codec.fingerprint] = codec
        found.update(dict.fromkeys(codec.earlier_fingerprints, codec))
    return found


def _earlier_versions(name: str) -> list[tuple[bytes, Any]]:
    """``(fingerprint, parsed schema)`` of each ``schemas/history/<name>.<n>.avsc``: earlier versions of a schema.

    Why: a message keeps its writer's fingerprint for as long as the topic keeps it, so
    after a compatible change records written before an upgrade must still decode. Only
    changes that Avro schema resolution reads into the current schema without loss
    belong there: an enum symbol appended, a field added with a default (e.g. the
    Conversion payout fields, ``Conversion.1.avsc``). ``tests/schemas/test_codec.py``
    decodes a record written with each one and compares with fastavro's resolution.
    History files are self-contained (every named type written out).
    """
    out = []
    for path in sorted((SCHEMA_DIR / "history").glob(f"{name}.*.avsc")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        schema = parse_schema(raw, named_schemas={})
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        out.append((fp, parse_schema(_drop_timestamp_logical_type(raw), named_schemas={})))
    return out


def _upgrading_reader(writer: Any, reader: Any) -> Any:
    """A compiled reader of records written with ``writer`` that returns them in ``reader``'s shape.

    Avro resolution for the changes history files may hold: fields are matched by name,
    a field the writer did not have takes its default (copied), a field the reader no
    longer has is dropped, fields come out in the reader's order.
    """
    read_old = compile_reader(writer)
    old_names = [f["name"] for f in writer["fields"]]
    new_fields = [(f["name"], f.get("default")) for f in reader["fields"]]
    missing = [(n, d) for n, d in new_fields if n not in old_names]
    if [n for n, _ in new_fields] == old_names:
        return read_old
    for n, d in missing:
        if not any(f["name"] == n and "default" in f for f in reader["fields"]):
            raise CodecError(f"{reader['name']}.{n} has no default: records of an earlier version cannot be read")

    def read(data: bytes, pos: int = 0) -> tuple[dict[str, Any], int]:
        record, end = read_old(data, pos)
        return {n: record[n] if n in record else copy.deepcopy(d) for n, d in new_fields}, end

    return read
