"""The type cases of the peers' own suites, value by value: exact in ClickHouse, or quarantined with a reason
that names the column; ClickHouse's own PostgreSQL reader (the postgresql() table function) reads the same
values beside it, and the test prints both verdicts.

The cases are drawn from ClickHouse's PostgreSQL integration tests (the table function, the database
engine, MaterializedPostgreSQL) and PeerDB's ClickHouse end-to-end tests (types, large numerics, time,
infinities, JSON, arrays), with their siblings: arrays of every scalar type in 1-3 dimensions, empty arrays
and NULL elements, NaN / ±Infinity / -0 / subnormals in every float form, numeric typmods at the edges,
domains, enums, ranges, geometry, network and text-search types.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from etl_service.postgres.embedded import postgres
from etl_service.run.pipeline import OK, run_job
from etl_service.service.checks import check
from etl_service.settings.reading import load

from .conftest import Backend, World, fresh_world

Q = "quarantined"


@dataclass(frozen=True)
class Case:
    pg_type: str
    values: tuple[str, ...]  # SQL literals, one row each
    quarantined: tuple[str, ...] = ()  # those of `values` that ClickHouse cannot hold as they are
    pg: str = "{c}"  # what PostgreSQL is asked for, to compare
    ch: str = "{c}"  # what ClickHouse is asked for
    norm: str = "plain"  # how both sides are brought to one form (see NORMS)


def _bits(kind: str) -> Callable[[Any], Any]:
    def norm(value: Any) -> Any:
        if isinstance(value, list):
            return [norm(v) for v in value]
        return None if value is None else struct.pack(kind, float(value))
    return norm


def _utc(value: Any) -> Any:
    if isinstance(value, list):
        return [_utc(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, memoryview | bytes):
        return bytes(value)
    return value


NORMS: dict[str, Callable[[Any], Any]] = {"plain": _plain, "f4": _bits("<f"), "f8": _bits("<d"), "utc": _utc}
TEXT = {"pg": "{c}::text", "ch": "{c}"}

CASES = [
    Case("smallint", ("-32768", "32767", "0")),
    Case("integer", ("-2147483648", "2147483647")),
    Case("bigint", ("-9223372036854775808", "9223372036854775807")),
    Case("numeric(12,2)", ("9999999999.99", "-0.01", "0", "'NaN'"), ("'NaN'",)),
    Case("numeric(38,0)", ("99999999999999999999999999999999999999", "-1")),
    Case("numeric(50,10)", ("1234567890123456789012345678901234567890.0123456789", "-0.0000000001")),
    Case("numeric(76,38)", ("12345678901234567890123456789012345678.12345678901234567890123456789012345678",)),
    Case("numeric(3,5)", ("0.00123", "-0.00999")),
    Case("numeric(5,-2)", ("12300", "-9999900")),
    Case("numeric", ("3.14159265358979323846264338327950288", "'NaN'", "'Infinity'", "'-Infinity'", "1e100",
                     "0.000001"), **TEXT),
    Case("numeric(100,2)", ("12345678901234567890.12",), **TEXT),
    Case("real", ("1.4e-45", "3.4028235e38", "'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "0.1"), norm="f4"),
    Case("double precision", ("5e-324", "1.7976931348623157e308", "'NaN'", "'Infinity'", "'-Infinity'", "'-0'",
                              "0.1"), norm="f8"),
    Case("boolean", ("true", "false")),
    Case("text", ("''", "E'h\\u00e9llo \"q\", comma\\nline'", "E'\\U0001F600 back\\\\slash'")),
    Case("varchar(5)", ("'abcde'", "''")),
    Case("char(5)", ("'ab'", "'abcde'")),
    Case("name", ("'a_name'",)),
    Case('"char"', ("'x'",), **TEXT),
    Case("bytea", ("'\\x'", "'\\x00ff10'", "decode(repeat('ab', 5000), 'hex')"),
         pg="encode({c}, 'hex')", ch="lower(hex({c}))"),
    Case("date", ("'2024-02-29'", "'1900-01-01'", "'0001-01-01'", "'9999-12-31'", "'infinity'", "'-infinity'",
                  "'4713-01-01 BC'", "'10000-01-01'"),
         ("'infinity'", "'-infinity'", "'4713-01-01 BC'", "'10000-01-01'")),
    Case("timestamp", ("'2024-02-29 23:59:59.999999'", "'1900-01-01 00:00:00'", "'0001-01-01 00:00:00'",
                       "'infinity'", "'-infinity'", "'10000-01-01 00:00:00'", "'294276-12-31 23:59:59'"),
         ("'infinity'", "'-infinity'", "'10000-01-01 00:00:00'", "'294276-12-31 23:59:59'")),
    Case("timestamptz", ("'2024-06-01 12:34:56.789012+02'", "'1970-01-01 00:00:00.000001+00'", "'infinity'"),
         ("'infinity'",), norm="utc"),
    Case("time", ("'12:34:56.789012'", "'24:00:00'"), **TEXT),
    Case("timetz", ("'12:34:56+05:30'",), **TEXT),
    Case("interval", ("'1 day 02:03:04.5'", "'-3 mons'", "'178000000 years'"), **TEXT),
    Case("uuid", ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "'00000000-0000-0000-0000-000000000000'"),
         pg="{c}::text", ch="toString({c})"),
    Case("json", ("'{\"b\": 1,  \"a\": [1, 2]}'", "'\"\\u00e9\"'", "'1e400'"), **TEXT),
    Case("jsonb", ("'{\"b\": 1, \"a\": [1,2], \"c\": {\"d\": null}}'", "'[]'", "'123456789012345678901234567890'"),
         **TEXT),
    Case("inet", ("'10.0.0.1/8'", "'::1'"), **TEXT),
    Case("cidr", ("'10.0.0.0/8'",), **TEXT),
    Case("macaddr", ("'08:00:2b:01:02:03'",), **TEXT),
    Case("macaddr8", ("'08:00:2b:01:02:03:04:05'",), **TEXT),
    Case("money", ("12.34",), **TEXT),
    Case("bit(3)", ("B'101'",), **TEXT),
    Case("bit varying", ("B'1011001'",), **TEXT),
    Case("tsvector", ("'a fat cat'",), **TEXT),
    Case("tsquery", ("'fat & rat'",), **TEXT),
    Case("point", ("'(1.5,2)'",), **TEXT),
    Case("box", ("'((0,0),(1,1))'",), **TEXT),
    Case("polygon", ("'((0,0),(1,1),(1,0))'",), **TEXT),
    Case("circle", ("'<(0,0),2>'",), **TEXT),
    Case("int4range", ("'[1,10)'", "'empty'"), **TEXT),
    Case("numrange", ("'(1.5,2.5]'",), **TEXT),
    Case("tstzrange", ("'[2024-01-01 00:00:00+00,)'",), **TEXT),
    Case("int4multirange", ("'{[1,3),[5,7)}'",), **TEXT),
    Case("mood", ("'happy'",), **TEXT),
    Case("posint", ("5",), **TEXT),
    Case("pg_lsn", ("'16/B374D848'",), **TEXT),
    Case("oid", ("4294967295",), **TEXT),
    # arrays: every scalar kind, NULL elements, empty and NULL arrays, 1 to 3 dimensions
    Case("smallint[]", ("'{1,NULL,-32768}'", "'{}'", "NULL")),
    Case("integer[]", ("'{1,NULL,3}'", "'[0:2]={7,8,9}'", "'[5:7]={7,8,9}'", "'{{1,2},{3,4}}'"),
         ("'{{1,2},{3,4}}'",)),
    Case("bigint[]", ("'{9223372036854775807}'",)),
    Case("real[]", ("'{NaN,Infinity,-Infinity,-0,1.4e-45,NULL}'",), norm="f4"),
    Case("double precision[]", ("'{NaN,Infinity,-Infinity,-0,5e-324}'",), norm="f8"),
    Case("numeric(10,2)[]", ("'{1.25,NULL,-0.01}'", "'{NaN,1.25}'"), ("'{NaN,1.25}'",)),
    Case("numeric[]", ("'{1.5,NaN,1e30}'",), pg="{c}::text[]"),
    Case("boolean[]", ("'{t,f,NULL}'",)),
    Case("text[]", ("'{\"a\",\"b,c\",NULL,\"\",\"q\\\"uote\"}'",)),
    Case("varchar(50)[]", ("'{tag1,tag2}'", "'{}'")),
    Case("char(3)[]", ("'{a,bc}'",)),
    Case("date[]", ("'{2024-01-01,NULL}'", "'{infinity}'"), ("'{infinity}'",)),
    Case("timestamp[]", ("'{\"2024-01-01 00:00:00.000001\"}'",)),
    Case("timestamptz[]", ("'{\"2024-01-01 00:00:00+02\"}'",), norm="utc"),
    Case("uuid[]", ("'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}'",), pg="{c}::text[]",
         ch="arrayMap(x -> toString(x), {c})"),
    Case("jsonb[]", ("ARRAY['{\"a\": 1}'::jsonb, NULL]",), pg="{c}::text[]"),
    Case("interval[]", ("'{\"1 day\",NULL}'", "'[-3:-3]={\"2 days\"}'"), pg="(({c})[:])::text[]"),
    Case("inet[]", ("'{10.0.0.1}'",), pg="{c}::text[]"),
    Case("mood[]", ("'{happy,sad}'",), pg="{c}::text[]"),
    Case("integer[][]", ("'{{1,2},{3,NULL}}'", "'{}'", "'{1,2}'", "'[2:3][5:6]={{1,2},{3,4}}'"), ("'{1,2}'",),
         pg="({c})[:]"),
    Case("text[][][]", ("'{{{a,b},{c,d}},{{e,f},{g,h}}}'",)),
    Case("double precision[][]", ("'{{NaN,1},{-0,Infinity}}'",), norm="f8"),
]


def _column(i: int) -> str:
    return f"c{i}"


@pytest.fixture(scope="module")
def tcp_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL of its own that also listens on TCP: ClickHouse's postgresql() reads it there."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with postgres(tmp_path_factory.mktemp("tcp-pg") / "pg") as server:
        yield server.listen_tcp(port)


@pytest.fixture
def matrix_world(backend: Backend, tcp_postgres: str, tmp_path: Path) -> Iterator[World]:
    if backend.name != "embedded":
        pytest.skip("the type matrix runs on the embedded servers (its own PostgreSQL on TCP)")
    with fresh_world(Backend(backend.name, tcp_postgres, backend.click_env, backend.client_kwargs,
                             backend.subprocess_ok, backend.ch()), tmp_path) as world:
        yield world


def _make_table(world: World) -> list[tuple[int, int, str]]:
    """The matrix table: one column per case, one row per value (the other columns NULL)."""
    world.sql("CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN posint AS integer CHECK (VALUE > 0)")
    columns = ", ".join(f"{_column(i)} {case.pg_type}" for i, case in enumerate(CASES))
    world.sql(f"CREATE TABLE m (id bigint PRIMARY KEY, {columns}, processed boolean NOT NULL DEFAULT false)")
    rows, key = [], 0
    for i, case in enumerate(CASES):
        for literal in case.values:
            key += 1
            world.sql(f"INSERT INTO m (id, {_column(i)}) VALUES ({key}, ({literal})::{case.pg_type})")
            rows.append((key, i, literal))
        # the reader reads a whole table's structure first: one view per column keeps a type it refuses apart
        world.sql(f"CREATE VIEW m_{_column(i)} AS SELECT id, {_column(i)} FROM m WHERE {_column(i)} IS NOT NULL")
    return rows


def _reader_value(world: World, port_uri: str, case: Case, i: int, key: int) -> tuple[str, Any]:
    """What ClickHouse's own postgresql() reader makes of the value: ('ok', value) or ('error', text)."""
    parts = psycopg2.extensions.parse_dsn(port_uri)
    source = (f"postgresql('{parts['host']}:{parts['port']}', '{world.ch_database}', 'm_{_column(i)}',"
              f" '{parts['user']}', '')")
    try:
        rows = world.ch_rows(f"SELECT {case.ch.format(c=_column(i))} FROM {source} WHERE id = {key}")
    except Exception as exc:
        return "error", str(exc).splitlines()[0][:90]
    return "ok", rows[0][0] if rows else None


