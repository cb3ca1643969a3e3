"""Exactly once whatever the databases themselves do: readiness answers, session settings a role or
database imposes, triggers and row security on the source, narrower target types, NULL flags.
"""

from __future__ import annotations

import time

import pytest

from etl_service import checks
from etl_service.pipeline import FAILED, OK, WAITING, run_job

from .conftest import World
from .test_pipeline import ch_summary, marked


def flags_table(world: World) -> str:
    """A per-batch status table in ClickHouse: batch, status (a word), x (a number)."""
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(f"CREATE TABLE {world.target('flags')} (batch UInt64, status String, x Float64)"
                               " ENGINE = MergeTree ORDER BY batch")
    return world.target("flags")


# --- readiness answers are typed ---------------------------------------------------------------

@pytest.mark.parametrize(("query", "said"), [
    ("SELECT status FROM {flags} WHERE batch = {{batch_id:UInt64}}", "answers String (status)"),  # a word per batch
    ("SELECT avg(x) FROM {flags} WHERE batch = 999", "answered NaN"),  # avg() over no rows
    ("SELECT [1, 2]", "answers Array(UInt8)"),
    ("SELECT toNullable(toLowCardinality(toString(1)))", "answers LowCardinality(Nullable(String))"),
])
def test_a_readiness_answer_that_is_not_yes_or_no_is_a_configuration_error(world: World, query: str,
                                                                            said: str) -> None:
    world.make_source(100)
    flags = flags_table(world)
    world.backend.ch().command(f"INSERT INTO {flags} VALUES (1, 'pending', 0)")
    settings = world.settings(ready_query=query.format(flags=flags), ready_timeout="1", ready_poll_interval="0.05")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True)
    assert "ETL_READY_QUERY" in result.message and said in result.message
    assert marked(world) == (0, 100)  # loaded, never marked: downstream work was never said to be done
    assert ch_summary(world) == (100, 100, 5050)
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any(line.startswith("  FAIL ETL_READY_QUERY") for line in lines), lines


def test_a_word_compared_in_the_query_waits_then_marks(world: World) -> None:
    world.make_source(100)
    flags = flags_table(world)
    world.backend.ch().command(f"INSERT INTO {flags} VALUES (1, 'pending', 0)")
    settings = world.settings(ready_query=f"SELECT max(status = 'done') FROM {flags} WHERE batch = {{batch_id:UInt64}}",
                              ready_timeout="0.3", ready_poll_interval="0.05")
    assert run_job(settings, settings.jobs[0]).status == WAITING
    assert marked(world) == (0, 100)
    world.backend.ch().command(f"INSERT INTO {flags} VALUES (1, 'done', 0)")
    done = run_job(settings, settings.jobs[0])
    assert (done.status, done.rows_loaded, done.rows_marked) == (OK, 0, 100)
    assert marked(world) == (100, 100) and ch_summary(world) == (100, 100, 5050)


# --- what a role or database sets for its sessions ---------------------------------------------

def test_a_database_interval_style_does_not_change_the_text_moved(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, span interval, processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src VALUES (1, '1 day 2 hours'), (2, '-3 minutes 4.5 seconds')")
    world.sql(f"ALTER DATABASE {world.ch_database} SET IntervalStyle = 'iso_8601'")
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == OK
    assert world.ch_rows(f"SELECT id, span FROM {world.target()} ORDER BY id") == \
        [(1, "1 day 02:00:00"), (2, "-00:02:55.5")]


def test_a_short_idle_session_timeout_does_not_cut_a_run_that_waits_for_readiness(world: World) -> None:
    world.make_source(100)
    world.sql(f"ALTER DATABASE {world.ch_database} SET idle_session_timeout = '300ms'")
    ready_at = time.time() + 1.5  # the run's connection sits idle for longer than the timeout
    settings = world.settings(ready_query=f"SELECT now64(3) > fromUnixTimestamp64Milli({int(ready_at * 1000)})",
                              ready_timeout="10", ready_poll_interval="0.1", retry_attempts="1")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 100), result.message
    assert marked(world) == (100, 100) and ch_summary(world) == (100, 100, 5050)
