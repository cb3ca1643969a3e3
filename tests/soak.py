"""Soak: the daemon for many runs under a writer; threads, descriptors and RSS sampled from /proc.

    .venv/bin/python tests/soak.py [--runs 3600] [--every 300] [--compressed]

The daemon runs its job every second (the shortest cron step) against an embedded PostgreSQL
and a chDB folder while a writer inserts rows: --runs 3600 is an hour of runs. --compressed
runs the same job back to back in this process instead (no scheduler wait between runs), an
hour of runs in minutes. Every `--every` runs it prints the process's thread count, open
descriptors (and what they point at) and RSS. At the end it checks that every row arrived
exactly once. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sample(pid: int) -> tuple[int, int, float, collections.Counter[str]]:
    """(threads, descriptors, RSS MB, descriptor kinds) of a live process."""
    proc = Path(f"/proc/{pid}")
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(proc / "fd"):
        try:
            target = os.readlink(proc / "fd" / fd)
        except OSError:
            continue
        kinds[_kind(target)] += 1
    rss_kb = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return len(os.listdir(proc / "task")), sum(kinds.values()), rss_kb / 1024, kinds


def _kind(target: str) -> str:
    if target.startswith(("socket:", "pipe:", "anon_inode:")):
        return target.split(":")[0] + (":" + target.split("[")[0].split(":")[1] if target.startswith("anon") else "")
    parts = Path(target).parts
    if "chdb" in parts:
        return "chdb/" + "/".join(parts[parts.index("chdb") + 1:][:2])
    return str(Path(*parts[:3]))


def writer(dsn: str, stop: threading.Event, counter: list[int], per_second: int) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        while not stop.is_set():
            cur.execute("INSERT INTO src (amount, name) SELECT g, 'w' FROM generate_series(1, %s) g",
                        (max(1, per_second // 10),))
            counter[0] += max(1, per_second // 10)
            stop.wait(0.1)
    conn.close()


def count_runs(dsn: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('etl.runs') IS NOT NULL")
        if not cur.fetchone()[0]:  # type: ignore[index]
            return 0
        cur.execute("SELECT count(*) FROM etl.runs")
        return int(cur.fetchone()[0])  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3600, help="runs to watch (default 3600: an hour of runs)")
    parser.add_argument("--every", type=int, default=300, help="sample every N runs")
    parser.add_argument("--rate", type=int, default=60, help="rows the writer inserts per second (default 60)")
    parser.add_argument("--batch", type=int, default=500, help="ETL_BATCH_SIZE (default 500)")
    parser.add_argument("--compressed", action="store_true", help="runs back to back in this process")
    args = parser.parse_args()
    from etl_service.postgres.embedded import postgres

    with tempfile.TemporaryDirectory(prefix="etl-soak-") as tmp, postgres(Path(tmp) / "pg") as pg:
        with psycopg2.connect(pg.uri) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE src (id bigserial PRIMARY KEY, amount numeric(12,2), name text,"
                        " created_at timestamptz DEFAULT now(), processed boolean NOT NULL DEFAULT false)")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG_", "CLICK_", "ETL_"))}
        env.update(PG_DSN=pg.uri, CLICK_DSN=f"chdb://{tmp}/chdb", ETL_SOURCE_TABLE="public.src",
                   ETL_TARGET_TABLE="dst", ETL_SCHEDULE="* * * * * *", ETL_LOG_LEVEL="WARNING",
                   ETL_BATCH_SIZE=str(args.batch), ETL_CHUNK_SIZE=str(max(1, args.batch // 2)))
        stop, written = threading.Event(), [0]
        feeder = threading.Thread(target=writer, args=(pg.uri, stop, written, args.rate), daemon=True)
        if args.compressed:
            feeder.start()
            _compressed(env, args, started=time.monotonic())
            stop.set()
            feeder.join()
            _exactness(env, tmp, pg.uri, written[0])
            return
        log = open(Path(tmp) / "daemon.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "etl_service"], env=env, cwd=REPO, stdout=log, stderr=log)
        feeder.start()
        started = time.monotonic()
        _header()
        try:
            next_sample = 10
            while next_sample <= args.runs:
                done = count_runs(pg.uri)
                if done >= next_sample:
                    _line(done, started, daemon.pid)
                    next_sample = args.every if next_sample == 10 else next_sample + args.every
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}; see {log.name}")
                time.sleep(1)
        finally:
            stop.set()
            feeder.join()
            time.sleep(3)  # a last run picks up the writer's final rows
            daemon.terminate()
            daemon.wait(timeout=60)
            log.close()
        subprocess.run([sys.executable, "-m", "etl_service", "--once"], env=env, cwd=REPO, check=True,
                       capture_output=True)
        _exactness(env, tmp, pg.uri, written[0])


def _header() -> None:
    print(f"{'runs':>6} {'minutes':>8} {'threads':>8} {'fds':>6} {'RSS MB':>8}  descriptors by kind", flush=True)


def _line(done: int, started: float, pid: int) -> None:
    threads, fds, rss, kinds = sample(pid)
    top = ", ".join(f"{k} {n}" for k, n in kinds.most_common(6))
    print(f"{done:>6} {(time.monotonic() - started) / 60:>8.1f} {threads:>8} {fds:>6} {rss:>8.0f}  {top}", flush=True)


def _compressed(env: dict[str, str], args: argparse.Namespace, started: float) -> None:
    """The job's runs back to back in this process: the same pipeline, the same shared chDB client."""
    from etl_service import logs
    from etl_service.run.pipeline import run_job
    from etl_service.settings.reading import load

    logs.setup("WARNING")
    settings = load(environ=env)
    _header()
    for done in range(1, args.runs + 1):
        run_job(settings, settings.jobs[0])
        if done == 10 or done % args.every == 0:
            _line(done, started, os.getpid())
    run_job(settings, settings.jobs[0])  # what the writer added last


def _exactness(env: dict[str, str], tmp: str, pg_uri: str, written: int) -> None:
    from etl_service.clickhouse import clients

    clients.close_all()  # this process may hold the folder (--compressed)
    out = subprocess.run([sys.executable, "-c", "import clickhouse_connect; c = clickhouse_connect.get_client("
                          f"dsn='chdb://{tmp}/chdb'); print(*c.query('SELECT count(), uniqExact(id)"
                          " FROM default.dst').result_rows[0])"], capture_output=True, text=True, check=True)
    rows, unique = out.stdout.split()
    with psycopg2.connect(pg_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE processed) FROM src")
        total, marked = cur.fetchone()  # type: ignore[misc]
    print(f"exactness: source {total} rows ({marked} marked), ClickHouse {rows} rows, {unique} distinct ids;"
          f" writer added {written}")


if __name__ == "__main__":
    main()
