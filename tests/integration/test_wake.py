"""ETL_WAKE=notify: commits wake the daemon's job; the schedule stays a safety net.

The daemon runs as a subprocess (its own chDB folder) on a schedule that does not fire during a
test (yearly), so every row that moves after the first run moved because a commit woke the job.
What the runs did is read from the ledger's runs table (cause, status, rows).
"""

from __future__ import annotations

import random
import select
import signal
import time
from pathlib import Path

import psycopg2
import pytest

from etl_service.ledger import Ledger
from etl_service.postgres.embedded import postgres
from etl_service.run.pipeline import run_job
from etl_service.service import checks, wake
from etl_service.settings.reading import load

from .conftest import World
from .helpers import Writer, assert_exact, chdb_query, running, start, stop, wait_for, write_env

YEARLY = "0 0 1 1 *"


def _runs(world: World) -> list[tuple[str, str, int, int]]:
    """(cause, status, batches, rows_marked) of every run so far, oldest first."""
    return [(str(c), str(s), int(b), int(m)) for c, s, b, m in world.sql(
        "SELECT cause, status, batches, rows_marked FROM etl.runs ORDER BY run_id")]


def _marked(uri_or_world: World | str) -> int:
    query = "SELECT count(*) FROM src WHERE processed"
    if isinstance(uri_or_world, str):
        conn = psycopg2.connect(uri_or_world)
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return int(cur.fetchone()[0])  # type: ignore[index]
        finally:
            conn.close()
    return int(uri_or_world.sql(query)[0][0])


def _ledger_ready(world: World) -> bool:
    return bool(world.sql("SELECT to_regclass('etl.runs') IS NOT NULL")[0][0]) and bool(_runs(world))


def _listening(log: Path) -> bool:
    return log.exists() and "wake-ups: listening" in log.read_text()


@pytest.mark.slow
def test_commits_wake_the_job_without_a_schedule_tick_and_its_own_mark_wakes_no_one(world: World,
                                                                                    tmp_path: Path) -> None:
    world.make_source(20)
    chdb, log = tmp_path / "chdb", tmp_path / "daemon.log"
    env_file = write_env(world, chdb, ETL_SCHEDULE=YEARLY, ETL_WAKE="notify", ETL_LAG_COLUMN="ts")
    with running("--env-file", str(env_file), log=log) as daemon:
        wait_for(lambda: _ledger_ready(world) and _listening(log), 60, "the first run and the listener")
        assert world.sql("SELECT tgname FROM pg_trigger WHERE tgrelid = 'src'::regclass AND NOT tgisinternal"
                         " ORDER BY 1") == [("etl_wake_src",), ("etl_wake_u_src",)]
        for done, first in enumerate((101, 201, 301), start=1):  # three commits, each once the last run ended
            world.sql(f"INSERT INTO src SELECT g, g, 'w', clock_timestamp(), false FROM generate_series({first},"
                      f" {first + 49}) g")
            wait_for(lambda n=done: len(_runs(world)) == n + 1, 30, f"a run to move rows {first}..")
        world.sql("UPDATE src SET amount = 0, processed = false WHERE id = 5")  # an update wakes it too
        wait_for(lambda: len(_runs(world)) == 5, 30, "a run to move the updated row")
        for _ in range(20):  # updates that leave no row to move: processed rows touched, the flag written as is
            world.sql("UPDATE src SET name = 'seen' WHERE id <= 10; UPDATE src SET processed = true WHERE id = 11")
        time.sleep(2.0)  # a mark, or one of those updates, that woke the job would show as one more run by now
        assert len(_runs(world)) == 5, _runs(world)
        assert stop(daemon) == 0
    runs = _runs(world)
    assert runs[0][:2] == ("start", "ok") and runs[0][3] == 20, runs
    woken = runs[1:]
    assert [r[0] for r in woken] == ["wake-up"] * 4, runs  # no schedule, no run woken by the service's marks
    assert [r[3] for r in woken] == [50, 50, 50, 1], runs
    latencies = [float(x) for (x,) in world.sql("SELECT latency FROM etl.runs WHERE cause = 'wake-up'"
                                                " ORDER BY run_id")]
    # from each row's ts: the inserts' own, and row 5's of 2026-01-01 (the update left ts alone)
    assert all(0 <= x < 30 for x in latencies[:3]) and latencies[3] > 86400, latencies
    ids = sorted(int(r[0]) for r in chdb_query(chdb, f"SELECT id FROM `{world.ch_database}`.dst"))
    assert ids == sorted([*range(1, 21), *range(101, 151), *range(201, 251), *range(301, 351), 5]), ids
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]
    amounts = chdb_query(chdb, f"SELECT amount FROM `{world.ch_database}`.dst WHERE id = 5 ORDER BY _etl_version")
    assert [float(a[0]) for a in amounts] == [6.25, 0.0], amounts


