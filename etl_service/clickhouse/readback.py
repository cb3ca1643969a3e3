"""What the target holds, read back: a batch's rows for load verification, rows and versions to reconcile.
"""

from __future__ import annotations

import re
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from etl_service.clickhouse import fit
from etl_service.clickhouse.clients import ch_errors
from etl_service.clickhouse.target_table import BATCH_COLUMN, table_name
from etl_service.errors import SinkError
from etl_service.postgres.versioning import VERSION_COLUMN


def batch_rows(client: Client, database: str, table: str, batch_id: int) -> int:
    """How many rows of `batch_id` the target holds (the batch column has a minmax skip index)."""
    with ch_errors(f"count batch {batch_id} in {database}.{table}"):
        rows = client.query(f"SELECT count() FROM {table_name(database, table)} WHERE {BATCH_COLUMN} = {{b:UInt64}}",
                            parameters={"b": batch_id}).result_rows
    return int(rows[0][0])


def max_batch(client: Client, database: str, table: str) -> int:
    """The highest batch id the target holds (0 if none): reads the whole batch column."""
    with ch_errors(f"read the highest batch id in {database}.{table}"):
        rows = client.query(f"SELECT max({BATCH_COLUMN}) FROM {table_name(database, table)}").result_rows
    return int(rows[0][0] or 0)


def doubled_keys(client: Client, database: str, table: str, batch_id: int, keys: tuple[str, ...],
                 limit: int = 10) -> list[str]:
    """Keys of `batch_id` that the target holds more than once (a few, as `col=value`)."""
    cols = ", ".join(quote_identifier(k) for k in keys)
    with ch_errors(f"look for doubled rows of batch {batch_id} in {database}.{table}"):
        rows = client.query(f"SELECT {cols}, count() AS copies FROM {table_name(database, table)}"
                            f" WHERE {BATCH_COLUMN} = {{b:UInt64}} GROUP BY {cols} HAVING copies > 1 ORDER BY {cols}"
                            f" LIMIT {limit}",
                            parameters={"b": batch_id}).result_rows
    return [", ".join(f"{k}={v}" for k, v in zip(keys, row[:-1], strict=True)) + f" ({row[-1]} copies)"
            for row in rows]


def sync_replica(client: Client, database: str, table: str) -> None:
    """Ask this replica to fetch the parts the others have (best effort: the privilege may be missing)."""
    try:
        with ch_errors(f"sync replica {database}.{table}"):
            client.command(f"SYSTEM SYNC REPLICA {table_name(database, table)} LIGHTWEIGHT")
    except SinkError:
        return


def rows_above(client: Client, database: str, table: str, batch_id: int) -> tuple[int, int]:
    """(rows, highest batch id) of the target's rows of batches above `batch_id`.

    The batch column's minmax skip index answers it without reading rows when there are none.
    """
    with ch_errors(f"look for batches above {batch_id} in {database}.{table}"):
        row = client.query(f"SELECT count(), max({BATCH_COLUMN}) FROM {table_name(database, table)}"
                           f" WHERE {BATCH_COLUMN} > {{b:UInt64}}", parameters={"b": batch_id}).result_rows[0]
    return int(row[0]), int(row[1] or 0)


# Key types whose values bind as query parameters (the others are compared without a key range).
_RANGE_TYPES = re.compile(r"^(U?Int\d+|String|UUID|Date|Date32)$")


def held_rows(client: Client, database: str, table: str, keys: tuple[str, ...], columns: list[str],
              bounds: tuple[Any, Any], lead_type: str, above: int, upto: int,
              newest: bool = False) -> list[tuple[Any, ...]]:
    """The target's rows of batches (above, upto] in the key range `bounds` of the first key column
    `keys[0]`: their `columns`; with `newest`, only each key's row of the highest source version."""
    inner = fit.unwrap(lead_type)[0]
    cols = ", ".join(quote_identifier(c) for c in columns)
    query = (f"SELECT {cols} FROM {table_name(database, table)}"
             f" WHERE {BATCH_COLUMN} > {{above:UInt64}} AND {BATCH_COLUMN} <= {{upto:UInt64}}")
    params: dict[str, Any] = {"above": above, "upto": upto}
    if _RANGE_TYPES.match(inner):
        lead = quote_identifier(keys[0])
        query += f" AND {lead} >= {{lo:{inner}}} AND {lead} <= {{hi:{inner}}}"
        params.update(lo=bounds[0], hi=bounds[1])
    if newest:
        query += (f" ORDER BY {VERSION_COLUMN} DESC LIMIT 1 BY"
                  f" {', '.join(quote_identifier(k) for k in keys)}")
    with ch_errors(f"read the rows {database}.{table} holds of batches {above + 1}..{upto}"):
        rows = client.query(query, parameters=params).result_rows
    return [tuple(r) for r in rows]


def span_keys(client: Client, database: str, table: str, key: str, above: int, upto: int) -> list[tuple[Any, int]]:
    """(key, batch id) of the target's rows of batches (above, upto]."""
    with ch_errors(f"read the keys {database}.{table} holds of batches {above + 1}..{upto}"):
        rows = client.query(f"SELECT {quote_identifier(key)}, {BATCH_COLUMN} FROM {table_name(database, table)}"
                            f" WHERE {BATCH_COLUMN} > {{above:UInt64}} AND {BATCH_COLUMN} <= {{upto:UInt64}}",
                            parameters={"above": above, "upto": upto}).result_rows
    return [(r[0], int(r[1])) for r in rows]


def max_version(client: Client, database: str, table: str) -> int:
    """The highest source version the target holds (0 when empty)."""
    with ch_errors(f"read the highest source version in {database}.{table}"):
        rows = client.query(f"SELECT max({VERSION_COLUMN}) FROM {table_name(database, table)}").result_rows
    return int(rows[0][0] or 0)


def time_ranges(client: Client) -> fit.Ranges:
    """The dates and times the server's Date32 and DateTime64 hold (wider since ClickHouse 26.x)."""
    try:
        with ch_errors("read the server's date ranges"):
            row = client.query(fit.RANGES_QUERY).result_rows[0]
    except SinkError:  # a server that cannot answer: assume the narrower ranges (values are set aside, never changed)
        return fit.NARROW
    return fit.ranges_from(row)
