"""Columns added at the source while rows are already in ClickHouse: the loaded rows show what PostgreSQL has.

The migrations are written as Django and Alembic emit them: `AddField(IntegerField(default=5))` is
`ADD COLUMN … NOT NULL DEFAULT 5` then `ALTER COLUMN … DROP DEFAULT`; Alembic's `add_column` with
`server_default` keeps the default. PostgreSQL writes a constant default into no row (it keeps it in the
catalog, attmissingval); a volatile one rewrites the table and gives each row its own value.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from etl_service.run.pipeline import OK, run_job
from etl_service.service import report

from .conftest import World
from .helpers import logged

COLUMNS = "id, label, priority, channel, price, due, urgent, token"


def _normal(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _source(world: World) -> list[tuple[Any, ...]]:
    return [tuple(map(_normal, row)) for row in world.sql(f"SELECT {COLUMNS} FROM src ORDER BY id")]


def _target(world: World, mode: str) -> list[tuple[Any, ...]]:
    if mode == "latest":
        query = f"SELECT {COLUMNS} FROM {world.target()} FINAL ORDER BY id"
    else:  # each key's newest version
        query = f"SELECT {COLUMNS} FROM {world.target()} ORDER BY id, _etl_version DESC LIMIT 1 BY id"
    return [tuple(map(_normal, row)) for row in world.ch_rows(query)]


@pytest.mark.parametrize("mode", ["append", "latest"])
def test_columns_added_with_a_constant_default_show_it_in_the_rows_loaded_before(world: World, mode: str) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, label text, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src (id, label) SELECT g, 'l' || g FROM generate_series(1, 50) g")
    settings = world.settings(target_mode=mode)
    assert run_job(settings, settings.jobs[0]).rows_marked == 50
    world.sql(  # Django's AddField with a default: added NOT NULL with it, then the default dropped
        "ALTER TABLE src ADD COLUMN priority integer NOT NULL DEFAULT 5;"
        "ALTER TABLE src ALTER COLUMN priority DROP DEFAULT;"
        # Alembic's add_column with a server_default, kept
        "ALTER TABLE src ADD COLUMN channel varchar(20) DEFAULT 'it''s web';"
        "ALTER TABLE src ADD COLUMN price numeric(10,2) NOT NULL DEFAULT 9.90;"
        "ALTER TABLE src ADD COLUMN due timestamptz DEFAULT '2026-03-01 12:00:00.25+02';"
        "ALTER TABLE src ADD COLUMN urgent boolean NOT NULL DEFAULT true;"
        "ALTER TABLE src ADD COLUMN token uuid DEFAULT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11';"
        "INSERT INTO src (id, label, priority, channel, price, due, urgent, token)"
        " VALUES (51, 'new', 7, 'app', 1.5, NULL, false, NULL);"
        "INSERT INTO src (id, label, priority) VALUES (52, 'new', 8)")
    with logged("INFO") as lines:
        result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 2)
    assert _target(world, mode) == _source(world)
    assert _source(world)[0] == (1, "l1", 5, "it's web", Decimal("9.90"), datetime(2026, 3, 1, 10, 0, 0, 250000),
                                 True, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert any("added column priority" in line and "'5'" in line for line in lines)
    assert not any("WARNING" in line and "loaded before column" in line for line in lines)
    # the DEFAULT is for the rows that predate the column: a later row with NULL keeps its NULL
    world.sql("INSERT INTO src (id, label, priority, channel) VALUES (53, 'x', 1, NULL)")
    run_job(settings, settings.jobs[0])
    assert _target(world, mode) == _source(world)


@pytest.mark.parametrize("changes", ["auto", "fail"])
def test_rows_holding_their_own_values_in_a_new_column_are_sent_again(world: World, changes: str) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, label text, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src (id, label) SELECT g, 'l' || g FROM generate_series(1, 30) g")
    settings = world.settings(target_mode="latest", schema_changes=changes)
    assert run_job(settings, settings.jobs[0]).rows_marked == 30
    # a volatile default rewrites the table: each row gets its own value, which no catalog entry holds
    world.sql("ALTER TABLE src ADD COLUMN token uuid DEFAULT gen_random_uuid();"
              "INSERT INTO src (id, label) VALUES (31, 'new')")
    with logged("INFO") as lines:
        result = run_job(settings, settings.jobs[0])
    said = [line for line in lines if "loaded before column token" in line]
    assert said and "30 row(s)" in said[0] and "show NULL" in said[0], lines
    if changes == "fail":  # the service may not write the flag for it: it says how
        assert result.rows_marked == 1
        statement = said[0].split("to send them again, ")[1].split(" (each loads")[0]
        assert statement.startswith("UPDATE ")
        world.sql(statement)
        result = run_job(settings, settings.jobs[0])
        assert result.rows_marked == 31  # row 31 too: it holds a token (sent again, harmless)
    else:  # sent again by the same run, and status says what was done
        assert (result.status, result.rows_marked) == (OK, 31), result.message
        assert any("30 row(s) of public.src set to be sent again" in line for line in lines), lines
        shown: list[str] = []
        report.status(settings, shown.append)
        said_status = [line for line in shown if "last column change at the source" in line]
        assert said_status and "added column token" in said_status[0] and "30 row(s) sent again" in said_status[0]
    source = {row[0]: str(row[1]) for row in world.sql("SELECT id, token FROM src")}
    assert dict(world.ch_rows(f"SELECT id, toString(token) FROM {world.target()} FINAL")) == source
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]


@pytest.mark.parametrize("mode", ["append", "latest"])
def test_a_column_renamed_at_the_source_is_renamed_in_the_target_with_its_values(world: World, mode: str) -> None:
    # Django's RenameField and Alembic's alter_column(new_column_name=…): ALTER TABLE … RENAME COLUMN
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, label text, score integer,"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src (id, label, score) SELECT g, 'l' || g, g * 10 FROM generate_series(1, 40) g")
    settings = world.settings(target_mode=mode)
    assert run_job(settings, settings.jobs[0]).rows_marked == 40
    world.sql("ALTER TABLE src RENAME COLUMN label TO title; INSERT INTO src VALUES (41, 'new', 5, false)")
    with logged("INFO") as lines:
        result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 1)
    assert any("column label renamed to title" in line for line in lines)
    assert not any("loaded before column" in line for line in lines)
    columns = [row[0] for row in world.ch_rows(f"DESCRIBE TABLE {world.target()}")]
    assert "title" in columns and "label" not in columns
    query = (f"SELECT id, title, score FROM {world.target()} FINAL ORDER BY id" if mode == "latest" else
             f"SELECT id, title, score FROM {world.target()} ORDER BY id, _etl_version DESC LIMIT 1 BY id")
    assert world.ch_rows(query) == world.sql("SELECT id, title, score FROM src ORDER BY id")


@pytest.mark.parametrize("moved_between", [True, False])
def test_a_column_dropped_and_added_again_shows_the_new_columns_values(world: World, moved_between: bool) -> None:
    # Django's RemoveField, then AddField (or a migration reverted and applied again): PostgreSQL shows the
    # new column's default in every old row, not the values the dropped column had
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, label text, priority integer, note text,"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, 'l' || g, g, 'n' || g FROM generate_series(1, 10) g")
    settings = world.settings(target_mode="latest")
    assert run_job(settings, settings.jobs[0]).rows_marked == 10
    world.sql("ALTER TABLE src DROP COLUMN priority; ALTER TABLE src DROP COLUMN note")
    if moved_between:  # a run loads a row while the columns are gone (else none sees them gone)
        world.sql("INSERT INTO src (id, label) VALUES (11, 'x')")
        assert run_job(settings, settings.jobs[0]).rows_marked == 1
    world.sql("ALTER TABLE src ADD COLUMN priority integer NOT NULL DEFAULT 5;"
              "ALTER TABLE src ALTER COLUMN priority DROP DEFAULT; ALTER TABLE src ADD COLUMN note text NULL;"
              "INSERT INTO src (id, label, priority) VALUES (12, 'y', 7)")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 1)
    assert world.ch_rows(f"SELECT id, label, priority, note FROM {world.target()} FINAL ORDER BY id") == \
        world.sql("SELECT id, label, priority, note FROM src ORDER BY id")


def test_a_type_change_that_converts_values_sends_the_rows_again(world: World) -> None:
    # Django's AlterField(max_length=5): ALTER COLUMN … TYPE varchar(5) USING …: PostgreSQL cuts every value
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, code varchar(50), processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, 'abcdefghij' || g FROM generate_series(1, 10) g")
    settings = world.settings(target_mode="latest")
    assert run_job(settings, settings.jobs[0]).rows_marked == 10
    world.sql("ALTER TABLE src ALTER COLUMN code TYPE varchar(5) USING left(code, 5);"
              "INSERT INTO src VALUES (11, 'new', false)")
    with logged("WARNING") as lines:
        result = run_job(settings, settings.jobs[0])
    assert any("column code changed from character varying(50) to character varying(5)" in line for line in lines)
    assert (result.status, result.rows_marked) == (OK, 11), result.message
    assert world.ch_rows(f"SELECT id, code FROM {world.target()} FINAL ORDER BY id") == \
        world.sql("SELECT id, code FROM src ORDER BY id")


def test_a_constant_default_added_to_a_partitioned_table_is_read_from_its_partitions(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, label text, processed boolean NOT NULL DEFAULT false)"
              " PARTITION BY RANGE (id);"
              "CREATE TABLE src_a PARTITION OF src FOR VALUES FROM (0) TO (100);"
              "CREATE TABLE src_b PARTITION OF src FOR VALUES FROM (100) TO (200);"
              "INSERT INTO src (id, label) SELECT g, 'l' || g FROM generate_series(1, 150) g")
    settings = world.settings(target_mode="latest")
    assert run_job(settings, settings.jobs[0]).rows_marked == 150
    world.sql("ALTER TABLE src ADD COLUMN channel text NOT NULL DEFAULT 'web';"
              "INSERT INTO src VALUES (151, 'n', false, 'app')")
    with logged("WARNING") as lines:
        assert run_job(settings, settings.jobs[0]).rows_marked == 1
    assert not any("loaded before column" in line for line in lines), lines
    assert world.ch_rows(f"SELECT id, label, channel FROM {world.target()} FINAL ORDER BY id") == \
        world.sql("SELECT id, label, channel FROM src ORDER BY id")


@pytest.mark.parametrize("mode", ["append", "latest"])
def test_a_key_that_widens_gets_a_target_made_again_with_every_row(world: World, mode: str) -> None:
    # Django's AutoField -> BigAutoField: ALTER TABLE … ALTER COLUMN id TYPE bigint; ClickHouse cannot change
    # the type of a sort-key column, so the service makes the table again and copies its rows
    world.sql("CREATE TABLE src (id integer PRIMARY KEY, label text, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, 'l' || g, false FROM generate_series(1, 300) g")
    settings = world.settings(target_mode=mode)
    assert run_job(settings, settings.jobs[0]).rows_marked == 300
    world.sql("ALTER TABLE src DROP COLUMN label;"  # a column the source no longer has: kept in the target
              "ALTER TABLE src ALTER COLUMN id TYPE bigint; INSERT INTO src VALUES (5000000000, false)")
    with logged("INFO") as lines:
        result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 1), result.message
    assert any("made again with id Int64, 300 rows copied" in line for line in lines), lines
    types = dict((row[0], row[1]) for row in world.ch_rows(f"DESCRIBE TABLE {world.target()}"))
    assert types["id"] == "Int64" and "label" in types
    assert world.ch_rows(f"SELECT count(), uniqExact(id), sum(id), countIf(label = 'l' || toString(id))"
                         f" FROM {world.target()}") == [(301, 301, sum(range(1, 301)) + 5000000000, 300)]
    # the new table still drops a repeated insert: a batch loaded again is not doubled
    assert any("non_replicated_deduplication_window" in row[0] for row in
               world.ch_rows(f"SHOW CREATE TABLE {world.target()}"))
    world.sql("INSERT INTO src VALUES (5000000001, false)")
    assert run_job(settings, settings.jobs[0]).rows_marked == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["append", "latest"])
def test_columns_added_while_a_writer_writes_and_a_run_is_killed_end_exact(world: World, mode: str) -> None:
    # Alembic's add_column with a server_default (kept) and a volatile default, applied while the rows flow:
    # one run is killed between load and mark of its second batch, the columns change, the next runs resume
    import signal

    from .helpers import Writer, chdb_query, cli, start, wait_for, write_env

    world.make_source(4000)
    chdb = world.tmp / "chdb"
    job = {"ETL_BATCH_SIZE": "1000", "ETL_CHUNK_SIZE": "400", "ETL_TARGET_MODE": mode}
    crashing = write_env(world, chdb, "crash.env", ETL_CRASH_AT="after_last_insert:3", **job)
    normal = write_env(world, chdb, "normal.env", **job)
    with Writer(world, batches=300, pause=0.02):
        killed = start("--once", "--env-file", str(crashing), log=world.tmp / "killed.log")
        wait_for(lambda: world.sql("SELECT to_regclass('etl.batches') IS NOT NULL")[0][0] and world.sql(
            "SELECT count(*) FROM etl.batches WHERE state = 'done'")[0][0] > 0, 60, "the first batch marked")
        world.sql("ALTER TABLE src ADD COLUMN priority integer DEFAULT 5;"  # constant: kept in the catalog
                  "ALTER TABLE src ADD COLUMN token uuid DEFAULT gen_random_uuid()")  # volatile: a rewrite
        killed.wait(120)
        assert killed.returncode in (-signal.SIGKILL, 0), (world.tmp / "killed.log").read_text()[-2000:]
        resumed = cli("--once", "--env-file", str(normal))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    for _ in range(2):
        final = cli("--once", "--env-file", str(normal))
        assert final.returncode == 0, final.stderr[-2000:]
    said = (world.tmp / "killed.log").read_text() + resumed.stderr
    # the volatile default's rewrite writes priority's 5 into every row too: both are sent again
    assert "added column priority Nullable(Int32)" in said and "added column token" in said, said[-3000:]
    assert "set to be sent again" in said, said[-3000:]  # the rows the rewrite gave a token of their own
    newest = (f"SELECT id, priority, toString(token) FROM `{world.ch_database}`.dst FINAL ORDER BY id"
              if mode == "latest" else f"SELECT id, priority, toString(token) FROM `{world.ch_database}`.dst"
              " ORDER BY id, _etl_version DESC LIMIT 1 BY id")
    held = [tuple(row) for row in chdb_query(chdb, newest)]
    source = [(int(i), p, str(t)) for i, p, t in world.sql("SELECT id, priority, token FROM src ORDER BY id")]
    assert [(int(i), p, t) for i, p, t in held] == source
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]