@pytest.mark.slow
def test_a_burst_of_commits_becomes_few_batches(world: World, tmp_path: Path) -> None:
    world.make_source(0)
    chdb, log = tmp_path / "chdb", tmp_path / "daemon.log"
    env_file = write_env(world, chdb, ETL_SCHEDULE=YEARLY, ETL_WAKE="notify", ETL_WAKE_DELAY="1",
                         ETL_BATCH_SIZE="5000")
    with running("--env-file", str(env_file), log=log) as daemon:
        wait_for(lambda: _ledger_ready(world) and _listening(log), 60, "the first run and the listener")
        conn = world.pg()
        with conn.cursor() as cur:
            for n in range(200):  # 200 commits of 5 rows, as fast as they go (well inside the delay)
                cur.execute("INSERT INTO src SELECT g, 1, 'b', now(), false FROM generate_series(%s, %s) g",
                            (n * 5 + 1, n * 5 + 5))
        conn.close()
        wait_for(lambda: _marked(world) == 1000, 60, "the burst to be marked")
        time.sleep(1.5)
        assert stop(daemon) == 0
    woken = [r for r in _runs(world) if r[0] == "wake-up"]
    assert sum(r[3] for r in woken) == 1000, woken
    assert 1 <= sum(r[2] for r in woken) <= 3, woken  # 200 commits: one batch, two if the burst straddled a run
    gathered = sum(int(w) for (w,) in world.sql("SELECT coalesce(wakeups, 0) FROM etl.runs WHERE cause = 'wake-up'"))
    assert 1 <= gathered <= 200, gathered
    assert_exact(world, chdb, "burst")


@pytest.mark.slow
def test_after_postgresql_restarts_the_daemon_listens_again_and_catches_up(world: World, tmp_path: Path) -> None:
    with postgres(tmp_path / "pg") as pg:
        uri = pg.uri
        conn = psycopg2.connect(uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), name text, ts timestamptz,"
                        " processed boolean NOT NULL DEFAULT false);"
                        " INSERT INTO src SELECT g, g, 'a', now(), false FROM generate_series(1, 10) g")
        conn.close()
        chdb, log = tmp_path / "chdb", tmp_path / "daemon.log"
        env_file = write_env(world, chdb, PG_DSN=uri, ETL_SCHEDULE=YEARLY, ETL_WAKE="notify",
                             ETL_RETRY_BACKOFF="0.2")
        with running("--env-file", str(env_file), log=log) as daemon:
            wait_for(lambda: _marked(uri) == 10 and _listening(log), 60, "the first run and the listener")
            pg.stop()
            time.sleep(1.0)
            pg.start()
            # written before the listener is back: only its catch-up run can move these
            conn = psycopg2.connect(uri)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("INSERT INTO src SELECT g, g, 'b', now(), false FROM generate_series(11, 30) g")
            conn.close()
            wait_for(lambda: _marked(uri) == 30, 60, "rows written across the restart")
            wait_for(lambda: log.read_text().count("wake-ups: listening") >= 2, 30, "listening again")
            conn = psycopg2.connect(uri)
            conn.autocommit = True
            with conn.cursor() as cur:  # and a commit after it wakes the job again
                cur.execute("INSERT INTO src SELECT g, g, 'c', now(), false FROM generate_series(31, 40) g")
            conn.close()
            wait_for(lambda: _marked(uri) == 40, 60, "rows written after the restart")
            assert stop(daemon) == 0
        text = log.read_text()
        assert "listening again in" in text and "catch-up run" in text, text[-3000:]
        ids = [int(r[0]) for r in chdb_query(chdb, f"SELECT id FROM `{world.ch_database}`.dst ORDER BY id")]
        assert ids == list(range(1, 41)), ids


