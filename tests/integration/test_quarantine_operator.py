"""Quarantined rows under operator actions: requeue, adopt, a dropped or emptied target, a fixed
transform, the quarantine limit, a kill. Every scenario ends with each row in ClickHouse once
and no row marked processed that ClickHouse lacks (found by an adversarial review, 2026-11-24:
one row lost through adopt + requeue, rows loaded twice through a resume + requeue)."""

from __future__ import annotations

from etl_service.run.pipeline import FAILED, OK, WAITING, run_job
from etl_service.service import admin

from .conftest import World
from .helpers import chdb_query, cli, write_env
from .test_guarantees import run_with_transform

FIVES = "def run(df):\n    if (df['id'] == 5).any():\n        raise ValueError('five')\n    return df\n"
FINE = "def run(df):\n    return df\n"
WAIT = {"ready_query": "SELECT 0", "ready_timeout": "0.2", "ready_poll_interval": "0.05"}


def state(world: World) -> dict[str, object]:
    rows, uniq = world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}")[0]
    in_ch = {int(r[0]) for r in world.ch_rows(f"SELECT DISTINCT id FROM {world.target()}")}
    processed = {int(r[0]) for r in world.sql("SELECT id FROM src WHERE processed")}
    quarantined = sorted((r[0], r[1]) for r in world.sql("SELECT job, key FROM etl.quarantine"))
    return {"ch_rows": int(rows), "ch_uniq": int(uniq), "source": world.sql("SELECT count(*) FROM src")[0][0],
            "processed": len(processed), "lost": sorted(processed - in_ch), "quarantined": quarantined,
            "open": world.sql("SELECT batch_id, job, state FROM etl.batches WHERE state <> 'done' ORDER BY 1")}


def exact(world: World, rows: int) -> None:
    """Each source row in ClickHouse once, all processed, none processed that ClickHouse lacks."""
    end = state(world)
    assert (end["ch_rows"], end["ch_uniq"], end["processed"], end["lost"]) == (rows, rows, rows, []), end


def test_adopt_then_requeue_marks_no_row_that_never_reached_clickhouse(world: World) -> None:
    world.make_source(20)
    first = run_with_transform(world, "b1", FIVES, job_name="b")  # job b: 5 quarantined, batch 1 done
    assert (first.status, first.rows_marked, first.rows_quarantined) == (OK, 19, 1)
    world.add_rows(21, 40)
    renamed = run_with_transform(world, "a1", FIVES, job_name="a", **WAIT)  # renamed to a: claims 5 again
    assert (renamed.status, renamed.rows_quarantined) == (WAITING, 1)
    b = world.settings(job_name="b")  # renamed back, adopts a's batch, releases "its" quarantined row
    out: list[str] = []
    assert admin.adopt(b, b.jobs[0], 2, out.append), out
    assert world.sql("SELECT job, key, batch_id FROM etl.quarantine") == [("b", "5", 2)]  # one entry, the latest
    assert not admin.requeue(b, list(b.jobs), None, out.append)  # its batch is unfinished: stays
    assert run_job(b, b.jobs[0]).rows_marked == 20  # batch 2 without row 5
    assert world.sql("SELECT processed FROM src WHERE id = 5") == [(False,)]
    assert admin.requeue(b, list(b.jobs), None, out.append)
    assert run_job(b, b.jobs[0]).rows_marked == 1
    exact(world, 40)


def test_a_target_emptied_while_a_batch_waited_reloads_a_row_once_quarantined_once(world: World) -> None:
    world.make_source(20)
    waiting = run_with_transform(world, "f2", FIVES, **WAIT)
    assert (waiting.status, waiting.rows_quarantined) == (WAITING, 1)
    world.backend.ch().command(f"TRUNCATE TABLE {world.target()}")
    fixed = run_with_transform(world, "ok2", FINE)  # ETL_TRANSFORM fixed: the reload sends row 5 too
    assert (fixed.status, fixed.rows_marked) == (OK, 20)
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]  # loaded now: not quarantined
    s = world.settings()
    assert admin.requeue(s, list(s.jobs), None, [].append)  # nothing to release
    assert run_job(s, s.jobs[0]).status == "idle"
    exact(world, 20)


