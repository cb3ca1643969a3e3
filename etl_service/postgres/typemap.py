"""PostgreSQL column types -> how to extract them (binary COPY -> Arrow) and their ClickHouse type.

The mapping (docs/clickhouse.md shows it; a test holds the two together):

| PostgreSQL                               | ClickHouse                 | notes                                   |
|------------------------------------------|----------------------------|-----------------------------------------|
| smallint / integer / bigint              | Int16 / Int32 / Int64      |                                         |
| numeric(p,s), p <= 76                    | Decimal(p,s)               | exact; p > 38: Decimal256; see below    |
| numeric without (p,s), or p > 76         | String                     | PostgreSQL's exact text                 |
| real / double precision                  | Float32 / Float64          | NaN, ±Infinity, -0 and subnormals kept  |
| boolean                                  | Bool                       |                                         |
| text / varchar / char(n) / name          | String                     | char(n) keeps its padding               |
| date                                     | Date32                     |                                         |
| timestamp                                | DateTime64(6)              | microseconds kept                       |
| timestamptz                              | DateTime64(6, 'UTC')       | the instant, in UTC, microseconds kept  |
| uuid                                     | UUID                       |                                         |
| json / jsonb                             | String                     | text identical to PostgreSQL's          |
| bytea                                    | String                     | the raw bytes                           |
| arrays of the types above                | Array(Nullable(T))         | one Array per dimension; see below      |
| arrays of any other type                 | Array(Nullable(String))    | each element's text; see below          |
| anything else (interval, time, inet, enum, domains, ...) | String   | PostgreSQL's text output                |

An array column gets one Array level per dimension it declares (`integer[][]`: two; `integer[]`
or none declared: one); a value of another depth is a bad row, as ClickHouse's arrays have one
depth per column. A NULL array becomes [] (ClickHouse has no NULL array).
numeric(p,s) outside ClickHouse's 0 <= s <= p (PostgreSQL 15 allows it) keeps every digit:
numeric(3,5) becomes Decimal(5, 5), numeric(3,-2) Decimal(5, 0).

A column that allows NULL becomes Nullable(T). The key column is never Nullable (it is the
MergeTree sort key). Values leave PostgreSQL in its binary COPY format, read into Arrow by the ADBC
driver (`extract`): no text is parsed for the mapped types, and no value takes a detour through a
float. What a type cannot hold is not stored changed: the conversion here raises `Unfit` naming
the value (±infinity dates, NaN in a Decimal, an array of another depth than its column's), and
the range checks of `clickhouse.fit` catch the rest; the row is then quarantined with the reason.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from psycopg2 import sql

# One column's arrays as the driver returns them (the value, then any helper expression) -> its Arrow array.
Converter = Callable[[list[pa.Array]], pa.Array]

# typname -> (ClickHouse type, Arrow type), for the types the driver reads natively
_SCALARS: dict[str, tuple[str, pa.DataType]] = {
    "int2": ("Int16", pa.int16()),
    "int4": ("Int32", pa.int32()),
    "int8": ("Int64", pa.int64()),
    "float4": ("Float32", pa.float32()),
    "float8": ("Float64", pa.float64()),
    "bool": ("Bool", pa.bool_()),
    "text": ("String", pa.string()),
    "varchar": ("String", pa.string()),
    "bpchar": ("String", pa.string()),
    "name": ("String", pa.string()),
    "date": ("Date32", pa.date32()),
    "timestamp": ("DateTime64(6)", pa.timestamp("us")),
    "timestamptz": ("DateTime64(6, 'UTC')", pa.timestamp("us", tz="UTC")),
    "uuid": ("UUID", pa.string()),
    "json": ("String", pa.string()),
    "jsonb": ("String", pa.string()),
    "bytea": ("String", pa.binary()),
}
_NUMERIC = re.compile(r"^numeric\((\d+),(-?\d+)\)")
# The driver counts dates and times from 1970; PostgreSQL's ±infinity (its largest and smallest
# values, counted from 2000) come out far below anything PostgreSQL can hold, at these values.
_INFINITE = {"date32[day]": {-2147472692: "infinity", -2147472691: "-infinity"},
             "timestamp": {-9222425352054775809: "infinity", -9222425352054775808: "-infinity"}}
_LOWEST = {"date32[day]": -2_440_588, "timestamp": -210_866_803_200_000_000}  # 4713-01-01 BC


class Unfit(ValueError):
    """A value ClickHouse's type for its column cannot hold as it is; the message names it."""