@pytest.mark.slow
def test_a_dropped_trigger_leaves_the_schedule_moving_rows_and_check_says_so(world: World, tmp_path: Path) -> None:
    world.make_source(10)
    settings = world.settings(wake="notify")
    job = settings.jobs[0]
    lines: list[str] = []
    assert checks.check(settings, lines.append), lines  # before the first start: what the daemon will make
    text = "\n".join(lines)
    assert "note wake-ups: the trigger etl_wake_src is not on public.src yet: the daemon creates it" in text, text
    assert "a NOTIFY reaches a LISTEN" in text, text
    chdb, log = tmp_path / "chdb", tmp_path / "daemon.log"
    env_file = write_env(world, chdb, ETL_SCHEDULE="*/2 * * * * *", ETL_WAKE="notify")
    with running("--env-file", str(env_file), log=log) as daemon:
        wait_for(lambda: _ledger_ready(world) and _listening(log), 60, "the first run and the listener")
        world.sql("DROP TRIGGER etl_wake_src ON src")
        world.sql("INSERT INTO src SELECT g, g, 'late', now(), false FROM generate_series(11, 60) g")
        wait_for(lambda: _marked(world) == 60, 30, "the schedule to move rows without wake-ups")
        lines = []
        assert not checks.check(settings, lines.append)
        assert any("FAIL" in line and "is missing" in line for line in lines), lines
        assert stop(daemon) == 0
    runs = _runs(world)
    assert runs[0] == ("start", "ok", 1, 10) and "schedule" in {r[0] for r in runs[1:]}, runs
    assert sum(r[3] for r in runs[1:]) == 50, runs
    assert_exact(world, chdb, "dropped trigger")
    # created again at the next start, and check is content
    with running("--env-file", str(env_file), log=log) as daemon:
        wait_for(lambda: wake.trigger_state(world.pg(), job) == "present", 30, "the trigger to be made again")
        assert stop(daemon) == 0
    lines = []
    assert checks.check(settings, lines.append), lines


@pytest.mark.slow
def test_exactly_once_under_a_writer_with_wake_ups_and_sigkills(world: World, tmp_path: Path) -> None:
    world.make_source(500)
    chdb, log = tmp_path / "chdb", tmp_path / "daemon.log"
    env_file = write_env(world, chdb, ETL_SCHEDULE=YEARLY, ETL_WAKE="notify", ETL_WAKE_DELAY="0.05",
                         ETL_BATCH_SIZE="300", ETL_CHUNK_SIZE="100")
    rng = random.Random(21)
    with Writer(world, batches=400, pause=0.05) as writer:  # commits across every daemon below
        for _ in range(4):
            daemon = start("--env-file", str(env_file), log=log)
            time.sleep(rng.uniform(1.5, 4.0))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
    before, recorded = log.stat().st_size, len(_runs(world))
    with running("--env-file", str(env_file), log=log) as daemon:  # drains what is left, woken or at start
        wait_for(lambda: "wake-ups: listening" in log.read_text()[before:], 60, "the last daemon to listen")
        wait_for(lambda: world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)], 90, "the drain")
        wait_for(lambda: world.sql("SELECT count(*) FROM etl.batches WHERE state <> 'done'") == [(0,)], 30,
                 "open batches to finish")
        wait_for(lambda: len(_runs(world)) > recorded, 30, "the last daemon's first run to end")
        runs = len(_runs(world))
        world.sql("INSERT INTO src SELECT g, 1, 'after', now(), false FROM generate_series(5000001, 5000100) g")
        wait_for(lambda: _marked(world) == 600 + writer.written, 30, "the last daemon to be woken")
        assert stop(daemon) == 0
    rows = assert_exact(world, chdb, "writer + SIGKILLs")
    assert rows == 600 + writer.written and writer.written > 300, (rows, writer.written)
    assert any(r[0] == "wake-up" and r[3] >= 100 for r in _runs(world)[runs:]), _runs(world)


def test_the_wake_settings_are_checked(world: World) -> None:
    from etl_service.errors import ConfigError

    with pytest.raises(ConfigError) as bad:
        load(environ=world.env(wake="sometimes"))
    assert "ETL_WAKE" in str(bad.value)
    with pytest.raises(ConfigError) as bad:
        load(environ=world.env(wake_delay="-1"))
    assert "ETL_WAKE_DELAY" in str(bad.value)