def test_a_dropped_target_recreated_loads_a_row_it_once_refused_once(world: World) -> None:
    world.make_source(20)
    world.sql("UPDATE src SET name = NULL WHERE id = 5")
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(
        f"CREATE TABLE {world.target()} (id Int64, amount Decimal(12,2), name String,"
        " ts Nullable(DateTime64(6, 'UTC')), _etl_batch UInt64) ENGINE = MergeTree ORDER BY id"
        " SETTINGS non_replicated_deduplication_window = 1000")  # name not Nullable: row 5 refused
    s = world.settings(**WAIT)
    waiting = run_job(s, s.jobs[0])
    assert (waiting.status, waiting.rows_quarantined) == (WAITING, 1)
    world.backend.ch().command(f"DROP TABLE {world.target()}")  # the service makes it again, Nullable
    s2 = world.settings()
    assert run_job(s2, s2.jobs[0]).rows_marked == 20
    admin.requeue(s2, list(s2.jobs), None, [].append)
    run_job(s2, s2.jobs[0])
    exact(world, 20)


def test_quarantine_limit_then_a_fixed_transform_then_requeue(world: World) -> None:
    world.make_source(40)
    bad = "def run(df):\n    if df['id'].isin([3, 7, 11, 15]).any():\n        raise ValueError('bad')\n    return df\n"
    assert run_with_transform(world, "q3", bad, quarantine_limit="2", chunk_size="40").status == FAILED
    s = world.settings()
    assert not admin.requeue(s, list(s.jobs), None, [].append)  # batch unfinished: they stay
    assert run_with_transform(world, "q3ok", FINE, chunk_size="40").rows_marked == 40  # fixed
    admin.requeue(s, list(s.jobs), None, [].append)
    run_job(s, s.jobs[0])
    exact(world, 40)


def test_a_transform_that_fails_its_first_rows_then_works(world: World) -> None:
    world.make_source(40)
    code = ("seen = [0]\ndef run(df):\n    seen[0] += len(df)\n    if seen[0] <= 12:\n"
            "        raise ValueError('warming up')\n    return df\n")  # per process: the first 12 rows fail
    run_with_transform(world, "warm", code, chunk_size="40")
    run_with_transform(world, "warm", code, chunk_size="40")
    end = state(world)
    assert end["lost"] == [] and end["ch_rows"] == end["ch_uniq"] == end["processed"], end


def test_kill_after_quarantine_then_fix_then_requeue(world: World) -> None:
    world.make_source(40)
    (world.tmp / "txbad.py").write_text("def run(df):\n    if (df['id'] == 3).any():\n"
                                        "        raise ValueError('three')\n    return df\n")
    (world.tmp / "txok.py").write_text(FINE)
    chdb = world.tmp / "chdb"
    bad = write_env(world, chdb, "bad.env", ETL_TRANSFORM="txbad:run", ETL_CHUNK_SIZE="40",
                    ETL_CRASH_AT="mid_extract:10")
    good = write_env(world, chdb, "good.env", ETL_TRANSFORM="txok:run", ETL_CHUNK_SIZE="40")
    assert cli("--once", "--env-file", str(bad), path=world.tmp).returncode == -9  # killed after row 3 was quarantined
    assert world.sql("SELECT key FROM etl.quarantine") == [("3",)]
    assert cli("--once", "--env-file", str(good), path=world.tmp).returncode == 0  # fixed: row 3 loads with its batch
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]
    cli("requeue", "--env-file", str(good), path=world.tmp)  # nothing left to release
    assert cli("--once", "--env-file", str(good), path=world.tmp).returncode == 0
    query = f"SELECT count(), uniqExact(id), countIf(id = 3) FROM `{world.ch_database}`.dst"
    assert chdb_query(chdb, query) == [[40, 40, 1]]
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(40,)]
