"""ClickHouse statements through clickhouse-connect: target table, deduplicated inserts, readiness, SQL.

Works the same on every kind of connection (`clickhouse` opens them: a server over HTTP(S), the
in-process chDB engine).
Every table name is `database`.`table` with backquoted identifiers. Driver errors are
translated with `clickhouse.ch_errors`.
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pyarrow as pa
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from loguru import logger

from etl_service import fit, source, target
from etl_service.clickhouse import ch_errors
from etl_service.errors import ConfigError, SinkError
from etl_service.source import SourceShape

BATCH_COLUMN = "_etl_batch"
VERSION_COLUMN = source.VERSION_COLUMN  # each row's source version
# How many recent insert tokens a MergeTree remembers; far more than chunks in flight.
DEDUP_WINDOW = 10000





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


def create_target(client: Client, database: str, table: str, shape: SourceShape, source: str,
                  cluster: str = "", latest: bool = False, deleted: bool = False) -> str:
    """Create the trigger table from the source types, sorted by the key; returns the DDL that was run."""
    ddl = target.create_ddl(table_name(database, table), shape, source, cluster, DEDUP_WINDOW, latest, deleted)
    with ch_errors(f"create target table {database}.{table}"):
        client.command(ddl)
    return ddl


_DESCRIBE_TARGET = """
SELECT engine, engine_full, comment,
       (SELECT groupArray((name, type)) FROM (SELECT name, type FROM system.columns
         WHERE database = {db:String} AND table = {t:String} ORDER BY position)),
       (SELECT groupArray((name, toUInt64OrZero(value))) FROM system.merge_tree_settings
         WHERE name IN ('replicated_deduplication_window', 'non_replicated_deduplication_window')),
       arrayZip(dependencies_database, dependencies_table)
FROM system.tables WHERE database = {db:String} AND name = {t:String}
"""


Views = list[tuple[str, str]]  # (database, name) of materialized views reading a table


def describe_target(client: Client, database: str, table: str) -> tuple[target.TargetInfo, Views] | None:
    """The target's engine, settings and columns, and the views that read it; None if it does not exist."""
    with ch_errors(f"describe {database}.{table}"):
        rows = client.query(_DESCRIBE_TARGET, parameters={"db": database, "t": table}).result_rows
    if not rows:
        return None
    engine, engine_full, comment, columns, windows, views = rows[0]
    info = target.TargetInfo(engine, engine_full, comment, dict(columns), {k: int(v) for k, v in windows})
    return info, [(str(d), str(v)) for d, v in views]


def doubling_views(client: Client, views: Views) -> list[str]:
    """Materialized views reading the target whose own target would double a repeated insert."""
    found = []
    for database, view in views:
        with ch_errors(f"describe view {database}.{view}"):
            rows = client.query("SELECT target_database, target_table FROM system.tables"
                                " WHERE database = {db:String} AND name = {t:String}",
                                parameters={"db": database, "t": view}).result_rows
        if not rows or not rows[0][1]:
            continue
        described = describe_target(client, str(rows[0][0]), str(rows[0][1]))
        name = table_name(str(rows[0][0]), str(rows[0][1]))
        problem = target.dedup_problem(described[0], name) if described else None
        if problem:
            found.append(f"materialized view {database}.{view} writes to {problem}")
    return found


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


def check_grants(client: Client, database: str, table: str, exists: bool) -> str:
    """The privileges a run needs on ClickHouse: INSERT and SELECT on the target, CREATE if it must be made."""
    needed = ["INSERT", "SELECT"] if exists else ["CREATE TABLE", "INSERT", "SELECT"]
    on = table_name(database, table)
    missing = []
    for grant in needed:
        try:
            rows = query_rows(client, f"CHECK GRANT {grant} ON {on}")
        except SinkError as exc:
            return f"note: ClickHouse privileges not verified (CHECK GRANT needs ClickHouse 24.6+): {exc}"
        if not (rows and rows[0][0]):
            missing.append(grant)
    if missing:
        raise ConfigError("CLICK_USER", f"lacks {', '.join(missing)} on {on}",
                          f"GRANT {', '.join(missing)} ON {on} TO the service's user")
    return f"ClickHouse privileges: {', '.join(needed)} on {on}"


