"""Outages, slowness, concurrent runners and stops: the daemon stays up and the end state is exact."""

from __future__ import annotations

import itertools
import re
import signal
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from etl_service.postgres import connection
from etl_service.postgres.embedded import postgres
from etl_service.run.pipeline import FAILED, OK, run_job

from .conftest import World
from .helpers import Writer, assert_exact, chdb_query, cli, running, slow_transform, start, stop, wait_for, write_env
from .test_pipeline import ch_summary, marked


def test_clickhouse_failing_mid_load_is_retried_and_nothing_doubles(world: World) -> None:
    world.make_source(2000)
    settings = world.settings(batch_size="1000", chunk_size="300", fail_at="between_chunks:2")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 2000)
    assert ch_summary(world) == (2000, 2000, 2001000)


def test_a_transient_failure_after_a_batch_was_marked_is_retried_in_the_same_run(world: World) -> None:
    world.make_source(2000)
    settings = world.settings(batch_size="500", chunk_size="250", fail_at="after_ready:2")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 2000)
    assert ch_summary(world) == (2000, 2000, 2001000)


def test_a_failed_run_leaves_a_consistent_ledger_and_the_next_run_completes(world: World) -> None:
    world.make_source(2000)
    failing = world.settings(batch_size="1000", chunk_size="300", fail_at="after_last_insert", retry_attempts="1")
    result = run_job(failing, failing.jobs[0])
    assert result.status == FAILED
    assert result.message.startswith("injected failure at after_last_insert")
    assert world.sql("SELECT state, chunks_loaded FROM etl.batches") == [("claimed", 3)]
    settings = world.settings(batch_size="1000", chunk_size="300")
    again = run_job(settings, settings.jobs[0])
    assert (again.status, again.rows_marked) == (OK, 2000)
    assert ch_summary(world) == (2000, 2000, 2001000)


def test_a_hung_postgres_statement_times_out(world: World) -> None:
    world.make_source(10)
    blocker = world.pg()
    blocker.autocommit = False
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE src IN ACCESS EXCLUSIVE MODE")
    try:
        settings = world.settings(retry_attempts="2")
        env = world.env(retry_attempts="2")
        env["PG_STATEMENT_TIMEOUT"] = "0.5"
        from etl_service.settings.reading import load

        settings = load(environ=env)
        t0 = time.monotonic()
        result = run_job(settings, settings.jobs[0])
        assert result.status == FAILED
        assert "statement timed out (PG_STATEMENT_TIMEOUT)" in result.message
        assert time.monotonic() - t0 < 10
    finally:
        blocker.rollback()
        blocker.close()
    # the aborted transaction was rolled back, so the failure is on record
    failed = world.sql("SELECT status, message FROM etl.runs ORDER BY run_id")
    assert failed and all(st == "failed" and "statement timed out" in msg for st, msg in failed)
    assert run_job(settings, settings.jobs[0]).rows_marked == 10


