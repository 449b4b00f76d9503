"""Schema-compiled Avro binary encoder, byte-identical to ``fastavro.schemaless_writer``.

``fastavro.schemaless_writer`` interprets the schema for every record (type dispatch,
union matching by validation, a stream object...): on the ingest hot path that is the
single biggest cost. ``compile_writer`` instead generates Python source for one schema
once -- nested records and array items inlined, no per-field dispatch -- and ``exec``s
it. The function it returns encodes one record to ``bytes``: the Avro binary body, with
no single-object header unless ``prefix`` is given.

Output is byte-for-byte what ``schemaless_writer`` writes for the same valid record
(``tests/schemas/test_fastwriter.py`` checks every schema in ``schemas/``):

- long/int: zig-zag varint; ``timestamp-millis`` takes ``int`` epoch ms, or anything
  fastavro's own ``prepare_timestamp_millis`` takes (``datetime``), converted by it;
- string: UTF-8 with varint length; bytes: varint length + raw bytes;
- arrays (and maps): one block ``count, items, 0``; an empty one is a single ``0``;
- unions: branch index then value -- ``None`` selects the ``"null"`` branch;
- enums: symbol index; boolean: one byte;
- ``decimal`` on bytes: two's-complement big-endian unscaled value of
  ``(bit_length + 8) // 8`` bytes, rescaled to the schema scale, with fastavro's checks
  (too many digits or places -> ``ValueError``);
- other logical types go through fastavro's own ``LOGICAL_WRITERS`` functions;
- a field missing from the record takes its schema default (``None`` for a nullable
  field without one); a missing required field raises ``KeyError``.

It is meant for records the caller built itself with correctly typed values: it does not
validate. Wrong types fail loudly rather than being coerced as fastavro does
(``TypeError``/``ValueError``: a float for a long, a str for bytes, an unknown enum
symbol, a long outside 64 bits), though a few mistakes (e.g. a truthy string for a
boolean) pass, exactly as they do with fastavro.

Unions other than a two-branch ``["null", X]`` / ``[X, "null"]`` are not supported
(``NotImplementedError`` at compile time; none of our schemas has one).
"""

from __future__ import annotations

import decimal
import itertools
import struct
from decimal import Decimal
from typing import Any, Callable

from fastavro import parse_schema
from fastavro.logical_writers import LOGICAL_WRITERS

__all__ = ["LEN_LIMIT", "compile_writer", "decimal_to_bytes", "encode_long", "generate_source"]

# -- varints --------------------------------------------------------------------------
# Zig-zag values below 2**14 come from V14 (one or two bytes). Longer varints are built
# from 14-bit chunks: C14[x] is the two-byte, continuation-flagged encoding of a 14-bit
# chunk. Epoch milliseconds (~2**41 after zig-zag) take three lookups, no loop. The two
# tables hold 32768 small bytes objects (~1.5 MB), built once at import.

#: Varint (already zig-zagged) of 0 .. 2**14 - 1.
V14: list[bytes] = [bytes((x,)) if x < 0x80 else bytes((x & 0x7F | 0x80, x >> 7)) for x in range(0x4000)]
#: Two varint bytes, both with the continuation bit, for a 14-bit chunk.
C14: list[bytes] = [bytes((x & 0x7F | 0x80, x >> 7 | 0x80)) for x in range(0x4000)]
#: Varint of a *non-negative* length/count n < 2**13 (zig-zag of n is 2n): LEN[n].
LEN: list[bytes] = V14[::2]
LEN_LIMIT = len(LEN)

_LONG_MIN = -(1 << 63)
_LONG_MAX = (1 << 63) - 1


def _varint_big(n: int) -> bytes:
    """Zig-zag varint of a long whose zig-zag value is >= 2**42 (rare: |n| >= 2**41)."""
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit in an Avro long (64 bits)")
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_long(n: int) -> bytes:
    """Zig-zag varint of one long (the generated code inlines the same steps)."""
    z = (n << 1) ^ (n >> 63)
    if z < 0x4000:
        return V14[z]
    if z < 0x10000000:
        return C14[z & 0x3FFF] + V14[z >> 14]
    if z < 0x40000000000:
        return C14[z & 0x3FFF] + C14[z >> 14 & 0x3FFF] + V14[z >> 28]
    return _varint_big(n)


def _len_big(n: int) -> bytes:
    """Varint of a length or count >= 2**13."""
    return encode_long(n)


