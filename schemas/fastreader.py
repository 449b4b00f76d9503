"""Schema-compiled Avro binary decoder, returning exactly what ``fastavro.schemaless_reader`` returns.

The counterpart of ``schemas/fastwriter.py``: ``fastavro.schemaless_reader`` interprets
the schema for every record (type dispatch, a stream object, one ``read`` call per
varint byte...), which is most of the CPU of our sinks. ``compile_reader`` generates
Python source for one schema once -- nested records and array items inlined, varints
decoded inline from the ``bytes`` with a one-byte fast path -- and ``exec``s it. The
function it returns decodes one record from ``data`` starting at offset ``pos`` and
returns ``(record, end_offset)``.

For valid data the record is equal, with the same types and the same ``repr``, to what
``schemaless_reader(BytesIO(data[pos:]), schema)`` returns for the same (reader ==
writer) schema (``tests/schemas/test_fastreader.py`` checks every schema in ``schemas/``):

- long/int: zig-zag varint -> ``int``; string -> ``str`` (strict UTF-8); bytes -> ``bytes``;
- boolean: one byte, anything but 0 is ``True`` (as fastavro); null -> ``None``;
- enums: the symbol ``str``; unions ``[null, X]`` / ``[X, null]`` / ``[X]``;
- arrays and maps: any number of blocks, negative block counts (followed by a block
  byte size) included, as the spec allows;
- ``decimal`` on bytes: the big-endian two's-complement unscaled value, as
  ``Decimal(unscaled).scaleb(-scale)`` in a context of the schema's precision -- the
  same value and representation as fastavro (``Decimal('19.990000')`` for scale 6);
- other logical types go through fastavro's own ``LOGICAL_READERS`` functions (with
  ``Codec``'s plain-timestamps reader schema, ``timestamp-millis`` fields stay ``int``).

Corrupt or truncated input always raises ``ValueError`` (never hangs, never allocates
more than the input's size): lengths are checked against ``len(data)`` before slicing,
negative lengths and varints longer than 64 bits are refused, block counts are checked
against the bytes left (each item takes at least one byte, or a total cap for items that
may take none), an out-of-range enum or union index is an error (fastavro wraps a
negative enum index around), and a decimal far longer than its precision allows is
refused rather than converted. Every other exception raised while decoding (truncation
``IndexError``, bad UTF-8, ``struct.error``, a too deeply nested recursive record...)
is re-raised as ``ValueError`` naming the offset.

Unions other than a two-branch ``["null", X]`` / ``[X, "null"]`` (or a single branch)
are not supported (``NotImplementedError`` at compile time; none of our schemas has one).
"""

from __future__ import annotations

import decimal
import itertools
import struct
from decimal import Decimal
from typing import Any, Callable

from fastavro import parse_schema
from fastavro.read import LOGICAL_READERS

from schemas.fastwriter import _collect_named, _schema_label, resolve_named

__all__ = ["ZERO_SIZE_ITEM_LIMIT", "compile_reader", "generate_source"]

#: Most items an array/map of items that may encode to zero bytes (e.g. ``null``) may hold.
ZERO_SIZE_ITEM_LIMIT = 1 << 20

# -- tables used by the generated code --------------------------------------------------

#: Zig-zag decoding of a one-byte varint (byte < 0x80).
ZZ: tuple[int, ...] = tuple((b >> 1) ^ -(b & 1) for b in range(0x80))
#: Length/count of a one-byte varint; an odd byte (a negative value) maps to a length no
#: input can hold, so the bounds check that follows refuses it.
_HUGE = 1 << 64
LEN1: tuple[int, ...] = tuple(_HUGE if b & 1 else b >> 1 for b in range(0x80))

_MASK64 = (1 << 64) - 1
_UNPACK_FLOAT = struct.Struct("<f").unpack_from
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from


# -- helpers called by the generated code (only on errors) --------------------------------


def _bad_varint() -> None:
    raise ValueError("varint longer than 64 bits")


def _bad_length(n: Any, left: int) -> None:
    if n >= _HUGE or n < 0:
        raise ValueError("negative length or count")
    raise ValueError(f"length or count {n} exceeds the {left} bytes left")


