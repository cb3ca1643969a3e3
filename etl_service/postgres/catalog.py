"""The source table as the catalog describes it: its columns and their types, its key, its storage.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from etl_service.errors import ConfigError
from etl_service.postgres.connection import Connection, pg_errors, qualified
from etl_service.postgres.keys import Key, KeyColumn
from etl_service.postgres.logic import BLIND_COUNTERS, UPDATE_RULES
from etl_service.postgres.typemap import Column, map_column
from etl_service.settings.model import JobConfig


@dataclass(frozen=True)
class SourceShape:
    """What the source table looks like to a job: its key type and the columns to move."""

    key: Key
    columns: tuple[Column, ...]  # selected source columns, in order
    targets: tuple[str, ...]  # their target column names (after ETL_COLUMNS renames)
    range_join: bool = False  # a partial index on the key holds the unprocessed rows (`_pending_index`)

    def target_of(self, source_name: str) -> str | None:
        for col, target in zip(self.columns, self.targets, strict=True):
            if col.name == source_name:
                return target
        return None

    @property
    def key_targets(self) -> tuple[str, ...]:
        """The target column names of the key columns (every key column is moved)."""
        return tuple(self.target_of(name) or name for name in self.key.names)


# For a range join (see SourceShape.range_join): no probe per key, and the claimed keys sorted in
# memory (a batch's keys spill PostgreSQL's default 4MB work_mem: a sort on disk costs a third more).
RANGE_JOIN = "SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '64MB'"
# Without such an index, a chunk or batch of integer keys that fills at least half of its key range
# (a backlog in key order) is read the same way from the table's key index; fewer keys than this
# cost less probed one by one than reading their range.
DENSE_AT_LEAST = 1_000


_DESCRIBE = """
SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull,
       t.typcategory, et.typname, a.attndims, a.attnum
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


# The columns as a chunk's extraction compares them with the run's shape, under the table's lock.
COLUMNS_NOW = """
SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type, NOT a.attnotnull AS nullable
FROM pg_attribute a
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# Unique indexes that make a key: not partial, on plain columns, valid; their key columns in order.
_UNIQUE_KEYS = """
SELECT i.indisprimary, array_agg(a.attname::text ORDER BY k.ord)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
GROUP BY i.indexrelid, i.indisprimary
ORDER BY i.indisprimary DESC, count(*), min(i.indexrelid::bigint)
"""

# Partial btree indexes and their leading columns: is there one on the key for the rows still to do?
_PARTIAL_INDEXES = """
SELECT pg_get_expr(i.indpred, i.indrelid), array_agg(a.attname::text ORDER BY k.ord)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass(%s) AND i.indisvalid AND i.indpred IS NOT NULL AND am.amname = 'btree'
GROUP BY i.indexrelid, i.indpred, i.indrelid
"""


def _pending_index(cur: psycopg2.extensions.cursor, name: str, flag: str, key: Key) -> bool:
    """Whether a btree index on the key (leading columns) holds exactly the unprocessed rows.

    With one, a key range of a batch can be read as a range of that index, which holds only
    rows still to do: joining the claimed keys against it is one ordered pass (see `range_join`).
    """
    cur.execute(_PARTIAL_INDEXES, (name,))
    bare = re.sub(r'[()"\s]', "", flag).lower()
    todo = {f"not{bare}", f"{bare}=false", f"{bare}isfalse"}
    for predicate, columns in cur.fetchall():
        normal = re.sub(r'[()"\s]', "", predicate).lower()
        if normal in todo and tuple(columns[:len(key.names)]) == key.names:
            return True
    return False


# The table's storage (partitions included) and its column types: `storage|types`. An ALTER …
# TYPE that rewrites the table changes both and gives every row a new xmin without changing its
# data; VACUUM FULL and CLUSTER change the storage but keep xmins; TRUNCATE changes the storage
# and leaves only rows inserted after it.
GENERATION = ("concat_ws(',', pg_relation_filenode({t}::regclass),"
              " (SELECT string_agg(pg_relation_filenode(p.relid)::text, ',' ORDER BY p.relid::oid)"
              " FROM pg_partition_tree({t}::regclass) p)) || '|' ||"
              " (SELECT md5(string_agg(a.attname || ' ' || a.atttypid || ' ' || a.atttypmod, ',' ORDER BY a.attnum))"
              " FROM pg_attribute a WHERE a.attrelid = {t}::regclass AND a.attnum > 0 AND NOT a.attisdropped)")


def generation(name: str) -> sql.Composable:
    """SQL for the storage generation of the table `name` (quoted schema.table; see GENERATION)."""
    return sql.SQL(GENERATION).format(t=sql.Literal(name))


def retyped(conn: Connection, job: JobConfig, claimed: str | None) -> bool:
    """Whether an ALTER … TYPE rewrote the table since a batch was claimed (see GENERATION).

    Such a rewrite gives every row a new xmin, so the batch's rows look changed and load again:
    told apart from real updates they cannot be (an update made before the rewrite carries the
    rewrite's xmin too), and loading a row twice is better than losing its update.
    """
    if claimed is None or "|" not in claimed:
        return False
    with pg_errors("read the source's storage", conn), conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {}").format(generation(qualified(job).as_string(conn))))
        now = str(cur.fetchone()[0])  # type: ignore[index]
    conn.commit()
    (storage, types), (storage_now, types_now) = claimed.split("|", 1), now.split("|", 1)
    return storage != storage_now and types != types_now


# Children by (old-style) inheritance: partitions are fine, their parent's key covers them.
_INHERITED = """
SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
               WHERE i.inhparent = to_regclass(%s) AND p.relkind = 'r')
