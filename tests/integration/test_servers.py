"""Exactly once on the servers users run: ClickHouse profiles that change the insert settings, a
PostgreSQL session that cannot write.

A ClickHouse profile is simulated on chDB with clickhouse-connect's client settings: they become the
defaults of every later query of that client, as a profile's would. No ClickHouse server, Keeper or
Replicated table can run here; the Replicated branch is unit-tested.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from loguru import logger

from etl_service.clickhouse import clients, readiness
from etl_service.errors import ConfigError
from etl_service.run.pipeline import FAILED, OK, STOPPED, WAITING, run_job
from etl_service.service import checks, report
from etl_service.settings.model import Settings

from .conftest import World
from .test_pipeline import ch_summary, marked


def profile(settings: Settings, **values: str) -> Any:
    """Make `values` the defaults of the job's ClickHouse client (shared for the life of the process,
    so each test names its job after its own database: no other test meets this client)."""
    client = clients.connect(settings, f"job:{settings.jobs[0].name}")
    try:
        for name, value in values.items():
            client.set_client_setting(name, value)
    finally:
        clients.release(client)
    return client


@pytest.mark.parametrize("values", [
    {"deduplicate_insert": "disable"},
    {"insert_deduplicate": "0", "deduplicate_insert": "backward_compatible_choice"},
    {"async_insert": "1", "wait_for_async_insert": "0", "deduplicate_insert": "disable"},
])
@pytest.mark.parametrize("point", ["between_chunks", "after_last_insert"])
def test_a_profile_without_deduplication_does_not_double_a_retried_chunk(world: World, values: dict[str, str],
                                                                         point: str) -> None:
    if world.backend.name != "embedded":
        pytest.skip("client settings stand in for a profile on the embedded engine")
    world.make_source(1000)
    settings = world.settings(chunk_size="300", fail_at=point,  # an outage just after a chunk went in
                              job_name=world.ch_database)
    profile(settings, **values)
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 1000), result.message
    assert ch_summary(world) == (1000, 1000, 1000 * 1001 // 2)
    assert marked(world) == (1000, 1000)


def test_a_readonly_profile_is_a_configuration_error(world: World) -> None:
    if world.backend.name != "embedded":
        pytest.skip("client settings stand in for a profile on the embedded engine")
    world.make_source(10)
    settings = world.settings(job_name=world.ch_database)
    profile(settings, readonly="1")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True)
    assert "CLICK_USER" in result.message and "read-only" in result.message
    assert marked(world) == (0, 10)


# --- PostgreSQL: the primary, and only the primary ----------------------------------------------

def test_a_read_only_session_is_a_configuration_error_at_start_in_check_and_in_a_run(world: World) -> None:
    world.make_source(10)
    world.sql(f"ALTER DATABASE {world.ch_database} SET default_transaction_read_only = on")
    settings = world.settings()
    with pytest.raises(ConfigError) as start:
        checks.preflight(settings)
    assert "PG_DSN / PG_HOST" in str(start.value) and "read-only" in str(start.value)
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any("FAIL PG_DSN / PG_HOST" in line and "read-only" in line for line in lines), lines
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True) and "target_session_attrs" in result.message
    assert marked(world) == (0, 10)
    admin = psycopg2.connect(world.backend.pg_uri)  # the server's own database: its sessions may write
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"ALTER DATABASE {world.ch_database} RESET default_transaction_read_only")
    admin.close()
    assert run_job(settings, settings.jobs[0]).rows_marked == 10


# --- verification reads what was inserted, and says what is wrong -------------------------------

def test_a_doubled_batch_names_its_keys_and_never_advises_turning_verification_off(world: World) -> None:
    world.make_source(600)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(12, 2), name Nullable(String),"
               " ts DateTime64(6, 'UTC'), _etl_batch UInt64) ENGINE = MergeTree ORDER BY id")  # keeps repeats
    settings = world.settings(target_dedup="off", chunk_size="300", fail_at="after_last_insert")
    result = run_job(settings, settings.jobs[0])  # the outage after the last chunk: it goes again, twice
    assert result.status == FAILED
    assert "ClickHouse holds 900 of its rows but 600 were sent" in result.message
    assert "id=301 (2 copies)" in result.message and "more than once" in result.message
    assert "ETL_VERIFY_LOAD" not in result.message
    assert marked(world) == (0, 600)
    assert world.sql("SELECT state FROM etl.batches") == [("loaded",)]
    ch.command(f"DELETE FROM {world.target()} WHERE id > 300")  # what the message says: remove the copies,
    ch.command(f"INSERT INTO {world.target()} SELECT number + 301, 0, NULL, now64(), 1 FROM numbers(300)")
    done = run_job(world.settings(target_dedup="off", chunk_size="300"), settings.jobs[0])
    assert (done.status, done.rows_marked) == (OK, 600) and marked(world) == (600, 600)


# --- the ledger's history lost: ids never repeat -------------------------------------------------

@pytest.mark.parametrize("loss", ["DROP SCHEMA etl CASCADE", "DROP TABLE etl.batches CASCADE"])
def test_a_ledger_that_lost_its_history_never_reuses_a_batch_id(world: World, loss: str) -> None:
    world.make_source(1000)
    settings = world.settings(batch_size="400")
    assert run_job(settings, settings.jobs[0]).rows_marked == 1000  # batches 1-3 in ClickHouse
    world.sql(loss)  # batch ids start at 1 again
    world.add_rows(1001, 1500)
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 500), result.message
    assert ch_summary(world) == (1500, 1500, 1500 * 1501 // 2)
    assert marked(world) == (1500, 1500)
    ids = world.ch_rows(f"SELECT _etl_batch, count() FROM {world.target()} GROUP BY 1 ORDER BY 1")
    assert [i for i, _ in ids] == [1, 2, 3, 4, 5] and sum(n for _, n in ids) == 1500
    world.add_rows(1501, 1600)
    assert run_job(settings, settings.jobs[0]).rows_marked == 100  # later ids follow on
    assert world.ch_rows(f"SELECT max(_etl_batch) FROM {world.target()}") == [(6,)]


# --- the ledger's history lost while rows are in flight: reconciled, never loaded twice ------------

def _waiting(world: World, rows: int) -> Settings:
    """`rows` rows loaded and waiting for a readiness answer that does not come (not marked)."""
    world.make_source(rows)
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(f"CREATE TABLE {world.target('ready')} (ok UInt8) ENGINE = MergeTree ORDER BY ok")
    settings = world.settings(batch_size="400", ready_query=f"SELECT count() > 0 FROM {world.target('ready')}",
                              ready_timeout="0.3", ready_poll_interval="0.05")
    first = run_job(settings, settings.jobs[0])
    assert first.status == WAITING and first.rows_loaded == 400, first.message
    return settings


@contextlib.contextmanager
def _stop_after_first_batch() -> Iterator[threading.Event]:
    """A stop event, set once a batch of the run has been marked (the run then stops as asked)."""
    stop = threading.Event()
    handler = logger.add(lambda message: stop.set() if " done: " in message else None, level="INFO",
                         format="{message}")
    try:
        yield stop
    finally:
        logger.remove(handler)


@pytest.mark.parametrize("loss", ["TRUNCATE etl.batches", "DROP SCHEMA etl CASCADE"])
def test_rows_in_flight_when_the_ledger_lost_them_are_marked_not_loaded_again(world: World, loss: str) -> None:
    settings = _waiting(world, 1000)
    world.sql(loss)
    world.backend.ch().command(f"INSERT INTO {world.target('ready')} VALUES (1)")
    with _stop_after_first_batch() as stop:
        stopped = run_job(settings, settings.jobs[0], stop=stop)
    assert stopped.status == STOPPED and stopped.rows_marked < 1000, stopped.message
    shown: list[str] = []
    report.status(settings, shown.append)  # a span stays open until a run has claimed every row
    assert any("reconciling with ClickHouse" in line and "batches 1..1" in line for line in shown), shown
    said: list[str] = []
    checks.check(settings, said.append)
    assert any("note reconciling with ClickHouse" in line for line in said), said
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked + stopped.rows_marked) == (OK, 1000), result.message
    assert result.rows_loaded + stopped.rows_loaded == 600  # the 400 in ClickHouse were found there, not sent again
    assert ch_summary(world) == (1000, 1000, 1000 * 1001 // 2)
    assert marked(world) == (1000, 1000)
    assert world.sql("SELECT count(*) FROM etl.reconcile") == [(0,)]  # reconciled: closed after the drain
    world.add_rows(1001, 1100)
    assert run_job(settings, settings.jobs[0]).rows_loaded == 100


def test_the_batches_table_truncated_under_a_waiting_batch_stops_its_mark(world: World) -> None:
    """Truncated while the batch waits for readiness, in the same run: its mark is rolled back, and
    the next run marks its rows without loading them again."""
    world.make_source(300)
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    truncate = ("SELECT count() > 0 FROM system.one WHERE (SELECT 1) = 1 AND {batch_id:UInt64} > 0")
    settings = world.settings(ready_query=truncate)
    original = readiness.is_ready

    def truncated_while_waiting(*args: Any, **kwargs: Any) -> bool:
        world.sql("TRUNCATE etl.batches")
        return original(*args, **kwargs)

    readiness.is_ready = truncated_while_waiting  # type: ignore[assignment]
    try:
        first = run_job(settings, settings.jobs[0])
    finally:
        readiness.is_ready = original  # type: ignore[assignment]
    assert first.status == FAILED and "no longer in the ledger" in first.message, first.message
    assert marked(world) == (0, 300)
    again = run_job(settings, settings.jobs[0])
    assert (again.status, again.rows_loaded, again.rows_marked) == (OK, 0, 300), again.message
    assert ch_summary(world) == (300, 300, 300 * 301 // 2)


def test_every_row_carries_its_source_version(world: World) -> None:
    """A version is the horizon of the snapshot that read the row (above every id it saw committed),
    on the server's timeline: each load of a row is higher than the one before."""
    world.make_source(50)
    settings = world.settings(batch_size="25")
    before = int(world.sql("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")[0][0])
    assert run_job(settings, settings.jobs[0]).rows_marked == 50
    world.sql("UPDATE src SET name = 'changed', processed = false WHERE id <= 10")
    assert run_job(settings, settings.jobs[0]).rows_marked == 10
    after = int(world.sql("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")[0][0])
    timeline = int(world.sql("SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int")
                   [0][0])
    rows = world.ch_rows(f"SELECT id, _etl_batch, _etl_version FROM {world.target()} ORDER BY id, _etl_version")
    assert {v >> 48 for _, _, v in rows} == {timeline}
    assert all(before <= (v & ((1 << 48) - 1)) <= after for _, _, v in rows), (before, after, rows[:3])
    by_batch: dict[int, set[int]] = {}
    for _, batch, version in rows:
        by_batch.setdefault(batch, set()).add(version)
    assert sorted(by_batch) == [1, 2, 3] and all(len(v) == 1 for v in by_batch.values()), by_batch  # one per chunk
    assert by_batch[1] < by_batch[2] < by_batch[3] or max(by_batch[1]) < min(by_batch[2]) < min(by_batch[3])
    for key in range(1, 11):  # both loads of a changed row: the second is the higher version
        versions = [v for i, _, v in rows if i == key]
        assert len(versions) == 2 and versions[0] < versions[1], (key, versions)