# -- helpers called by the generated code ----------------------------------------------


def decimal_to_bytes(value: Any, precision: int, scale: int) -> Any:
    """fastavro's ``prepare_bytes_decimal``: same bytes, same errors; non-Decimals pass through."""
    if not isinstance(value, Decimal):
        return value
    shape = value.as_tuple()
    if len(shape.digits) > precision:
        raise ValueError("The decimal precision is bigger than allowed by schema")
    if shape.exponent + scale < 0:
        raise ValueError("Scale provided in schema does not match the decimal")
    # Exact: at most `precision` digits, shifted by a context that never rounds.
    unscaled = int(value.scaleb(scale, _EXACT))
    return unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)


_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


class _AnyLength:
    """``LEN`` of the fallback writer: ``LEN[n]`` for any n, not only n < ``LEN_LIMIT``."""

    __slots__ = ()

    def __getitem__(self, n: int) -> bytes:
        return LEN[n] if n < LEN_LIMIT else encode_long(n)


def _bad_enum(name: str, value: Any) -> bytes:
    raise ValueError(f"{value!r} is not a symbol of enum {name}")


def _bad_fixed(name: str, value: Any, size: int) -> None:
    raise ValueError(f"{name}: fixed of size {size}, got {len(value)} bytes")


_PACK_FLOAT = struct.Struct("<f").pack
_PACK_DOUBLE = struct.Struct("<d").pack

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_COMPLEX = frozenset({"record", "error", "enum", "array", "map", "fixed"})


# -- code generation ---------------------------------------------------------------------
#
# The generated function collects the encoding as a list of byte strings ("parts") and
# joins them once. Straight-line fields become expressions ("pending parts") gathered
# into a single ``o = [...]`` / ``o += (...)``; only arrays, maps and unions of such
# need their own appends. Lengths and counts are looked up in ``LEN`` without a bounds
# check: a string of 8 KiB or more, or an array of 8192+ items, raises IndexError,
# and the writer re-runs the record with a second instance of the same code whose
# ``LEN`` accepts any length. (``bytes`` fields -- request bodies can be large -- are
# checked inline instead.)


class _Block:
    """Statements at one indentation level plus the parts not yet appended to ``o``."""

    def __init__(self, indent: str, top: bool = False) -> None:
        self.ind = indent
        self.top = top
        self.lines: list[str] = []
        self.parts: list[str] = []
        self.appends = False  # does this block append to ``o`` itself?

    def stmt(self, line: str) -> None:
        self.lines.append(self.ind + line)


