"""The target stays right as tables change: the deduplication guard, schema evolution, load verification."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal

import pytest
from loguru import logger

from etl_service.run.pipeline import FAILED, OK, run_job
from etl_service.service import checks

from .conftest import World
from .helpers import Writer, assert_exact, cli, running, stop, wait_for, write_env


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m).rstrip()), level="INFO", format="{level} {message}")
    yield lines
    logger.remove(sink_id)


def operator_target(world: World, engine: str) -> None:
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(12, 2), name Nullable(String),"
                               f" ts Nullable(DateTime64(6, 'UTC')), _etl_batch UInt64) ENGINE = {engine}")


@pytest.mark.parametrize(("engine", "fix"), [
    ("MergeTree ORDER BY id", "MODIFY SETTING non_replicated_deduplication_window = 10000"),
    ("ReplacingMergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 0",
     "MODIFY SETTING non_replicated_deduplication_window = 10000"),
    ("Memory", "recreate it as MergeTree"),
    ("Log", "recreate it as MergeTree"),
    ("Null", "recreate it as MergeTree"),
])
def test_a_target_that_would_double_a_retry_is_refused(world: World, engine: str, fix: str,
                                                       log_lines: list[str]) -> None:
    world.make_source(100)
    operator_target(world, engine)
    settings = world.settings()
    refused = run_job(settings, settings.jobs[0])
    assert (refused.status, refused.permanent, refused.rows_loaded) == (FAILED, True, 0)
    assert "ETL_TARGET_DEDUP:" in refused.message and fix in refused.message
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(0,)]
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any(line.startswith("  FAIL ETL_TARGET_DEDUP:") and fix in line for line in lines), lines
    accepted = world.settings(target_dedup="off", verify_load="off")
    result = run_job(accepted, accepted.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 100)
    assert any(line.startswith("WARNING ETL_TARGET_DEDUP=off: at-least-once delivery") for line in log_lines)


@pytest.mark.parametrize("engine", [
    "MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100",
    "ReplacingMergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100",
])
def test_a_deduplicating_operator_target_is_filled(world: World, engine: str) -> None:
    world.make_source(100)
    operator_target(world, engine)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).rows_marked == 100


def test_a_view_whose_target_would_double_is_warned_about_once(world: World, log_lines: list[str]) -> None:
    world.make_source(50)
    operator_target(world, "MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100")
    ch = world.backend.ch()
    ch.command(f"CREATE TABLE `{world.ch_database}`.totals (n UInt64) ENGINE = SummingMergeTree ORDER BY tuple()")
    ch.command(f"CREATE MATERIALIZED VIEW `{world.ch_database}`.totals_mv TO `{world.ch_database}`.totals"
               f" AS SELECT count() AS n FROM {world.target()}")
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == OK
    world.add_rows(51, 60)
    assert run_job(settings, settings.jobs[0]).status == OK
    warned = [line for line in log_lines if "materialized view" in line]
    assert len(warned) == 1 and f"{world.ch_database}.totals_mv writes to `{world.ch_database}`.`totals`" in warned[0]
    assert "non_replicated_deduplication_window = 10000" in warned[0]


def test_columns_added_and_widened_at_the_source_follow_into_the_target(world: World) -> None:
    world.make_source(300)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).rows_marked == 300
    world.sql("ALTER TABLE src ADD COLUMN note text; ALTER TABLE src ADD COLUMN qty integer NOT NULL DEFAULT 7;"
              " ALTER TABLE src ALTER COLUMN amount TYPE numeric(20,2)")
    world.sql("INSERT INTO src (id, amount, name, ts, note, qty) VALUES"
              " (301, 123456789012345678.91, 'big', now(), 'hello', 2147483647), (302, 1, 'n', now(), NULL, 5)")
    world.sql("ALTER TABLE src ALTER COLUMN qty TYPE bigint")
    world.sql("INSERT INTO src (id, amount, name, ts, note, qty) VALUES (303, 2, 'x', now(), 'wide', 4294967296)")
    result = run_job(settings, settings.jobs[0])
    # ALTER … TYPE bigint rewrote the table, writing qty's 7 into the 300 rows loaded before (PostgreSQL kept it
    # in its catalog until then): ClickHouse cannot show it by itself, so they are sent again, with 7
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 303, 0)
    types = dict(world.ch_rows(f"SELECT name, type FROM system.columns WHERE database = '{world.ch_database}'"
                               " AND table = 'dst'"))
    assert (types["note"], types["qty"], types["amount"]) == ("Nullable(String)", "Int64", "Decimal(20, 2)")
    rows = world.ch_rows(f"SELECT id, amount, note, qty FROM {world.target()} WHERE id > 299"
                         " ORDER BY id, _etl_version DESC LIMIT 1 BY id")
    assert rows == [(300, Decimal("375.00"), None, 7), (301, Decimal("123456789012345678.91"), "hello", 2147483647),
                    (302, Decimal("1.00"), None, 5), (303, Decimal("2.00"), "wide", 4294967296)]


def test_a_change_that_could_lose_values_stops_the_run_with_the_statement(world: World) -> None:
    world.make_source(10)
    settings = world.settings()
    run_job(settings, settings.jobs[0])
    world.sql("ALTER TABLE src ALTER COLUMN amount TYPE text; INSERT INTO src VALUES (11, 'n/a', 'x', now(), false)")
    result = run_job(settings, settings.jobs[0])
    assert result.status == FAILED and result.rows_quarantined == 0
    assert f"run ALTER TABLE `{world.ch_database}`.`dst` MODIFY COLUMN `amount` String" in result.message
    assert world.sql("SELECT processed FROM src WHERE id = 11") == [(False,)]


def test_schema_fail_mode_leaves_an_operator_table_alone(world: World) -> None:
    world.make_source(10)
    operator_target(world, "MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100")
    world.sql("ALTER TABLE src ADD COLUMN note text")
    settings = world.settings(schema_changes="fail")
    result = run_job(settings, settings.jobs[0])
    assert result.status == FAILED and "ETL_SCHEMA_CHANGES=fail" in result.message
    assert f"ALTER TABLE `{world.ch_database}`.`dst` ADD COLUMN IF NOT EXISTS `note` Nullable(String)" in result.message
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(0,)]


@pytest.mark.slow
def test_columns_change_while_a_daemon_runs_under_a_writer(world: World) -> None:
    world.make_source(3000)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="* * * * * *", ETL_BATCH_SIZE="500", ETL_CHUNK_SIZE="250")
    with running("--env-file", str(env_file), log=world.tmp / "daemon.log") as daemon, Writer(world, pause=0.02):
        wait_for(lambda: world.sql("SELECT count(*) FROM src WHERE processed")[0][0] > 500, 60, "some rows")
        world.sql("ALTER TABLE src ADD COLUMN tag text; ALTER TABLE src ADD COLUMN qty smallint DEFAULT 1")
        world.sql("INSERT INTO src (id, amount, name, ts, tag, qty) SELECT g, 1, 'a', now(),"
                  " CASE WHEN g % 3 = 0 THEN 'tag ' || g END, g % 1000 FROM generate_series(5001, 5400) g")
        log = world.tmp / "daemon.log"
        wait_for(lambda: "added column qty Nullable(Int16)" in log.read_text(), 30, "the new columns in ClickHouse")
        # A widening PostgreSQL does without rewriting the table (a type-changing rewrite while a
        # batch is in flight loads that batch again: test_guarantees covers it).
        world.sql("ALTER TABLE src ALTER COLUMN amount TYPE numeric(20,2)")
        world.sql("INSERT INTO src (id, amount, name, ts, tag, qty) SELECT g, 123456789012345678.91, 'b', now(),"
                  " 'wide', 7 FROM generate_series(5401, 5600) g")
        wait_for(lambda: world.sql("SELECT count(*) FROM src WHERE NOT processed")[0][0] == 0, 90, "the drain")
        assert stop(daemon) == 0
    assert cli("--once", "--env-file", str(env_file)).returncode == 0
    assert_exact(world, chdb, "columns added and widened under a writer")
    from .helpers import chdb_query
    late = world.sql("SELECT id, tag, qty, amount::text FROM src WHERE tag IS NOT NULL OR qty > 1 ORDER BY id")
    got = chdb_query(chdb, f"SELECT id, tag, qty, toString(amount) FROM `{world.ch_database}`.dst"
                           " WHERE tag IS NOT NULL OR qty > 1 ORDER BY id")
    assert [tuple(r) for r in got] == [(i, t, q, a.rstrip("0").rstrip(".")) for i, t, q, a in late]
    assert len(late) > 500 and ("123456789012345678.91",) in {(r[3],) for r in got}
    text = log.read_text()
    assert "schema change at the source: added column tag Nullable(String)" in text
    assert "widened column amount from Decimal(12, 2) to Decimal(20, 2)" in text
    assert " quarantined: " not in text and "rows_quarantined=0" in text


@pytest.mark.parametrize("loss", ["delete", "ttl"])
def test_verification_catches_a_batch_clickhouse_did_not_keep(world: World, loss: str) -> None:
    world.make_source(200)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ttl = " TTL toDateTime(ts) + INTERVAL 1 DAY DELETE" if loss == "ttl" else ""
    ch.command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(12, 2), name Nullable(String),"
               f" ts DateTime64(6, 'UTC'), _etl_batch UInt64) ENGINE = MergeTree ORDER BY id{ttl}"
               " SETTINGS non_replicated_deduplication_window = 100")
    ch.command(f"CREATE TABLE `{world.ch_database}`.flag (ok UInt8) ENGINE = MergeTree ORDER BY tuple()")
    settings = world.settings(ready_query=f"SELECT count() > 0 FROM `{world.ch_database}`.flag",
                              ready_poll_interval="0.05", ready_timeout="30")
    results = []
    worker = threading.Thread(target=lambda: results.append(run_job(settings, settings.jobs[0])))
    worker.start()
    wait_for(lambda: world.sql("SELECT to_regclass('etl.batches') IS NOT NULL")[0][0]
             and world.sql("SELECT state FROM etl.batches") == [("loaded",)], 30, "the load")
    if loss == "delete":
        ch.command(f"DELETE FROM {world.target()} WHERE id % 10 = 0")
    else:  # every row is older than a day: the TTL drops them when the part is written or merged
        ch.command(f"OPTIMIZE TABLE {world.target()} FINAL")
    ch.command(f"INSERT INTO `{world.ch_database}`.flag VALUES (1)")
    worker.join(60)
    kept = 180 if loss == "delete" else 0
    assert results[0].status == FAILED
    assert f"ClickHouse holds {kept} of its rows but 200 were sent: {200 - kept} are missing, so it is not marked" \
        in results[0].message
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(0,)]
    assert world.sql("SELECT state FROM etl.batches") == [("loaded",)]
    unchecked = world.settings(verify_load="off", ready_query=f"SELECT count() > 0 FROM `{world.ch_database}`.flag")
    assert run_job(unchecked, unchecked.jobs[0]).rows_marked == 200  # the operator accepted it