def _repeat_uint64(value: int, count: int) -> pa.Array:
    """`count` times `value` as UInt64, built from bytes: pa.array() and pa.scalar() import pandas
    (about 50 MB and 0.3 s) to see whether they were given pandas objects."""
    return pa.Array.from_buffers(pa.uint64(), count, [None, pa.py_buffer(struct.pack("<Q", value) * count)])


# The insert settings the guarantee rests on, sent with every insert whatever the server's profile
# says: deduplication on (`deduplicate_insert` supersedes `insert_deduplicate` since 26.x), also in
# the views on the target (or they would count a repeated block twice), and synchronous inserts
# (a chunk is large, and a token then means one insert, at once).
INSERT_SETTINGS = {"deduplicate_insert": "enable", "insert_deduplicate": "1",
                   "deduplicate_blocks_in_dependent_materialized_views": "1", "async_insert": "0"}


def insert_settings(client: Client) -> dict[str, str]:
    """INSERT_SETTINGS that this server knows: an older server refuses a setting it lacks."""
    known = getattr(client, "server_settings", None) or {}
    return {k: v for k, v in INSERT_SETTINGS.items() if k in known or (not known and k != "deduplicate_insert")}


def check_insert_settings(client: Client) -> list[str]:
    """ConfigError when the server would still keep a repeated insert twice; else what each setting is.

    A profile may set any of INSERT_SETTINGS; the value an insert sends wins, unless the user may
    not change it (a `readonly` profile, a constraint): then refused, naming the setting and the fix.
    """
    with ch_errors("read the effective insert settings"):
        rows = client.query("SELECT name, value, readonly FROM system.settings WHERE name IN {names:Array(String)}"
                            " OR name = 'readonly'", parameters={"names": list(INSERT_SETTINGS)}).result_rows
    found = {str(name): (str(value), bool(readonly)) for name, value, readonly in rows}
    if found.get("readonly", ("0", False))[0] == "1":
        raise ConfigError("CLICK_USER", "this user's profile is readonly = 1: it may not insert, nor change the"
                          " insert settings a retried insert needs", "use a user whose profile allows INSERT")
    notes = []
    for name, needed in insert_settings(client).items():
        value, fixed = found.get(name, (needed, False))
        if value != needed and fixed:
            raise ConfigError("CLICK_USER", f"this user's profile sets {name} = {value} and may not change it (a"
                              f" readonly setting or a constraint): a retried insert would be kept twice",
                              f"let the user change {name} (drop the constraint, or make it changeable), or set"
                              f" {name} = {needed} in its profile")
        if value != needed:
            notes.append(f"{name} = {value} on the server; every insert sends {needed}")
    return notes


def insert_chunk(client: Client, database: str, table: str, data: pa.Table, batch_id: int, token: str,
                 with_batch_column: bool, with_version_column: bool = True) -> int:
    """Insert one chunk; a repeat with the same token is dropped by ClickHouse. Returns rows sent.

    `data` may carry the rows' source versions (VERSION_COLUMN): sent where the target has the column.
    """
    if VERSION_COLUMN in data.column_names and not with_version_column:
        data = data.drop_columns([VERSION_COLUMN])
    if with_batch_column:
        data = data.append_column(BATCH_COLUMN, _repeat_uint64(batch_id, data.num_rows))
    settings = {"insert_deduplication_token": token, **insert_settings(client)}
    with ch_errors(f"insert batch {batch_id} into {database}.{table}"):
        client.insert_arrow(table_name(database, table), data, settings=settings)
    return data.num_rows


_ANSWER_TYPE = re.compile(r"^(Bool|U?Int\d+|Float\d+|Decimal(\d+)?\(.*\)|Nothing)$")


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


