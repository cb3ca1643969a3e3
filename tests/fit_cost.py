"""What the exact-value checks (`fit.first_misfit`) cost per million rows, before every insert.

    .venv/bin/python tests/fit_cost.py [--rows 1000000]

One Arrow table of six columns as the source types arrive (bigint, numeric(12,2), timestamptz,
date, double precision, text), checked against the types the service creates for them and
against narrower ones an operator might make (Int32, Decimal(10, 2), DateTime, Date, Float32,
FixedString). Every value fits both, so every check runs to the end. Best of 5; figures, not
assertions.
"""

from __future__ import annotations

import argparse
import time
from decimal import Decimal

import pyarrow as pa

from etl_service.clickhouse.fit import first_misfit

CREATED = {"id": "Int64", "amount": "Decimal(12, 2)", "at": "DateTime64(6, 'UTC')", "d": "Date32", "f": "Float64",
           "s": "String"}
NARROWER = {"id": "Int32", "amount": "Decimal(10, 2)", "at": "DateTime('UTC')", "d": "Date", "f": "Float32",
            "s": "FixedString(12)"}


def table(rows: int) -> pa.Table:
    return pa.table({
        "id": pa.array(range(rows), pa.int64()),
        "amount": pa.array([Decimal(i) / 4 for i in range(rows)], pa.decimal128(12, 2)),
        "at": pa.array([1_700_000_000_000_000 + i * 1_000_000 for i in range(rows)], pa.timestamp("us", tz="UTC")),
        "d": pa.array([19_000 + i % 1000 for i in range(rows)], pa.int32()).cast(pa.date32()),
        "f": pa.array([i * 0.5 for i in range(rows)], pa.float64()),
        "s": pa.array([f"row {i}" for i in range(rows)], pa.string()),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    data = table(rows)
    for name, types in (("types the service creates", CREATED), ("narrower operator-made types", NARROWER)):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            found = first_misfit(data, types)
            times.append(time.perf_counter() - t0)
        assert found is None, found
        print(f"{name}: {min(times) * 1000:.1f} ms for {rows:,} rows x {len(types)} columns"
              f" ({min(times) * 1000 * 1_000_000 / rows:.1f} ms per million rows)")


if __name__ == "__main__":
    main()