class _Generator:
    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.consts: dict[str, Any] = {}
        self._counter = itertools.count()
        self.record_funcs: dict[str, str] = {}  # recursive record fullname -> function name
        self._pending: list[str] = []
        self._o_created = False

    # names ---------------------------------------------------------------------------------
    def var(self, stem: str = "v") -> str:
        return f"{stem}{next(self._counter)}"

    def const(self, value: Any, stem: str) -> str:
        name = self.var(stem)
        self.consts[name] = value
        return name

    def bind(self, expr: str, blk: _Block) -> str:
        """A local variable holding ``expr`` (``expr`` itself when it already is one)."""
        if expr.isidentifier():
            return expr
        v = self.var()
        blk.stmt(f"{v} = {expr}")
        return v

    def resolve(self, schema: Any) -> Any:
        return resolve_named(self.named, schema)

    def kind(self, schema: Any) -> Any:
        schema = self.resolve(schema)
        return schema["type"] if isinstance(schema, dict) else schema

    # flushing ------------------------------------------------------------------------------
    def flush(self, blk: _Block) -> None:
        """Append the block's pending parts to ``o`` (creating ``o`` at the top level)."""
        parts, blk.parts = blk.parts, []
        if blk.top and not self._o_created:
            blk.stmt(f"o = [{', '.join(parts)}]")
            self._o_created = True
        elif len(parts) == 1:
            blk.stmt(f"o.append({parts[0]})")
        elif parts:
            blk.stmt(f"o += ({', '.join(parts)})")
        blk.appends = True

    # emitters ------------------------------------------------------------------------------
    def emit(self, schema: Any, expr: str, blk: _Block, stack: tuple[str, ...]) -> None:
        """Emit code appending the encoding of ``expr`` (a primary expression) under ``schema``."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return self._union(schema, expr, blk, stack)
        if isinstance(schema, str):
            kind, logical, node = schema, None, {"type": schema}
        else:
            kind, logical, node = schema["type"], schema.get("logicalType"), schema

        if logical == "timestamp-millis" and kind == "long":
            v = self.bind(expr, blk)
            prep = self.const(LOGICAL_WRITERS["long-timestamp-millis"], "_prep")
            blk.stmt("try:")
            blk.stmt(f"    z = ({v} << 1) ^ ({v} >> 63)")
            blk.stmt("except TypeError:")  # a datetime: fastavro's own conversion
            blk.stmt(f"    {v} = {prep}({v}, None)")
            blk.stmt(f"    z = ({v} << 1) ^ ({v} >> 63)")
            return self._varint_z(v, blk)
        if logical == "decimal" and kind == "bytes":
            precision, scale = int(node["precision"]), int(node.get("scale", 0))
            return self._bytes(f"_decimal({expr}, {precision}, {scale})", blk)
        if logical is not None:
            prep = LOGICAL_WRITERS.get(f"{kind}-{logical}")
            if prep is not None:
                expr = f"{self.const(prep, '_prep')}({expr}, {self.const(node, 'S')})"

        if kind == "string":
            s = self.var("s")
            blk.stmt(f"{s} = {expr}.encode()")
            blk.parts += [f"LEN[len({s})]", s]
        elif kind == "long" or kind == "int":
            v = self.bind(expr, blk)
            blk.stmt(f"z = ({v} << 1) ^ ({v} >> 63)")
            self._varint_z(v, blk)
        elif kind == "bytes":
            self._bytes(expr, blk)
        elif kind == "boolean":
            blk.parts.append(f"(b'\\x01' if {expr} else b'\\x00')")
        elif kind == "null":
            pass
        elif kind == "float":
            blk.parts.append(f"_pack_float({expr})")
        elif kind == "double":
            blk.parts.append(f"_pack_double({expr})")
        elif kind == "enum":
            v = self.bind(expr, blk)
            table = self.const({s: encode_long(i) for i, s in enumerate(node["symbols"])}, "E")
            blk.parts.append(f"({table}.get({v}) or _bad_enum({node['name']!r}, {v}))")
        elif kind == "fixed":
            v = self.bind(expr, blk)
            size = int(node["size"])
            blk.stmt(f"if len({v}) != {size}:")
            blk.stmt(f"    _bad_fixed({node['name']!r}, {v}, {size})")
            blk.parts.append(v)
        elif kind == "array" or kind == "map":
            self._repeated(node, kind, expr, blk, stack)
        elif kind == "record" or kind == "error":
            name = node["name"]
            if name in stack:  # recursive type: call its own function instead of inlining forever
                blk.parts.append(f"{self.record_func(name)}({expr})")
            else:
                self._fields(node, expr, blk, stack + (name,))
        else:
            raise NotImplementedError(f"Avro type {kind!r} is not supported by compile_writer")

    def _fields(self, node: dict[str, Any], expr: str, blk: _Block, stack: tuple[str, ...]) -> None:
        r = self.bind(expr, blk)
        for field in node["fields"]:
            name, ftype = field["name"], field["type"]
            if "default" in field:
                default = field["default"]
                value = f"{r}.get({name!r})" if default is None else f"{r}.get({name!r}, {self.const(default, 'D')})"
            elif _nullable(self.resolve(ftype)):  # fastavro writes null for a missing nullable field
                value = f"{r}.get({name!r})"
            else:
                value = f"{r}[{name!r}]"
            if ftype == "float" or ftype == "double":  # fastavro converts these record fields
                value = f"float({value})"
            self.emit(ftype, value, blk, stack)

    def _repeated(self, node: dict[str, Any], kind: str, expr: str, blk: _Block, stack: tuple[str, ...]) -> None:
        """An array or map, as fastavro writes them: one block ``count, items, 0`` (just ``0`` if empty)."""
        a = self.bind(expr, blk)
        self.flush(blk)
        body = _Block(blk.ind + "        ")
        if kind == "array":
            item = self.var("i")
            loop = f"for {item} in {a}:"
            self.emit(node["items"], item, body, stack)
        else:
            key, val = self.var("k"), self.var("m")
            loop = f"for {key}, {val} in {a}.items():"
            self.emit("string", key, body, stack)
            self.emit(node["values"], val, body, stack)
        self.flush(body)
        if not body.lines:
            body.stmt("pass")
        blk.stmt(f"if {a}:")
        blk.stmt(f"    o.append(LEN[len({a})])")
        blk.stmt(f"    {loop}")
        blk.lines += body.lines
        blk.parts.append("b'\\x00'")

    def _union(self, branches: list[Any], expr: str, blk: _Block, stack: tuple[str, ...]) -> None:
        kinds = [self.kind(b) for b in branches]
        if len(branches) == 1:
            blk.parts.append("b'\\x00'")
            return self.emit(branches[0], expr, blk, stack)
        if len(branches) != 2 or "null" not in kinds:
            raise NotImplementedError(f"only [null, X] unions are supported, got {branches!r}")
        null_index = kinds.index("null")
        v = self.bind(expr, blk)
        other = _Block(blk.ind + "    ")
        other.parts.append(repr(encode_long(1 - null_index)))
        self.emit(branches[1 - null_index], v, other, stack)
        if not other.appends:
            # Straight-line value: both branches set the same number of part variables.
            names = [self.var("u") for _ in other.parts]
            nulls = [repr(encode_long(null_index))] + ["b''"] * (len(names) - 1)
            blk.stmt(f"if {v} is None:")
            blk.stmt(f"    {', '.join(names)} = {', '.join(nulls)}")
            blk.stmt("else:")
            blk.lines += other.lines
            blk.stmt(f"    {', '.join(names)} = {', '.join(other.parts)}")
            blk.parts += names
            return
        self.flush(blk)
        self.flush(other)
        blk.stmt(f"if {v} is None:")
        blk.stmt(f"    o.append({encode_long(null_index)!r})")
        blk.stmt("else:")
        blk.lines += other.lines

    def _varint_z(self, v: str, blk: _Block) -> None:
        """Parts for the varint of ``z`` (the zig-zag of ``v``, just computed)."""
        t1, t2, t3 = self.var("t"), self.var("t"), self.var("t")
        blk.stmt("if z < 0x4000:")
        blk.stmt(f"    {t1}, {t2}, {t3} = V14[z], b'', b''")
        blk.stmt("elif z < 0x10000000:")
        blk.stmt(f"    {t1}, {t2}, {t3} = C14[z & 0x3FFF], V14[z >> 14], b''")
        blk.stmt("elif z < 0x40000000000:")
        blk.stmt(f"    {t1}, {t2}, {t3} = C14[z & 0x3FFF], C14[z >> 14 & 0x3FFF], V14[z >> 28]")
        blk.stmt("else:")
        blk.stmt(f"    {t1}, {t2}, {t3} = _varint_big({v}), b'', b''")
        blk.parts += [t1, t2, t3]

    def _bytes(self, expr: str, blk: _Block) -> None:
        b, n = self.var("b"), self.var("n")
        blk.stmt(f"{b} = {expr}")
        blk.stmt(f"{n} = len({b})")
        blk.parts += [f"(LEN_TABLE[{n}] if {n} < {LEN_LIMIT} else _len_big({n}))", b]

    # functions -----------------------------------------------------------------------------
    def record_func(self, name: str) -> str:
        """Name of the standalone function of a recursive record (generated by ``build``)."""
        if name not in self.record_funcs:
            self.record_funcs[name] = self.var("_rec")
            self._pending.append(name)
        return self.record_funcs[name]

    def function(self, fname: str, schema: Any, prefix: bytes, stack: tuple[str, ...], entry: bool) -> list[str]:
        self._o_created = False
        ind = "            " if entry else "        "
        blk = _Block(ind, top=True)
        if prefix:
            blk.parts.append(self.const(prefix, "P"))
        if stack:  # the function of a recursive record: its fields, inlined
            self._fields(schema, "d", blk, stack)
        else:
            self.emit(schema, "d", blk, stack)
        if self._o_created:
            self.flush(blk)
            blk.stmt("return _join(o)")
        else:
            blk.stmt(f"return _join(({', '.join(blk.parts)},))" if blk.parts else "return b''")
        if not entry:
            return [f"    def {fname}(d):", *blk.lines]
        label = self.const(_schema_label(schema), "L")
        return [
            f"    def {fname}(d):",
            "        try:",
            *blk.lines,
            "        except IndexError:  # a length or count >= LEN_LIMIT: rerun with the any-length LEN",
            "            if _fallback is None:",
            "                raise",
            "            return _fallback(d)",
            "        except AttributeError as exc:  # .encode() of a non-str, .get() of a non-mapping",
            f"            raise TypeError(f'value does not match the {{{label}}} schema: {{exc}}') from exc",
        ]

    def build(self, schema: Any, prefix: bytes) -> tuple[str, dict[str, Any]]:
        funcs = self.function("write", schema, prefix, (), entry=True)
        done: set[str] = set()
        while self._pending:
            name = self._pending.pop()
            if name not in done:
                done.add(name)
                funcs += self.function(self.record_funcs[name], self.named[name], b"", (name,), entry=False)
        env = {
            "V14": V14,
            "C14": C14,
            "LEN_TABLE": LEN,
            "_len_big": _len_big,
            "_varint_big": _varint_big,
            "_decimal": decimal_to_bytes,
            "_bad_enum": _bad_enum,
            "_bad_fixed": _bad_fixed,
            "_pack_float": _PACK_FLOAT,
            "_pack_double": _PACK_DOUBLE,
            "_join": b"".join,
            **self.consts,
        }
        # Everything the functions use is a closure variable of a factory: fast lookups, and
        # the writer takes exactly one argument. ``LEN`` and ``_fallback`` vary per instance.
        names = sorted(env)
        source = "\n".join(
            [f"def _factory(LEN, _fallback, {', '.join(names)}):", *funcs, "    return write", ""]
        )
        return source, env


def resolve_named(named: dict[str, Any], schema: Any) -> Any:
    """Replace a reference to a named type (``"ns.Name"`` or ``{"type": "ns.Name"}``) by its definition.

    Shared by the compiled writer and reader (schemas/fastreader.py).
    """
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        try:
            return named[schema]
        except KeyError:
            raise ValueError(f"unknown named type {schema!r}") from None
    if isinstance(schema, dict):
        kind = schema.get("type")
        if isinstance(kind, (dict, list)) or (
            isinstance(kind, str) and kind not in _PRIMITIVES and kind not in _COMPLEX
        ):
            return resolve_named(named, kind)
    return schema


def _nullable(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(b == "null" or (isinstance(b, dict) and b.get("type") == "null") for b in schema)
    return schema == "null"


def _collect_named(schema: Any, named: dict[str, Any]) -> None:
    """Record every named type defined in ``schema`` (for schemas without ``__named_schemas``)."""
    if isinstance(schema, list):
        for branch in schema:
            _collect_named(branch, named)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in _COMPLEX and "name" in schema:
            named.setdefault(schema["name"], schema)
        if isinstance(kind, (dict, list)):
            _collect_named(kind, named)
        for field in schema.get("fields", ()):
            _collect_named(field["type"], named)
        if "items" in schema:
            _collect_named(schema["items"], named)
        if "values" in schema:
            _collect_named(schema["values"], named)


def generate_source(parsed_schema: Any, prefix: bytes = b"") -> tuple[str, dict[str, Any]]:
    """The Python source ``compile_writer`` executes, and its closure values (for debugging)."""
    named: dict[str, Any] = {}
    if isinstance(parsed_schema, dict) and "__fastavro_parsed" in parsed_schema:
        named.update(parsed_schema.get("__named_schemas", {}))
    else:  # a raw schema: parse it (names get qualified) and learn its named types
        parsed_schema = parse_schema(parsed_schema, named_schemas=named)
    _collect_named(parsed_schema, named)
    return _Generator(named).build(parsed_schema, bytes(prefix))


def compile_writer(parsed_schema: dict[str, Any], prefix: bytes = b"") -> Callable[[dict[str, Any]], bytes]:
    """Compile ``parsed_schema`` (fastavro-parsed, e.g. ``Codec.for_record(name).schema``)
    into ``write(record) -> bytes``, the Avro binary encoding of one record, byte-identical
    to ``fastavro.schemaless_writer``. ``prefix`` (e.g. the single-object header) is
    written first, saving a concatenation.
    """
    source, env = generate_source(parsed_schema, prefix)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<fastwriter {_schema_label(parsed_schema)}>", "exec"), namespace)
    factory = namespace["_factory"]
    fallback = factory(LEN=_AnyLength(), _fallback=None, **env)
    write = factory(LEN=LEN, _fallback=fallback, **env)
    write.__doc__ = f"Avro binary encoding of one {_schema_label(parsed_schema)} record."
    return write


def _schema_label(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("type"))
    return str(schema)
