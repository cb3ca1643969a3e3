"""Running the program as a subprocess the way a user does, and checking the end state exactly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from .conftest import World

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """This process's environment without any setting the program would read."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG_", "CLICK_", "ETL_"))}


def write_env(world: World, chdb: Path, name: str = "test.env", **extra: str) -> Path:
    """An env file for `world` with chDB at `chdb` (a subprocess opens its own engine folder)."""
    values = {**world.env(), "CLICK_DSN": f"chdb://{chdb}", "ETL_LOG_FORMAT": "text", **extra}
    for key in ("CLICK_HOST", "CLICK_PORT", "CLICK_USER", "CLICK_PASSWORD"):
        values.pop(key, None)
    path = world.tmp / name
    path.write_text("".join(f'{k}="{_quoted(v)}"\n' for k, v in values.items()))
    return path


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def cli(*args: str, timeout: float = 120, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the program to completion; `path` goes on PYTHONPATH (for a test's transform module)."""
    return subprocess.run([sys.executable, "-m", "etl_service", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env(path))


def start(*args: str, log: Path, path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the program in the background, its output going to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "etl_service", *args], stdout=out, stderr=out,
                                cwd=REPO, env=_env(path))


@contextlib.contextmanager
def running(*args: str, log: Path, path: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The program in the background for the block; killed if the block leaves it running."""
    proc = start(*args, log=log, path=path)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, as systemctl stop sends it; returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def _env(path: Path | None) -> dict[str, str]:
    env = clean_env()
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return env


def slow_transform(world: World, seconds: float) -> str:
    """A transform module in the test's folder that takes `seconds` per chunk (and leaves the file
    slow_tx.started when it first begins); returns its spec."""
    started = world.tmp / "slow_tx.started"
    (world.tmp / "slow_tx.py").write_text(f"import time\ndef pause(df):\n    open({str(started)!r}, 'w').close()\n"
                                          f"    time.sleep({seconds})\n    return df\n")
    return "slow_tx:pause"


def chdb_query(chdb: Path, query: str) -> list[list[object]]:
    """Query a chDB folder from a fresh process (one process at a time holds an engine folder)."""
    code = ("import json, clickhouse_connect\n"
            f"c = clickhouse_connect.get_client(dsn={f'chdb://{chdb}'!r})\n"
            f"print(json.dumps(c.query({query!r}).result_rows, default=str))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


class Writer:
    """A concurrent writer: inserts rows the whole time, at both ends of the key range."""

    def __init__(self, world: World, batches: int = 200, pause: float = 0.01) -> None:
        self.world = world
        self.batches = batches
        self.pause = pause
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = self.world.pg()
        try:
            with conn.cursor() as cur:
                for n in range(1, self.batches + 1):
                    if self._stop.is_set():
                        break
                    # high keys and negative keys: rows committed late below the claimed range too
                    cur.execute("INSERT INTO src (id, amount, name, ts) SELECT g, 1, 'w', now()"
                                " FROM unnest(ARRAY[%s, %s, %s]::bigint[]) g", (1_000_000 + 2 * n,
                                                                                1_000_001 + 2 * n, -n))
                    self.written += 3
                    time.sleep(self.pause)
        finally:
            conn.close()

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


def assert_exact(world: World, chdb: Path, context: str = "") -> int:
    """Every source row is in ClickHouse exactly once and marked; no batch left open. Returns rows."""
    source_ids = sorted(int(r[0]) for r in world.sql("SELECT id FROM src"))
    target_ids = sorted(int(r[0]) for r in chdb_query(chdb, f"SELECT id FROM `{world.ch_database}`.dst"))
    missing = sorted(set(source_ids) - set(target_ids))
    doubled = len(target_ids) - len(set(target_ids))
    assert (missing[:10], doubled) == ([], 0), f"{context}: {len(missing)} lost, {doubled} doubled"
    assert target_ids == source_ids, f"{context}: target has keys the source does not"
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)], context
    assert world.sql("SELECT count(*) FROM etl.batches WHERE state <> 'done'") == [(0,)], context
    return len(source_ids)


def operator_target(world: World, columns: str) -> None:
    """Make the job's target as an operator would, with `columns` (plus the batch column), deduplicating."""
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} ({columns}, _etl_batch UInt64) ENGINE = MergeTree ORDER BY id"
               " SETTINGS non_replicated_deduplication_window = 1000")


@contextlib.contextmanager
def logged(level: str) -> Iterator[list[str]]:
    """The service's log lines at `level` and above while the block runs."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level=level)
    try:
        yield lines
    finally:
        logger.remove(sink)
