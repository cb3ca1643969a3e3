"""Type mapping and CSV parsing: exact values, NULL versus empty string, the documented choices."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.extract import parse_csv
from etl_service.postgres.typemap import map_column


@pytest.mark.parametrize(("typname", "pg_type", "ch_type"), [
    ("int2", "smallint", "Int16"), ("int4", "integer", "Int32"), ("int8", "bigint", "Int64"),
    ("numeric", "numeric(12,2)", "Decimal(12, 2)"), ("numeric", "numeric(76,0)", "Decimal(76, 0)"),
    ("numeric", "numeric", "String"), ("numeric", "numeric(100,2)", "String"),
    ("float4", "real", "Float32"), ("float8", "double precision", "Float64"), ("bool", "boolean", "Bool"),
    ("text", "text", "String"), ("varchar", "character varying(5)", "String"), ("bpchar", "character(3)", "String"),
    ("date", "date", "Date32"), ("timestamp", "timestamp without time zone", "DateTime64(6)"),
    ("timestamptz", "timestamp with time zone", "DateTime64(6, 'UTC')"), ("uuid", "uuid", "UUID"),
    ("json", "json", "String"), ("jsonb", "jsonb", "String"), ("bytea", "bytea", "String"),
    ("interval", "interval", "String"), ("inet", "inet", "String"),
])
def test_scalar_mapping(typname: str, pg_type: str, ch_type: str) -> None:
    col = map_column("c", typname, pg_type, False, "X", None)
    assert col.ch_type == ch_type
    assert col.ch_column_type() == ch_type
    assert map_column("c", typname, pg_type, True, "X", None).ch_column_type() == f"Nullable({ch_type})"
    assert map_column("c", typname, pg_type, True, "X", None).ch_column_type(is_key=True) == ch_type


def test_arrays_map_to_arrays_of_nullable_and_multidimensional_to_text() -> None:
    assert map_column("a", "_int4", "integer[]", True, "A", "int4").ch_column_type() == "Array(Nullable(Int32))"
    assert map_column("a", "_numeric", "numeric(6,2)[]", True, "A", "numeric").ch_type == \
        "Array(Nullable(Decimal(6, 2)))"
    assert map_column("a", "_int4", "integer[][]", True, "A", "int4").ch_type == "String"
    assert map_column("a", "_jsonb", "jsonb[]", True, "A", "jsonb").ch_type == "String"


def shape_of(*cols: tuple[str, str, str, str, str | None]) -> SourceShape:
    columns = tuple(map_column(n, t, f, True, cat, e) for n, t, f, cat, e in cols)
    return SourceShape("bigint", columns, tuple(c.name for c in columns))


def test_parse_csv_keeps_exact_values_and_tells_null_from_empty() -> None:
    shape = shape_of(("id", "int8", "bigint", "N", None), ("amount", "numeric", "numeric(12,2)", "N", None),
                     ("name", "text", "text", "S", None), ("ok", "bool", "boolean", "B", None),
                     ("day", "date", "date", "D", None),
                     ("at", "timestamptz", "timestamp with time zone", "D", None),
                     ("raw", "bytea", "bytea", "U", None), ("tags", "_text", "text[]", "A", "text"),
                     ("prices", "_numeric", "numeric(6,2)[]", "A", "numeric"))
    data = (b'1,12.34,"",t,2024-02-29,2024-06-01 10:34:56.789012,\\x00ff,"[""a"",null]","[1.50,2]"\n'
            b'2,,,f,,,,,\n'
            b'3,-0.01,"line1\nline2, ""q""",,1900-01-01,1970-01-01 00:00:00.000001,\\x,[],[]\n')
    table = parse_csv(data, shape)
    assert table.schema.field("amount").type == pa.decimal128(12, 2)
    assert table.schema.field("at").type == pa.timestamp("us", tz="UTC")
    rows = table.to_pylist()
    assert rows[0] == {"id": 1, "amount": Decimal("12.34"), "name": "", "ok": True, "day": date(2024, 2, 29),
                       "at": datetime(2024, 6, 1, 10, 34, 56, 789012, tzinfo=UTC), "raw": b"\x00\xff",
                       "tags": ["a", None], "prices": [Decimal("1.50"), Decimal("2.00")]}
    assert rows[1] == {"id": 2, "amount": None, "name": None, "ok": False, "day": None, "at": None, "raw": None,
                       "tags": [], "prices": []}
    assert rows[2]["name"] == 'line1\nline2, "q"'
    assert rows[2]["at"] == datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC)


def test_parse_csv_of_nothing_is_an_empty_typed_table() -> None:
    shape = shape_of(("id", "int8", "bigint", "N", None), ("v", "numeric", "numeric(5,1)", "N", None))
    table = parse_csv(b"", shape)
    assert table.num_rows == 0 and table.schema.field("v").type == pa.decimal128(5, 1)


def test_renamed_targets_name_the_arrow_columns() -> None:
    col = map_column("amount", "int4", "integer", False, "N", None)
    table = parse_csv(b"5\n", SourceShape("bigint", (col,), ("total",)))
    assert table.column_names == ["total"] and table.to_pylist() == [{"total": 5}]