def _bad_index(what: str, index: int) -> None:
    raise ValueError(f"{what}: index {index} out of range")


def _bad_decimal(n: int, limit: int) -> None:
    raise ValueError(f"decimal of {n} bytes, more than its precision allows ({limit})")


def _too_many_items(n: int) -> None:
    raise ValueError(f"more than {ZERO_SIZE_ITEM_LIMIT} items of zero size ({n})")


def _decimal_bytes_limit(precision: int) -> int:
    """Most bytes a writer can use for ``precision`` digits, with generous slack
    (fastavro writes ``(bit_length + 8) // 8``; Java the minimal two's complement)."""
    return ((10**precision).bit_length() + 8) // 8 + 8


# -- code generation ---------------------------------------------------------------------
#
# The generated function keeps the input in ``data`` (bytes), its length in ``L`` and
# the offset in ``p``. Every value is decoded into a local; a record becomes a dict
# display of its field locals (evaluated once they are all decoded), so straight-line
# records cost one BUILD_CONST_KEY_MAP. Varints take one table lookup when they fit in a
# byte, an inline loop otherwise. ``data[p]`` past the end raises IndexError; slices are
# bounds-checked explicitly (a slice past the end would silently come back short).


class _Block:
    """Statements at one indentation level."""

    def __init__(self, indent: str) -> None:
        self.ind = indent
        self.lines: list[str] = []

    def stmt(self, line: str) -> None:
        self.lines.append(self.ind + line)

    def sub(self) -> _Block:
        return _Block(self.ind + "    ")

    def add(self, other: _Block) -> None:
        self.lines += other.lines