@dataclass(frozen=True)
class Column:
    """One source column and everything needed to move it."""

    name: str  # source column name
    pg_type: str  # format_type(), e.g. numeric(12,2)
    nullable: bool
    ch_type: str  # without the Nullable() wrapper
    arrow_type: pa.DataType  # what the column is after `convert`
    select: tuple[sql.Composable, ...]  # its expressions in the extraction's SELECT (the value first)
    convert: Converter | None = None
    nest: Callable[[int], Column] | None = field(default=None, compare=False)  # an array column, other depth
    number: int = field(default=0, compare=False)  # pg_attribute.attnum: the column whatever its name

    def ch_column_type(self, is_key: bool = False) -> str:
        """The ClickHouse column type, Nullable where PostgreSQL allows NULL."""
        if self.nullable and not is_key and not self.ch_type.startswith("Array("):
            return f"Nullable({self.ch_type})"
        return self.ch_type

    def as_text(self) -> Column:
        """The column as PostgreSQL's text: for a target column of type String made for it before."""
        text = sql.SQL("{}::text").format(sql.Identifier("s", self.name))
        return Column(self.name, self.pg_type, self.nullable, "String", pa.string(), (text,))

    def nested(self, depth: int) -> Column:
        """The array column read `depth` Arrays deep: the depth of a target made when it declared another."""
        return self.nest(depth) if self.nest and depth != self.ch_type.count("Array(") else self

    def to_arrow(self, arrays: list[pa.Array]) -> pa.Array:
        """This column's values from the driver's arrays; Unfit naming the first value that cannot go."""
        arrays = [_plain(a) for a in arrays]
        try:
            return self.convert(arrays) if self.convert else arrays[0]
        except Unfit as exc:
            raise Unfit(f"column {self.name!r}: {exc}") from None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise Unfit(f"column {self.name!r} ({self.pg_type}): {str(exc).splitlines()[0][:200]}") from None


def map_column(name: str, typname: str, pg_type: str, nullable: bool, category: str,
               elem_typname: str | None, dims: int = 0) -> Column:
    """Map one PostgreSQL column (from pg_attribute/pg_type) to its extraction recipe.

    `dims`: the dimensions an array column declares (pg_attribute.attndims; 0 when it declares none).
    The extraction query aliases the source table as `s`, so expressions qualify with it.
    """
    ident = sql.Identifier("s", name)
    if category == "A" and elem_typname:
        return _array_column(name, pg_type, nullable, ident, elem_typname, max(dims, 1))
    scalar = _scalar(typname, pg_type)
    if scalar is None:
        text = sql.SQL("{}::text").format(ident)
        return Column(name, pg_type, nullable, "String", pa.string(), (text,))
    ch_type, arrow_type = scalar
    one = _converter(typname, arrow_type)
    return Column(name, pg_type, nullable, ch_type, arrow_type, (_read_as(typname, ident),),
                  (lambda arrays: one(arrays[0])) if one else None)


def _read_as(typname: str, ident: sql.Composable, array: bool = False) -> sql.Composable:
    """The expression that reads a mapped type. numeric goes as its text: the server writes it for less
    than the driver's decoding of numeric's binary form costs (measured: docs/performance.md)."""
    if typname == "numeric":
        return sql.SQL("{}::text[]" if array else "{}::text").format(ident)
    return ident


