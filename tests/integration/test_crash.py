"""SIGKILL at every step boundary, and at random moments: nothing lost, nothing doubled.

Each test drives the real program as a subprocess (`--once`) on embedded PostgreSQL + chDB while
a writer inserts rows the whole time, kills it with SIGKILL, restarts, drains, and compares the
key multiset in ClickHouse with the source exactly. ETL_CRASH_AT (faults.py) names the point.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from etl_service.faults import POINTS

from .conftest import World
from .helpers import Writer, assert_exact, chdb_query, cli, start, write_env

JOB = {"ETL_BATCH_SIZE": "1000", "ETL_CHUNK_SIZE": "400", "ETL_READY_QUERY": "SELECT 1",
       "ETL_READY_POLL_INTERVAL": "0.1"}


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_step_loses_and_doubles_nothing(world: World, point: str) -> None:
    world.make_source(2500)
    chdb = world.tmp / "chdb"
    crashing = write_env(world, chdb, "crash.env", ETL_CRASH_AT=f"{point}:2", **JOB)  # mid-drain
    normal = write_env(world, chdb, "normal.env", **JOB)
    with Writer(world):
        killed = cli("--once", "--env-file", str(crashing))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        resumed = cli("--once", "--env-file", str(normal))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = cli("--once", "--env-file", str(normal))
    assert final.returncode == 0, final.stderr[-2000:]
    if point != "after_claim":
        assert "resuming batch" in resumed.stderr
    rows = assert_exact(world, chdb, f"killed at {point}")
    print(f"SIGKILL at {point}: {rows} rows, 0 lost, 0 doubled")
    assert rows > 2500


@pytest.mark.slow
def test_random_sigkills_over_many_cycles(world: World) -> None:
    seed = int(os.environ.get("ETL_TEST_SEED") or time.time_ns() % 2**32)
    print(f"random kill test seed={seed} (replay with ETL_TEST_SEED={seed})")
    rng = random.Random(seed)
    world.make_source(150000)  # enough work that most runs are still busy when the kill comes
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_BATCH_SIZE="3000", ETL_CHUNK_SIZE="700")
    kills = 0
    with Writer(world, batches=400, pause=0.02):
        for cycle in range(8):
            proc = start("--once", "--env-file", str(env_file), log=world.tmp / "random.log")
            time.sleep(rng.uniform(0.3, 1.8))  # start-up takes ~0.7 s: some kills land before any work
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            print(f"cycle {cycle}: exit {proc.returncode}")
    for _ in range(2):
        drained = cli("--once", "--env-file", str(env_file))
        assert drained.returncode == 0, f"seed={seed}: {drained.stderr[-2000:]}"
    rows = assert_exact(world, chdb, f"seed={seed}, {kills} kills")
    print(f"seed={seed}: {kills} kills, {rows} rows, 0 lost, 0 doubled")
    assert kills >= 4, f"seed={seed}: only {kills} kills landed"


def test_rows_updated_between_a_killed_insert_and_its_resume_load_again_and_nothing_is_doubled(
        world: World) -> None:
    # killed after a chunk's insert, before the ledger recorded it; rows of that chunk then change: the
    # resumed insert (same token) is dropped by ClickHouse, which holds the rows of the first one, more than
    # the resume sends; no key is there twice, so the batch is marked without the changed rows
    world.make_source(1000)
    chdb = world.tmp / "chdb"
    crashing = write_env(world, chdb, "crash.env", ETL_CRASH_AT="after_last_insert:1", ETL_TARGET_MODE="latest",
                         **JOB)
    normal = write_env(world, chdb, "normal.env", ETL_TARGET_MODE="latest", **JOB)
    killed = cli("--once", "--env-file", str(crashing))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    world.sql("UPDATE src SET amount = amount + 1000 WHERE id > 900")  # rows of the chunk killed after its insert
    resumed = cli("--once", "--env-file", str(normal))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "more than were sent now" in resumed.stderr
    final = cli("--once", "--env-file", str(normal))
    assert final.returncode == 0, final.stderr[-2000:]
    held = chdb_query(chdb, f"SELECT id, amount * 100 FROM `{world.ch_database}`.dst FINAL ORDER BY id")
    assert [(int(i), int(float(a))) for i, a in held] == [(int(i), int(a * 100)) for i, a in
                                                          world.sql("SELECT id, amount FROM src ORDER BY id")]
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]
