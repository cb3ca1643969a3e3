"""The program as a user runs it: a subprocess with an env file, real signals, real exit codes."""

from __future__ import annotations

import json
import signal
import time

import pytest

from etl_service.postgres import connection, logic

from .conftest import World
from .helpers import chdb_query, cli, running, slow_transform, stop, wait_for, write_env


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
    as_json = json.loads(cli("status", "--json", "--env-file", str(env_file)).stdout)
    job = as_json["jobs"][0]
    assert (as_json["healthy"], job["job"], job["backlog"], job["quarantined"]) == (True, "src", 0, 0)
    assert (job["runs"][0]["status"], job["runs"][0]["rows_marked"]) == ("ok", 10)
    checked = json.loads(cli("check", "--json", "--env-file", str(env_file)).stdout)
    assert checked["healthy"] is True and checked["jobs"][0]["job"] == "src"
    texts = [f["text"] for f in checked["jobs"][0]["findings"]]
    assert any(t.startswith("next runs: ") for t in texts) and "0 unprocessed row(s)" in texts
    bad = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_SOURCE_TABLE="public.nope")))
    assert bad.returncode == 1
    assert 'FAIL ETL_SOURCE_TABLE: table "public"."nope" does not exist in PostgreSQL' in bad.stdout
    no_key = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_SOURCE_KEY="order_id")))
    assert no_key.returncode == 1
    assert "FAIL ETL_SOURCE_KEY: column 'order_id' does not exist in \"public\".\"src\"" in no_key.stdout
    assert "columns are: id, amount, name, ts, processed" in no_key.stdout
    renamed = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_COLUMNS="id, name:title")))
    assert renamed.returncode == 0, renamed.stdout
    assert "note the next run will apply: added column title Nullable(String) (new at the source)" in renamed.stdout
    assert "next runs: " in renamed.stdout



def test_check_says_when_marking_cannot_be_a_hot_update(world: World) -> None:
    world.make_source(10)
    env_file = write_env(world, world.tmp / "chdb")
    # make_source gives src the usual backlog index: src_todo ON src (id) WHERE NOT processed
    plain = cli("check", "--env-file", str(env_file))
    assert plain.returncode == 0, plain.stdout  # advice, not a failure
    assert "note index src_todo (btree) on src refers to processed, so marking a row writes index entries" \
        in plain.stdout
    assert "note src has fillfactor 100: a marked row moves to another page" in plain.stdout
    world.sql("DROP INDEX src_todo; CREATE INDEX src_todo ON src USING brin (id) WHERE NOT processed;"
              " ALTER TABLE src SET (fillfactor = 70)")
    tuned = cli("check", "--env-file", str(env_file))
    assert tuned.returncode == 0 and "HOT" not in tuned.stdout and "src_todo" not in tuned.stdout, tuned.stdout
    world.sql("CREATE INDEX src_flag ON src (processed, id)")  # the flag as a column blocks HOT as well
    assert "note index src_flag (btree) on src refers to processed" in cli("check", "--env-file", str(env_file)).stdout
    # a partitioned table: its partitions' storage and indexes; a flag name that needs quotes; a
    # function of the same name as the flag is not the flag
    world.sql('CREATE TABLE parts (id bigint PRIMARY KEY, "Done Flag" boolean NOT NULL DEFAULT false, lower text)'
              " PARTITION BY RANGE (id);"
              " CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM (0) TO (100) WITH (fillfactor = 50);"
              " CREATE TABLE parts_b PARTITION OF parts FOR VALUES FROM (100) TO (200);"
              ' CREATE INDEX parts_b_todo ON parts_b (id) WHERE NOT "Done Flag";'
              " CREATE INDEX parts_low ON parts (lower(id::text))")
    settings = world.settings(source_table="public.parts", processed_column="Done Flag")
    conn = connection.connect(settings)
    try:
        advice = logic.hot_advice(conn, settings.jobs[0])
    finally:
        conn.close()
    assert [a.split(":")[0] for a in advice] == [
        "index parts_b_todo (btree) on parts_b refers to Done Flag, so marking a row writes index entries (no HOT"
        " update)", "parts_b has fillfactor 100"], advice
    assert "ALTER TABLE parts_b SET (fillfactor = 50)" in advice[1]
    for flag in ("lower", "flag["):  # a flag that is also a function's name; one that regexes choke on
        odd = world.settings(source_table="public.parts", processed_column=flag)
        conn = connection.connect(odd)
        try:
            assert not any("refers to" in a for a in logic.hot_advice(conn, odd.jobs[0]))
        finally:
            conn.close()

