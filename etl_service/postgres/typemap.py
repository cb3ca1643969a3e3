"""PostgreSQL column types -> how to extract them (COPY CSV -> Arrow) and their ClickHouse type.

The mapping (docs/configuration.md points here: this table is the reference):

| PostgreSQL                         | ClickHouse                  | notes                              |
|------------------------------------|-----------------------------|------------------------------------|
| smallint / integer / bigint        | Int16 / Int32 / Int64       |                                    |
| numeric(p,s), p <= 76              | Decimal(p,s)                | exact; p > 38 uses Decimal256      |
| numeric without (p,s), or p > 76   | String                      | PostgreSQL's exact text            |
| real / double precision            | Float32 / Float64           |                                    |
| boolean                            | Bool                        |                                    |
| text / varchar / char(n) / name    | String                      | char(n) keeps its padding          |
| date                               | Date32                      |                                    |
| timestamp                          | DateTime64(6)               | microseconds kept                  |
| timestamptz                        | DateTime64(6, 'UTC')        | converted to UTC, microseconds kept|
| uuid                               | UUID                        |                                    |
| json / jsonb                       | String                      | text identical to PostgreSQL's     |
| bytea                              | String                      | the raw bytes                      |
| one-dimensional arrays of the above scalars | Array(Nullable(T)) | a NULL array becomes []            |
| anything else (interval, inet, enum, ...) | String               | PostgreSQL's text output           |

A column that allows NULL becomes Nullable(T). The key column is never Nullable (it is the
MergeTree sort key). Values travel as PostgreSQL's own text (COPY CSV) and are parsed into
exact Arrow types: no float round trip for numeric, no loss of microseconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
from psycopg2 import sql

Converter = Callable[[pa.Array], pa.Array]

# typname -> (ClickHouse type, Arrow type)
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
}
_NUMERIC = re.compile(r"^numeric\((\d+),(\d+)\)")


@dataclass(frozen=True)
class Column:
    """One source column and everything needed to move it."""

    name: str  # source column name
    pg_type: str  # format_type(), e.g. numeric(12,2)
    nullable: bool
    ch_type: str  # without the Nullable() wrapper
    csv_type: pa.DataType  # what pyarrow.csv parses the COPY text as
    arrow_type: pa.DataType  # what the column is after `convert`
    select: sql.Composable  # expression in the COPY SELECT
    convert: Converter | None = None

    def ch_column_type(self, is_key: bool = False) -> str:
        """The ClickHouse column type, Nullable where PostgreSQL allows NULL."""
        if self.nullable and not is_key and not self.ch_type.startswith("Array("):
            return f"Nullable({self.ch_type})"
        return self.ch_type


def map_column(name: str, typname: str, pg_type: str, nullable: bool, category: str,
               elem_typname: str | None) -> Column:
    """Map one PostgreSQL column (from pg_attribute/pg_type) to its extraction recipe.

    The extraction query aliases the source table as `s`, so expressions qualify with it.
    """
    ident = sql.Identifier("s", name)
    if category == "A" and elem_typname and pg_type.count("[]") == 1:
        elem = _scalar(elem_typname, pg_type.removesuffix("[]"))
        if elem is not None and elem_typname not in ("bytea", "json", "jsonb"):
            return _array_column(name, pg_type, nullable, ident, elem)
    if typname == "bytea":
        return Column(name, pg_type, nullable, "String", pa.string(), pa.binary(), ident, _hex_to_binary)
    scalar = _scalar(typname, pg_type)
    if scalar is None:
        text = sql.SQL("{}::text").format(ident)
        return Column(name, pg_type, nullable, "String", pa.string(), pa.string(), text)
    ch_type, arrow_type = scalar
    if pa.types.is_decimal256(arrow_type):  # pyarrow's CSV reader parses decimal128 only
        return Column(name, pg_type, nullable, ch_type, pa.string(), arrow_type, ident,
                      lambda values: pc.cast(values, arrow_type))
    if typname == "timestamptz":
        # PostgreSQL prints the UTC wall clock; Arrow then labels it UTC without shifting.
        expr = sql.SQL("({} AT TIME ZONE 'UTC')").format(ident)
        return Column(name, pg_type, nullable, ch_type, pa.timestamp("us"), arrow_type, expr, _label_utc)
    return Column(name, pg_type, nullable, ch_type, arrow_type, arrow_type, ident)


def _scalar(typname: str, pg_type: str) -> tuple[str, pa.DataType] | None:
    if typname == "numeric":
        match = _NUMERIC.match(pg_type)
        if not match:
            return None
        precision, scale = int(match[1]), int(match[2])
        if precision > 76:
            return None
        arrow = pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        return f"Decimal({precision}, {scale})", arrow
    return _SCALARS.get(typname)


def _array_column(name: str, pg_type: str, nullable: bool, ident: sql.Identifier,
                  elem: tuple[str, pa.DataType]) -> Column:
    ch_elem, arrow_elem = elem
    list_type = pa.list_(arrow_elem)
    exact = pa.types.is_decimal(arrow_elem)

    def convert(values: pa.Array) -> pa.Array:
        parse = Decimal if exact else None
        lists = [[] if v is None else json.loads(v, parse_float=parse, parse_int=parse)
                 for v in values.to_pylist()]
        if pa.types.is_date32(arrow_elem) or pa.types.is_timestamp(arrow_elem):
            flat = pa.array([x for lst in lists for x in lst], pa.string()).cast(arrow_elem)
            offsets = pa.array([0, *_running_lengths(lists)], pa.int32())
            return pa.ListArray.from_arrays(offsets, flat)
        return pa.array(lists, list_type)

    expr = sql.SQL("array_to_json({})::text").format(ident)
    ch_type = f"Array(Nullable({ch_elem}))"
    return Column(name, pg_type, nullable, ch_type, pa.string(), list_type, expr, convert)


def _running_lengths(lists: list[list[object]]) -> list[int]:
    total, out = 0, []
    for lst in lists:
        total += len(lst)
        out.append(total)
    return out


def _hex_to_binary(values: pa.Array) -> pa.Array:
    # bytea's CSV text is \x followed by hex digits.
    return pa.array([None if v is None else bytes.fromhex(v[2:]) for v in values.to_pylist()], pa.binary())


def _label_utc(values: pa.Array) -> pa.Array:
    return pc.cast(values, pa.timestamp("us", tz="UTC"))
