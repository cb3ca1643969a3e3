"""The target table through clickhouse-connect: create it, describe it, its grants and views, its ALTERs.

Works the same on every kind of connection (`clients` opens them: a server over HTTP(S), the
in-process chDB engine). Every table name is `database`.`table` with backquoted identifiers.
Driver errors are translated with `clients.ch_errors`.
"""

from __future__ import annotations

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from etl_service.clickhouse import evolution, guard
from etl_service.clickhouse.clients import ch_errors, query_rows, short_error
from etl_service.errors import ConfigError, SinkError
from etl_service.postgres import versioning
from etl_service.postgres.catalog import SourceShape

BATCH_COLUMN = "_etl_batch"


VERSION_COLUMN = versioning.VERSION_COLUMN  # each row's source version


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
    ddl = evolution.create_ddl(table_name(database, table), shape, source, cluster, DEDUP_WINDOW, latest, deleted)
    with ch_errors(f"create target table {database}.{table}"):
        client.command(ddl)
    return ddl


def check_types(client: Client, shape: SourceShape) -> None:
    """ConfigError naming the column when the server has no type the mapping gives it (before a CREATE).

    One query for every column; only when it fails is each column asked alone, to name the one.
    """
    keys = shape.key_targets
    wanted = {t: (c, c.ch_column_type(is_key=t in keys)) for c, t in zip(shape.columns, shape.targets, strict=True)}
    probe = ", ".join(f"defaultValueOfTypeName({_literal(ch_type)})" for _, ch_type in wanted.values())
    try:
        client.query(f"SELECT {probe}")
        return
    except ClickHouseError:
        pass
    for target, (column, ch_type) in wanted.items():
        try:
            client.query(f"SELECT defaultValueOfTypeName({_literal(ch_type)})")
        except ClickHouseError as exc:
            raise ConfigError("ETL_TARGET_TABLE", f"source column {column.name} ({column.pg_type}) maps to ClickHouse"
                              f" {ch_type} for {target}, which this ClickHouse does not have: {short_error(exc)}",
                              "create the target yourself with a type this server has (the service keeps an"
                              " operator-made table's types), leave the column out (ETL_COLUMNS), or change it"
                              " with a transform (ETL_TRANSFORM)") from None


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


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


def describe_target(client: Client, database: str, table: str) -> tuple[guard.TargetInfo, Views] | None:
    """The target's engine, settings and columns, and the views that read it; None if it does not exist."""
    with ch_errors(f"describe {database}.{table}"):
        rows = client.query(_DESCRIBE_TARGET, parameters={"db": database, "t": table}).result_rows
    if not rows:
        return None
    engine, engine_full, comment, columns, windows, views = rows[0]
    info = guard.TargetInfo(engine, engine_full, comment, dict(columns), {k: int(v) for k, v in windows})
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
        problem = guard.dedup_problem(described[0], name) if described else None
        if problem:
            found.append(f"materialized view {database}.{view} writes to {problem}")
    return found


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


def run_statement(client: Client, statement: str) -> None:
    """Run one statement the service wrote (a schema change); SchemaChangeError if ClickHouse refuses it."""
    try:
        with ch_errors(f"run {statement}"):
            client.command(statement)
    except SinkError as exc:
        raise evolution.SchemaChangeError(f"{exc}: run it by hand once the cause is fixed") from exc