class _Generator:
    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.consts: dict[str, Any] = {}
        self._counter = itertools.count()
        self.record_funcs: dict[str, str] = {}  # recursive record fullname -> function name
        self._pending: list[str] = []

    # names ---------------------------------------------------------------------------------
    def var(self, stem: str = "v") -> str:
        return f"{stem}{next(self._counter)}"

    def const(self, value: Any, stem: str) -> str:
        name = self.var(stem)
        self.consts[name] = value
        return name

    def resolve(self, schema: Any) -> Any:
        return resolve_named(self.named, schema)

    def kind(self, schema: Any) -> Any:
        schema = self.resolve(schema)
        return schema["type"] if isinstance(schema, dict) else schema

    def min_size(self, schema: Any, stack: tuple[str, ...] = ()) -> int:
        """Fewest bytes a value of ``schema`` encodes to (bounds array counts)."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return 1  # the branch index
        kind = schema if isinstance(schema, str) else schema["type"]
        if kind == "null":
            return 0
        if kind == "float":
            return 4
        if kind == "double":
            return 8
        if kind == "fixed":
            return int(schema["size"])
        if kind in ("record", "error"):
            if schema["name"] in stack:
                return 0
            return sum(self.min_size(f["type"], stack + (schema["name"],)) for f in schema["fields"])
        return 1  # boolean, int, long, bytes, string, enum, array, map: at least one byte

    # primitives ----------------------------------------------------------------------------
    def _varint(self, target: str, blk: _Block, table: str = "ZZ") -> None:
        """Decode the varint at ``p`` into ``target``: zig-zag signed (``ZZ``), or a
        non-negative length/count (``LEN1``: negative ones come out as 2**64).

        One byte: a table lookup. Longer: an inline loop (measured faster here than
        unrolling into a helper or decoding 8 bytes at once with bit tricks on big ints).
        """
        blk.stmt("b = data[p]")
        blk.stmt("p += 1")
        blk.stmt("if b < 0x80:")
        blk.stmt(f"    {target} = {table}[b]")
        blk.stmt("else:")
        blk.stmt("    z = b & 0x7F")
        blk.stmt("    s = 7")
        blk.stmt("    while True:")
        blk.stmt("        b = data[p]")
        blk.stmt("        p += 1")
        blk.stmt("        z |= (b & 0x7F) << s")
        blk.stmt("        if b < 0x80:")
        blk.stmt("            break")
        blk.stmt("        s += 7")
        blk.stmt("        if s > 63:")
        blk.stmt("            _bad_varint()")
        blk.stmt("    if z > _MASK64:")
        blk.stmt("        _bad_varint()")
        if table == "ZZ":
            blk.stmt(f"    {target} = (z >> 1) ^ -(z & 1)")
        else:
            blk.stmt(f"    {target} = _HUGE if z & 1 else z >> 1")

    def _slice(self, blk: _Block) -> str:
        """Read a length and bounds-check it; return the local holding the end offset."""
        n, e = self.var("n"), self.var("e")
        self._varint(n, blk, table="LEN1")
        blk.stmt(f"{e} = p + {n}")
        blk.stmt(f"if {e} > L:")
        blk.stmt(f"    _bad_length({n}, L - p)")
        return e

    # emitters ------------------------------------------------------------------------------
    def emit(self, schema: Any, blk: _Block, stack: tuple[str, ...]) -> str:
        """Emit code decoding one value of ``schema`` at ``p``; return an expression of it
        (a local, a constant, or a dict display of locals), valid right after the code."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return self._union(schema, blk, stack)
        if isinstance(schema, str):
            kind, logical, node = schema, None, {"type": schema}
        else:
            kind, logical, node = schema["type"], schema.get("logicalType"), schema

        if logical == "decimal" and kind == "bytes":
            precision, scale = int(node["precision"]), int(node.get("scale", 0))
            v = self.var()
            e = self._slice(blk)
            limit = _decimal_bytes_limit(precision)
            ctx = self.const(decimal.Context(prec=precision), "C")
            blk.stmt(f"if {e} - p > {limit}:")
            blk.stmt(f"    _bad_decimal({e} - p, {limit})")
            # As fastavro: the unscaled value in a context of the schema's precision.
            blk.stmt(f"{v} = _Decimal(_from_bytes(data[p:{e}], 'big', signed=True)).scaleb({-scale}, {ctx})")
            blk.stmt(f"p = {e}")
            return v

        value = self._plain(kind, node, blk, stack)
        if logical is not None:
            fn = LOGICAL_READERS.get(f"{kind}-{logical}")
            if fn is not None:
                v = self.var()
                blk.stmt(f"{v} = {self.const(fn, '_logical')}({value}, {self.const(node, 'S')}, {self.const(node, 'S')})")
                return v
        return value

    def _plain(self, kind: str, node: dict[str, Any], blk: _Block, stack: tuple[str, ...]) -> str:
        if kind == "string" or kind == "bytes":
            v = self.var()
            e = self._slice(blk)
            blk.stmt(f"{v} = data[p:{e}].decode()" if kind == "string" else f"{v} = data[p:{e}]")
            blk.stmt(f"p = {e}")
            return v
        if kind == "long" or kind == "int":
            v = self.var()
            self._varint(v, blk)
            return v
        if kind == "boolean":
            v = self.var()
            blk.stmt(f"{v} = data[p] != 0")
            blk.stmt("p += 1")
            return v
        if kind == "null":
            return "None"
        if kind == "float" or kind == "double":
            v = self.var()
            blk.stmt(f"{v} = {'_unpack_float' if kind == 'float' else '_unpack_double'}(data, p)[0]")
            blk.stmt(f"p += {4 if kind == 'float' else 8}")
            return v
        if kind == "enum":
            return self._enum(node, blk)
        if kind == "fixed":
            v, size = self.var(), int(node["size"])
            blk.stmt(f"{v} = data[p:p + {size}]")
            blk.stmt(f"p += {size}")
            blk.stmt("if p > L:")
            blk.stmt(f"    _bad_length({size}, L - p + {size})")
            return v
        if kind == "array" or kind == "map":
            return self._repeated(node, kind, blk, stack)
        if kind == "record" or kind == "error":
            name = node["name"]
            if name in stack:  # recursive type: call its own function instead of inlining forever
                v = self.var()
                blk.stmt(f"{v}, p = {self.record_func(name)}(data, p, L)")
                return v
            return self._fields(node, blk, stack + (name,))
        raise NotImplementedError(f"Avro type {kind!r} is not supported by compile_reader")

    def _fields(self, node: dict[str, Any], blk: _Block, stack: tuple[str, ...]) -> str:
        items = []
        for field in node["fields"]:
            items.append(f"{field['name']!r}: {self.emit(field['type'], blk, stack)}")
        return "{" + ", ".join(items) + "}"

    def _enum(self, node: dict[str, Any], blk: _Block) -> str:
        v = self.var()
        symbols = list(node["symbols"])
        if len(symbols) <= 64:
            # Every valid index is a one-byte varint 2*i: one dict lookup (KeyError otherwise).
            table = self.const({2 * i: s for i, s in enumerate(symbols)}, "E")
            blk.stmt(f"{v} = {table}[data[p]]")
            blk.stmt("p += 1")
            return v
        table = self.const(tuple(symbols), "E")
        self._varint(v, blk)
        blk.stmt(f"if not 0 <= {v} < {len(symbols)}:")
        blk.stmt(f"    _bad_index({node['name']!r}, {v})")
        blk.stmt(f"{v} = {table}[{v}]")
        return v

    def _repeated(self, node: dict[str, Any], kind: str, blk: _Block, stack: tuple[str, ...]) -> str:
        """An array or map: blocks ``count, items`` until a zero count; a negative count
        is followed by the block's byte size (ignored)."""
        a, c = self.var("a"), self.var("c")
        item_schema = node["items"] if kind == "array" else node["values"]
        least = self.min_size(item_schema, stack) + (1 if kind == "map" else 0)
        blk.stmt(f"{a} = {'[]' if kind == 'array' else '{}'}")
        total = None
        if least == 0:
            total = self.var("t")
            blk.stmt(f"{total} = 0")
        blk.stmt("while True:")
        loop = blk.sub()
        self._varint(c, loop)
        loop.stmt(f"if {c} == 0:")
        loop.stmt("    break")
        loop.stmt(f"if {c} < 0:")
        loop.stmt(f"    {c} = -{c}")
        size_blk = loop.sub()
        self._varint(self.var("bs"), size_blk)
        loop.add(size_blk)
        if least == 0:
            loop.stmt(f"{total} += {c}")
            loop.stmt(f"if {total} > {ZERO_SIZE_ITEM_LIMIT}:")
            loop.stmt(f"    _too_many_items({total})")
        elif least == 1:
            loop.stmt(f"if {c} > L - p:")
            loop.stmt(f"    _bad_length({c}, L - p)")
        else:
            loop.stmt(f"if {c} * {least} > L - p:")
            loop.stmt(f"    _bad_length({c}, L - p)")
        loop.stmt(f"for _ in range({c}):")
        body = loop.sub()
        if kind == "array":
            item = self.emit(item_schema, body, stack)
            body.stmt(f"{a}.append({item})")
        else:
            key = self.emit("string", body, stack)
            val = self.emit(item_schema, body, stack)
            body.stmt(f"{a}[{key}] = {val}")
        loop.add(body)
        blk.add(loop)
        return a

    def _union(self, branches: list[Any], blk: _Block, stack: tuple[str, ...]) -> str:
        kinds = [self.kind(b) for b in branches]
        u = self.var("u")
        if len(branches) == 1:
            blk.stmt("if data[p] != 0:")
            blk.stmt("    _bad_index('union', data[p])")
            blk.stmt("p += 1")
            return self.emit(branches[0], blk, stack)
        if len(branches) != 2 or "null" not in kinds:
            raise NotImplementedError(f"only [null, X] unions are supported, got {branches!r}")
        null_index = kinds.index("null")
        other = blk.sub()
        other.stmt(f"{u} = {self.emit(branches[1 - null_index], other, stack)}")
        blk.stmt("b = data[p]")
        blk.stmt("p += 1")
        blk.stmt(f"if b == {2 * (1 - null_index)}:")
        blk.add(other)
        blk.stmt(f"elif b == {2 * null_index}:")
        blk.stmt(f"    {u} = None")
        blk.stmt("else:")
        blk.stmt("    _bad_index('union', b)")
        return u

    # functions -----------------------------------------------------------------------------
    def record_func(self, name: str) -> str:
        """Name of the standalone function of a recursive record (generated by ``build``)."""
        if name not in self.record_funcs:
            self.record_funcs[name] = self.var("_rec")
            self._pending.append(name)
        return self.record_funcs[name]

    def function(self, fname: str, schema: Any, stack: tuple[str, ...], entry: bool) -> list[str]:
        blk = _Block("            " if entry else "        ")
        if stack:  # the function of a recursive record: its fields, inlined
            value = self._fields(schema, blk, stack)
        else:
            value = self.emit(schema, blk, stack)
        blk.stmt(f"return {value}, p")
        if not entry:
            return [f"    def {fname}(data, p, L):", *blk.lines]
        label = self.const(_schema_label(schema), "L")
        return [
            f"    def {fname}(data, pos=0):",
            "        if type(data) is not bytes:",
            "            data = bytes(data)",
            "        L = len(data)",
            "        p = pos",
            "        if not 0 <= p <= L:",
            "            raise ValueError(f'offset {p} outside the {L} bytes of data')",
            "        try:",
            *blk.lines,
            "        except ValueError:",
            "            raise",
            "        except IndexError as exc:",
            f"            raise ValueError(f'truncated {{{label}}} data (at offset {{p}} of {{L}})') from exc",
            "        except Exception as exc:  # bad enum index (KeyError), struct.error, RecursionError...",
            f"            raise ValueError(f'corrupt {{{label}}} data (at offset {{p}}): {{exc!r}}') from exc",
        ]

    def build(self, schema: Any) -> tuple[str, dict[str, Any]]:
        funcs = self.function("read", schema, (), entry=True)
        done: set[str] = set()
        while self._pending:
            name = self._pending.pop()
            if name not in done:
                done.add(name)
                funcs += self.function(self.record_funcs[name], self.named[name], (name,), entry=False)
        env = {
            "ZZ": ZZ,
            "LEN1": LEN1,
            "_HUGE": _HUGE,
            "_Decimal": Decimal,
            "_from_bytes": int.from_bytes,
            "_unpack_float": _UNPACK_FLOAT,
            "_unpack_double": _UNPACK_DOUBLE,
            "_MASK64": _MASK64,
            "_bad_varint": _bad_varint,
            "_bad_length": _bad_length,
            "_bad_index": _bad_index,
            "_bad_decimal": _bad_decimal,
            "_too_many_items": _too_many_items,
            **self.consts,
        }
        # Everything the functions use is a closure variable of a factory: fast lookups.
        names = sorted(env)
        source = "\n".join([f"def _factory({', '.join(names)}):", *funcs, "    return read", ""])
        return source, env