def _scalar(typname: str, pg_type: str) -> tuple[str, pa.DataType] | None:
    if typname == "numeric":
        match = _NUMERIC.match(pg_type)
        if not match:
            return None
        precision, scale = int(match[1]), int(match[2])
        # ClickHouse wants 0 <= scale <= precision; PostgreSQL 15 allows either outside: numeric(3,5)
        # holds 0.00123 (five digits after the point), numeric(3,-2) holds 12300 (five before it).
        precision, scale = max(precision, scale) - min(scale, 0), max(scale, 0)
        if precision > 76:
            return None
        arrow = pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        return f"Decimal({precision}, {scale})", arrow
    return _SCALARS.get(typname)


def _converter(typname: str, arrow_type: pa.DataType) -> Callable[[pa.Array], pa.Array] | None:
    """How the driver's array of one scalar type becomes `arrow_type` (None: it already is)."""
    if pa.types.is_decimal(arrow_type):  # numeric is read as its text (`_read_as`)
        return lambda values: _decimals(values, arrow_type)
    if typname == "uuid":
        return _uuid_text
    if typname in ("date", "timestamp", "timestamptz"):
        return _finite
    return None


def _array_column(name: str, pg_type: str, nullable: bool, ident: sql.Identifier, elem_typname: str,
                  dims: int) -> Column:
    base = pg_type.split("[", 1)[0]
    scalar = _scalar(elem_typname, base)
    convert_elem = _converter(elem_typname, scalar[1]) if scalar else None
    # The driver reads only arrays whose lower bounds are 0 or 1 (one other refuses the whole chunk):
    # anything but a plain one-dimensional array is sliced, which renumbers every dimension from 1.
    plain = sql.SQL("(CASE WHEN array_ndims({0}) = 1 AND array_lower({0}, 1) = 1 THEN {0} ELSE {0}[:] END)").format(
        ident)
    value = _read_as(elem_typname, plain, array=True)
    if scalar is None:  # an element type ClickHouse has none for: each element's text
        scalar, value = ("String", pa.string()), sql.SQL("{}::text[]").format(plain)
    ch_elem, arrow_elem = scalar
    # The driver reads any array flat: its shape comes beside it, as [dimensions, length, length, ...].
    lengths = sql.SQL("ARRAY[array_ndims({})]").format(ident) if dims == 1 else sql.SQL(
        "ARRAY[array_ndims({0}), {1}]").format(ident, sql.SQL(", ").join(
            sql.SQL("array_length({}, {})").format(ident, sql.Literal(d)) for d in range(1, dims + 1)))
    ch_type, arrow_type = f"Nullable({ch_elem})", arrow_elem
    for _ in range(dims):
        ch_type, arrow_type = f"Array({ch_type})", pa.list_(arrow_type)

    def convert(arrays: list[pa.Array]) -> pa.Array:
        flat, shapes = arrays
        elements = _plain(flat.flatten())
        if convert_elem is not None:
            elements = convert_elem(elements)
        return _shaped(flat, elements, shapes, dims, pg_type)

    return Column(name, pg_type, nullable, ch_type, arrow_type, (value, lengths), convert,
                  lambda depth: _array_column(name, pg_type, nullable, ident, elem_typname, depth))


def _shaped(flat: pa.Array, elements: pa.Array, shapes: pa.Array, dims: int, pg_type: str) -> pa.Array:
    """Nest each row's flat elements `dims` deep by its lengths; a NULL or empty array becomes []."""
    depth = pc.list_element(shapes, 0)  # NULL for a NULL array, and for an empty one (it has no dimensions)
    other = pc.and_(pc.is_valid(depth), pc.not_equal(depth, dims))
    if pc.any(other).as_py():
        found = depth[pc.index(other, True).as_py()].as_py()
        raise Unfit(f"a {found}-dimensional array, where the column's ClickHouse type nests {dims} Array"
                    f"{'s' if dims > 1 else ''} (a ClickHouse column's arrays all have one depth; PostgreSQL does"
                    f" not hold a {pg_type} column to its declared dimensions)")
    offsets = np.asarray(flat.offsets)
    if dims == 1:  # the driver's own offsets: only a NULL array changes, to []
        return pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()), elements)
    sizes = np.stack([np.asarray(pc.fill_null(pc.list_element(shapes, level), 0), dtype=np.int64)
                      for level in range(1, dims + 1)], axis=1)
    sizes[np.asarray(pc.is_null(depth))] = 0
    if not np.array_equal(np.prod(sizes, axis=1), np.diff(offsets)):
        raise Unfit(f"the lengths of an array in a {pg_type} column do not match its elements")
    nested = elements
    for level in range(dims - 1, -1, -1):  # the innermost lists first
        counts = np.repeat(sizes[:, level], np.prod(sizes[:, :level], axis=1)) if level else sizes[:, 0]
        nested = pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(counts))), pa.int32()), nested)
    return nested


