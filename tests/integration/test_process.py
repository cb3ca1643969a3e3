"""The program as a user runs it: a subprocess with an env file, real signals, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import World

REPO = Path(__file__).resolve().parents[2]


def write_env(world: World, chdb: Path, **extra: str) -> Path:
    values = {**world.env(), "CLICK_DSN": f"chdb://{chdb}", "ETL_LOG_FORMAT": "text", **extra}
    for key in ("CLICK_HOST", "CLICK_PORT", "CLICK_USER", "CLICK_PASSWORD"):
        values.pop(key, None)
    path = world.tmp / "test.env"
    path.write_text("".join(f"{k}='{v}'\n" for k, v in values.items()))
    return path


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG_", "CLICK_", "ETL_"))}
    return subprocess.run([sys.executable, "-m", "etl_service", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def chdb_query(chdb: Path, query: str) -> list[list[object]]:
    """Query a chDB folder from a fresh process (one process holds one engine folder)."""
    code = ("import json, sys, clickhouse_connect\n"
            f"c = clickhouse_connect.get_client(dsn={f'chdb://{chdb}'!r})\n"
            f"print(json.dumps(c.query({query!r}).result_rows, default=str))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def marked(world: World) -> int:
    return int(world.sql("SELECT count(*) FROM src WHERE processed")[0][0])


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


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
    bad = cli("check", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_SOURCE_TABLE="public.nope")))
    assert bad.returncode == 1
    assert 'FAIL ETL_SOURCE_TABLE: table "public"."nope" does not exist in PostgreSQL' in bad.stdout


@pytest.mark.slow
def test_daemon_runs_on_a_seconds_schedule_and_exits_0_on_sigterm(world: World) -> None:
    world.make_source(300)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="*/1 * * * * *", ETL_MISFIRE_GRACE="5")
    log_path = world.tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG_", "CLICK_", "ETL_"))}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "etl_service", "--env-file", str(env_file)],
                                stderr=log, stdout=log, cwd=REPO, env=env)
    try:
        wait_for(lambda: marked(world) == 300, 60, "the first 300 rows to be marked")
        world.add_rows(301, 450)
        wait_for(lambda: marked(world) == 450, 30, "150 more rows on a later scheduled run")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stop_seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "etl-service ready: 1 job(s)" in text
    assert "rows_marked=150" in text
    assert "etl-service stopped" in text
    assert stop_seconds < 15
    assert chdb_query(chdb, f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == [[450, 450]]
