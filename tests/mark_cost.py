"""What the mark costs: flagging a loaded batch processed, with the checks that it sticks.

    .venv/bin/python tests/mark_cost.py [--rows 1000000] [--batch 100000] [--batches 8]

On an embedded PostgreSQL: a source of `--rows` rows with the usual partial index of the backlog,
claimed in batches of `--batch` through the ledger; each batch is set to 'loaded' (nothing is sent
to ClickHouse) and marked with the ledger's own mark, timed alone. Prints the median and the best
mark of `--batches` batches, in ms and in µs per row. Run it on a quiet machine, once per version
to compare (PYTHONPATH at another checkout). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etl_service.ledger import Ledger
from etl_service.postgres import catalog, connection
from etl_service.postgres.embedded import postgres
from etl_service.settings.reading import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="etl-mark-") as tmp, postgres(Path(tmp) / "pg") as pg:
        setup = psycopg2.connect(pg.uri)
        setup.autocommit = True
        with setup.cursor() as cur:
            cur.execute("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12, 2), name text, ts timestamptz,"
                        " processed boolean NOT NULL DEFAULT false) WITH (fillfactor = 50);"
                        f" INSERT INTO src SELECT g, g * 1.25, 'row ' || g, now(), false"
                        f" FROM generate_series(1, {args.rows}) g;"
                        " CREATE INDEX src_todo ON src (id) WHERE NOT processed")
            cur.execute("VACUUM ANALYZE src")
        setup.close()
        settings = load(environ={"PG_DSN": pg.uri, "CLICK_DSN": f"chdb://{tmp}/chdb", "ETL_SOURCE_TABLE": "public.src",
                                 "ETL_TARGET_TABLE": "dst", "ETL_BATCH_SIZE": str(args.batch)})
        job = settings.jobs[0]
        conn = connection.connect(settings)
        ledger = Ledger(conn, settings.ledger_schema, job)
        ledger.ensure_schema()
        shape = catalog.describe(conn, job)
        times = []
        for _ in range(args.batches):
            batch = ledger.batches.claim(shape)
            assert batch is not None
            with conn.cursor() as cur:
                cur.execute(f"UPDATE {settings.ledger_schema}.batches SET state = 'loaded' WHERE batch_id = %s",
                            (batch.batch_id,))
            conn.commit()
            t0 = time.perf_counter()
            done = ledger.mark.run(batch, shape, lambda: None)
            times.append(time.perf_counter() - t0)
            assert done.marked == batch.row_count, (done.marked, batch.row_count)
        conn.close()
    median, best = statistics.median(times) * 1000, min(times) * 1000
    print(f"mark of a batch of {args.batch:,} rows ({args.batches} batches, source {args.rows:,} rows):"
          f" median {median:.0f} ms ({median * 1000 / args.batch:.2f} µs/row), best {best:.0f} ms")


if __name__ == "__main__":
    main()
