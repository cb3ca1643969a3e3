"""Benchmark: etl-service against ClickHouse's own PostgreSQL reader and the naive tutorial path.

    .venv/bin/python tests/benchmark.py [--rows 1000000] [--big 5000000] [--wide-mb 800] [--runs 3]
    .venv/bin/python tests/benchmark.py --tuning [--rows 1000000]
    .venv/bin/python tests/benchmark.py --notify [--rate 500] [--seconds 60] [--idle 30]

On an embedded PostgreSQL (listening on 127.0.0.1 so ClickHouse's postgresql() can read it)
and chDB, for each path in its own process (so peak RSS and "own CPU" are its own; the whole-machine
CPU includes PostgreSQL's): recreate the source table
with generate_series (not timed), CHECKPOINT, run the path, check that the target holds exactly
the source rows, and record wall seconds, whole-machine CPU-seconds (from /proc/stat, so
PostgreSQL's work counts too) and peak RSS. Prints medians, ratios, the peak RSS of etl-service
at --rows, at --big and on a table of 1,500 rows holding --wide-mb MB of text (values of 512 kB,
eight of 8 MB), and the cost of a run with nothing to do. Figures, not assertions.

--notify: a daemon with ETL_WAKE=notify (and a yearly schedule, so only wake-ups move rows)
while a writer commits --rate rows per second (five per commit) for --seconds; prints the
distribution of commit-to-marked and commit-to-in-ClickHouse latency (p50, p99, max), the
runs and batches it took, the daemon's CPU while rows flow and while idle, and the exactness
check. A row's commit time is taken by the writer when COMMIT returns; its mark time by a
trigger on the flag (clock_timestamp() in the mark's transaction, which commits right after);
its arrival in ClickHouse by a DEFAULT now64(6) column of the target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extensions

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE_SQL = """
DROP TABLE IF EXISTS src;
CREATE TABLE src AS
SELECT g::bigint AS id,
       (g %% 1000)::integer AS qty,
       (g %% 100000 / 100.0)::numeric(12,2) AS amount,
       g * 1.5::double precision AS score,
       'item-' || (g %% 5000) AS label,
       (CASE WHEN g %% 7 = 0 THEN NULL ELSE 'note ' || g END)::varchar(40) AS note,
       g %% 2 = 0 AS flag,
       date '2020-01-01' + (g %% 2000)::integer AS day,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1.000001 second' AS at,
       md5(g::text)::uuid AS uid,
       jsonb_build_object('k', g %% 10, 'tag', 'x') AS meta,
       false AS processed
FROM generate_series(1, %s) AS g;
ALTER TABLE src ADD PRIMARY KEY (id);
CREATE INDEX src_unprocessed ON src (id) WHERE NOT processed;
"""
COLUMNS = "id, qty, amount, score, label, note, flag, day, at, uid, meta"
TARGET_DDL = (
    "CREATE TABLE {t} (id Int64, qty Nullable(Int32), amount Nullable(Decimal(12, 2)), score Nullable(Float64),"
    " label Nullable(String), note Nullable(String), flag Nullable(Bool), day Nullable(Date32),"
    " at Nullable(DateTime64(6, 'UTC')), uid Nullable(UUID), meta Nullable(String), _etl_batch UInt64)"
    " ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 10000")
MARK_SQL = "UPDATE src SET processed = true WHERE processed = false"
WIDE_SQL = """
DROP TABLE IF EXISTS src;
CREATE TABLE src (id bigint PRIMARY KEY, doc text, processed boolean NOT NULL DEFAULT false);
INSERT INTO src SELECT g, repeat(md5(g::text), CASE WHEN g %% 187 = 0 THEN 262144 ELSE %s END), false
FROM generate_series(1, 1500) AS g;
"""


# ---- the three paths, each run as `benchmark.py --phase NAME` in its own process ----

def phase_native(pg_uri: str, chdb: str, host_port: str) -> dict[str, float]:
    """ClickHouse pulls from PostgreSQL itself, then the same marking UPDATE."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb}")
    client.command("CREATE DATABASE IF NOT EXISTS bench")
    client.command(TARGET_DDL.format(t="bench.dst"))
    t0 = time.perf_counter()
    client.command(f"INSERT INTO bench.dst ({COLUMNS}) SELECT {COLUMNS.replace('meta', 'toString(meta)')}"
                   f" FROM postgresql('{host_port}', 'postgres', 'src', 'postgres', '') WHERE processed = false")
    t1 = time.perf_counter()
    _mark(pg_uri)
    t2 = time.perf_counter()
    client.close()
    return {"load": t1 - t0, "mark": t2 - t1, "seconds": t2 - t0}