"""


# A column added with a constant default (`ADD COLUMN priority integer DEFAULT 5`, kept or dropped
# after) is not written into the rows that predate it: PostgreSQL keeps the value in the catalog
# (attmissingval) and shows it for each of them. Its text, for the target's DEFAULT.
# A partitioned table keeps it on each partition there was (one value for all of them, or none is used).
_MISSING = """
SELECT a.attname::text, min((p.attmissingval::text::text[])[1])
FROM pg_attribute a
JOIN (SELECT to_regclass(%(t)s) AS relid UNION SELECT relid FROM pg_partition_tree(to_regclass(%(t)s))) t ON true
JOIN pg_attribute p ON p.attrelid = t.relid AND p.attname = a.attname AND p.atthasmissing AND NOT p.attisdropped
WHERE a.attrelid = to_regclass(%(t)s) AND a.attnum > 0 AND NOT a.attisdropped
GROUP BY a.attname
HAVING count(DISTINCT (p.attmissingval::text::text[])[1]) = 1
"""
# The value in the form ClickHouse reads it, by the kind of the column's ClickHouse type (the
# connection pins TimeZone=UTC, DateStyle=ISO and exact floats: `connection.options`).
_AS_CLICKHOUSE_READS = {"Date32": "to_char({v}, 'YYYY-MM-DD')",
                        "DateTime64(6)": "to_char({v}, 'YYYY-MM-DD HH24:MI:SS.US')",
                        "DateTime64(6, 'UTC')": "to_char({v} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"}
_PLAIN_TEXT = re.compile(r"^(U?Int\d+|Float(32|64)|Decimal\(\d+, \d+\)|Bool|String|UUID)$")


def missing_values(conn: Connection, job: JobConfig, columns: Iterable[Column]) -> dict[str, tuple[str, str | None]]:
    """Source column -> the value rows that predate it hold (a constant default given when it was added):
    (PostgreSQL's text of it, the text ClickHouse reads for the column's type, or None where that is not
    plain: arrays, char(n) with its padding, bytea, unmapped types). Columns without one are left out."""
    wanted = {c.name: c for c in columns}
    if not wanted:
        return {}
    name = qualified(job).as_string(conn)
    found: dict[str, tuple[str, str | None]] = {}
    with pg_errors(f"read the defaults of {name}'s new columns", conn), conn.cursor() as cur:
        cur.execute(_MISSING, {"t": name})
        for column_name, text in cur.fetchall():
            column = wanted.get(column_name)
            if column is None or text is None:
                continue
            render = "{v}::text" if _PLAIN_TEXT.match(column.ch_type) else _AS_CLICKHOUSE_READS.get(column.ch_type)
            if render is None or column.pg_type.startswith("character(") or column.pg_type == "bytea":
                found[column_name] = (text, None)
                continue
            cur.execute(sql.SQL("SELECT " + render.replace("{v}", "({}::{})")).format(
                sql.Literal(text), sql.SQL(column.pg_type)))
            found[column_name] = (text, cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return found


def differing(column: Column, value: str | None, nullable: bool) -> sql.Composable:
    """Rows whose `column` is not what the target shows for rows loaded before it had the column: `value`
    (PostgreSQL's text of the target's DEFAULT), else NULL in a Nullable column; a column that is neither
    shows its type's default, and every row differs."""
    if value is not None:
        return sql.SQL("{c}::text IS DISTINCT FROM ({v}::{t})::text").format(
            c=sql.Identifier(column.name), v=sql.Literal(value), t=sql.SQL(column.pg_type))
    return sql.SQL("{c} IS NOT NULL").format(c=sql.Identifier(column.name)) if nullable else sql.SQL("true")


