"""The cycle on real PostgreSQL and real ClickHouse: every row once, marked exactly, never early."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from etl_service.ledger import Ledger
from etl_service.postgres import catalog, connection
from etl_service.run.pipeline import IDLE, OK, SKIPPED, WAITING, run_job

from .conftest import World


def ch_summary(world: World, table: str = "dst") -> tuple[int, int, int]:
    """(rows, distinct ids, sum of ids) in the target."""
    rows, unique, total = world.ch_rows(f"SELECT count(), uniqExact(id), sum(id) FROM {world.target(table)}")[0]
    return int(rows), int(unique), int(total)


def marked(world: World, table: str = "src") -> tuple[int, int]:
    """(processed rows, all rows) in the source."""
    done, total = world.sql(f"SELECT count(*) FILTER (WHERE processed), count(*) FROM {table}")[0]
    return int(done), int(total)


def test_full_drain_moves_every_row_once_and_marks_exactly_those(world: World) -> None:
    world.make_source(2500)
    settings = world.settings()
    first = run_job(settings, settings.jobs[0])
    assert (first.status, first.batches, first.rows_loaded, first.rows_marked) == (OK, 3, 2500, 2500)
    assert ch_summary(world) == (2500, 2500, 2500 * 2501 // 2)
    assert marked(world) == (2500, 2500)
    # amounts arrive exact (Decimal), batch ids recorded
    amount_sum, batches = world.ch_rows(f"SELECT sum(amount), uniqExact(_etl_batch) FROM {world.target()}")[0]
    assert str(amount_sum) == str(world.sql("SELECT sum(amount) FROM src")[0][0])
    assert batches == 3
    second = run_job(settings, settings.jobs[0])
    assert (second.status, second.rows_loaded, second.rows_marked) == (IDLE, 0, 0)
    assert ch_summary(world) == (2500, 2500, 2500 * 2501 // 2)
    assert world.sql("SELECT count(*), count(*) FILTER (WHERE state = 'done') FROM etl.batches")[0] == (3, 3)


def test_rows_inserted_during_a_run_are_not_lost(world: World) -> None:
    world.make_source(3000)
    settings = world.settings(batch_size="300", chunk_size="100")
    stop_writer = threading.Event()
    written = [3000]

    def writer() -> None:
        conn = world.pg()
        with conn.cursor() as cur:
            for _ in range(100):  # bounded: a writer faster than the drain would keep one run going
                if stop_writer.is_set():
                    break
                first = written[0] + 1
                # out of key order on purpose: low keys committed late are the classic race
                cur.execute("INSERT INTO src SELECT g, g, 'late', now(), false FROM generate_series(%s, %s) g",
                            (first, first + 19))
                written[0] = first + 19
                time.sleep(0.01)
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        during = run_job(settings, settings.jobs[0])
    finally:
        stop_writer.set()
        thread.join()
    assert during.status == OK
    final = run_job(settings, settings.jobs[0])
    assert final.status in (OK, IDLE)
    total = written[0]
    assert total > 3000
    assert ch_summary(world) == (total, total, total * (total + 1) // 2)
    assert marked(world) == (total, total)


def test_readiness_deadline_leaves_rows_unmarked_and_a_later_run_completes_them(world: World) -> None:
    world.make_source(500)
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(f"CREATE TABLE {world.target('flags')} (batch UInt64) ENGINE = MergeTree ORDER BY batch")
    settings = world.settings(
        ready_query=f"SELECT count() > 0 FROM {world.target('flags')} WHERE batch = {{batch_id:UInt64}}",
        ready_timeout="0.3", ready_poll_interval="0.1", batch_size="1000")
    first = run_job(settings, settings.jobs[0])
    assert first.status == WAITING
    assert marked(world) == (0, 500)
    assert ch_summary(world) == (500, 500, 500 * 501 // 2)  # loaded once, not yet marked
    assert world.sql("SELECT state FROM etl.batches") == [("loaded",)]
    again = run_job(settings, settings.jobs[0])  # still not ready: polls, does not reload
    assert again.status == WAITING and again.rows_loaded == 0
    world.backend.ch().command(f"INSERT INTO {world.target('flags')} VALUES (1)")
    done = run_job(settings, settings.jobs[0])
    assert (done.status, done.rows_loaded, done.rows_marked) == (OK, 0, 500)
    assert marked(world) == (500, 500)
    assert ch_summary(world) == (500, 500, 500 * 501 // 2)


def test_row_updated_after_extraction_is_not_marked_and_its_new_version_loads_next(world: World) -> None:
    world.make_source(50)
    # The transform runs after extraction and before marking: it plays a concurrent writer.
    (world.tmp / "touch_row.py").write_text(
        "import os, psycopg2\n"
        "def touch(df):\n"
        "    if 7 in set(df['id'].tolist()):\n"
        "        with psycopg2.connect(os.environ['TOUCH_DSN']) as c, c.cursor() as cur:\n"
        "            cur.execute(\"UPDATE src SET name = 'changed' WHERE id = 7 AND name <> 'changed'\")\n"
        "    return df\n")
    import os
    import sys

    sys.path.insert(0, str(world.tmp))
    os.environ["TOUCH_DSN"] = world.pg_dsn
    try:
        settings = world.settings(transform="touch_row:touch")
        result = run_job(settings, settings.jobs[0])
        # batch 1: 50 loaded, 49 marked (row 7 changed after extraction);
        # batch 2 of the same run: row 7's new version, loaded and marked.
        assert (result.status, result.batches, result.rows_loaded, result.rows_marked) == (OK, 2, 51, 50)
        assert world.sql("SELECT rows_marked FROM etl.batches ORDER BY batch_id") == [(49,), (1,)]
    finally:
        sys.path.remove(str(world.tmp))
        del os.environ["TOUCH_DSN"]
    versions = world.ch_rows(f"SELECT name FROM {world.target()} WHERE id = 7 ORDER BY _etl_batch")
    assert versions == [("row 7",), ("changed",)]
    assert marked(world) == (50, 50)


def test_second_runner_is_refused_by_the_lock(world: World) -> None:
    world.make_source(100)
    settings = world.settings()
    job = settings.jobs[0]
    holder = connection.connect(settings, "other-runner")
    try:
        other = Ledger(holder, settings.ledger_schema, job)
        other.ensure_schema()
        assert other.lock.take()
        refused = run_job(settings, job)
        assert refused.status == SKIPPED
        assert "other-runner" in refused.message
        assert marked(world) == (0, 100)
        other.lock.release()
    finally:
        holder.close()
    ran = run_job(settings, job)
    assert (ran.status, ran.rows_marked) == (OK, 100)


def test_unreachable_postgres_fails_the_run_cleanly_after_bounded_retries(world: World) -> None:
    world.make_source(10)
    env = world.env()
    env["PG_DSN"] = "postgresql://etl:secret-pw@127.0.0.1:1/nowhere"
    from etl_service.settings.reading import load

    settings = load(environ=env)
    t0 = time.monotonic()
    result = run_job(settings, settings.jobs[0])
    assert result.status == "failed"
    assert "gave up after 3 attempts" in result.message
    assert "secret-pw" not in result.message
    assert time.monotonic() - t0 < 5  # backoff 0.1 s, 0.2 s


def test_existing_target_is_filled_by_column_name(world: World) -> None:
    world.make_source(20)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    # different column order, an extra column with a default, no _etl_batch
    ch.command(f"CREATE TABLE {world.target()} (name String, extra UInt8 DEFAULT 42, amount Decimal(12, 2),"
               " ts DateTime64(6, 'UTC'), id Int64) ENGINE = MergeTree ORDER BY id"
               " SETTINGS non_replicated_deduplication_window = 100")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 20)
    assert world.ch_rows(f"SELECT id, name, amount, extra FROM {world.target()} WHERE id = 3") == \
        [(3, "row 3", world.sql("SELECT amount FROM src WHERE id = 3")[0][0], 42)]


def test_target_missing_a_column_gets_it_or_in_fail_mode_says_what_to_run(world: World) -> None:
    world.make_source(5)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64) ENGINE = MergeTree ORDER BY id"
               " SETTINGS non_replicated_deduplication_window = 100")
    strict = world.settings(schema_changes="fail")
    result = run_job(strict, strict.jobs[0])
    assert result.status == "failed"
    assert (f"run ALTER TABLE `{world.ch_database}`.`dst` ADD COLUMN IF NOT EXISTS `amount` Decimal(12, 2);"
            f" ALTER TABLE `{world.ch_database}`.`dst` ADD COLUMN IF NOT EXISTS `name` Nullable(String)") \
        in result.message
    assert marked(world) == (0, 5)
    settings = world.settings()  # auto: the operator's table gets the columns
    assert run_job(settings, settings.jobs[0]).rows_marked == 5
    assert world.ch_rows(f"SELECT name FROM {world.target()} WHERE id = 2") == [("row 2",)]


def test_identifiers_from_config_are_quoted_not_executed(world: World) -> None:
    world.sql('CREATE TABLE "src; DROP TABLE victim" (id int PRIMARY KEY, processed bool NOT NULL DEFAULT false);'
              'INSERT INTO "src; DROP TABLE victim" VALUES (1, false), (2, false);'
              'CREATE TABLE victim (x int)')
    settings = world.settings(source_table="public.src; DROP TABLE victim", target_table="dst`; DROP TABLE x")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 2)
    assert world.sql("SELECT to_regclass('victim') IS NOT NULL") == [(True,)]
    assert world.ch_rows(f"SELECT count() FROM `{world.ch_database}`.`dst\\`; DROP TABLE x`") == [(2,)]


def test_post_processing_sql_runs_after_marking(world: World) -> None:
    world.make_source(30)
    world.sql("CREATE TABLE audit (marked bigint)")
    settings = world.settings(post_pg_sql="INSERT INTO audit SELECT count(*) FROM src WHERE processed",
                              post_ch_sql=f"OPTIMIZE TABLE {world.target()} FINAL")
    result = run_job(settings, settings.jobs[0])
    assert result.status == OK
    assert world.sql("SELECT marked FROM audit") == [(30,)]


def test_connection_errors_never_show_the_password(world: World) -> None:
    from etl_service.settings.reading import load

    env = world.env()
    env["PG_DSN"] = "postgresql://etl:hunter2@127.0.0.1:1/db"
    settings = load(environ=env)
    assert "hunter2" not in repr(settings)
    try:
        connection.connect(settings)
    except Exception as exc:
        assert "hunter2" not in str(exc)
        assert isinstance(exc.__cause__, psycopg2.OperationalError)
    else:
        raise AssertionError("connect to port 1 should fail")


def test_several_jobs_from_a_jobs_file_each_move_their_own_table(world: World) -> None:
    world.make_source(300, table="orders")
    world.sql("CREATE TABLE payments (payment_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), cents integer,"
              " done boolean NOT NULL DEFAULT false);"
              "INSERT INTO payments (cents) SELECT g FROM generate_series(1, 250) g")
    jobs = world.tmp / "jobs.toml"
    jobs.write_text('[jobs.orders]\nsource_table = "orders"\ntarget_table = "orders_t"\n\n'
                    '[jobs.payments]\nsource_table = "public.payments"\nsource_key = "payment_id"\n'
                    'processed_column = "done"\ntarget_table = "payments_t"\ncolumns = "payment_id, cents:amount"\n'
                    'batch_size = 100\n')
    from etl_service.settings.reading import load

    settings = load(environ={**world.env(), "ETL_JOBS_FILE": str(jobs)})
    results = {job.name: run_job(settings, job) for job in settings.jobs}
    assert {n: (r.status, r.rows_marked) for n, r in results.items()} == {"orders": (OK, 300), "payments": (OK, 250)}
    assert results["payments"].batches == 3  # its own batch size; uuid keys claimed in key order
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target('orders_t')}") == [(300, 300)]
    assert world.ch_rows(f"SELECT count(), uniqExact(payment_id), sum(amount) FROM {world.target('payments_t')}") \
        == [(250, 250, 250 * 251 // 2)]
    assert world.sql("SELECT count(*) FROM payments WHERE done") == [(250,)]


def test_lag_without_a_lag_column_counts_from_the_last_run_that_left_nothing_to_claim(world: World) -> None:
    world.make_source(100)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == OK  # took everything: not an idle run
    # that run ended 10 minutes ago; an idle run 2 hours ago, a run stopped by its time budget 1 minute ago
    world.sql("UPDATE etl.runs SET started_at = now() - interval '11 minutes',"
              " finished_at = now() - interval '10 minutes';"
              " INSERT INTO etl.runs (job, started_at, finished_at, status, batches, rows_loaded, rows_marked,"
              " seconds, message) VALUES"
              " ('src', now() - interval '2 hours', now() - interval '2 hours', 'idle', 0, 0, 0, 0, NULL),"
              " ('src', now() - interval '2 minutes', now() - interval '1 minute', 'ok', 1, 10, 10, 60,"
              " 'time budget of 60s spent; backlog remains')")
    world.add_rows(101, 110)
    conn = connection.connect(settings)
    try:
        health = Ledger(conn, settings.ledger_schema, settings.jobs[0]).runs.health()
    finally:
        conn.close()
    assert health.backlog == 10
    assert 595 <= health.lag_seconds <= 660, health  # since the drained run: the new rows came after it
    with_column = world.settings(lag_column="ts")  # add_rows stamps ts with now()
    conn = connection.connect(with_column)
    try:
        assert Ledger(conn, settings.ledger_schema, with_column.jobs[0]).runs.health().lag_seconds < 60
        world.sql("UPDATE src SET ts = NULL WHERE NOT processed")  # no timestamps: the estimate, not 0
        assert 595 <= Ledger(conn, settings.ledger_schema, with_column.jobs[0]).runs.health().lag_seconds <= 660
    finally:
        conn.close()


def test_an_index_of_the_unprocessed_rows_on_the_key_is_recognised(world: World) -> None:
    world.sql("CREATE TABLE src (a int, b int, v text, processed boolean NOT NULL DEFAULT false, PRIMARY KEY (a, b))")
    settings = world.settings(source_key="a, b")
    cases = [("CREATE INDEX todo ON src (a, b) WHERE NOT processed", True),
             ("CREATE INDEX todo ON src (a, b, v) WHERE (processed = false)", True),  # leading columns suffice
             ("CREATE INDEX todo ON src (b, a) WHERE NOT processed", False),  # not in the key's order
             ("CREATE INDEX todo ON src (a) WHERE NOT processed", False),  # part of the key
             ("CREATE INDEX todo ON src (a, b) WHERE processed", False),  # the done rows
             ("CREATE INDEX todo ON src USING brin (a, b) WHERE NOT processed", False),  # not ordered
             ("CREATE INDEX todo ON src (a, b)", False)]
    conn = connection.connect(settings)
    try:
        for ddl, expected in cases:
            world.sql(f"DROP INDEX IF EXISTS todo; {ddl}")
            assert catalog.describe(conn, settings.jobs[0]).range_join is expected, ddl
    finally:
        conn.close()
    world.sql('CREATE TABLE odd (id int PRIMARY KEY, "Done Flag" boolean NOT NULL DEFAULT false);'
              ' CREATE INDEX odd_todo ON odd (id) WHERE "Done Flag" = false')
    odd = world.settings(source_table="public.odd", processed_column="Done Flag")
    conn = connection.connect(odd)
    try:
        assert catalog.describe(conn, odd.jobs[0]).range_join  # a flag name with a space and capitals
    finally:
        conn.close()
    # a run through it with a composite key is exact (the shared fixture's tables have one on id)
    world.sql("DROP INDEX todo; CREATE INDEX todo ON src (a, b) WHERE NOT processed;"
              " INSERT INTO src SELECT g % 7, g, 'v' || g, false FROM generate_series(1, 3000) g")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 3000)
    assert world.ch_rows(f"SELECT count(), uniqExact(a, b), sum(b) FROM {world.target()}") == [(3000, 3000, 4501500)]


def test_dense_and_sparse_key_ranges_without_a_backlog_index_load_exactly(world: World,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # a table with only its primary key: a chunk whose keys fill most of their range is read as one range
    # of the key index merged with the claimed keys, a sparse one key by key; both load every row once
    from etl_service.postgres import extract

    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, v text, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, 'd' || g, false FROM generate_series(1, 3000) g;"  # dense
              "INSERT INTO src SELECT g, 's' || g, false FROM generate_series(10000, 100000, 25) g;"  # sparse
              "INSERT INTO src SELECT g, 'p' || g, true FROM generate_series(3001, 5000) g")  # done already
    dense: list[bool] = []
    decided = extract.Extractor._dense

    def noted(self: extract.Extractor, *args: object) -> bool:
        answer = decided(self, *args)  # type: ignore[arg-type]
        dense.append(answer)
        return answer

    monkeypatch.setattr(extract.Extractor, "_dense", noted)
    settings = world.settings(batch_size="2500", chunk_size="1500")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 3000 + 3601)
    assert True in dense and False in dense, dense
    total = sum(range(1, 3001)) + sum(range(10000, 100001, 25))
    assert world.ch_rows(f"SELECT count(), uniqExact(id), sum(id), countIf(startsWith(v, 'p'))"
                         f" FROM {world.target()}") == [(6601, 6601, total, 0)]