@pytest.mark.slow
def test_daemon_runs_on_a_seconds_schedule_and_exits_0_on_sigterm(world: World) -> None:
    world.make_source(300)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="*/1 * * * * *", ETL_MISFIRE_GRACE="5")
    log_path = world.tmp / "daemon.log"
    with running("--env-file", str(env_file), log=log_path) as proc:
        wait_for(lambda: marked(world) == 300, 60, "the first 300 rows to be marked")
        world.add_rows(301, 450)
        wait_for(lambda: marked(world) == 450, 30, "150 more rows on a later scheduled run")
        t0 = time.monotonic()
        assert stop(proc) == 0
        stop_seconds = time.monotonic() - t0
    text = log_path.read_text()
    assert "etl-service ready: 1 job(s)" in text
    assert "rows_marked=150" in text
    assert "etl-service stopped" in text
    assert stop_seconds < 15
    assert chdb_query(chdb, f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == [[450, 450]]


@pytest.mark.slow
def test_sighup_reloads_the_env_file_keeps_the_batch_in_flight_and_refuses_a_bad_one(world: World) -> None:
    world.make_source(1200)
    chdb = world.tmp / "chdb"
    job = {"ETL_SCHEDULE": "*/1 * * * * *", "ETL_BATCH_SIZE": "600", "ETL_CHUNK_SIZE": "100"}
    env_file = write_env(world, chdb, ETL_TRANSFORM=slow_transform(world, 0.3), **job)
    log = world.tmp / "reload.log"
    with running("--env-file", str(env_file), log=log, path=world.tmp) as proc:
        wait_for(lambda: "chunk" in log.read_text() or marked(world) > 0 or _loaded(world) > 0, 60, "a run")
        write_env(world, chdb, ETL_TARGET_TABLE="dst2", **job)  # same file name: the edit
        proc.send_signal(signal.SIGHUP)  # mid-run: the batch in flight finishes into dst
        wait_for(lambda: "configuration reloaded" in log.read_text(), 30, "the reload")
        wait_for(lambda: marked(world) == 1200, 60, "the backlog")
        world.add_rows(1201, 1300)
        wait_for(lambda: marked(world) == 1300, 30, "new rows after the reload")
        write_env(world, chdb, ETL_TARGET_TABLE="dst3", ETL_SCHEDULE="not a cron")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in log.read_text(), 30, "the refusal")
        world.add_rows(1301, 1350)
        wait_for(lambda: marked(world) == 1350, 30, "rows under the old configuration")
        assert stop(proc) == 0
    text = log.read_text()
    assert "reload refused, the previous configuration keeps running: ETL_SCHEDULE" in text
    counts = chdb_query(chdb, f"SELECT 'dst', count(), uniqExact(id) FROM `{world.ch_database}`.dst"
                              f" UNION ALL SELECT 'dst2', count(), uniqExact(id) FROM `{world.ch_database}`.dst2")
    by_table = {t: (int(n), int(u)) for t, n, u in counts}
    assert by_table["dst"][0] == by_table["dst"][1] and by_table["dst2"][0] == by_table["dst2"][1]
    assert by_table["dst"][0] + by_table["dst2"][0] == 1350  # every row once, across the two targets
    assert by_table["dst2"][0] >= 150  # rows after the reload went to the new target


def _loaded(world: World) -> int:
    if not world.sql("SELECT to_regclass('etl.batches') IS NOT NULL")[0][0]:
        return 0
    return int(world.sql("SELECT coalesce(sum(rows_loaded), 0) FROM etl.batches")[0][0])


@pytest.mark.slow
def test_metrics_endpoint_reports_rows_backlog_and_last_success(world: World) -> None:
    import socket
    import urllib.request

    world.make_source(300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_file = write_env(world, world.tmp / "chdb", ETL_SCHEDULE="0 0 1 1 *", ETL_METRICS_PORT=str(port))
    with running("--env-file", str(env_file), log=world.tmp / "metrics.log") as proc:
        wait_for(lambda: marked(world) == 300, 60, "the start-up run")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()

        wait_for(lambda: 'etl_backlog_rows{job="src"} 0.0' in scrape(), 20, "the backlog gauge")
        text = scrape()
        assert stop(proc) == 0
    for line in ('etl_rows_total{job="src",step="extracted"} 300.0',
                 'etl_rows_total{job="src",step="loaded"} 300.0',
                 'etl_rows_total{job="src",step="marked"} 300.0',
                 'etl_run_duration_seconds_count{job="src",status="ok"} 1.0',
                 'etl_batch_duration_seconds_count{job="src"} 1.0'):
        assert line in text, line
    last_success = next(ln for ln in text.splitlines()
                        if ln.startswith('etl_last_success_timestamp_seconds{job="src"}'))
    assert float(last_success.split()[-1]) > time.time() - 120