def phase_naive(pg_uri: str, chdb: str) -> dict[str, float]:
    """The tutorial: fetchall -> DataFrame -> to_dict('records') -> insert; UPDATE ... WHERE processed = false."""
    import clickhouse_connect
    import pandas as pd

    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb}")
    client.command("CREATE DATABASE IF NOT EXISTS bench")
    client.command(TARGET_DDL.format(t="bench.dst"))
    t0 = time.perf_counter()
    conn = psycopg2.connect(pg_uri)
    with conn.cursor() as cur:
        cur.execute(f"SELECT {COLUMNS.replace('meta', 'meta::text')} FROM src WHERE processed = false")
        rows = cur.fetchall()
        names = [d[0] for d in cur.description]
    conn.close()
    frame = pd.DataFrame(rows, columns=names)
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")  # NaN -> NULL
    client.insert("bench.dst", [list(r.values()) for r in records], column_names=names)
    t1 = time.perf_counter()
    _mark(pg_uri)
    t2 = time.perf_counter()
    client.close()
    return {"load": t1 - t0, "mark": t2 - t1, "seconds": t2 - t0}


def _mark(pg_uri: str) -> None:
    conn = psycopg2.connect(pg_uri)
    with conn.cursor() as cur:
        cur.execute(MARK_SQL)
    conn.commit()
    conn.close()


# ---- the driver ----