@pytest.mark.slow
def test_two_jobs_on_one_partitioned_table_are_each_woken(world: World, tmp_path: Path) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), name text, ts timestamptz,"
              " processed boolean NOT NULL DEFAULT false, sent boolean NOT NULL DEFAULT false) PARTITION BY RANGE (id);"
              " CREATE TABLE src_low PARTITION OF src FOR VALUES FROM (MINVALUE) TO (1000);"
              " CREATE TABLE src_high PARTITION OF src FOR VALUES FROM (1000) TO (MAXVALUE);"
              " INSERT INTO src SELECT g, g, 'a', now(), false, false FROM generate_series(1, 10) g")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[jobs.first]\nsource_table = "public.src"\ntarget_table = "dst"\n\n'
                    '[jobs.second]\nsource_table = "public.src"\nprocessed_column = "sent"\ntarget_table = "dst2"\n')
    chdb, log = tmp_path / "chdb", tmp_path / "daemon.log"
    env_file = write_env(world, chdb, ETL_SCHEDULE=YEARLY, ETL_WAKE="notify", ETL_JOBS_FILE=str(jobs))
    both = "SELECT count(*) FILTER (WHERE processed), count(*) FILTER (WHERE sent) FROM src"
    with running("--env-file", str(env_file), log=log) as daemon:
        wait_for(lambda: world.sql(both) == [(10, 10)] and _listening(log)
                 and world.sql("SELECT count(*) FROM etl.runs") == [(2,)], 60, "the first runs and the listener")
        assert sorted(world.sql("SELECT tgname FROM pg_trigger WHERE tgrelid = 'src'::regclass AND NOT tgisinternal")) \
            == [("etl_wake_first",), ("etl_wake_second",), ("etl_wake_u_first",), ("etl_wake_u_second",)]
        world.sql("INSERT INTO src SELECT g, g, 'b', now(), false, false FROM generate_series(990, 1009) g")  # both
        wait_for(lambda: world.sql(both) == [(30, 30)], 30, "both jobs to be woken")
        # a statement naming a partition fires that partition's trigger; so does a write in replica mode
        world.sql("INSERT INTO src_high SELECT g, g, 'c', now(), false, false FROM generate_series(2000, 2004) g")
        wait_for(lambda: world.sql(both) == [(35, 35)], 30, "a write into a partition to wake both jobs")
        world.sql("SET session_replication_role = replica;"
                  " INSERT INTO src_low SELECT g, g, 'r', now(), false, false FROM generate_series(500, 504) g")
        wait_for(lambda: world.sql(both) == [(40, 40)], 30, "a write in replica mode to wake both jobs")
        assert stop(daemon) == 0
    causes = world.sql("SELECT job, cause, sum(rows_marked) FROM etl.runs GROUP BY 1, 2 ORDER BY 1, 2")
    assert [tuple(r) for r in causes] == [("first", "start", 10), ("first", "wake-up", 30),
                                          ("second", "start", 10), ("second", "wake-up", 30)], causes
    for table in ("dst", "dst2"):
        ids = [int(r[0]) for r in chdb_query(chdb, f"SELECT id FROM `{world.ch_database}`.{table} ORDER BY id")]
        assert ids == [*range(1, 11), *range(500, 505), *range(990, 1010), *range(2000, 2005)], (table, ids)


def test_the_services_own_mark_sends_no_notification(world: World) -> None:
    world.make_source(30)
    settings = world.settings(wake="notify")
    job = settings.jobs[0]
    conn = psycopg2.connect(world.pg_dsn)
    try:
        Ledger(conn, settings.ledger_schema, job).ensure_schema()
        assert wake.ensure_trigger(conn, settings.ledger_schema, job) is None
        assert wake.trigger_state(conn, job) == "present"
        listener = world.pg()
        with listener.cursor() as cur:
            cur.execute('LISTEN "etl_wake_src"')

        def heard(wait: float) -> int:
            deadline, count = time.monotonic() + wait, 0
            while time.monotonic() < deadline:
                if select.select([listener], [], [], 0.1) != ([], [], []):
                    listener.poll()
                    count += len(listener.notifies)
                    listener.notifies.clear()
            return count

        world.sql("INSERT INTO src VALUES (1000, 1, 'x', now(), false)")  # a row to move wakes
        assert heard(1.0) == 1
        world.sql("UPDATE src SET name = 'y' WHERE id = 1")  # a row already waiting: no second wake-up
        assert heard(1.0) == 0
        result = run_job(settings, job)
        assert result.rows_marked == 31, result.message
        assert heard(1.0) == 0  # 30 rows marked, no wake-up
        world.sql("INSERT INTO src SELECT g, g, 'n', now(), false FROM generate_series(31, 40) g;"
                  " INSERT INTO src SELECT g, g, 'n', now(), false FROM generate_series(41, 50) g")
        assert heard(1.0) == 1  # two statements, one transaction: one notification
        listener.close()
    finally:
        conn.close()