def generate_source(parsed_schema: Any) -> tuple[str, dict[str, Any]]:
    """The Python source ``compile_reader`` executes, and its closure values (for debugging)."""
    named: dict[str, Any] = {}
    if isinstance(parsed_schema, dict) and "__fastavro_parsed" in parsed_schema:
        named.update(parsed_schema.get("__named_schemas", {}))
    else:  # a raw schema: parse it (names get qualified) and learn its named types
        parsed_schema = parse_schema(parsed_schema, named_schemas=named)
    _collect_named(parsed_schema, named)
    return _Generator(named).build(parsed_schema)


def compile_reader(parsed_reader_schema: dict[str, Any]) -> Callable[[bytes, int], tuple[dict[str, Any], int]]:
    """Compile ``parsed_reader_schema`` (fastavro-parsed, e.g. ``Codec.for_record(name)._reader_schema``)
    into ``read(data, pos=0) -> (record, end)``: the record encoded at ``data[pos:]``,
    equal to what ``fastavro.schemaless_reader`` returns, and the offset just past it.
    Raises ``ValueError`` for truncated or corrupt data.
    """
    source, env = generate_source(parsed_reader_schema)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<fastreader {_schema_label(parsed_reader_schema)}>", "exec"), namespace)
    read = namespace["_factory"](**env)
    read.__doc__ = f"Decode one {_schema_label(parsed_reader_schema)} record: (record, end offset)."
    return read
