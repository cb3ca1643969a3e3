"""Columns that change while a run goes on: whatever statement meets the change first, the run starts over."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from etl_service.postgres import catalog
from etl_service.run.pipeline import OK, run_job
from etl_service.service.checks import check

from .conftest import World
from .helpers import logged, operator_target


def test_a_column_dropped_between_describe_and_claim_starts_the_run_over(world: World,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, name text, discount text,"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, 'n' || g, 'd' || g, false FROM generate_series(1, 500) g")
    described = catalog.describe
    calls: list[int] = []

    def drop_after_first_describe(conn: Any, job: Any) -> catalog.SourceShape:
        shape = described(conn, job)
        calls.append(1)
        if len(calls) == 1:  # as an application's migration would, right after the run read the columns
            world.sql("ALTER TABLE src DROP COLUMN discount")
        return shape

    monkeypatch.setattr(catalog, "describe", drop_after_first_describe)
    settings = world.settings(batch_size="200", chunk_size="100")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 500), result.message
    assert len(calls) >= 2  # described again after the change
    assert world.ch_rows(f"SELECT count(), uniqExact(id), sum(toInt64(substring(name, 2))) FROM {world.target()}") \
        == [(500, 500, sum(range(1, 501)))]
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(500,)]


def test_a_mark_that_is_a_deadlocks_victim_is_done_again_and_the_run_ends_ok(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, name text, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, 'n' || g, false FROM generate_series(1, 1000) g")
    app = world.pg()
    app.autocommit = False
    with app.cursor() as cur:  # an application transaction holds a row the mark reaches late...
        cur.execute("SET deadlock_timeout = '10s'")  # ...and waits longest, so the mark is the victim
        cur.execute("SELECT id FROM src WHERE id = 900 FOR UPDATE")
    done = threading.Event()

    def application() -> None:
        # once the mark waits for row 900 (holding rows 1..899), take row 5: a deadlock
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not world.sql(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name LIKE 'etl-service/src-mark/%'"):
            time.sleep(0.05)
        with app.cursor() as cur:
            cur.execute("UPDATE src SET name = 'changed' WHERE id = 5")
        app.commit()
        done.set()

    thread = threading.Thread(target=application)
    thread.start()
    with logged("INFO") as said:
        settings = world.settings(batch_size="1000", chunk_size="500")
        result = run_job(settings, settings.jobs[0])
    thread.join(60)
    app.close()
    assert done.is_set()
    assert any("deadlock detected" in line and "marking again in" in line for line in said), said
    # row 5 changed after its claim: the run drains it again (its new version) in a second batch
    assert (result.status, result.rows_quarantined, result.rows_marked, result.rows_loaded) == (OK, 0, 1000, 1001)
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]
    assert world.ch_rows(f"SELECT name FROM {world.target()} WHERE id = 5 ORDER BY _etl_version") == [
        ("n5",), ("changed",)]
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(1000,)]


def test_check_names_the_statement_a_type_change_needs_before_a_run_stops_on_it(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, v integer, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, g, false FROM generate_series(1, 10) g")
    operator_target(world, "id Int64, v Nullable(Int32)")
    settings = world.settings(schema_changes="fail")
    assert run_job(settings, settings.jobs[0]).status == OK
    world.sql("ALTER TABLE src ALTER COLUMN v TYPE text; INSERT INTO src VALUES (11, 'eleven', false)")
    said: list[str] = []
    assert not check(settings, said.append)
    assert any("FAIL" in line and "MODIFY COLUMN `v` Nullable(String)" in line for line in said), said
    stopped = run_job(settings, settings.jobs[0])
    assert stopped.status != OK and "MODIFY COLUMN `v` Nullable(String)" in stopped.message