def test_a_transaction_that_commits_a_newer_version_under_a_lower_id_still_wins(world: World) -> None:
    """B takes its transaction id first, A updates row 11 and commits, a run loads A's row, then B updates
    row 11 and commits: B's row is the current one although its xmin is lower than A's."""
    world.make_source(20)
    settings = world.settings(target_mode="latest")
    assert run_job(settings, settings.jobs[0]).rows_marked == 20
    b = world.pg()
    b.autocommit = False
    with b.cursor() as cur:
        cur.execute("UPDATE src SET name = 'B-other', processed = false WHERE id = 12")  # B's id is taken here
        a_xid = world.sql("UPDATE src SET name = 'A', processed = false WHERE id = 11"
                          " RETURNING xmin::text::bigint")[0][0]  # A: a higher id, committed
        assert run_job(settings, settings.jobs[0]).rows_marked == 1  # A's row 11 loaded
        cur.execute("UPDATE src SET name = 'B', processed = false WHERE id = 11")
    b.commit()
    b.close()
    assert world.sql("SELECT xmin::text::bigint FROM src WHERE id = 11")[0][0] < a_xid  # B's row: the lower id
    assert run_job(settings, settings.jobs[0]).rows_marked == 2
    final = world.ch_rows(f"SELECT id, name FROM {world.target()} FINAL WHERE id IN (11, 12) ORDER BY id")
    assert [tuple(r) for r in final] == [(11, "B"), (12, "B-other")], final
    newest = world.ch_rows(f"SELECT argMax(name, _etl_version) FROM {world.target()} WHERE id = 11")
    assert newest == [("B",)], newest