def _plain(values: pa.Array) -> pa.Array:
    """The driver marks some types (numeric, uuid, ...) as extension types: their storage is the value."""
    return values.storage if isinstance(values, pa.ExtensionArray) else values


def _decimals(values: pa.Array, arrow_type: pa.DataType) -> pa.Array:
    """numeric's text (see `_read_as`) as Decimal; NaN and ±Infinity (which no Decimal holds) are Unfit, by name."""
    special = pc.and_(pc.is_valid(values), pc.is_in(pc.utf8_lower(values), pa.array(["nan", "inf", "-inf",
                                                                                      "infinity", "-infinity"])))
    if pc.any(special).as_py():
        shown = values[pc.index(special, True).as_py()].as_py()
        raise Unfit(f"{shown!r} is not a number: ClickHouse's Decimal({arrow_type.precision}, {arrow_type.scale})"
                    " holds numbers only")
    return pc.cast(values, arrow_type)


def _finite(values: pa.Array) -> pa.Array:
    """Dates and times as they are; ±infinity (which ClickHouse's types do not have) is Unfit, by name."""
    kind = "date32[day]" if pa.types.is_date32(values.type) else "timestamp"
    raw = pc.cast(values, pa.int32() if kind == "date32[day]" else pa.int64())
    low = pc.less(raw, _LOWEST[kind])
    if not pc.any(low).as_py():
        return values
    found = raw[pc.index(low, True).as_py()].as_py()
    target = 'Date32' if kind == 'date32[day]' else 'DateTime64'
    if found not in _INFINITE[kind]:  # counted from 1970, a value near PostgreSQL's end of time wraps around
        raise Unfit(f"a {'date' if kind == 'date32[day]' else 'time'} hundreds of thousands of years ahead"
                    f" has no ClickHouse {target} value")
    raise Unfit(f"{_INFINITE[kind][found]} has no ClickHouse {target} value")


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_UUID_GROUPS = (0, 4, 6, 8, 10, 16)  # byte offsets of the groups of 8-4-4-4-12 hex digits


def _uuid_text(values: pa.Array) -> pa.Array:
    """The driver's 16-byte uuids as PostgreSQL writes them (lower-case 8-4-4-4-12), NULLs kept."""
    storage = _plain(values)
    count = len(storage)
    raw = np.frombuffer(storage.buffers()[1], dtype=np.uint8, count=(storage.offset + count) * 16,
                        offset=0)[storage.offset * 16:].reshape(count, 16)
    digits = np.empty((count, 32), dtype=np.uint8)
    digits[:, 0::2], digits[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    text = np.full((count, 36), ord("-"), dtype=np.uint8)
    at = 0
    for first, last in itertools.pairwise(_UUID_GROUPS):
        width = (last - first) * 2
        text[:, at:at + width] = digits[:, first * 2:last * 2]
        at += width + 1
    offsets = pa.py_buffer(np.arange(0, 36 * (count + 1), 36, dtype=np.int32).tobytes())
    validity = storage.buffers()[0]
    if validity is not None and storage.offset:
        validity = pc.is_valid(storage).buffers()[1]
    return pa.StringArray.from_buffers(count, offsets, pa.py_buffer(text.tobytes()), validity, storage.null_count)
