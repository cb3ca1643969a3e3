"""A daemon that runs for months does not grow with runs: threads, descriptors and memory stay bounded.

Counted, not timed: the daemon runs on a 1-second schedule under a writer; threads, open
descriptors and RSS are read from /proc after a warm-up and again after many more runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

import pytest

from .conftest import World
from .helpers import Writer, assert_exact, chdb_query, cli, running, stop, wait_for, write_env

WARM_UP_RUNS = 10
MEASURED_RUNS = 100
# What the data supports (docs/performance.md, "Running for months"; tests/soak.py): no growth per run. The
# embedded engine's global pool keeps a thread for each task it ever ran at once, so a rare peak
# (a merge overlapping a query) can add one thread, with up to 3 descriptors on
# /proc/self/task/<tid>: +1 thread in 6000 runs of the soak. RSS: +6 MB over those 6000 runs.
# Before one chDB client per process, every run added 5 threads, 13 descriptors and 2.7 MB (500
# threads over the measured runs); before the engine removed old parts serially, a pool of ~125
# threads appeared once, a few hundred inserts in (etl_service/chdb_engine.xml).
MAX_THREADS_GAINED = 2
MAX_RSS_MB = 20


def sample(pid: int) -> tuple[int, int, float]:
    """(threads, open descriptors, RSS in MB) of a live process between runs.

    The daemon runs every second, and a run holds a query's threads, its connections and a temp
    file for a moment: threads and descriptors are the fewest of ten readings over two seconds
    (the process at rest), RSS their median.
    """
    readings = []
    for _ in range(10):
        proc = Path(f"/proc/{pid}")
        rss_kb = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        readings.append((len(os.listdir(proc / "task")), len(os.listdir(proc / "fd")), rss_kb / 1024))
        time.sleep(0.2)
    threads, fds, rss = zip(*readings, strict=True)
    return min(threads), min(fds), sorted(rss)[5]


def descriptors(pid: int) -> Counter[str]:
    """What the open descriptors point at, with /proc/<pid>/task/<tid> folded to one name: the reading
    with the fewest of ten over two seconds (the process at rest, not inside a run's connections)."""
    readings = []
    for _ in range(10):
        targets: Counter[str] = Counter()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                targets[re.sub(r"/task/\d+", "/task/<tid>", os.readlink(f"/proc/{pid}/fd/{fd}"))] += 1
        readings.append(targets)
        time.sleep(0.2)
    return min(readings, key=lambda found: sum(found.values()))


def runs(world: World) -> int:
    found = world.sql("SELECT to_regclass('etl.runs') IS NOT NULL")[0][0]
    return int(world.sql("SELECT count(*) FROM etl.runs")[0][0]) if found else 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_threads_descriptors_and_memory_stay_flat_over_many_runs(world: World) -> None:
    world.make_source(2000)
    chdb = world.tmp / "chdb"
    # A run drains while rows keep coming; a writer as fast as the run would keep one run going for good:
    # ETL_MAX_RUN_SECONDS ends each run, so the measured runs are many runs, as the schedule intends.
    env_file = write_env(world, chdb, ETL_SCHEDULE="* * * * * *", ETL_BATCH_SIZE="500", ETL_CHUNK_SIZE="250",
                         ETL_MAX_RUN_SECONDS="2")
    log = world.tmp / "daemon.log"
    with running("--env-file", str(env_file), log=log) as daemon, Writer(world, batches=100_000, pause=0.05):
        wait_for(lambda: runs(world) >= WARM_UP_RUNS, 120, "the warm-up runs")
        first, at, fds = sample(daemon.pid), runs(world), descriptors(daemon.pid)
        wait_for(lambda: runs(world) >= at + MEASURED_RUNS, 300, "the measured runs")
        last, done = sample(daemon.pid), runs(world)
        now = descriptors(daemon.pid)
        assert stop(daemon) == 0
    opened = sorted((now - fds).elements())  # what the process holds now that it did not
    moved = int(world.sql("SELECT coalesce(sum(rows_marked), 0) FROM etl.runs WHERE run_id > %s", (at,))[0][0])
    print(f"\nafter {at} runs: {first[0]} threads, {first[1]} descriptors, {first[2]:.0f} MB RSS;"
          f" after {done} runs: {last[0]} threads, {last[1]} descriptors, {last[2]:.0f} MB RSS"
          f" ({done - at} runs moving {moved} rows in between)")
    assert moved > 0, "the measured runs must do work, not only find nothing"
    gained = last[0] - first[0]
    assert gained <= MAX_THREADS_GAINED, (first, last)
    # The engine opens /proc/self/task/<tid>/{stat,schedstat,io} for a thread once it runs a query,
    # and keeps them for the thread's life: bounded by its threads (3 each), not by runs.
    per_thread = re.compile(r"/task/<tid>/(stat|schedstat|io)$")
    # A reading may still land inside a run: its three PostgreSQL connections (the run's, the mark's, the
    # extraction's) are sockets for a moment; the counts above (first against last) are what must not grow.
    assert sum(1 for target in opened if not per_thread.search(target)) <= 3, (first, last, opened)
    assert sum(n for target, n in now.items() if per_thread.search(target)) <= 3 * last[0], (last, now)
    assert last[2] - first[2] <= MAX_RSS_MB, (first, last)
    assert cli("--once", "--env-file", str(env_file)).returncode == 0  # what the writer added last
    assert_exact(world, chdb, "after the flat runs")


def test_a_reload_that_moves_the_chdb_folder_takes_effect_and_frees_the_old_one(world: World) -> None:
    world.make_source(300)
    old, new = world.tmp / "chdb_old", world.tmp / "chdb_new"
    env_file = write_env(world, old, "reload.env", ETL_SCHEDULE="* * * * * *")
    with running("--env-file", str(env_file), log=world.tmp / "daemon.log") as daemon:
        wait_for(lambda: int(world.sql("SELECT count(*) FROM src WHERE processed")[0][0]) == 300, 60, "first rows")
        write_env(world, new, "reload.env", ETL_SCHEDULE="* * * * * *")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in (world.tmp / "daemon.log").read_text(), 30, "the reload")
        world.add_rows(301, 500)
        wait_for(lambda: int(world.sql("SELECT count(*) FROM src WHERE processed")[0][0]) == 500, 60, "new rows")
        # the old folder is free: another process opens it while the daemon keeps running
        assert chdb_query(old, f"SELECT count() FROM `{world.ch_database}`.dst") == [[300]]
        assert daemon.poll() is None
        assert stop(daemon) == 0
    assert chdb_query(new, f"SELECT count(), min(id) FROM `{world.ch_database}`.dst") == [[200, 301]]


def test_the_engines_start_up_pages_are_handed_back_and_it_still_answers(tmp_path: Path) -> None:
    # In a process of its own: the library must be mapped by this process for there to be pages to hand back.
    code = ("import sys; from etl_service.clickhouse import clients\n"
            f"client = clients._open_chdb('chdb://{tmp_path / 'chdb'}')\n"  # opening hands the pages back once
            "released = clients.release_start_pages()\n"
            "print(released, client.query('SELECT sum(number) FROM numbers(1000)').result_rows[0][0])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    released, total = (int(v) for v in proc.stdout.split())
    assert released > 100 * 1024 * 1024  # the library's read-only and code mappings (about 550 MB in all)
    assert total == 499500
