"""Every mapped type round-trips with exact values: ClickHouse returns what PostgreSQL returns."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from etl_service.clickhouse import target_table
from etl_service.errors import ConfigError
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.keys import Key, KeyColumn
from etl_service.postgres.typemap import map_column
from etl_service.run.pipeline import OK, run_job
from etl_service.service.checks import check

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


def test_text_into_a_typed_column_arrives_as_the_value_it_writes_or_is_quarantined_by_name(world: World) -> None:
    # an operator-made target with typed columns for text (and unconstrained numeric, which is read as its
    # text): ClickHouse parses the text on insert, truncating digits, clamping dates, and storing NULL for
    # what it cannot read; none of that may happen silently
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric, n text, day text, at text, u text,"
              " f text, dur interval, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src (id, amount, n, day, at, u, f, dur) VALUES"
              " (1, 12.5, '12', '2024-01-01', '2024-01-01 00:00:00.123', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',"
              "  '0.5', NULL),"
              " (2, 1.239, NULL, NULL, NULL, NULL, NULL, NULL),"  # a digit Decimal(10, 2) would drop
              " (3, 1e20, NULL, NULL, NULL, NULL, NULL, NULL),"  # beyond Decimal(10, 2): ClickHouse stores NULL
              " (4, NULL, '1.5', NULL, NULL, NULL, NULL, NULL),"  # not an integer: NULL
              " (5, NULL, '99999999999', NULL, NULL, NULL, NULL, NULL),"  # beyond Int32: NULL
              " (6, NULL, NULL, '2300-01-01', NULL, NULL, NULL, NULL),"  # beyond Date: clamped to 2149-06-06
              " (7, NULL, NULL, NULL, '2024-01-01 00:00:00.123456', NULL, NULL, NULL),"  # finer than DateTime64(3)
              " (8, NULL, NULL, NULL, NULL, 'not-a-uuid', NULL, NULL),"
              " (9, NULL, NULL, NULL, NULL, NULL, '16777217', NULL),"  # Float32 holds 16777216
              " (10, NULL, NULL, NULL, NULL, NULL, NULL, '1 day')")  # interval text into Int64: NULL
    operator_target(world, "id Int64, amount Nullable(Decimal(10, 2)), n Nullable(Int32), day Nullable(Date),"
                           " at Nullable(DateTime64(3)), u Nullable(UUID), f Nullable(Float32), dur Nullable(Int64)")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 1, 9)
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    for key, column, said in [("2", "amount", "more digits after the point"), ("3", "amount", "does not fit"),
                              ("4", "n", "not a number"), ("5", "n", "does not fit Int32"),
                              ("6", "day", "out of the range of Date"), ("7", "at", "more precise"),
                              ("8", "u", "not a UUID"), ("9", "f", "not held exactly by Float32"),
                              ("10", "dur", "'1 day' is not a number")]:
        assert f"column '{column}'" in reasons[key] and said in reasons[key], (key, reasons[key])
    assert world.ch_rows(f"SELECT id, amount, n, toString(day), toString(at), toString(u), f FROM {world.target()}") \
        == [(1, Decimal("12.50"), 12, "2024-01-01", "2024-01-01 00:00:00.123", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
             0.5)]


def test_an_array_column_declared_deeper_after_its_target_was_made_keeps_its_targets_depth(world: World) -> None:
    # `ALTER COLUMN a TYPE int[][]` changes only the declared dimensions (the type stays integer[]): the
    # target keeps Array(Nullable(Int32)); one-dimensional values still go, deeper ones are bad rows by name
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, a integer[], processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src VALUES (1, '{1,2}')")
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).rows_marked == 1
    world.sql("ALTER TABLE src ALTER COLUMN a TYPE integer[][];"
              "INSERT INTO src VALUES (2, '{{1,2},{3,4}}'), (3, '{5}'), (4, NULL)")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 2, 1)
    reason = world.sql("SELECT reason FROM etl.quarantine WHERE key = '2'")[0][0]
    assert "'a'" in reason and "2-dimensional" in reason
    assert world.ch_rows(f"SELECT id, a FROM {world.target()} ORDER BY id") == [(1, [1, 2]), (3, [5]), (4, [])]


def test_values_an_operators_column_would_change_are_quarantined_by_name(world: World) -> None:
    # each of these was stored changed by ClickHouse's own conversion on insert, with no error
    cases = [  # (source type, the operator's column type, the value)
        ("double precision", "Decimal(10, 2)", "0.29"),  # ClickHouse truncates 28.999999999999996: 0.28
        ("double precision", "Int64", "9223372036854775807"),  # the double is 2^63: stored as -2^63
        ("double precision", "UInt64", "18446744073709551615"),  # 2^64
        ("numeric(5,2)", "Bool", "0.5"),  # true
        ("text", "DateTime64(6, 'UTC')", "'2024-01-01T10:00:00Z'"),  # NULL
        ("text", "DateTime", "'2024-01-01 10:00:00+05'"),  # NULL
        ("text", "UInt8", "'-0'"),  # NULL
        ("text", "UUID", "'a0eebc99-9c0b4ef8bb6d6bb9bd380a11'"),  # NULL
        ("text", "IPv6", "'fe80::1%eth0'"),  # NULL
        ("integer", "Enum8('x = 5' = 3)", "5"),  # NULL
        ("date", "DateTime('Asia/Tokyo')", "'1970-01-01'"),  # before 1970 in Tokyo: wrapped to 2106
        ("text", "Float64", "'1e400'"),  # inf
        ("text", "Float64", "'5\n'"),  # NULL
        ("double precision[]", "Array(Decimal(10, 2))", "'{0.29}'"),
    ]
    columns = ", ".join(f"c{i} {pg}" for i, (pg, _, _) in enumerate(cases))
    world.sql(f"CREATE TABLE src (id bigint PRIMARY KEY, {columns}, processed boolean NOT NULL DEFAULT false)")
    for i, (pg, _, value) in enumerate(cases):  # each beside a row that fits (a run of bad rows alone stops it)
        world.sql(f"INSERT INTO src (id, c{i}) VALUES ({2 * i}, ({value})::{pg}), ({2 * i + 1}, NULL)")
    operator_target(world, "id Int64, " + ", ".join(
        f"c{i} {ch if ch.startswith('Array') else f'Nullable({ch})'}" for i, (_, ch, _) in enumerate(cases)))
    settings = world.settings(batch_size="4", chunk_size="2")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, len(cases), len(cases)), \
        result.message
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    for i in range(len(cases)):
        assert f"column 'c{i}'" in reasons[str(2 * i)], (cases[i], reasons[str(2 * i)])
    assert world.ch_rows(f"SELECT id FROM {world.target()} ORDER BY id") == [(2 * i + 1,) for i in range(len(cases))]


def test_a_target_column_whose_conversion_cannot_be_checked_is_refused_up_front_by_name(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, blob bytea, n integer, at timestamp, tags integer[],"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src VALUES (1, '\\x01', 1, now(), '{1}')")
    operator_target(world, "id Int64, blob Nullable(Int32), n Nullable(Date32), at Nullable(Int64),"
                           " tags Array(Nullable(UUID))")
    settings = world.settings()
    lines: list[str] = []
    healthy = check(settings, lines.append)
    failed = [line for line in lines if "FAIL" in line]
    assert not healthy
    for said in ("column blob (bytea) into Nullable(Int32)", "column n (integer) into Nullable(Date32)",
                 "column at (timestamp without time zone) into Nullable(Int64)", "column tags (integer[])"):
        assert any(said in line for line in failed), (said, failed)
    result = run_job(settings, settings.jobs[0])
    assert result.status != OK and "column blob (bytea)" in (result.message or "")
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(0,)]
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]


def test_text_for_a_typed_column_is_sent_as_its_value_not_as_text_to_parse(world: World) -> None:
    # ClickHouse's own reading of float text on insert is not always the nearest float (6.732790423501354
    # arrived as 6.7327904235013545): the service reads the text and sends the value. Text times and dates
    # for a column in a zone are that zone's wall clock, as ClickHouse reads them, except one the zone
    # skips (a DST gap: ClickHouse moves it by an hour)
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, f text, r text, big text, ns text, ny text, d date,"
              " amount numeric, processed boolean NOT NULL DEFAULT false);"
              f"INSERT INTO src VALUES (1, '6.732790423501354', '1.5e-38', '{2**255 - 1}',"  # Int256's largest
              " '2024-01-01 00:00:00.123456789', '2024-03-10 12:00:00', '2024-01-02', 12345678901234567890.12),"
              " (2, '9.949413129414565e-304', '3e-38', NULL, NULL, NULL, NULL, NULL),"
              f" (3, NULL, NULL, '{2**256 + 5}',"  # wrapped to 5 by a 256-bit parse
              "  NULL, NULL, NULL, NULL),"
              " (4, NULL, NULL, NULL, '2300-01-01 00:00:00', NULL, NULL, NULL),"  # beyond DateTime64(9)
              " (6, NULL, NULL, NULL, NULL, '2024-03-10 02:30:00', NULL, NULL),"  # skipped in New York
              " (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL)")
    operator_target(world, "id Int64, f Nullable(Float64), r Nullable(Float32), big Nullable(Int256),"
                           " ns Nullable(DateTime64(9)), ny Nullable(DateTime('America/New_York')),"
                           " d Nullable(DateTime('Asia/Tokyo')), amount Nullable(Decimal(38, 2))")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 3, 3), result.message
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    assert "column 'big'" in reasons["3"] and "does not fit Int256" in reasons["3"]
    assert "column 'ns'" in reasons["4"]
    assert "column 'ny'" in reasons["6"] and "does not exist in America/New_York" in reasons["6"]
    rows = world.ch_rows(f"SELECT id, f, toString(r), toString(big), toString(ns), toUnixTimestamp(ny),"
                         f" toUnixTimestamp(d), amount FROM {world.target()} ORDER BY id")
    assert rows[0] == (1, 6.732790423501354, "1.5e-38", str(2**255 - 1),
                       "2024-01-01 00:00:00.123456789", 1710086400, 1704121200, Decimal("12345678901234567890.12"))
    assert rows[1][:3] == (2, 9.949413129414565e-304, "3e-38")


def test_edges_of_text_read_for_typed_columns(world: World) -> None:
    # found by an adversarial review: floats below the smallest normal rounded to 0, '+5' that the check took
    # and the conversion refused (every run failed), 10^38 into Decimal(38, 0), a Decimal's zeros past its
    # scale, nanoseconds past 2262 in a zoned column, a 9-digit second into a Date
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, f text, n text, d text, t text, day text,"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src VALUES (1, '1e-400', NULL, NULL, NULL, NULL), (2, '1.5e-320', '+5',"
              f" '1.{'0' * 40}', '2024-01-01 10:00:00', '2024-01-01 00:00:00.000000000'),"
              f" (3, NULL, NULL, '1{'0' * 38}', NULL, NULL), (4, NULL, NULL, NULL, '2262-04-11 20:00:00', NULL),"
              " (5, '0.0', '7', '2.5', NULL, NULL)")
    operator_target(world, "id Int64, f Nullable(Float64), n Nullable(Int32), d Nullable(Decimal(38, 2)),"
                           " t Nullable(DateTime64(9, 'America/New_York')), day Nullable(Date)")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 2, 3), result.message
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    assert "column 'f'" in reasons["1"] and "column 'd'" in reasons["3"] and "column 't'" in reasons["4"]
    assert world.ch_rows(f"SELECT id, f, n, d, toString(t), toString(day) FROM {world.target()} ORDER BY id") == [
        (2, 1.5e-320, 5, Decimal("1.00"), "2024-01-01 10:00:00.000000000", "2024-01-01"),
        (5, 0.0, 7, Decimal("2.50"), None, None)]