@pytest.mark.slow
def test_postgres_outage_while_the_daemon_runs(world: World, tmp_path: Path) -> None:
    with postgres(tmp_path / "outage-pg") as pg:
        conn = psycopg2.connect(pg.uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), name text,"
                        " ts timestamptz, processed boolean NOT NULL DEFAULT false);"
                        "INSERT INTO src SELECT g, g, 'r', now(), false FROM generate_series(1, 500) g")
        conn.close()
        chdb = tmp_path / "chdb"
        env_file = write_env(world, chdb, PG_DSN=pg.uri, ETL_SCHEDULE="*/1 * * * * *", ETL_RETRY_BACKOFF="0.2")

        def count(sql: str) -> int:
            with psycopg2.connect(pg.uri) as c, c.cursor() as cur:
                cur.execute(sql)
                return int(cur.fetchone()[0])  # type: ignore[index]

        log = tmp_path / "daemon.log"
        with running("--env-file", str(env_file), log=log) as proc:
            wait_for(lambda: count("SELECT count(*) FROM src WHERE processed") == 500, 60, "first drain")
            pg.stop()
            time.sleep(4)
            assert proc.poll() is None, "the daemon must survive a PostgreSQL outage"
            pg.start()
            with psycopg2.connect(pg.uri) as c, c.cursor() as cur:
                cur.execute("INSERT INTO src SELECT g, g, 'r', now(), false FROM generate_series(501, 800) g")
            wait_for(lambda: count("SELECT count(*) FROM src WHERE processed") == 800, 60, "drain after outage")
            assert stop(proc) == 0
        text = log.read_text()
        assert "status=failed" in text and "retrying in" in text
        assert chdb_query(chdb, f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == [[800, 800]]


@pytest.mark.slow
def test_a_readiness_flag_that_never_comes_keeps_rows_unmarked_until_it_does(world: World) -> None:
    world.make_source(300)
    flag = world.tmp / "flag.csv"
    flag.write_text("0\n")
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="*/1 * * * * *", ETL_READY_TIMEOUT="1",
                         ETL_READY_POLL_INTERVAL="0.2",
                         ETL_READY_QUERY=f"SELECT max(x) = 1 FROM file('{flag}', 'CSV', 'x UInt8')")
    log = world.tmp / "daemon.log"
    with running("--env-file", str(env_file), log=log) as proc:
        wait_for(lambda: log.read_text().count("status=waiting") >= 3, 60, "three runs missing the deadline")
        assert proc.poll() is None
        assert marked(world) == (0, 300)
        flag.write_text("1\n")
        wait_for(lambda: marked(world) == (300, 300), 30, "rows marked once the flag is set")
        assert stop(proc) == 0
    text = log.read_text()
    assert text.count("rows_loaded=300") == 1  # loaded once, polled again by later runs
    assert chdb_query(chdb, f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == [[300, 300]]


@pytest.mark.slow
def test_a_run_longer_than_its_period_does_not_overlap_or_pile_up(world: World) -> None:
    world.make_source(2000)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="*/1 * * * * *", ETL_BATCH_SIZE="200", ETL_CHUNK_SIZE="200",
                         ETL_TRANSFORM=slow_transform(world, 0.4))
    log = world.tmp / "daemon.log"
    with running("--env-file", str(env_file), log=log, path=world.tmp) as proc:
        wait_for(lambda: marked(world) == (2000, 2000), 60, "the slow drain")
        assert stop(proc) == 0
    text = log.read_text()
    merged = re.findall(r"INFO    \[job=src\] this run took \d+s, longer than the schedule '\*/1 \* \* \* \* \*': (\d+)"
                        r" due run\(s\) were merged into it", text)
    assert len(merged) == 1 and int(merged[0]) >= 3, text[-3000:]  # one line for the one long run, with the count
    assert "still going" not in text
    assert "Traceback" not in text and "maximum number of running instances" not in text
    assert "is running this job" not in text  # never two runs of the job in one process
    runs = world.sql("SELECT started_at, finished_at FROM etl.runs WHERE status <> 'idle' ORDER BY started_at")
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(runs))
    assert_exact(world, chdb, "slow runs")