def test_every_peer_type_case_is_exact_or_quarantined_by_name(matrix_world: World, tcp_postgres: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    world = matrix_world
    rows = _make_table(world)
    settings = load(environ=world.env(source_table="public.m", target_table="m", batch_size="100000"))
    said: list[str] = []
    assert check(settings, said.append), "\n".join(said)  # the claim's and the chunk's statements, no row read
    assert any("every column reads (binary COPY) into its ClickHouse type" in line for line in said)
    result = run_job(settings, settings.jobs[0])
    assert result.status == OK, result.message

    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine WHERE job = 'm'"))
    report, wrong, ours_exact, ours_set_aside, peer_changed = [], [], 0, 0, 0
    for key, i, literal in rows:
        case = CASES[i]
        name, norm = _column(i), NORMS[case.norm]
        reason = reasons.get(str(key))
        status, value = _reader_value(world, tcp_postgres, case, i, key)
        if literal in case.quarantined:  # PostgreSQL's own text, as a Python value may not exist
            want = world.sql(f"SELECT {name}::text FROM m WHERE id = {key}")[0][0]
            ours = f"{Q}: {reason}" if reason else "LOADED"
            if not reason or f"'{name}'" not in reason:
                wrong.append(f"{case.pg_type} {literal}: expected a quarantine naming {name}, got {ours}")
            ours_set_aside += 1
            peer = f"error: {value}" if status == "error" else f"gives {value!s:.40} for {want}"
            peer_changed += status == "ok"
        else:
            want = norm(world.sql(f"SELECT {case.pg.format(c=name)} FROM m WHERE id = {key}")[0][0])
            if case.pg_type.endswith("]") and want is None:
                want = []  # documented: a NULL array arrives as []
            got = world.ch_rows(f"SELECT {case.ch.format(c=name)} FROM {world.target('m')} WHERE id = {key}")
            held = norm(got[0][0]) if got else None
            ours = "exact" if got and held == want else (f"{Q}: {reason}" if reason else f"CHANGED to {held!r}")
            if ours != "exact":
                wrong.append(f"{case.pg_type} {literal}: {ours} (PostgreSQL has {want!r})")
            ours_exact += 1
            if status == "ok" and norm(value) == want:
                peer = "same"
            else:
                peer = f"error: {value}" if status == "error" else f"CHANGED to {norm(value)!r}"[:90]
                peer_changed += status == "ok"
        report.append(f"  {case.pg_type:<22} {literal[:34]:<34} etl-service: {ours[:70]:<40} postgresql(): {peer}")
    with capsys.disabled():
        print(f"\ntype matrix: {len(CASES)} types, {len(rows)} values; etl-service: {ours_exact} exact,"
              f" {ours_set_aside} quarantined by name; ClickHouse's postgresql() reader changed {peer_changed}")
        print("\n".join(report))
    assert not wrong, "\n".join(wrong)
    assert result.rows_quarantined == sum(len(case.quarantined) for case in CASES)


def test_a_value_set_aside_names_its_column_and_the_value(matrix_world: World) -> None:
    world = matrix_world
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, d date, amounts numeric(8,2)[], grid integer[],"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src VALUES (1, 'infinity', NULL, NULL), (2, NULL, '{NaN}', NULL),"
              " (3, NULL, NULL, '{{1},{2}}'), (4, '2024-01-01', '{1.5}', '{1,2}')")
    settings = load(environ=world.env())
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 1, 3)
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    assert "'d'" in reasons["1"] and "infinity" in reasons["1"]
    assert "'amounts'" in reasons["2"] and "NaN" in reasons["2"].replace("nan", "NaN")
    assert "'grid'" in reasons["3"] and "2-dimensional" in reasons["3"]
    assert world.ch_rows(f"SELECT id, d, amounts, grid FROM {world.target()}") == [
        (4, date(2024, 1, 1), [Decimal("1.50")], [1, 2])]