def processed_where(conn: Connection, job: JobConfig, condition: sql.Composable, limit: int = 100_000) -> int:
    """How many processed rows meet `condition` (counted up to `limit`)."""
    name = qualified(job).as_string(conn)
    with pg_errors(f"count the loaded rows of {name} that differ", conn), conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM (SELECT FROM {t} WHERE {flag} AND {condition} LIMIT {n}) d").format(
            t=qualified(job), flag=sql.Identifier(job.processed_column), condition=condition, n=sql.Literal(limit)))
        count = int(cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return count


def describe(conn: Connection, job: JobConfig) -> SourceShape:
    """Read the source table's columns and key; ConfigError when the table, a column or the key is wrong."""
    name = qualified(job).as_string(conn)
    with pg_errors(f"describe {name}", conn), conn.cursor() as cur:
        shape = _read_shape(cur, job, name)
    conn.rollback()
    return shape


def _read_shape(cur: psycopg2.extensions.cursor, job: JobConfig, name: str) -> SourceShape:
    cur.execute(_DESCRIBE, (name,))
    rows = cur.fetchall()
    cur.execute(_UNIQUE_KEYS, (name,))
    unique = [tuple(r[1]) for r in cur.fetchall()]
    if not rows:
        raise ConfigError("ETL_SOURCE_TABLE", f"table {name} does not exist in PostgreSQL",
                          "check the schema and table name (schema.table)")
    cur.execute(_INHERITED, (name,))
    if cur.fetchone()[0]:  # type: ignore[index]
        raise ConfigError("ETL_SOURCE_TABLE", f"{name} has child tables by inheritance: its key is unique in the"
                          " parent only, and reading it reads the children too", "point the job at a partitioned"
                          " table, or at each child table with a job of its own")
    cur.execute(BLIND_COUNTERS, {"table": name})
    if cur.fetchone()[0]:  # type: ignore[index]
        raise ConfigError("PG_DSN / PG_HOST", f"track_counts is off for the service's sessions, and {name} has"
                          " triggers on UPDATE: the service reads PostgreSQL's row counters to see what they do when"
                          " it marks rows (a trigger that sets rows back would load them again)",
                          "turn it back on for the database or role (ALTER DATABASE … RESET track_counts, ALTER ROLE"
                          " … RESET track_counts; it is on by default)")
    cur.execute(UPDATE_RULES, {"table": name})
    rules = [str(r[0]) for r in cur.fetchall()]
    if rules:
        raise ConfigError("ETL_SOURCE_TABLE", f"{name} has {'; '.join(rules)}: a rule rewrites the service's mark of"
                          f" {job.processed_column}, so whether the mark sticks cannot be seen",
                          "do that work in a trigger instead (DROP RULE …), one that leaves the service's mark alone,"
                          " or point the job at a table without rules on UPDATE")
    by_name = {r[0]: r for r in rows}
    _check_named_columns(name, job, by_name)
    key = _key(name, job, unique, by_name)
    pairs = job.columns or tuple((r[0], r[0]) for r in rows if r[0] != job.processed_column)
    if job.deleted_column and job.deleted_column not in {src for src, _ in pairs}:
        raise ConfigError("ETL_DELETED_COLUMN", f"{job.deleted_column!r} is not one of the columns moved",
                          f"add it to ETL_COLUMNS (\"…, {job.deleted_column}\")")
    _check_moved_columns(name, pairs, key, by_name)
    columns = tuple(dataclasses.replace(map_column(src, *by_name[src][1:7]), number=int(by_name[src][7]))
                    for src, _ in pairs)
    return SourceShape(key, columns, tuple(t for _, t in pairs),
                       _pending_index(cur, name, job.processed_column, key))


def _check_named_columns(name: str, job: JobConfig, by_name: dict[str, tuple[Any, ...]]) -> None:
    for col in job.source_key:
        if col not in by_name:
            raise ConfigError("ETL_SOURCE_KEY", f"column {col!r} does not exist in {name}",
                              f"columns are: {', '.join(by_name)}")
    if job.processed_column not in by_name:
        raise ConfigError("ETL_PROCESSED_COLUMN", f"column {job.processed_column!r} does not exist in {name}",
                          f"columns are: {', '.join(by_name)}")
    if by_name[job.processed_column][1] != "bool":
        raise ConfigError("ETL_PROCESSED_COLUMN", f"column {job.processed_column!r} must be boolean")
    if job.deleted_column and by_name.get(job.deleted_column, ("", ""))[1] != "bool":
        raise ConfigError("ETL_DELETED_COLUMN", f"{name} has no boolean column {job.deleted_column!r}",
                          f"name the boolean column that marks a row deleted; columns are: {', '.join(by_name)}")
    if job.lag_column and by_name.get(job.lag_column, ("", ""))[1] not in ("timestamptz", "timestamp", "date"):
        raise ConfigError("ETL_LAG_COLUMN", f"{name} has no timestamp column {job.lag_column!r}",
                          "name a timestamptz, timestamp or date column such as created_at, or leave it empty")


def _check_moved_columns(name: str, pairs: tuple[tuple[str, str], ...], key: Key,
                         by_name: dict[str, tuple[Any, ...]]) -> None:
    missing = [src for src, _ in pairs if src not in by_name]
    if missing:
        raise ConfigError("ETL_COLUMNS", f"{', '.join(missing)} not in {name}",
                          f"columns are: {', '.join(by_name)}")
    reserved = [t for _, t in pairs if t.startswith("_etl_")]
    if reserved:
        raise ConfigError("ETL_COLUMNS", f"column name {reserved[0]!r} is reserved for the service's own columns"
                          " in ClickHouse (_etl_…)", f"rename it: ETL_COLUMNS=\"…, {reserved[0]}:other\"")
    unmoved = [k for k in key.names if k not in {src for src, _ in pairs}]
    if unmoved:
        raise ConfigError("ETL_COLUMNS", f"leaves out the key column(s) {', '.join(unmoved)}",
                          "every key column must be moved (it identifies the row in ClickHouse)")


def _key(table: str, job: JobConfig, unique: list[tuple[str, ...]], by_name: dict[str, tuple[Any, ...]]) -> Key:
    """The key, checked: a PRIMARY KEY or a non-partial UNIQUE index on exactly these columns."""
    wanted = set(job.source_key)
    if len(wanted) != len(job.source_key):
        raise ConfigError("ETL_SOURCE_KEY", f"names a column twice: {', '.join(job.source_key)}")
    if job.processed_column in wanted:
        raise ConfigError("ETL_SOURCE_KEY", f"the key of {table} includes the flag {job.processed_column}: marking a"
                          " row would change its key (a table partitioned by its flag has to include it)",
                          "use a table whose key does not include the flag (a table partitioned by the flag cannot be"
                          " a source: partition it by another column)")
    for columns in unique:
        if set(columns) == wanted:
            return Key(tuple(KeyColumn(c, by_name[c][2], bool(by_name[c][3])) for c in columns))
    qualifying = "; ".join(", ".join(cols) for cols in unique)
    fix = (f"keys that qualify: {qualifying}" if unique else
           f"the table has no PRIMARY KEY or UNIQUE index: add one, e.g. ALTER TABLE {table} ADD PRIMARY KEY (…)")
    raise ConfigError("ETL_SOURCE_KEY", f"{', '.join(job.source_key)} is not a unique key of {table}: no"
                      " PRIMARY KEY or UNIQUE index (without WHERE, on plain columns) covers exactly these"
                      " columns, so rows could repeat and be loaded more than once", fix)


def columns_changed(now: list[dict[str, Any]], job: JobConfig, shape: SourceShape) -> bool:
    """Whether the columns this run moves (all but the flag, without ETL_COLUMNS) differ from `shape`'s.

    `now`: the table's columns as COLUMNS_NOW reads them, under the table's lock.
    """
    current = {r["name"]: (r["type"], bool(r["nullable"])) for r in now}
    moved = {c.name: (c.pg_type, c.nullable) for c in shape.columns}
    if job.columns:
        return any(current.get(column) != described for column, described in moved.items())
    return {column: d for column, d in current.items() if column != job.processed_column} != moved
