"""ETL_TARGET_MODE=latest: rows that change converge in ClickHouse (FINAL gives the source's current rows).

On embedded PostgreSQL and chDB. Every assertion compares `SELECT … FINAL` with the source's rows.
"""

from __future__ import annotations

import pytest

from etl_service.run.pipeline import FAILED, OK, WAITING, run_job
from etl_service.service import checks
from etl_service.settings.model import Settings

from .conftest import World
from .helpers import chdb_query, cli, write_env

COLUMNS = "id, amount, name"


def final(world: World, where: str = "") -> list[tuple[object, ...]]:
    return [tuple(r) for r in world.ch_rows(f"SELECT {COLUMNS} FROM {world.target()} FINAL {where} ORDER BY id")]


def current(world: World, where: str = "") -> list[tuple[object, ...]]:
    return [tuple(r) for r in world.sql(f"SELECT {COLUMNS} FROM src {where} ORDER BY id")]


def latest(world: World, **extra: str) -> Settings:
    return world.settings(target_mode="latest", batch_size="250", **extra)


def test_repeated_updates_converge_and_the_history_stays_until_merged(world: World) -> None:
    world.make_source(600)
    settings = latest(world)
    assert run_job(settings, settings.jobs[0]).rows_marked == 600
    for round_ in range(3):
        world.sql(f"UPDATE src SET name = 'v{round_} ' || id, amount = amount + 1, processed = false WHERE id % 5 = 0")
        result = run_job(settings, settings.jobs[0])
        assert (result.status, result.rows_marked) == (OK, 120), result.message
    assert final(world) == current(world)
    assert world.ch_rows(f"SELECT count() FROM {world.target()}")[0][0] >= 600  # versions fold when merged
    engine = world.ch_rows(f"SELECT engine_full FROM system.tables WHERE database = '{world.ch_database}'"
                           " AND name = 'dst'")[0][0]
    assert "ReplacingMergeTree(_etl_version)" in engine.replace("`", "")


def test_soft_deletes_leave_final_and_undeletes_bring_rows_back(world: World) -> None:
    world.make_source(300)
    world.sql("ALTER TABLE src ADD COLUMN deleted boolean NOT NULL DEFAULT false")
    settings = latest(world, deleted_column="deleted")
    assert run_job(settings, settings.jobs[0]).rows_marked == 300
    world.sql("UPDATE src SET deleted = true, processed = false WHERE id % 7 = 0")
    assert run_job(settings, settings.jobs[0]).rows_marked == 42
    assert final(world) == current(world, "WHERE NOT deleted")
    world.sql("UPDATE src SET deleted = false, name = 'back', processed = false WHERE id IN (7, 14)")
    assert run_job(settings, settings.jobs[0]).rows_marked == 2
    assert final(world) == current(world, "WHERE NOT deleted")
    assert (7, 8.75, "back") in [(i, float(a), n) for i, a, n in final(world)]


def test_a_merge_between_load_and_mark_does_not_fail_verification(world: World) -> None:
    world.make_source(500)
    ready = world.target("ready")
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(f"CREATE TABLE {ready} (ok UInt8) ENGINE = MergeTree ORDER BY ok")
    settings = latest(world, ready_query=f"SELECT count() > 0 FROM {ready}", ready_timeout="0.3",
                      ready_poll_interval="0.05")
    world.backend.ch().command(f"INSERT INTO {ready} VALUES (1)")
    assert run_job(settings, settings.jobs[0]).rows_marked == 500
    world.backend.ch().command(f"TRUNCATE TABLE {ready}")
    world.sql("UPDATE src SET name = 'changed', processed = false WHERE id <= 200")
    waiting = run_job(settings, settings.jobs[0])
    assert waiting.status == WAITING, waiting.message  # loaded, not marked
    world.backend.ch().command(f"OPTIMIZE TABLE {world.target()} FINAL")  # folds the old versions away
    world.backend.ch().command(f"INSERT INTO {ready} VALUES (1)")
    done = run_job(settings, settings.jobs[0])
    assert (done.status, done.rows_marked) == (OK, 200), done.message
    assert world.ch_rows(f"SELECT count() FROM {world.target()}") == [(500,)]
    assert final(world) == current(world)


