"""What load verification and the target's catalog check cost, on a target of 10M rows (chDB).

    .venv/bin/python tests/verify_cost.py [--rows 10000000] [--batch 100000]

Builds a trigger table the way the service does (with and without the minmax skip index on
the batch column), fills it with `--rows` rows in batches of `--batch`, then times the count of
one batch (what verification runs before every mark), the look for batch ids above the ledger's
highest (what the first load of every run asks: reconcile) and the target description (what every
run that loads rows reads). Medians of 20; figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import clickhouse_connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etl_service.clickhouse import readback, target_table


def timed(action: object, repeat: int = 20) -> float:
    """Median milliseconds of `action()`."""
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        action()  # type: ignore[operator]
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="etl-verify-") as tmp:
        client = clickhouse_connect.get_client(dsn=f"chdb://{tmp}/chdb")
        client.command("CREATE DATABASE d")
        for name, index in (("indexed", ", INDEX _etl_batch_minmax _etl_batch TYPE minmax GRANULARITY 1"),
                            ("plain", "")):
            client.command(f"CREATE TABLE d.{name} (id Int64, amount Decimal(12, 2), note Nullable(String),"
                           f" _etl_batch UInt64{index}) ENGINE = MergeTree ORDER BY id"
                           " SETTINGS non_replicated_deduplication_window = 10000")
            client.command(f"INSERT INTO d.{name} SELECT number, number / 100, 'note ' || toString(number % 1000),"
                           f" 1 + intDiv(number, {args.batch}) FROM numbers({args.rows})")
            client.command(f"OPTIMIZE TABLE d.{name} FINAL")
            middle = 1 + args.rows // args.batch // 2
            count = timed(lambda n=name, b=middle: readback.batch_rows(client, "d", n, b))
            assert readback.batch_rows(client, "d", name, middle) == args.batch
            print(f"{name:8} count of one batch of {args.batch:,} in {args.rows:,} rows: {count:6.1f} ms")
            top = args.rows // args.batch
            above = timed(lambda n=name, t=top: readback.rows_above(client, "d", n, t))
            assert readback.rows_above(client, "d", name, top) == (0, 0)
            print(f"{name:8} look for batch ids above the ledger's highest (none, the normal case): {above:6.1f} ms")
        describe = timed(lambda: target_table.describe_target(client, "d", "indexed"))
        print(f"describe the target (engine, settings, columns, views): {describe:6.1f} ms")
        client.close()


if __name__ == "__main__":
    main()