@pytest.mark.slow
def test_sigterm_mid_batch_exits_0_and_the_next_start_finishes_the_batch(world: World) -> None:
    world.make_source(3000)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_BATCH_SIZE="3000", ETL_CHUNK_SIZE="300",
                         ETL_TRANSFORM=slow_transform(world, 0.3))
    log = world.tmp / "stop.log"
    with running("--once", "--env-file", str(env_file), log=log, path=world.tmp) as proc:
        wait_for(lambda: "chunk" in log.read_text() or _chunks_loaded(world) > 0, 60, "the first chunk")
        t0 = time.monotonic()
        code = stop(proc)
        stopped_in = time.monotonic() - t0
    assert code == 75  # --once: stopped before the backlog was drained
    assert stopped_in < 5  # one chunk (0.3 s transform + I/O) at most
    assert world.sql("SELECT state FROM etl.batches") == [("claimed",)]
    assert 0 < _chunks_loaded(world) < 10
    assert "stop requested; batch 1 resumes at chunk" in log.read_text()
    finished = cli("--once", "--env-file", str(env_file), path=world.tmp)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming batch 1" in finished.stderr
    assert_exact(world, chdb, "after SIGTERM")


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_and_loses_nothing(world: World) -> None:
    world.make_source(1000)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_BATCH_SIZE="1000", ETL_CHUNK_SIZE="500",
                         ETL_TRANSFORM=slow_transform(world, 20))
    log = world.tmp / "stop2.log"
    with running("--once", "--env-file", str(env_file), log=log, path=world.tmp) as proc:
        # the first signal while a chunk is in the (20 s) transform: the run waits for a safe point there
        wait_for(lambda: (world.tmp / "slow_tx.started").exists(), 60, "a chunk in the transform")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        assert stop(proc, timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 3
    env_fast = write_env(world, chdb, "fast.env", ETL_BATCH_SIZE="1000", ETL_CHUNK_SIZE="500")
    assert cli("--once", "--env-file", str(env_fast)).returncode == 0
    assert_exact(world, chdb, "after two SIGTERMs")


def _batches(world: World) -> int:
    return int(world.sql("SELECT count(*) FROM etl.batches")[0][0])


def _chunks_loaded(world: World) -> int:
    rows = world.sql("SELECT coalesce(max(chunks_loaded), 0) FROM etl.batches") \
        if world.sql("SELECT to_regclass('etl.batches') IS NOT NULL")[0][0] else [(0,)]
    return int(rows[0][0])


@pytest.mark.slow
def test_two_daemons_and_a_once_on_one_job_never_overlap(world: World) -> None:
    # A chDB folder belongs to one process, so each runner has its own engine; they coordinate
    # through PostgreSQL, and every row must land in exactly one of them, once.
    world.make_source(5000)
    folders = [world.tmp / "chdb_a", world.tmp / "chdb_b", world.tmp / "chdb_once"]
    settings = {"ETL_SCHEDULE": "*/1 * * * * *", "ETL_BATCH_SIZE": "500", "ETL_CHUNK_SIZE": "250",
                "ETL_RETRY_BACKOFF": "0.2", "ETL_RETRY_ATTEMPTS": "5"}
    envs = [write_env(world, folder, f"{folder.name}.env", **settings) for folder in folders]
    logs = [world.tmp / "a.log", world.tmp / "b.log"]
    procs = []
    once_codes: list[int] = []
    try:
        for env_file, log in zip(envs, logs, strict=False):
            procs.append(start("--env-file", str(env_file), log=log))
            wait_for(lambda log=log: "etl-service ready" in log.read_text(), 60, "a daemon to be ready")
        with running("--env-file", str(envs[0]), log=world.tmp / "copy.log") as copy:  # same folder as a
            wait_for(lambda: "is held by process" in (world.tmp / "copy.log").read_text(), 30, "the copy to wait")
            assert stop(copy) == 0
        copy_log = (world.tmp / "copy.log").read_text()
        assert f"the chDB folder {folders[0]} is held by process {procs[0].pid}" in copy_log
        with Writer(world, batches=150, pause=0.02):
            time.sleep(2)
            once = cli("--once", "--env-file", str(envs[2]))
            once_codes.append(once.returncode)
            once_log = once.stderr[-3000:]
        wait_for(lambda: marked(world)[0] == marked(world)[1], 60, "every row marked")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert once_codes[0] in (0, 75), f"--once either ran or said it skipped:\n{once_log}"
    text = "".join(log.read_text() for log in logs)
    assert "is running this job" in text  # some run found the lock taken and said so
    runs = world.sql("SELECT started_at, finished_at FROM etl.runs WHERE status <> 'skipped'"
                     " ORDER BY started_at")
    overlaps = [(a, b) for a, b in itertools.pairwise(runs) if a[1] > b[0]]
    assert overlaps == [], "two runners processed the job at the same time"
    has_dst = f"SELECT count() FROM system.tables WHERE database = '{world.ch_database}' AND name = 'dst'"
    landed = [int(row[0]) for folder in folders if chdb_query(folder, has_dst) == [[1]]
              for row in chdb_query(folder, f"SELECT id FROM `{world.ch_database}`.dst")]
    source_ids = sorted(int(r[0]) for r in world.sql("SELECT id FROM src"))
    assert sorted(landed) == source_ids, f"{len(landed) - len(set(landed))} doubled"
    assert world.sql("SELECT count(*) FROM etl.batches WHERE state <> 'done'") == [(0,)]


def test_lock_holder_is_named_when_a_run_skips(world: World) -> None:
    world.make_source(5)
    settings = world.settings()
    started = threading.Event()
    release = threading.Event()

    def hold() -> None:
        from etl_service.ledger import Ledger

        conn = connection.connect(settings, "holder")
        ledger = Ledger(conn, settings.ledger_schema, settings.jobs[0])
        ledger.ensure_schema()
        ledger.lock.take()
        started.set()
        release.wait(10)
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    started.wait(10)
    try:
        result = run_job(settings, settings.jobs[0])
    finally:
        release.set()
        thread.join()
    assert result.status == "skipped"
    assert "etl-service/holder/" in result.message and "is running this job" in result.message
