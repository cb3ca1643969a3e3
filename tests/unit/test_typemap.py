"""Type mapping and the driver's Arrow: exact values, NULL versus empty, the documented choices, named refusals."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from etl_service.errors import BadSourceValues
from etl_service.postgres import typemap
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.extract import to_target
from etl_service.postgres.typemap import map_column
from etl_service.postgres.versioning import VERSION_COLUMN

ROOT = Path(__file__).resolve().parents[2]

SCALARS = [
    ("int2", "smallint", "Int16"), ("int4", "integer", "Int32"), ("int8", "bigint", "Int64"),
    ("numeric", "numeric(12,2)", "Decimal(12, 2)"), ("numeric", "numeric(76,0)", "Decimal(76, 0)"),
    ("numeric", "numeric(3,5)", "Decimal(5, 5)"), ("numeric", "numeric(5,-2)", "Decimal(7, 0)"),
    ("numeric", "numeric", "String"), ("numeric", "numeric(100,2)", "String"),
    ("float4", "real", "Float32"), ("float8", "double precision", "Float64"), ("bool", "boolean", "Bool"),
    ("text", "text", "String"), ("varchar", "character varying(5)", "String"), ("bpchar", "character(3)", "String"),
    ("name", "name", "String"),
    ("date", "date", "Date32"), ("timestamp", "timestamp without time zone", "DateTime64(6)"),
    ("timestamptz", "timestamp with time zone", "DateTime64(6, 'UTC')"), ("uuid", "uuid", "UUID"),
    ("json", "json", "String"), ("jsonb", "jsonb", "String"), ("bytea", "bytea", "String"),
    ("interval", "interval", "String"), ("inet", "inet", "String"), ("time", "time without time zone", "String"),
]


@pytest.mark.parametrize(("typname", "pg_type", "ch_type"), SCALARS)
def test_scalar_mapping(typname: str, pg_type: str, ch_type: str) -> None:
    col = map_column("c", typname, pg_type, False, "X", None)
    assert col.ch_type == ch_type
    assert col.ch_column_type() == ch_type
    assert map_column("c", typname, pg_type, True, "X", None).ch_column_type() == f"Nullable({ch_type})"
    assert map_column("c", typname, pg_type, True, "X", None).ch_column_type(is_key=True) == ch_type


def test_arrays_nest_one_level_per_declared_dimension_and_other_elements_go_as_text() -> None:
    assert map_column("a", "_int4", "integer[]", True, "A", "int4").ch_column_type() == "Array(Nullable(Int32))"
    assert map_column("a", "_numeric", "numeric(6,2)[]", True, "A", "numeric").ch_type == \
        "Array(Nullable(Decimal(6, 2)))"
    assert map_column("a", "_int4", "integer[]", True, "A", "int4", 2).ch_type == "Array(Array(Nullable(Int32)))"
    assert map_column("a", "_text", "text[]", True, "A", "text", 3).ch_type == \
        "Array(Array(Array(Nullable(String))))"
    assert map_column("a", "_jsonb", "jsonb[]", True, "A", "jsonb").ch_type == "Array(Nullable(String))"
    assert map_column("a", "_interval", "interval[]", True, "A", "interval").ch_type == "Array(Nullable(String))"
    assert map_column("a", "_varchar", "character varying(50)[]", True, "A", "varchar").ch_type == \
        "Array(Nullable(String))"


# The documented names of the scalar rows, as (typname, format_type) for map_column.
DOCUMENTED = {
    "smallint": ("int2", "smallint"), "integer": ("int4", "integer"), "bigint": ("int8", "bigint"),
    "real": ("float4", "real"), "double precision": ("float8", "double precision"), "boolean": ("bool", "boolean"),
    "text": ("text", "text"), "varchar": ("varchar", "character varying(5)"), "char(n)": ("bpchar", "character(3)"),
    "name": ("name", "name"), "date": ("date", "date"), "timestamp": ("timestamp", "timestamp without time zone"),
    "timestamptz": ("timestamptz", "timestamp with time zone"), "uuid": ("uuid", "uuid"), "json": ("json", "json"),
    "jsonb": ("jsonb", "jsonb"), "bytea": ("bytea", "bytea"),
}


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_the_docs_show_the_codes_table() -> None:
    docs = (ROOT / "docs" / "clickhouse.md").read_text(encoding="utf-8")
    section = docs.split("<!-- type-mapping:begin", 1)[1].split("<!-- type-mapping:end -->", 1)[0]
    assert _table_rows(section) == _table_rows(typemap.__doc__ or ""), \
        "copy the table of etl_service/postgres/typemap.py into docs/clickhouse.md (Type mapping)"


def test_every_scalar_row_of_the_table_is_what_map_column_does() -> None:
    seen = set()
    for row in _table_rows(typemap.__doc__ or "")[2:]:
        names, ch_types = ([part.strip() for part in cell.split(" / ")] for cell in row.strip("|").split("|")[:2])
        for i, name in enumerate(names):
            if name in DOCUMENTED:
                typname, pg_type = DOCUMENTED[name]
                assert map_column("c", typname, pg_type, False, "X", None).ch_type == \
                    ch_types[i if len(ch_types) == len(names) else 0], f"the table's row for {name}"
                seen.add(name)
    assert seen == set(DOCUMENTED), f"the table lost the rows of {sorted(set(DOCUMENTED) - seen)}"


def shape_of(*cols: typemap.Column) -> SourceShape:
    return SourceShape("bigint", cols, tuple(c.name for c in cols))  # type: ignore[arg-type]


def driver_table(shape: SourceShape, *arrays: pa.Array, versions: list[int] | None = None) -> pa.Table:
    """A table as the driver returns the chunk query: c<i>_<j> per column expression, then the version."""
    names = [f"c{i}_{j}" for i, column in enumerate(shape.columns) for j in range(len(column.select))]
    count = len(arrays[0]) if arrays else 0
    return pa.Table.from_arrays([*arrays, pa.array(versions or [7] * count, pa.int64())],
                                names=[*names, VERSION_COLUMN])


def test_the_drivers_arrays_become_exact_typed_columns() -> None:
    amount = map_column("amount", "numeric", "numeric(12,2)", True, "N", None)
    key = map_column("key", "uuid", "uuid", True, "U", None)
    day = map_column("day", "date", "date", True, "D", None)
    at = map_column("at", "timestamptz", "timestamp with time zone", True, "D", None)
    tags = map_column("tags", "_text", "text[]", True, "A", "text")
    shape = shape_of(amount, key, day, at, tags)
    ids = [uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), None]
    table = to_target(driver_table(
        shape, pa.array(["12.34", None]), pa.array([u.bytes if u else None for u in ids], pa.binary(16)),
        pa.array([date(2024, 2, 29), None]), pa.array([datetime(2024, 6, 1, 10, 34, 56, 789012), None],
                                                      pa.timestamp("us", tz="UTC")),
        pa.array([["a", None, ""], None], pa.list_(pa.string())), pa.array([[1], None], pa.list_(pa.int32()))),
        shape)
    assert table.schema.field("amount").type == pa.decimal128(12, 2)
    assert table.schema.field(VERSION_COLUMN).type == pa.uint64()
    assert table.to_pylist() == [
        {"amount": Decimal("12.34"), "key": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "day": date(2024, 2, 29),
         "at": datetime(2024, 6, 1, 10, 34, 56, 789012, tzinfo=UTC), "tags": ["a", None, ""], VERSION_COLUMN: 7},
        {"amount": None, "key": None, "day": None, "at": None, "tags": [], VERSION_COLUMN: 7}]


def test_a_two_dimensional_column_is_nested_by_the_lengths_beside_it() -> None:
    grid = map_column("grid", "_int4", "integer[]", True, "A", "int4", 2)
    shape = shape_of(grid)
    flat = pa.array([[1, 2, 3, None, 5, 6], None, [], [7, 8]], pa.list_(pa.int32()))
    lengths = pa.array([[2, 2, 3], None, [None, None, None], [2, 2, 1]], pa.list_(pa.int32()))
    table = to_target(driver_table(shape, flat, lengths), shape)
    assert table.column("grid").to_pylist() == [[[1, 2, 3], [None, 5, 6]], [], [], [[7], [8]]]


@pytest.mark.parametrize(("column", "arrays", "named"), [
    (map_column("amount", "numeric", "numeric(12,2)", True, "N", None), [pa.array(["1.00", "NaN"])], "'NaN'"),
    (map_column("day", "date", "date", True, "D", None), [pa.array([-2147472692], pa.int32()).cast(pa.date32())],
     "infinity"),
    (map_column("at", "timestamp", "timestamp", True, "D", None),
     [pa.array([-9222425352054775808], pa.int64()).cast(pa.timestamp("us"))], "-infinity"),
    (map_column("grid", "_int4", "integer[]", True, "A", "int4"),
     [pa.array([[1, 2, 3, 4]], pa.list_(pa.int32())), pa.array([[2]], pa.list_(pa.int32()))], "2-dimensional"),
    (map_column("prices", "_numeric", "numeric(6,2)[]", True, "A", "numeric"),
     [pa.array([["1.50", "NaN"]], pa.list_(pa.string())), pa.array([[1]], pa.list_(pa.int32()))], "'NaN'"),
])
def test_a_value_its_type_cannot_hold_is_a_row_error_naming_the_column_and_the_value(
        column: typemap.Column, arrays: list[pa.Array], named: str) -> None:
    shape = shape_of(column)
    with pytest.raises(BadSourceValues, match=rf"column '{column.name}': .*{re.escape(named)}"):
        to_target(driver_table(shape, *arrays), shape)


def test_nothing_is_an_empty_typed_table() -> None:
    shape = shape_of(map_column("v", "numeric", "numeric(5,1)", True, "N", None),
                     map_column("a", "_int4", "integer[]", True, "A", "int4", 2))
    table = to_target(driver_table(shape, pa.array([], pa.string()), pa.array([], pa.list_(pa.int32())),
                                   pa.array([], pa.list_(pa.int32()))), shape)
    assert table.num_rows == 0
    assert table.schema.field("v").type == pa.decimal128(5, 1)
    assert table.schema.field("a").type == pa.list_(pa.list_(pa.int32()))


def test_renamed_targets_name_the_arrow_columns() -> None:
    col = map_column("amount", "int4", "integer", False, "N", None)
    shape = SourceShape("bigint", (col,), ("total",))  # type: ignore[arg-type]
    table = to_target(driver_table(shape, pa.array([5], pa.int32())), shape)
    assert table.column_names == ["total", VERSION_COLUMN] and table.to_pylist() == [{"total": 5, VERSION_COLUMN: 7}]


def test_a_chunk_without_rows_of_a_column_the_driver_marks_as_an_extension_type_is_empty_and_typed() -> None:
    numeric = pa.opaque(pa.string(), "numeric", "PostgreSQL")  # as the driver reads numeric
    shape = shape_of(map_column("v", "numeric", "numeric(5,1)", True, "N", None),
                     map_column("a", "_numeric", "numeric(5,1)[]", True, "A", "numeric"))
    table = pa.Table.from_arrays([pa.chunked_array([], numeric), pa.chunked_array([], pa.list_(numeric)),
                                  pa.chunked_array([], pa.list_(pa.int32())), pa.chunked_array([], pa.int64())],
                                 names=["c0_0", "c1_0", "c1_1", VERSION_COLUMN])
    out = to_target(table, shape)
    assert out.num_rows == 0
    assert out.schema.field("v").type == pa.decimal128(5, 1)
    assert out.schema.field("a").type == pa.list_(pa.decimal128(5, 1))