def test_the_trigger_is_made_again_where_it_went_missing_and_a_disabled_one_is_reported(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, processed boolean NOT NULL DEFAULT false)"
              " PARTITION BY RANGE (id); CREATE TABLE src_a PARTITION OF src FOR VALUES FROM (0) TO (100)")
    settings = world.settings(wake="notify")
    job = settings.jobs[0]
    conn = psycopg2.connect(world.pg_dsn)
    try:
        Ledger(conn, settings.ledger_schema, job).ensure_schema()
        assert wake.ensure_trigger(conn, settings.ledger_schema, job) is None
        world.sql("CREATE TABLE src_b PARTITION OF src FOR VALUES FROM (100) TO (200)")  # a new partition
        assert wake.trigger_state(conn, job) == "missing"
        assert wake.ensure_trigger(conn, settings.ledger_schema, job) is None
        world.sql("DROP SCHEMA etl CASCADE")  # the ledger, and the function with every trigger
        assert wake.trigger_state(conn, job) == "missing"
        Ledger(conn, settings.ledger_schema, job).ensure_schema()
        assert wake.ensure_trigger(conn, settings.ledger_schema, job) is None
        world.sql("ALTER TABLE src_a ENABLE REPLICA TRIGGER etl_wake_src")
        assert wake.trigger_state(conn, job) == "partial"
        assert wake.ensure_trigger(conn, settings.ledger_schema, job) is None
        world.sql("ALTER TABLE src_b DISABLE TRIGGER etl_wake_src")
        problem = wake.ensure_trigger(conn, settings.ledger_schema, job)
        assert problem is not None and "disabled on src_b" in problem and "ENABLE ALWAYS" in problem, problem
        states = sorted(world.sql("SELECT tgrelid::regclass::text, tgenabled::text FROM pg_trigger"
                                  " WHERE tgname = 'etl_wake_src'"))
        assert states == [("src", "A"), ("src_a", "A"), ("src_b", "D")], states
    finally:
        conn.close()


def test_updates_notify_only_when_they_leave_a_row_to_move_and_the_older_trigger_is_replaced(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, seen int NOT NULL DEFAULT 0,"
              " processed boolean NOT NULL DEFAULT false) PARTITION BY RANGE (id);"
              "CREATE TABLE src_a PARTITION OF src FOR VALUES FROM (0) TO (100);"
              "INSERT INTO src SELECT g, 0, true FROM generate_series(1, 99) g")
    settings = world.settings(wake="notify")
    job = settings.jobs[0]
    conn = psycopg2.connect(world.pg_dsn)
    try:
        Ledger(conn, settings.ledger_schema, job).ensure_schema()
        with conn.cursor() as cur:
            cur.execute(wake.statements(settings.ledger_schema, job)[0])  # the function
        conn.commit()
        # what an earlier version made: one statement trigger for INSERT OR UPDATE
        world.sql("CREATE TRIGGER etl_wake_src AFTER INSERT OR UPDATE ON src FOR EACH STATEMENT"
                  " EXECUTE FUNCTION etl.etl_wake('etl_wake_src');"
                  "CREATE TRIGGER etl_wake_src AFTER INSERT OR UPDATE ON src_a FOR EACH STATEMENT"
                  " EXECUTE FUNCTION etl.etl_wake('etl_wake_src')")
        assert wake.ensure_trigger(conn, settings.ledger_schema, job) is None
        kinds = world.sql("SELECT tgrelid::regclass::text, tgname, tgtype & 16 <> 0, tgtype & 1 = 1 FROM pg_trigger"
                          " WHERE tgname LIKE 'etl_wake%' ORDER BY 1, 2")
        assert kinds == [("src", "etl_wake_src", False, False), ("src", "etl_wake_u_src", True, True),
                         ("src_a", "etl_wake_src", False, False), ("src_a", "etl_wake_u_src", True, True)], kinds
        listener = psycopg2.connect(world.pg_dsn)
        listener.autocommit = True
        with listener.cursor() as cur:
            cur.execute("LISTEN etl_wake_src")

        def notified(statement: str) -> bool:
            world.sql(statement)
            time.sleep(0.3)
            listener.poll()
            found = bool(listener.notifies)
            listener.notifies.clear()
            return found

        assert not notified("UPDATE src SET seen = seen + 1")  # processed rows touched: nothing to move
        assert not notified("UPDATE src SET seen = 1, processed = true WHERE id < 50")  # an ORM saving every column
        assert not notified("UPDATE src_a SET seen = 2 WHERE id = 7")  # through the partition
        assert notified("UPDATE src_a SET processed = false WHERE id = 7")  # a row to move, via the partition
        assert not notified("UPDATE src SET seen = 3 WHERE id = 7")  # a row already waiting: woken already
        assert notified("INSERT INTO src VALUES (0, 0, false)")
        # the application's own trigger that sets the flag back: the row it leaves to move wakes the job
        world.sql("CREATE FUNCTION dirty() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                  " IF NEW.seen <> OLD.seen THEN NEW.processed := false; END IF; RETURN NEW; END $$;"
                  "CREATE TRIGGER dirty BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION dirty()")
        assert notified("UPDATE src SET seen = 9 WHERE id = 60")
        listener.close()
    finally:
        conn.close()