def test_a_ledger_restored_from_an_older_copy_neither_doubles_nor_sticks(world: World) -> None:
    """The ledger's tables put back as they were two runs ago (a restore from an older dump): the
    batch they hold as unfinished is finished without loading anything twice, and later rows move."""
    settings = _waiting(world, 1000)  # batch 1 loaded, waiting for readiness
    world.sql("CREATE SCHEMA old_copy; CREATE TABLE old_copy.batches AS SELECT * FROM etl.batches;"
              " CREATE TABLE old_copy.quarantine AS SELECT * FROM etl.quarantine")
    world.backend.ch().command(f"INSERT INTO {world.target('ready')} VALUES (1)")
    assert run_job(settings, settings.jobs[0]).rows_marked == 1000
    world.sql("TRUNCATE etl.batches, etl.quarantine; INSERT INTO etl.batches SELECT * FROM old_copy.batches;"
              " INSERT INTO etl.quarantine SELECT * FROM old_copy.quarantine")  # the older copy is back
    world.add_rows(1001, 1200)
    result = run_job(settings, settings.jobs[0])
    assert result.status == OK, result.message
    assert ch_summary(world) == (1200, 1200, 1200 * 1201 // 2)
    assert marked(world) == (1200, 1200)
    assert world.sql("SELECT count(*) FROM etl.batches WHERE state <> 'done'") == [(0,)]
