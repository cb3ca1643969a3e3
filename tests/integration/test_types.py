"""Every mapped type round-trips with exact values: ClickHouse returns what PostgreSQL returns."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from etl_service.clickhouse import target_table
from etl_service.errors import ConfigError
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.keys import Key, KeyColumn
from etl_service.postgres.typemap import map_column
from etl_service.run.pipeline import OK, run_job

from .conftest import World
from .helpers import operator_target

TABLE = """
CREATE TABLE src (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    n numeric(12,2), nbig numeric(50,10), nfree numeric,
    r real, d double precision, b boolean,
    t text, vc varchar(20), ch char(5),
    dt date, ts timestamp, tstz timestamptz,
    u uuid, j json, jb jsonb, by bytea,
    ai integer[], at text[], an numeric(6,2)[], ad date[],
    iv interval,
    processed boolean NOT NULL DEFAULT false
);
INSERT INTO src VALUES
 (1, -32768, 2147483647, -9223372036854775808, 9999999999.99,
  1234567890123456789012345678901234567890.0123456789, 3.14159265358979323846264338327950288,
  1.5, 0.1, true, E'h\u00e9llo "quoted", comma\\nnew line', '', 'ab',
  '1900-01-01', '2024-02-29 23:59:59.999999', '2024-06-01 12:34:56.789012+02',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": [1,2]}', '\\x00ff10',
  '{1,NULL,3}', '{"a","b,c",NULL,""}', '{1.50,NULL,-2.25}', '{2024-01-01,NULL}',
  '1 day 02:03:04.5', false),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false),
 (3, 32767, -2147483648, 9223372036854775807, -0.01, -0.0000000001, 0, 3.4028235e38,
  -1.7976931348623157e308, false, 'x', 'twenty chars exactly', 'abcde',
  '2299-12-31', '1900-01-01 00:00:00', '1970-01-01 00:00:00.000001+00',
  '00000000-0000-0000-0000-000000000000', '[]', '{}', '\\x', '{}', '{}', '{}', '{}', '-3 mons', false);
"""

PG_SELECT = """
SELECT id, i2, i4, i8, n, nbig, nfree::text, r, d, b, t, vc, ch, dt, ts, tstz, u::text, j::text, jb::text,
       encode(by, 'hex'), ai, at, an, ad, iv::text
FROM src ORDER BY id
"""

COLUMNS = ["id", "i2", "i4", "i8", "n", "nbig", "nfree", "r", "d", "b", "t", "vc", "ch", "dt", "ts", "tstz",
           "u", "j", "jb", "by", "ai", "at", "an", "ad", "iv"]

CH_SELECT = """
SELECT id, i2, i4, i8, n, nbig, nfree, r, d, b, t, vc, ch, dt, ts, tstz, toString(u), j, jb,
       lower(hex(by)), ai, at, an, ad, iv
FROM {table} ORDER BY id
"""


def _normal(value: Any, column: str) -> Any:
    """Bring both sides to one comparable form where the drivers differ in Python types only."""
    if column == "tstz" and isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if column == "r" and value is not None:
        return struct.pack("<f", value)  # compare as float32 bits
    if column in ("ai", "at", "an", "ad") and value is None:
        return []  # documented: a NULL array arrives as []
    return value


def test_every_mapped_type_round_trips_exactly(world: World) -> None:
    world.sql(TABLE)
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 3)

    pg_rows = world.sql(PG_SELECT)
    ch_rows = world.ch_rows(CH_SELECT.format(table=world.target()))
    assert len(pg_rows) == len(ch_rows) == 3
    for pg_row, ch_row in zip(pg_rows, ch_rows, strict=True):
        for name, pg_value, ch_value in zip(COLUMNS, pg_row, ch_row, strict=True):
            assert _normal(ch_value, name) == _normal(pg_value, name), f"id={pg_row[0]} column {name}"


def test_target_types_follow_the_documented_mapping(world: World) -> None:
    world.sql(TABLE)
    settings = world.settings()
    run_job(settings, settings.jobs[0])
    types = dict(world.ch_rows("SELECT name, type FROM system.columns WHERE database = {db:String}"
                               " AND table = 'dst'", {"db": world.ch_database}))
    assert types == {
        "id": "Int64", "i2": "Nullable(Int16)", "i4": "Nullable(Int32)", "i8": "Nullable(Int64)",
        "n": "Nullable(Decimal(12, 2))", "nbig": "Nullable(Decimal(50, 10))", "nfree": "Nullable(String)",
        "r": "Nullable(Float32)", "d": "Nullable(Float64)", "b": "Nullable(Bool)",
        "t": "Nullable(String)", "vc": "Nullable(String)", "ch": "Nullable(String)",
        "dt": "Nullable(Date32)", "ts": "Nullable(DateTime64(6))", "tstz": "Nullable(DateTime64(6, 'UTC'))",
        "u": "Nullable(UUID)", "j": "Nullable(String)", "jb": "Nullable(String)", "by": "Nullable(String)",
        "ai": "Array(Nullable(Int32))", "at": "Array(Nullable(String))", "an": "Array(Nullable(Decimal(6, 2)))",
        "ad": "Array(Nullable(Date32))", "iv": "Nullable(String)", "_etl_batch": "UInt64", "_etl_version": "UInt64",
    }


def test_an_array_column_whose_target_column_is_a_string_keeps_getting_postgresqls_text(world: World) -> None:
    # what an earlier version made for a multi-dimensional array and for jsonb[]: String, with PostgreSQL's text
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, grid integer[][], docs jsonb[], tags text[],"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src VALUES (1, '{{1,2},{3,NULL}}', ARRAY['{\"a\": 1}'::jsonb], '{x,NULL}'),"
              " (2, NULL, NULL, NULL)")
    operator_target(world, "id Int64, grid Nullable(String), docs Nullable(String), tags Array(Nullable(String))")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 2)
    assert world.ch_rows(f"SELECT id, grid, docs, tags FROM {world.target()} ORDER BY id") == [
        (1, "{{1,2},{3,NULL}}", '{"{\\"a\\": 1}"}', ["x", None]), (2, None, None, [])]


def test_a_type_the_server_does_not_have_is_refused_by_name_before_the_target_is_made(world: World) -> None:
    key = Key((KeyColumn("id", "bigint", False),))
    good = map_column("id", "int8", "bigint", False, "N", None)
    odd = map_column("v", "numeric", "numeric(12,2)", True, "N", None)
    odd = type(odd)(odd.name, odd.pg_type, odd.nullable, "Decimal(80, 2)", odd.arrow_type, odd.select)
    shape = SourceShape(key, (good, odd), ("id", "v"))
    target_table.check_types(world.backend.ch(), SourceShape(key, (good,), ("id",)))
    try:
        target_table.check_types(world.backend.ch(), shape)
    except ConfigError as exc:
        assert "source column v (numeric(12,2)) maps to ClickHouse Nullable(Decimal(80, 2))" in str(exc)
        assert "ETL_COLUMNS" in str(exc)
    else:
        raise AssertionError("Decimal(80, 2) was accepted")
