"""ClickHouse I/O through clickhouse-connect: target table, deduplicated inserts, readiness, SQL.

Works the same against a server (`http(s)://`) and the in-process chDB engine (`chdb:///path`).
Every table name is `database`.`table` with backquoted identifiers. Driver errors are
translated here: connection problems become SinkUnavailable, refusals SinkError.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import clickhouse_connect
import pyarrow as pa
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError
from loguru import logger

from etl_service.config import Settings
from etl_service.errors import BadSinkValues, SinkError, SinkUnavailable
from etl_service.source import SourceShape

BATCH_COLUMN = "_etl_batch"
# How many recent insert tokens a MergeTree remembers; far more than chunks in flight.
DEDUP_WINDOW = 10000


# ClickHouse error codes that blame the inserted values, not the statement: the chunk is split
# to find the rows, which are quarantined (CANNOT_PARSE_*, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND,
# CANNOT_CONVERT_TYPE, INCORRECT_DATA, TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE,
# CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN, CANNOT_PARSE_UUID, DECIMAL_OVERFLOW, ...).
DATA_ERROR_CODES = {6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 349, 376, 407, 691}
_CODE = re.compile(r"Code: (\d+)")


@contextmanager
def ch_errors(action: str) -> Iterator[None]:
    """Translate clickhouse-connect errors raised while doing `action`."""
    try:
        yield
    except OperationalError as exc:
        raise SinkUnavailable(f"{action}: {_short(exc)}") from exc
    except (DatabaseError, ClickHouseError) as exc:
        text = str(exc)
        if "Unable to open the chdb engine" in text:
            raise SinkUnavailable(f"{action}: the chDB folder is in use by another process (one process"
                                  " at a time can open it)") from exc
        match = _CODE.search(text)
        if match and int(match[1]) in DATA_ERROR_CODES:
            raise BadSinkValues(f"{action}: {_short(exc)}") from exc
        raise SinkError(f"{action}: {_short(exc)}") from exc


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:500] if lines else type(exc).__name__


def connect(settings: Settings) -> Client:
    """A client for the configured ClickHouse; the target database is created if absent."""
    target = settings.clickhouse
    kwargs = dict(target.client_kwargs)
    kwargs.pop("database", None)  # may not exist yet: every name below is qualified instead
    if target.kind == "http":
        kwargs.update(connect_timeout=10, send_receive_timeout=int(settings.ch_query_timeout) + 30)
    with ch_errors(f"connect to ClickHouse ({target.display})"):
        client = clickhouse_connect.get_client(**kwargs)
    try:
        with ch_errors(f"create database {target.database}"):
            client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(target.database)}")
    except BaseException:
        client.close()  # for chDB an open client keeps the folder locked against other processes
        raise
    return client


def table_name(database: str, table: str) -> str:
    """`database`.`table`, each part backquoted."""
    return f"{quote_identifier(database)}.{quote_identifier(table)}"


def target_columns(client: Client, database: str, table: str) -> dict[str, str] | None:
    """Column name -> type of an existing table, or None if it does not exist."""
    with ch_errors(f"describe {database}.{table}"):
        result = client.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}"
            " ORDER BY position", parameters={"db": database, "t": table})
    return dict(result.result_rows) or None  # type: ignore[arg-type]


def create_target(client: Client, database: str, table: str, shape: SourceShape, key: str) -> str:
    """Create the trigger table from the source types; returns the DDL that was run."""
    key_target = shape.target_of(key)
    cols = [f"{quote_identifier(t)} {c.ch_column_type(is_key=(t == key_target))}"
            for c, t in zip(shape.columns, shape.targets, strict=True)]
    cols.append(f"{quote_identifier(BATCH_COLUMN)} UInt64")
    order = quote_identifier(key_target) if key_target else "tuple()"
    ddl = (f"CREATE TABLE IF NOT EXISTS {table_name(database, table)} ({', '.join(cols)})"
           f" ENGINE = MergeTree ORDER BY {order}"
           f" SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}")
    with ch_errors(f"create target table {database}.{table}"):
        client.command(ddl)
    return ddl


def fit_columns(existing: dict[str, str], data_columns: list[str], table: str) -> list[str]:
    """Check data columns against an existing table; returns warnings, raises if data has nowhere to go."""
    missing = [c for c in data_columns if c not in existing]
    if missing:
        raise SinkError(f"target table {table} has no column {', '.join(map(repr, missing))}: add it"
                        " (ALTER TABLE … ADD COLUMN), or select/rename columns with ETL_COLUMNS")
    extra = [c for c in existing if c not in data_columns and c != BATCH_COLUMN]
    warnings = []
    if extra:
        warnings.append(f"target table {table} has columns the job does not fill"
                        f" ({', '.join(extra)}): they get their defaults")
    if BATCH_COLUMN not in existing:
        warnings.append(f"target table {table} has no {BATCH_COLUMN} column: batch ids are not recorded")
    return warnings


def insert_chunk(client: Client, database: str, table: str, data: pa.Table, batch_id: int, token: str,
                 with_batch_column: bool) -> int:
    """Insert one chunk; a repeat with the same token is dropped by ClickHouse. Returns rows sent."""
    if with_batch_column:
        data = data.append_column(BATCH_COLUMN, pa.repeat(pa.scalar(batch_id, pa.uint64()), data.num_rows))
    settings = {"insert_deduplication_token": token, "insert_deduplicate": 1}
    with ch_errors(f"insert batch {batch_id} into {database}.{table}"):
        client.insert_arrow(table_name(database, table), data, settings=settings)
    return data.num_rows


def is_ready(client: Client, query: str, batch_id: int, timeout: float) -> bool:
    """Run the readiness query once; truthy first value of the first row means ready."""
    params = {"batch_id": batch_id} if "{batch_id" in query else None
    with ch_errors("readiness query"):
        result = client.query(query, parameters=params, settings={"max_execution_time": int(timeout)})
    rows = result.result_rows
    return bool(rows and rows[0] and rows[0][0])


def await_ready(client: Client, query: str, batch_id: int, timeout: float, interval: float,
                stop: Callable[[float], bool], clock: Callable[[], float] = time.monotonic) -> bool:
    """Poll the readiness query until it says ready, the deadline passes, or a stop is asked.

    `stop(seconds)` waits up to `seconds` and returns True if the service is stopping.
    """
    deadline = clock() + timeout
    polls = 0
    while True:
        polls += 1
        if is_ready(client, query, batch_id, min(interval * 4, 60)):
            return True
        left = deadline - clock()
        if left <= 0:
            logger.warning("batch {} not ready after {:.0f}s ({} polls): it stays loaded, the next run"
                           " polls again without reloading", batch_id, timeout, polls)
            return False
        if stop(min(interval, left)):
            return False


def run_sql(client: Client, statements: str) -> None:
    """Run post-processing SQL (statements separated by ';')."""
    for stmt in filter(None, (s.strip() for s in statements.split(";"))):
        with ch_errors(f"post-processing SQL {stmt[:60]!r}"):
            client.command(stmt)


def query_rows(client: Client, query: str, parameters: dict[str, Any] | None = None) -> list[Any]:
    """Rows of a query (for status and the demo)."""
    with ch_errors("query"):
        return list(client.query(query, parameters=parameters).result_rows)