def test_a_backfill_and_a_recreated_ledger_converge_to_the_newest_versions(world: World) -> None:
    world.make_source(400)
    settings = latest(world)
    assert run_job(settings, settings.jobs[0]).rows_marked == 400
    world.sql("UPDATE src SET processed = false WHERE id <= 100")  # a backfill: send these again
    assert run_job(settings, settings.jobs[0]).rows_marked == 100
    assert final(world) == current(world)
    world.sql("DROP SCHEMA etl CASCADE")  # the ledger starts over; versions come from PostgreSQL
    world.sql("UPDATE src SET name = 'newest', processed = false WHERE id % 3 = 0")
    assert run_job(settings, settings.jobs[0]).status == OK
    assert final(world) == current(world)
    assert {n for _, _, n in final(world, "WHERE id % 3 = 0")} == {"newest"}


def test_an_operator_made_target_that_does_not_keep_the_latest_version_is_refused(world: World) -> None:
    world.make_source(50)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(12, 2), name Nullable(String),"
               " ts Nullable(DateTime64(6, 'UTC')), _etl_batch UInt64, _etl_version UInt64)"
               " ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 1000")
    settings = latest(world)
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent, result.rows_loaded) == (FAILED, True, 0)
    assert "ETL_TARGET_MODE" in result.message and "ReplacingMergeTree(_etl_version)" in result.message
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any(line.startswith("  FAIL ETL_TARGET_MODE") for line in lines), lines


def test_versions_that_go_backwards_are_refused(world: World) -> None:
    world.make_source(50)
    settings = latest(world)
    assert run_job(settings, settings.jobs[0]).rows_marked == 50
    # what ClickHouse holds after the database was restored into a new cluster (its ids start over)
    world.backend.ch().command(f"INSERT INTO {world.target()} (id, amount, name, _etl_batch, _etl_version)"
                               f" VALUES (1, 1.25, 'row 1', 999, {9 << 48})")
    world.add_rows(51, 60)
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent, result.rows_loaded) == (FAILED, True, 0), result.message
    assert "newer than anything this PostgreSQL has written" in result.message and "TRUNCATE TABLE" in result.message


@pytest.mark.parametrize("mode", ["append", "latest"])
def test_a_deleted_column_needs_latest_mode(world: World, mode: str) -> None:
    world.make_source(10)
    world.sql("ALTER TABLE src ADD COLUMN gone boolean")
    if mode == "append":
        with pytest.raises(Exception, match="ETL_DELETED_COLUMN"):
            world.settings(deleted_column="gone")
        return
    settings = latest(world, deleted_column="gone")
    assert run_job(settings, settings.jobs[0]).rows_marked == 10  # NULL is not deleted
    assert len(final(world)) == 10


@pytest.mark.slow
def test_a_crash_between_load_and_mark_with_a_merge_meanwhile_converges(world: World) -> None:
    world.make_source(300)
    chdb = world.tmp / "chdb-latest"
    env_file = write_env(world, chdb, ETL_TARGET_MODE="latest", ETL_BATCH_SIZE="100")
    assert cli("--env-file", str(env_file), "--once").returncode == 0
    world.sql("UPDATE src SET name = 'changed', processed = false WHERE id % 2 = 0")
    crash_file = write_env(world, chdb, "crash.env", ETL_TARGET_MODE="latest", ETL_BATCH_SIZE="100",
                           ETL_CRASH_AT="after_ready:1")
    crashed = cli("--env-file", str(crash_file), "--once")
    assert crashed.returncode == -9, crashed.stderr[-2000:]  # killed after loading, before the mark
    chdb_query(chdb, f"OPTIMIZE TABLE `{world.ch_database}`.dst FINAL")  # the old versions fold away
    resumed = cli("--env-file", str(env_file), "--once")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = chdb_query(chdb, f"SELECT id, amount, name FROM `{world.ch_database}`.dst FINAL ORDER BY id")
    assert [(int(i), float(a), n) for i, a, n in rows] == [(i, float(a), n) for i, a, n in current(world)]
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]


@pytest.mark.parametrize("order", ["(id, name)", "_etl_batch", "tuple()"])
def test_an_operator_made_latest_target_not_sorted_by_the_key_is_refused(world: World, order: str) -> None:
    world.make_source(20)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(12, 2), name String,"
               " ts Nullable(DateTime64(6, 'UTC')), _etl_batch UInt64, _etl_version UInt64)"
               f" ENGINE = ReplacingMergeTree(_etl_version) ORDER BY {order}"
               " SETTINGS non_replicated_deduplication_window = 1000, allow_nullable_key = 1")
    settings = latest(world)
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent, result.rows_loaded) == (FAILED, True, 0), result.message
    assert "ETL_TARGET_MODE" in result.message and "not by the key (id)" in result.message, result.message
    assert "ORDER BY id;" in result.message, result.message
    assert world.ch_rows(f"SELECT count() FROM {world.target()}") == [(0,)]
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any(line.startswith("  FAIL ETL_TARGET_MODE") for line in lines), lines