def check_ready_query(client: Client, query: str) -> None:
    """ConfigError if the readiness query's first column cannot be a yes or no (a String, an Array, …).

    Asked of the query's type (`DESCRIBE (query)`), so it is found even while the query has no row
    for the batch. A query DESCRIBE cannot wrap is run once as it is: one ClickHouse cannot parse
    (a FORMAT clause, a typo) is a ConfigError too; one that fails otherwise (a table not made yet)
    is left to the answers themselves (`readiness`).
    """
    params = {"batch_id": 0} if "{batch_id" in query else None
    try:
        with ch_errors("describe the readiness query"):
            # on lines of their own: a trailing `-- comment` must not swallow the parenthesis
            rows = client.query(f"DESCRIBE (\n{query.strip().rstrip(';')}\n)", parameters=params).result_rows
    except SinkError:
        try:
            with ch_errors("run the readiness query"):
                client.query(query, parameters=params)
        except SinkError as exc:
            if "Code: 62" in str(exc) or "SYNTAX_ERROR" in str(exc):
                raise ConfigError("ETL_READY_QUERY", f"ClickHouse cannot parse it: {exc}",
                                  "write one SELECT without a FORMAT clause, e.g. SELECT count() = 0 FROM … WHERE"
                                  " batch = {batch_id:UInt64} AND NOT done") from None
        return
    if not rows:
        return
    name, ch_type = str(rows[0][0]), str(rows[0][1])
    inner = ch_type
    while inner.startswith(("Nullable(", "LowCardinality(")):
        inner = inner.split("(", 1)[1][:-1]
    if not _ANSWER_TYPE.match(inner):
        raise ConfigError("ETL_READY_QUERY", f"answers {ch_type} ({name}): a readiness query must answer"
                          " true/false or a number (non-zero: ready)", "compare in the query, e.g."
                          " SELECT status = 'done' FROM … or SELECT count() = 0 FROM … WHERE NOT ready")


def is_ready(client: Client, query: str, batch_id: int, timeout: float) -> bool:
    """Run the readiness query once: is the first value of its first row a yes (see `readiness`)?"""
    params = {"batch_id": batch_id} if "{batch_id" in query else None
    with ch_errors("readiness query"):
        result = client.query(query, parameters=params, settings={"max_execution_time": int(timeout)})
    rows = result.result_rows
    return readiness(rows[0][0] if rows and rows[0] else None)


def readiness(answer: Any) -> bool:
    """A readiness answer as yes or no: a boolean, or a number (non-zero is yes); no row or NULL is no.

    Anything else (a string such as 'pending', an array, NaN) is a ConfigError naming
    ETL_READY_QUERY: taking it for a yes would mark rows before downstream work is done.
    """
    if answer is None or isinstance(answer, bool):
        return bool(answer)
    if isinstance(answer, int | Decimal) or (isinstance(answer, float) and not math.isnan(answer)):
        return answer != 0
    shown = "NaN" if isinstance(answer, float) else f"{type(answer).__name__} {str(answer)[:60]!r}"
    raise ConfigError("ETL_READY_QUERY", f"answered {shown}: a readiness query must answer true/false or a number"
                      " (non-zero: ready)", "compare in the query, e.g. SELECT status = 'done' FROM … or"
                      " SELECT count() = 0 FROM … WHERE NOT ready")


def await_ready(client: Client, query: str, batch_id: int, timeout: float, interval: float,
                stop: Callable[[float], bool], clock: Callable[[], float] = time.monotonic,
                first: float | None = None) -> bool:
    """Poll the readiness query until it says ready, the deadline passes, or a stop is asked.

    `stop(seconds)` waits up to `seconds` and returns True if the service is stopping. `first`:
    the first wait, doubled after each poll up to `interval` (a woken job: readiness a moment
    after the load should not cost a whole interval of latency).
    """
    deadline = clock() + timeout
    polls = 0
    wait = min(first, interval) if first else interval
    check_ready_query(client, query)
    while True:
        polls += 1
        if is_ready(client, query, batch_id, min(interval * 4, 60)):
            return True
        left = deadline - clock()
        if left <= 0:
            logger.warning("batch {} not ready after {:.0f}s ({} polls): it stays loaded, the next run"
                           " polls again without reloading", batch_id, timeout, polls)
            return False
        if stop(min(wait, left)):
            return False
        wait = min(wait * 2, interval)


def run_statement(client: Client, statement: str) -> None:
    """Run one statement the service wrote (a schema change); SchemaChangeError if ClickHouse refuses it."""
    try:
        with ch_errors(f"run {statement}"):
            client.command(statement)
    except SinkError as exc:
        raise target.SchemaChangeError(f"{exc}: run it by hand once the cause is fixed") from exc


def run_sql(client: Client, statements: str) -> None:
    """Run post-processing SQL (statements separated by ';')."""
    for stmt in filter(None, (s.strip() for s in statements.split(";"))):
        with ch_errors(f"post-processing SQL {stmt[:60]!r}"):
            client.command(stmt)


def query_rows(client: Client, query: str, parameters: dict[str, Any] | None = None) -> list[Any]:
    """Rows of a query (for status and the demo)."""
    with ch_errors("query"):
        return list(client.query(query, parameters=parameters).result_rows)
