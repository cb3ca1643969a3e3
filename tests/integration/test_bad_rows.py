"""Bad rows are quarantined with their reason, stay unprocessed, and the rest of the batch goes on."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from etl_service.run.pipeline import FAILED, OK, run_job
from etl_service.service import admin, report

from .conftest import World
from .helpers import logged, operator_target
from .test_pipeline import ch_summary, marked


@pytest.fixture
def picky_transform(world: World) -> Iterator[str]:
    """A transform that raises for ids ending in 7 while PICKY is set (a bug, later fixed)."""
    module = f"picky_{world.ch_database}"
    (world.tmp / f"{module}.py").write_text(
        "import os\n"
        "def clean(df):\n"
        "    if os.environ.get('PICKY') and (df['id'] % 10 == 7).any():\n"
        "        raise ValueError('customer code missing')\n"
        "    df['name'] = df['name'].str.upper()\n"
        "    return df\n")
    sys.path.insert(0, str(world.tmp))
    os.environ["PICKY"] = "1"
    yield f"{module}:clean"
    os.environ.pop("PICKY", None)
    sys.path.remove(str(world.tmp))


def test_rows_the_transform_rejects_are_quarantined_and_requeued_after_a_fix(world: World,
                                                                             picky_transform: str) -> None:
    world.make_source(1000)
    settings = world.settings(transform=picky_transform, batch_size="500", chunk_size="250")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_loaded, result.rows_marked, result.rows_quarantined) == (OK, 900, 900, 100)
    assert ch_summary(world) == (900, 900, sum(i for i in range(1, 1001) if i % 10 != 7))
    assert marked(world) == (900, 1000)
    rows = world.sql("SELECT key, reason, row->>'name' FROM etl.quarantine ORDER BY key::int LIMIT 2")
    assert [(key, name) for key, _, name in rows] == [("7", "row 7"), ("17", "row 17")]
    assert rows[0][1] == f"transform {picky_transform} raised ValueError: customer code missing"
    lines: list[str] = []
    report.status(settings, lines.append)
    assert "  quarantined rows: 100 (release with `requeue` after fixing them)" in lines
    assert run_job(settings, settings.jobs[0]).rows_loaded == 0  # quarantined rows are not claimed again

    os.environ.pop("PICKY")  # the fix
    released: list[str] = []
    assert admin.requeue(settings, list(settings.jobs), ["7", "17"], released.append)
    assert released == ["job src: 2 row(s) released (17, 7)"]
    assert run_job(settings, settings.jobs[0]).rows_marked == 2
    assert admin.requeue(settings, list(settings.jobs), None, released.append)
    after = run_job(settings, settings.jobs[0])
    assert (after.status, after.rows_marked, after.rows_quarantined) == (OK, 98, 0)
    assert ch_summary(world) == (1000, 1000, 500500)
    assert marked(world) == (1000, 1000)
    assert world.ch_rows(f"SELECT name FROM {world.target()} WHERE id = 7") == [("ROW 7",)]


def test_values_the_target_cannot_take_are_quarantined(world: World) -> None:
    world.sql("""
        CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), code text, day date,
                          processed boolean NOT NULL DEFAULT false);
        INSERT INTO src SELECT g, g, '6f1e2b8e-8c47-4b56-9a4a-3e1f2a3b4c5d', date '2026-01-01', false
        FROM generate_series(1, 300) g;
        UPDATE src SET amount = 12345.67 WHERE id = 50;           -- wider than Decimal(5,2)
        UPDATE src SET code = 'not-a-uuid' WHERE id = 150;        -- ClickHouse rejects it
        UPDATE src SET day = 'infinity' WHERE id = 250;           -- no Date32 for it
        UPDATE src SET amount = NULL WHERE id = 251;              -- NULL into a non-Nullable column
    """)
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(5, 2), code UUID, day Nullable(Date32),"
               " _etl_batch UInt64) ENGINE = MergeTree ORDER BY id"
               " SETTINGS non_replicated_deduplication_window = 1000")
    settings = world.settings(batch_size="300", chunk_size="100")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_loaded, result.rows_marked, result.rows_quarantined) == (OK, 296, 296, 4)
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    assert sorted(reasons, key=int) == ["50", "150", "250", "251"]
    assert "column 'amount': value 12345.67 does not fit Decimal(5, 2)" in reasons["50"]
    assert "UUID" in reasons["150"]
    assert "column 'day': infinity has no ClickHouse Date32 value" in reasons["250"]
    assert "column 'amount': NULL into non-Nullable Decimal(5, 2)" in reasons["251"]
    assert ch_summary(world) == (296, 296, 45150 - 50 - 150 - 250 - 251)
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(4,)]


def test_a_transform_broken_for_every_row_quarantines_nothing_and_fails_the_run(world: World,
                                                                                 picky_transform: str) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, name text, processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g * 10 + 7, 'x', false FROM generate_series(1, 200) g")
    settings = world.settings(transform=picky_transform, chunk_size="50")
    result = run_job(settings, settings.jobs[0])
    assert result.status == FAILED
    assert "every row of positions 1-50 in batch 1 failed" in result.message
    assert "customer code missing" in result.message
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]
    assert marked(world) == (0, 200)
    os.environ.pop("PICKY")  # the fix: the same batch now loads
    fixed = run_job(settings, settings.jobs[0])
    assert (fixed.status, fixed.rows_marked) == (OK, 200)
    assert ch_summary(world) == (200, 200, sum(g * 10 + 7 for g in range(1, 201)))


def test_the_quarantine_limit_stops_a_run(world: World, picky_transform: str) -> None:
    world.make_source(300)
    settings = world.settings(transform=picky_transform, quarantine_limit="5", chunk_size="100")
    result = run_job(settings, settings.jobs[0])
    assert result.status == FAILED
    assert "more than ETL_QUARANTINE_LIMIT=5 rows quarantined" in result.message
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(6,)]
    assert marked(world) == (0, 300)


def test_a_resumed_split_batch_never_loads_a_row_twice(world: World, picky_transform: str) -> None:
    """A run that stops inside a split resumes on the same halves: every token matches again."""
    world.make_source(400)
    settings = world.settings(transform=picky_transform, batch_size="400", chunk_size="400",
                              fail_at="after_last_insert", retry_attempts="1")
    first = run_job(settings, settings.jobs[0])
    assert first.status == FAILED  # injected outage after every range of the chunk was sent
    assert world.sql("SELECT chunks_loaded, cardinality(split) > 0 FROM etl.batches") == [(0, True)]
    settings = world.settings(transform=picky_transform, batch_size="400", chunk_size="400")
    second = run_job(settings, settings.jobs[0])
    assert (second.status, second.rows_marked) == (OK, 360)
    assert ch_summary(world) == (360, 360, sum(i for i in range(1, 401) if i % 10 != 7))


def test_status_lists_quarantined_rows_with_reasons(world: World, picky_transform: str) -> None:
    world.make_source(20)
    settings = world.settings(transform=picky_transform)
    run_job(settings, settings.jobs[0])
    lines: list[str] = []
    assert not report.status(settings, lines.append)  # quarantined rows need attention: exit 1
    text = "\n".join(lines)
    assert "quarantined rows: 2" in text
    assert "id=17 at " in text and "customer code missing" in text


def test_many_bad_rows_in_a_batch_are_said_in_a_few_lines(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2),"
              " processed boolean NOT NULL DEFAULT false);"
              "INSERT INTO src SELECT g, CASE WHEN g % 3 = 0 THEN 12345.67 ELSE 1.5 END, false"
              " FROM generate_series(1, 300) g")
    operator_target(world, "id Int64, amount Decimal(5, 2)")
    with logged("WARNING") as warnings:
        settings = world.settings(batch_size="300", chunk_size="100")
        result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 200, 100)
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(100,)]
    splits = [w for w in warnings if "splitting to find the bad rows" in w]
    named = [w for w in warnings if "quarantined: column 'amount'" in w]
    assert len(splits) == 3, splits  # one per chunk; the splits of its halves are details
    assert len(named) == 5, named  # the batch's first five by name, the rest counted as each chunk ends
    assert any("more row(s) of batch 1 quarantined (100 so far" in w for w in warnings), warnings
    assert len(warnings) <= 12, warnings
