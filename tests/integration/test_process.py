"""The program as a user runs it: a subprocess with an env file, real signals, real exit codes."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import World
from .helpers import chdb_query, cli, start, wait_for, write_env


def marked(world: World) -> int:
    return int(world.sql("SELECT count(*) FROM src WHERE processed")[0][0])


def test_once_moves_every_row_and_a_second_once_moves_nothing(world: World) -> None:
    world.make_source(1234)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb)
    first = cli("--once", "--env-file", str(env_file))
    assert first.returncode == 0, first.stderr
    assert "status=ok batches=2 rows_loaded=1234 rows_marked=1234" in first.stderr
    assert marked(world) == 1234
    second = cli("--once", "--env-file", str(env_file))
    assert second.returncode == 0, second.stderr
    assert "status=idle batches=0 rows_loaded=0 rows_marked=0" in second.stderr
    assert chdb_query(chdb, f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == [[1234, 1234]]


def test_check_and_status_report_what_they_find(world: World) -> None:
    world.make_source(10)
    env_file = write_env(world, world.tmp / "chdb")
    check = cli("check", "--env-file", str(env_file))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "10 unprocessed row(s)" in check.stdout
    assert "does not exist yet: the first run creates it" in check.stdout
    cli("--once", "--env-file", str(env_file))
    status = cli("status", "--env-file", str(env_file))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "backlog: 0 unprocessed row(s)" in status.stdout
    assert "batches=1 loaded=10 marked=10" in status.stdout
    bad = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_SOURCE_TABLE="public.nope")))
    assert bad.returncode == 1
    assert 'FAIL ETL_SOURCE_TABLE: table "public"."nope" does not exist in PostgreSQL' in bad.stdout
    no_key = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_SOURCE_KEY="order_id")))
    assert no_key.returncode == 1
    assert "FAIL ETL_SOURCE_KEY: column 'order_id' does not exist in \"public\".\"src\"" in no_key.stdout
    assert "columns are: id, amount, name, ts, processed" in no_key.stdout
    misfit = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_COLUMNS="id, name:title")))
    assert misfit.returncode == 1
    assert "has no column 'title': add it (ALTER TABLE … ADD COLUMN), or select/rename columns with ETL_COLUMNS" \
        in misfit.stdout


@pytest.mark.slow
def test_daemon_runs_on_a_seconds_schedule_and_exits_0_on_sigterm(world: World) -> None:
    world.make_source(300)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="*/1 * * * * *", ETL_MISFIRE_GRACE="5")
    log_path = world.tmp / "daemon.log"
    proc = start("--env-file", str(env_file), log=log_path)
    try:
        wait_for(lambda: marked(world) == 300, 60, "the first 300 rows to be marked")
        world.add_rows(301, 450)
        wait_for(lambda: marked(world) == 450, 30, "150 more rows on a later scheduled run")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stop_seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "etl-service ready: 1 job(s)" in text
    assert "rows_marked=150" in text
    assert "etl-service stopped" in text
    assert stop_seconds < 15
    assert chdb_query(chdb, f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == [[450, 450]]