def machine_cpu() -> float:
    """CPU-seconds the whole machine has spent working so far (all processes: PostgreSQL too)."""
    with open("/proc/stat", encoding="ascii") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_phase(args: list[str]) -> tuple[dict[str, float], float, float, str]:
    """Run a child process; returns (its JSON result, wall seconds, its own peak RSS in MB, stderr).

    The result gets "cpu": whole-machine CPU-seconds while the child ran, and "own_cpu": the
    child's own (the rest is mostly PostgreSQL's).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        cpu0 = machine_cpu()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - t0
        cpu = machine_cpu() - cpu0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in (0, 75):
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    result["cpu"] = cpu
    result["own_cpu"] = usage.ru_utime + usage.ru_stime
    return result, wall, usage.ru_maxrss / 1024, stderr


def etl_env(pg_uri: str, chdb: Path, folder: Path) -> Path:
    path = folder / "bench.env"
    path.write_text(f'PG_DSN="{pg_uri}"\nCLICK_DSN="chdb://{chdb}"\nCLICK_DATABASE="bench"\n'
                    'ETL_SOURCE_TABLE="public.src"\nETL_TARGET_TABLE="dst"\nETL_LOG_FORMAT="text"\n')
    return path


def verify(chdb: Path, pg_uri: str) -> str:
    """Exact check: the target holds each source row once (count, distinct, sums) and all are marked."""
    code = ("import json, clickhouse_connect\n"
            f"c = clickhouse_connect.get_client(dsn='chdb://{chdb}')\n"
            "print(json.dumps(c.query('SELECT count(), uniqExact(id), sum(id), toString(sum(amount))"
            " FROM bench.dst').result_rows[0]))\n")
    count, unique, ch_ids, ch_amount = json.loads(subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout)
    ch = (count, unique, Decimal(ch_ids), Decimal(ch_amount))
    with psycopg2.connect(pg_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE processed), sum(id), sum(amount) FROM src")
        total, marked, id_sum, amount_sum = cur.fetchone()  # type: ignore[misc]
    ok = ch == (total, total, id_sum, amount_sum) and marked == total
    return "exact" if ok else f"MISMATCH target={ch} source={(total, marked, id_sum, amount_sum)}"


SHAPES = {"index": "with the partial index of the backlog", "pk": "with only a primary key"}
SHAPE = ["index"]  # the table shape every measurement seeds (--shape)


def seed(pg_uri: str, rows: int) -> None:
    conn = psycopg2.connect(pg_uri)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(SOURCE_SQL, (rows,))
        if SHAPE[0] == "pk":
            cur.execute("DROP INDEX src_unprocessed")
        cur.execute("VACUUM ANALYZE src")
        cur.execute("CHECKPOINT")  # each path starts with the same clean WAL state
    conn.close()


def measure(name: str, pg_uri: str, rows: int, folder: Path, port: int) -> dict[str, float | str]:
    seed(pg_uri, rows)
    chdb = folder / f"chdb-{name}-{time.time_ns()}"
    if name == "etl-service":
        env = etl_env(pg_uri, chdb, folder)
        result, wall, rss, err = run_phase(["-m", "etl_service", "--once", "--env-file", str(env)])
        match = re.search(r"seconds=([\d.]+)", err)
        result = {"seconds": float(match[1]) if match else float("nan"), "cpu": result["cpu"],
                  "own_cpu": result["own_cpu"]}
    else:
        extra = [f"127.0.0.1:{port}"] if name == "native" else []
        result, wall, rss, _ = run_phase([__file__, "--phase", name, pg_uri, str(chdb), *extra])
    check = verify(chdb, pg_uri)
    return {**result, "wall": wall, "rss": rss, "check": check}


def measure_wide(pg_uri: str, megabytes: int, folder: Path) -> dict[str, float | str]:
    """etl-service on 1,500 rows of long text: memory must follow bytes, not rows."""
    per_row = max(1, (megabytes * 1024 * 1024 - 8 * 8 * 1024 * 1024) // 1492 // 32)  # md5 is 32 characters
    conn = psycopg2.connect(pg_uri)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(WIDE_SQL, (per_row,))
        cur.execute("VACUUM ANALYZE src")
        cur.execute("CHECKPOINT")
        cur.execute("SELECT count(*), sum(octet_length(doc)) FROM src")
        rows, size = cur.fetchone()  # type: ignore[misc]
    conn.close()
    chdb = folder / f"chdb-wide-{time.time_ns()}"
    env = etl_env(pg_uri, chdb, folder)
    result, wall, rss, _ = run_phase(["-m", "etl_service", "--once", "--env-file", str(env)])
    code = ("import clickhouse_connect\n"
            f"c = clickhouse_connect.get_client(dsn='chdb://{chdb}')\n"
            "print(*c.query('SELECT count(), sum(length(doc)) FROM bench.dst').result_rows[0])\n")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    check = "exact" if [int(v) for v in got.split()] == [rows, size] else f"MISMATCH {got.strip()} vs {rows} {size}"
    return {"wall": wall, "rss": rss, "cpu": result["cpu"], "mb": size / 1e6, "check": check}


TUNINGS = {
    "`... (id) WHERE NOT processed` btree index, fillfactor 100": "",
    "no index on the flag, fillfactor 100": "DROP INDEX src_unprocessed",
    "`USING brin (id) WHERE NOT processed`, fillfactor 90":
        "DROP INDEX src_unprocessed; CREATE INDEX src_unprocessed ON src USING brin (id) WHERE NOT processed;"
        " ALTER TABLE src SET (fillfactor = 90)",
    "the same, fillfactor 70": "ALTER TABLE src SET (fillfactor = 70)",
    "the same, fillfactor 50": "ALTER TABLE src SET (fillfactor = 50)",
}
MARK_BATCH_SQL = (  # the service's marking statement, on a batch of claimed keys and xmins
    "UPDATE src s SET processed = true FROM b CROSS JOIN LATERAL unnest(b.k, b.x) u(k, x)"
    " WHERE s.id = u.k::bigint AND s.xmin = u.x")


def tuning(pg_uri: str, rows: int) -> None:
    """docs/performance.md, Tuning: marking `rows` rows in batches of 100k under each index and fillfactor setup."""
    conn = psycopg2.connect(pg_uri)
    conn.autocommit = True
    setup = ""
    with conn.cursor() as cur:
        for label, change in TUNINGS.items():
            setup = change if change.startswith("DROP") or not setup else f"{setup}; {change}"
            cur.execute(SOURCE_SQL, (rows,))
            if setup:
                cur.execute(setup)
            cur.execute("VACUUM FULL src")
            cur.execute("VACUUM ANALYZE src")
            cur.execute("CHECKPOINT")
            cur.execute("SELECT pg_current_wal_lsn()")
            lsn = cur.fetchone()[0]  # type: ignore[index]
            seconds = 0.0
            for _ in range(-(-rows // 100_000)):
                cur.execute("DROP TABLE IF EXISTS b; CREATE TABLE b AS SELECT array_agg(id::text ORDER BY id) k,"
                            " array_agg(xmin ORDER BY id) x FROM (SELECT id, xmin FROM src WHERE NOT processed"
                            " ORDER BY id LIMIT 100000) s")
                t0 = time.perf_counter()
                cur.execute(MARK_BATCH_SQL)
                seconds += time.perf_counter() - t0
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,))
            wal = float(cur.fetchone()[0])  # type: ignore[index]
            time.sleep(1)  # the statistics of this backend reach the views
            cur.execute("SELECT round(100.0 * n_tup_hot_upd / nullif(n_tup_upd, 0))"
                        " FROM pg_stat_user_tables WHERE relname = 'src'")
            hot = cur.fetchone()[0]  # type: ignore[index]
            print(f"{label:58} marking {rows:,} rows {seconds:5.2f}s  WAL {wal / 1e6:4.0f} MB  HOT {hot}%", flush=True)
    conn.close()


def idle_cost(pg_uri: str, folder: Path) -> float:
    """Seconds of work (the run's own summary) when there is nothing to do."""
    env = etl_env(pg_uri, folder / "chdb-idle", folder)
    times = []
    for _ in range(3):
        _, _, _, err = run_phase(["-m", "etl_service", "--once", "--env-file", str(env)])
        match = re.search(r"status=idle .*seconds=([\d.]+)", err)
        times.append(float(match[1]) if match else float("nan"))
    return statistics.median(times)


NOTIFY_SQL = """
DROP TABLE IF EXISTS src, marked_at;
CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2) NOT NULL,
                  at timestamptz NOT NULL DEFAULT clock_timestamp(), processed boolean NOT NULL DEFAULT false);
CREATE INDEX src_unprocessed ON src (id) WHERE NOT processed;
CREATE TABLE marked_at (id bigint PRIMARY KEY, at timestamptz NOT NULL);
CREATE FUNCTION note_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  INSERT INTO marked_at VALUES (new.id, clock_timestamp()) ON CONFLICT DO NOTHING; RETURN NULL; END $$;
CREATE TRIGGER note_mark AFTER UPDATE OF processed ON src FOR EACH ROW
  WHEN (new.processed AND NOT old.processed) EXECUTE FUNCTION note_mark();
INSERT INTO src (id, amount) VALUES (0, 0);
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _chdb(chdb: Path, statement: str, query: bool = False) -> list[list[object]]:
    code = ("import json, clickhouse_connect\n"
            f"c = clickhouse_connect.get_client(dsn='chdb://{chdb}')\n"
            + (f"print(json.dumps(c.query({statement!r}).result_rows, default=str))\n" if query
               else f"c.command({statement!r})\nprint('[]')\n"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "no rows"
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.5):.3f}s  p99 {pick(0.99):.3f}s  max {ordered[-1]:.3f}s"


def notify_latency(pg_uri: str, folder: Path, rate: int, seconds: float, idle: float) -> None:
    """ETL_WAKE=notify under a steady writer: latency figures, CPU, exactness (see the module docstring)."""
    conn = psycopg2.connect(pg_uri)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(NOTIFY_SQL)
    chdb = folder / f"chdb-notify-{time.time_ns()}"
    env = etl_env(pg_uri, chdb, folder)
    with env.open("a") as f:
        f.write('ETL_SCHEDULE="0 0 1 1 *"\nETL_WAKE="notify"\nETL_LAG_COLUMN="at"\n')
    once = subprocess.run([sys.executable, "-m", "etl_service", "--once", "--env-file", str(env)], cwd=REPO,
                          capture_output=True, text=True)
    if once.returncode:
        raise SystemExit(once.stderr[-2000:])
    # when each row arrived in ClickHouse: a column the service leaves to its default
    _chdb(chdb, "ALTER TABLE bench.dst ADD COLUMN _arrived DateTime64(6, 'UTC') DEFAULT now64(6)")
    log = (folder / "notify.log").open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "etl_service", "--env-file", str(env)], cwd=REPO,
                              stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while b"wake-ups: listening" not in (folder / "notify.log").read_bytes():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit((folder / "notify.log").read_text()[-3000:])
            time.sleep(0.1)
        time.sleep(1.0)
        committed: dict[int, float] = {}
        per_commit = 5
        interval = per_commit / rate
        cpu0, t0 = _cpu_seconds(daemon.pid), time.monotonic()
        next_id, due = 1, time.monotonic()
        with conn.cursor() as cur:
            while time.monotonic() - t0 < seconds:
                ids = list(range(next_id, next_id + per_commit))
                cur.execute("INSERT INTO src (id, amount) SELECT g, g %% 1000 / 10.0 FROM unnest(%s::bigint[]) g",
                            (ids,))  # autocommit: committed when execute returns
                done = time.time()
                committed.update((i, done) for i in ids)
                next_id += per_commit
                due += interval
                time.sleep(max(0.0, due - time.monotonic()))
        written = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while True:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM src WHERE NOT processed")
                if cur.fetchone()[0] == 0:  # type: ignore[index]
                    break
            if time.monotonic() > deadline:
                raise SystemExit("rows were not all marked within 120 s of the writer's end")
            time.sleep(0.2)
        busy_cpu = _cpu_seconds(daemon.pid) - cpu0
        busy_wall = time.monotonic() - t0
        time.sleep(2.0)
        cpu1 = _cpu_seconds(daemon.pid)
        time.sleep(idle)
        idle_cpu = _cpu_seconds(daemon.pid) - cpu1
        # an application touching processed rows 20 times a second (a seen_at, a counter): nothing to move
        runs_before = _run_count(conn)
        cpu2, t2 = _cpu_seconds(daemon.pid), time.monotonic()
        with conn.cursor() as cur:
            while time.monotonic() - t2 < idle:
                cur.execute("UPDATE src SET amount = amount WHERE id = %s", (1 + int(time.monotonic() * 20) % 1000,))
                time.sleep(0.05)
        noop_cpu = _cpu_seconds(daemon.pid) - cpu2
        noop_runs = _run_count(conn) - runs_before
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
    with conn.cursor() as cur:
        cur.execute("SELECT id, extract(epoch FROM at) FROM marked_at WHERE id > 0")
        marked = dict(cur.fetchall())
        cur.execute("SELECT cause, count(*), coalesce(sum(batches), 0), coalesce(sum(wakeups), 0) FROM etl.runs"
                    " GROUP BY cause ORDER BY cause")
        runs = cur.fetchall()
    conn.close()
    arrived = {int(i): float(at) for i, at in _chdb(
        chdb, "SELECT id, toUnixTimestamp64Micro(_arrived) / 1e6 FROM bench.dst WHERE id > 0", query=True)}
    to_mark = [float(marked[i]) - at for i, at in committed.items() if i in marked]
    to_ch = [arrived[i] - at for i, at in committed.items() if i in arrived]
    check = verify(chdb, pg_uri)
    print(f"ETL_WAKE=notify, ETL_WAKE_DELAY=0.2 (default), no readiness query: a writer committed"
          f" {len(committed):,} rows in {written:.1f}s ({len(committed) / written:,.0f} rows/s, {per_commit} per"
          " commit)")
    print(f"commit -> in ClickHouse: {_quantiles(to_ch)}  ({len(to_ch):,} rows)")
    print(f"commit -> marked:        {_quantiles(to_mark)}  ({len(to_mark):,} rows)")
    print("runs by cause (runs, batches, notifications): " + ", ".join(f"{c} {n} / {b} / {w}" for c, n, b, w in runs))
    print(f"daemon CPU while rows flow: {busy_cpu:.1f}s in {busy_wall:.0f}s"
          f" ({100 * busy_cpu / busy_wall:.0f}% of a core); idle: {idle_cpu:.2f}s in {idle:.0f}s"
          f" ({100 * idle_cpu / idle:.2f}% of a core)")
    print(f"daemon CPU under 20 updates/s of processed rows: {noop_cpu:.2f}s in {idle:.0f}s"
          f" ({100 * noop_cpu / idle:.2f}% of a core), runs started meanwhile: {noop_runs}")
    print(f"check: {check}" + ("" if len(to_mark) == len(committed) else
                               f"; {len(committed) - len(to_mark)} rows without a mark time"))


def _run_count(conn: psycopg2.extensions.connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM etl.runs")
        return int(cur.fetchone()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big", type=int, default=5_000_000, help="rows for the memory check (0: skip)")
    parser.add_argument("--wide-mb", type=int, default=800, help="MB of text in the 1,500-row table (0: skip)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tuning", action="store_true",
                        help="only the Tuning table of docs/performance.md (marking, HOT)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="index",
                        help="the source table: with the partial index of the backlog (default), or a primary key only")
    parser.add_argument("--notify", action="store_true", help="only the ETL_WAKE=notify latency figures")
    parser.add_argument("--rate", type=int, default=500, help="--notify: rows committed per second")
    parser.add_argument("--seconds", type=float, default=60, help="--notify: how long the writer writes")
    parser.add_argument("--idle", type=float, default=30, help="--notify: seconds of idle CPU measured")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    SHAPE[0] = args.shape
    if args.phase:
        name, *rest = args.phase
        result = phase_native(*rest) if name == "native" else phase_naive(*rest)
        print(json.dumps(result))
        return
    from etl_service.postgres.embedded import postgres

    with tempfile.TemporaryDirectory(prefix="etl-bench-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # the embedded server runs as its own user when we are root
        with postgres(folder / "pgdata") as pg:
            port = free_port()
            uri = pg.listen_tcp(port)
            if args.tuning:
                tuning(uri, args.rows)
            elif args.notify:
                notify_latency(uri, folder, args.rate, args.seconds, args.idle)
            else:
                report(uri, args, folder, port)


def report(uri: str, args: argparse.Namespace, folder: Path, port: int) -> None:
    paths = ["etl-service", "native"] + ([] if args.skip_naive else ["naive"])
    results: dict[str, list[dict[str, float | str]]] = {p: [] for p in paths}
    for run in range(args.runs):
        for name in paths:
            r = measure(name, uri, args.rows, folder, port)
            results[name].append(r)
            print(f"run {run + 1} {name:12} wall {r['wall']:6.2f}s  work {r['seconds']:6.2f}s"
                  f"  CPU {r['cpu']:6.2f}s (own {r['own_cpu']:5.2f}s)  peak RSS {r['rss']:5.0f} MB  {r['check']}",
                  flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[name])

    print(f"\n{args.rows:,} rows x 11 columns, {SHAPES[args.shape]}, medians of {args.runs}"
          " (wall = whole process incl. start-up; CPU = the whole machine, PostgreSQL included)")
    print(f"{'path':14}{'wall s':>8}{'CPU s':>8}{'own CPU s':>11}{'rows/s':>10}{'peak RSS MB':>13}")
    for name in paths:
        wall = med(name, "wall")
        print(f"{name:14}{wall:8.2f}{med(name, 'cpu'):8.2f}{med(name, 'own_cpu'):11.2f}{args.rows / wall:10,.0f}"
              f"{med(name, 'rss'):13.0f}")
    native = med("native", "wall")
    print(f"native detail: pull {med('native', 'load'):.2f}s + marking UPDATE {med('native', 'mark'):.2f}s")
    print(f"a/b (etl-service / native pull + UPDATE): wall {med('etl-service', 'wall') / native:.2f} (target <= 0.8),"
          f" CPU {med('etl-service', 'cpu') / med('native', 'cpu'):.2f} (target <= 1)")
    if "naive" in results:
        print(f"c/a (naive / etl-service): {med('naive', 'wall') / med('etl-service', 'wall'):.1f}  (target >= 3)")
    if args.big:
        big = measure("etl-service", uri, args.big, folder, port)
        print(f"etl-service peak RSS: {med('etl-service', 'rss'):.0f} MB at {args.rows:,} rows,"
              f" {big['rss']:.0f} MB at {args.big:,} rows ({big['wall']:.1f}s, {big['check']})")
    if args.wide_mb:
        wide = measure_wide(uri, args.wide_mb, folder)
        print(f"etl-service peak RSS: {wide['rss']:.0f} MB on 1,500 rows holding {wide['mb']:.0f} MB of text"
              f" ({wide['wall']:.1f}s, {wide['check']})")
    print(f"run with nothing to do: {idle_cost(uri, folder) * 1000:.0f} ms of work after start-up")


if __name__ == "__main__":
    main()
