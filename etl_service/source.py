"""PostgreSQL I/O: connect, describe the source table, stream claimed rows out as Arrow.

Driver errors are translated here: a broken or refused connection becomes SourceUnavailable
(transient), anything else PostgreSQL refuses becomes SourceError with its own message.
"""

from __future__ import annotations

import io
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg2 import sql

from etl_service.config import JobConfig, Settings
from etl_service.errors import BadSourceValues, ConfigError, SourceChanged, SourceError, SourceUnavailable
from etl_service.keys import Key, KeyColumn
from etl_service.typemap import Column, map_column

Connection = psycopg2.extensions.connection


def connect(settings: Settings, purpose: str = "etl") -> Connection:
    """Open a PostgreSQL connection with timeouts and the session settings extraction relies on."""
    timeout_ms = int(settings.pg_statement_timeout * 1000)
    # Output settings pinned, so a role's or database's own defaults never change the text COPY
    # produces; idle_session_timeout off, as a run's connection sits idle while ClickHouse gets
    # ready (a role or server setting would otherwise cut it, and every run would look like an outage).
    options = (f"-c statement_timeout={timeout_ms} -c TimeZone=UTC -c DateStyle=ISO,YMD "
               "-c extra_float_digits=3 -c client_encoding=UTF8 -c bytea_output=hex -c IntervalStyle=postgres "
               "-c idle_session_timeout=0")
    app = f"etl-service/{purpose}/{socket.gethostname()}/{os.getpid()}"[:63]
    with pg_errors(f"connect to PostgreSQL ({settings.pg_display})"):
        conn = psycopg2.connect(settings.pg_dsn, connect_timeout=10, application_name=app,
                                options=options, keepalives=1, keepalives_idle=30)
    if purpose != "status":  # `status` only reads: it may look at a standby
        try:
            require_primary(conn, settings.pg_display)
        except BaseException:
            conn.close()
            raise
    return conn


def require_primary(conn: Connection, display: str) -> None:
    """ConfigError unless this session may write: a hot standby, or a read-only session, is refused.

    The service writes the flag and its ledger; on a standby every write would fail, and a run
    that reads there would see a past the primary has left behind.
    """
    with pg_errors("ask whether PostgreSQL is the primary", conn), conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'")
        standby, read_only = cur.fetchone()  # type: ignore[misc]
    conn.rollback()
    multi_host = ("connect to the primary: point PG_DSN (or PG_HOST) at it, or name every server with"
                  " target_session_attrs=read-write, e.g. postgresql://db1,db2/app?target_session_attrs=read-write,"
                  " so a failover needs no change")
    if standby:
        raise ConfigError("PG_DSN / PG_HOST", f"PostgreSQL at {display} is a hot standby (in recovery): the service"
                          " writes the processed flag and its ledger", multi_host)
    if read_only:
        raise ConfigError("PG_DSN / PG_HOST", f"sessions at {display} are read-only (default_transaction_read_only, a"
                          " read-only role, or a pooler routing to a replica): the service writes the processed flag"
                          " and its ledger", "use a role whose sessions may write, and " + multi_host)


@contextmanager
def pg_errors(action: str, conn: Connection | None = None) -> Iterator[None]:
    """Translate psycopg2 errors raised while doing `action` into our exception tree.

    With `conn`, a failed statement's transaction is rolled back, so the connection can go on
    (to record the failure in the ledger, to release the job's lock).
    """
    try:
        yield
    except psycopg2.Error as exc:
        if conn is not None and not conn.closed:
            with suppress(psycopg2.Error):
                conn.rollback()
        raise _translate(action, exc, conn) from exc


# Refusals that no retry can cure: the settings (or the server's grants) must change. Matched on
# the server's message, as connection-time errors carry no SQLSTATE in psycopg2.
_PERMANENT = (
    ("password authentication failed", "PG_PASSWORD", "set the right password (PG_PASSWORD, or in PG_DSN)"),
    ("no password supplied", "PG_PASSWORD", "set PG_PASSWORD (or put the password in PG_DSN)"),
    ("role \"", "PG_USER", "use an existing role (PG_USER, or the user in PG_DSN)"),
    ("database \"", "PG_DATABASE", "use an existing database (PG_DATABASE, or the dbname in PG_DSN)"),
    ("no pg_hba.conf entry", "PG_USER",
     "the server does not let this user connect from this host to this database: add a pg_hba.conf entry"),
    ("pg_hba.conf rejects connection", "PG_USER",
     "the server's pg_hba.conf refuses this user from this host to this database; if it says \"no encryption\","
     " the server wants TLS: sslmode=verify-full in PG_DSN"),
    ("permission denied for database", "PG_USER", "GRANT CONNECT ON DATABASE … TO the user"),
    # TLS (libpq's words): the server's certificate, or the files PG_DSN names for it
    ("certificate verify failed", "PG_DSN",
     "the server's certificate is not signed by the CA in sslrootcert=, or has expired: point sslrootcert at"
     " the CA that issued it (docs/postgresql.md: PostgreSQL over TLS)"),
    ("does not match host name", "PG_DSN",
     "connect with a host name the server's certificate carries (its subjectAltName), or have it reissued"),
    ("root certificate file", "PG_DSN",
     "set sslrootcert= to the CA's file, readable by the service user (docs/postgresql.md: PostgreSQL over TLS)"),
    ("private key file", "PG_DSN", "sslkey= must name the client key, owned by the service user, mode 600"),
    ("certificate file", "PG_DSN", "sslcert= must name the client certificate, readable by the service user"),
    ("alert unknown ca", "PG_DSN",
     "the server does not trust the client certificate (sslcert=): have it issued by the server's ssl_ca_file"),
    ("client certificate", "PG_DSN", "the server wants a client certificate: set sslcert= and sslkey= in PG_DSN"),
    ("does not support SSL", "PG_DSN", "the server has TLS off: turn ssl on there, or change sslmode"),
)


def _permanent(action: str, exc: psycopg2.Error) -> ConfigError | None:
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return ConfigError("PG_USER", f"{action}: {_first_line(exc)}",
                           "grant the privilege to the user (`check` lists what the service needs)")
    if isinstance(exc, psycopg2.OperationalError) and exc.pgcode is None:
        # libpq says one line per address it tried ("localhost": ::1, then 127.0.0.1): any may be the cause
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        for needle, variable, fix in _PERMANENT:
            for text in lines:
                if needle in text and ("does not exist" in text or not needle.endswith('"')):
                    return ConfigError(variable, f"{action}: {text}", fix)
    return None


# libpq's words for a connection that went away mid-statement (a COPY, say), where psycopg2
# raises a plain DatabaseError rather than an OperationalError.
_LOST = ("no message from the libpq", "server closed the connection", "connection already closed",
         "terminating connection", "SSL connection has been closed")


def _translate(action: str, exc: psycopg2.Error, conn: Connection | None = None) -> SourceError | ConfigError:
    permanent = _permanent(action, exc)
    if permanent is not None:
        return permanent
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return SourceUnavailable(f"{action}: statement timed out (PG_STATEMENT_TIMEOUT)")
    if isinstance(exc, psycopg2.errors.IdleSessionTimeout):
        return SourceUnavailable(f"{action}: PostgreSQL closed the idle session (idle_session_timeout; a pooler"
                                 " that drops the service's session options lets a role's setting through)")
    lost = (conn is not None and conn.closed) or (exc.pgcode or "").startswith(("08", "57P")) \
        or any(text in str(exc) for text in _LOST)
    if lost or isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return SourceUnavailable(f"{action}: {_first_line(exc)}")
    return SourceError(f"{action}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_sql(conn: Connection, statements: str) -> None:
    """Run the operator's post-processing SQL (ETL_POST_PG_SQL) in one transaction."""
    with pg_errors("post-processing SQL on PostgreSQL", conn), conn.cursor() as cur:
        cur.execute(sql.SQL(statements))  # operator-written SQL from config
        conn.commit()


def qualified(job: JobConfig) -> sql.Identifier:
    """The source table as a quoted schema.table identifier."""
    return sql.Identifier(*job.source_table)


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


_DESCRIBE = """
SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull,
       t.typcategory, et.typname
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
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
    cur.execute(_BLIND_COUNTERS, {"table": name})
    if cur.fetchone()[0]:  # type: ignore[index]
        raise ConfigError("PG_DSN / PG_HOST", f"track_counts is off for the service's sessions, and {name} has"
                          " triggers on UPDATE: the service reads PostgreSQL's row counters to see what they do when"
                          " it marks rows (a trigger that sets rows back would load them again)",
                          "turn it back on for the database or role (ALTER DATABASE … RESET track_counts, ALTER ROLE"
                          " … RESET track_counts; it is on by default)")
    cur.execute(_UPDATE_RULES, {"table": name})
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
    columns = tuple(map_column(src, by_name[src][1], by_name[src][2], by_name[src][3], by_name[src][4],
                               by_name[src][5]) for src, _ in pairs)
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


# Types whose raw length octet_length() reads from the value's header, without fetching or
# decompressing a TOASTed value (bytea's length is doubled: COPY writes it in hex).
_RAW_LENGTH = {"text": 1, "bytea": 2, "json": 1, "xml": 1}
_RAW_LENGTH_PREFIX = ("character varying", "character(", "character")


def row_bytes(shape: SourceShape, alias: str = "s") -> sql.Composable:
    """About how many bytes a row takes on its way out (COPY text, then Arrow).

    Fixed-width types (integers, floats, dates, timestamps, uuid, boolean) count their width, a
    constant. Texts and byteas count their full length, read from the value's header without
    fetching it (what makes a row large: a value of several MB). Other types count their stored size,
    unless PostgreSQL compressed the value: a compressed jsonb or array can be a hundred times
    its stored size, so such a value (2 kB or more before compression) is measured as text.
    Used at claim time to end chunks by bytes as well as by rows (PostgreSQL 14 or later).
    """
    parts: list[sql.Composable] = []
    fixed = len(shape.columns)  # separators
    for column in shape.columns:
        ident = sql.Identifier(alias, column.name)
        width = _fixed_width(column)
        if width:  # a constant: nothing to compute per row (a NULL counts its width too)
            fixed += width
            continue
        factor = _RAW_LENGTH.get(column.pg_type) or (1 if column.pg_type.startswith(_RAW_LENGTH_PREFIX) else 0)
        if factor:
            cast = sql.SQL("::text") if column.pg_type in ("json", "xml") else sql.SQL("")
            parts.append(sql.SQL("coalesce(octet_length({}{}), 0) * {}").format(ident, cast, sql.Literal(factor)))
        else:
            parts.append(sql.SQL("coalesce(CASE WHEN pg_column_compression({0}) IS NULL THEN pg_column_size({0})"
                                 " ELSE octet_length({0}::text) END, 0)").format(ident))
    parts.append(sql.Literal(fixed))
    return sql.SQL(" + ").join(parts)


def _fixed_width(column: Column) -> int | None:
    """Bytes of a fixed-width column in Arrow (bool: 1), or None when its values vary in size."""
    if column.pg_type == "uuid":
        return 16
    if pa.types.is_boolean(column.arrow_type):
        return 1
    if pa.types.is_decimal(column.arrow_type):  # numeric's stored size follows its digits
        return None
    try:
        return int(column.arrow_type.byte_width) or None
    except ValueError:  # strings, lists, binaries
        return None


# The source's tables that hold rows (its partitions, if partitioned), their fillfactor, and the
# indexes on them other than BRIN ones, with what those index and filter.
_HOT = """
SELECT t.relid::regclass::text, coalesce((SELECT option_value::int FROM pg_options_to_table(c.reloptions)
                                          WHERE option_name = 'fillfactor'), 100),
       x.relname, x.amname, x.definition
FROM (SELECT relid FROM pg_partition_tree(to_regclass(%(table)s)) WHERE isleaf
      UNION SELECT oid FROM pg_class WHERE oid = to_regclass(%(table)s) AND relkind = 'r') t
JOIN pg_class c ON c.oid = t.relid
LEFT JOIN LATERAL (
    SELECT ic.relname, am.amname, pg_get_indexdef(i.indexrelid) AS definition
    FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
    WHERE i.indrelid = t.relid AND am.amname <> 'brin'
      AND (%(attnum)s = ANY(i.indkey::int2[]) OR i.indpred IS NOT NULL OR i.indexprs IS NOT NULL)
) x ON true
ORDER BY 1, 3
"""


# The service's own wake-up trigger (ETL_WAKE=notify, wake.py) is quiet in the mark's transaction
# (MARKING) and changes no row: it is never a cause the mark looks for.
MARKING = "SET LOCAL etl_service.marking = 'on'"
_NOT_WAKE = "tg.tgfoid NOT IN (SELECT oid FROM pg_proc WHERE proname = 'etl_wake')"

# Triggers that fire on UPDATE and row security policies that govern UPDATE, on the source, its
# partitions and the tables it is a partition of: what can reset or refuse the service's mark.
_MARK_BLOCKERS = """
WITH t AS (SELECT to_regclass(%(table)s) AS oid UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))
           UNION SELECT relid FROM pg_partition_ancestors(to_regclass(%(table)s)))
SELECT format('%%strigger %%I (%%s UPDATE, for each %%s) on %%s',
              CASE WHEN tg.tginitdeferred THEN 'deferred constraint ' WHEN tg.tgconstraint <> 0 THEN 'constraint '
                   ELSE '' END, tg.tgname,
              CASE WHEN tg.tgtype & 2 = 2 THEN 'BEFORE' WHEN tg.tgtype & 64 = 64 THEN 'INSTEAD OF' ELSE 'AFTER' END,
              CASE WHEN tg.tgtype & 1 = 1 THEN 'row' ELSE 'statement' END, tg.tgrelid::regclass)
FROM pg_trigger tg WHERE tg.tgrelid IN (SELECT oid FROM t) AND NOT tg.tgisinternal AND tg.tgenabled <> 'D'
  AND tg.tgtype & 16 = 16 AND {NOT_WAKE}
UNION ALL
SELECT format('row security policy %%I (%%s) on %%s', p.polname,
              CASE p.polcmd WHEN 'w' THEN 'FOR UPDATE' ELSE 'FOR ALL' END, p.polrelid::regclass)
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
WHERE p.polrelid IN (SELECT oid FROM t) AND c.relrowsecurity AND p.polcmd IN ('w', '*')
ORDER BY 1
""".replace("{NOT_WAKE}", _NOT_WAKE)


# track_counts off (the per-transaction row counters the mark reads stay at 0) on a table whose
# triggers could act on a mark.
_BLIND_COUNTERS = """
SELECT current_setting('track_counts') = 'off' AND EXISTS (
  SELECT 1 FROM pg_trigger tg WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D' AND tg.tgtype & 16 = 16
    AND {NOT_WAKE}
    AND tg.tgrelid IN (SELECT to_regclass(%(table)s) UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))
                       UNION SELECT relid FROM pg_partition_ancestors(to_regclass(%(table)s))))
""".replace("{NOT_WAKE}", _NOT_WAKE)


_UPDATE_RULES = """
SELECT format('rule %%I (ON UPDATE DO %%s) on %%s', r.rulename, CASE WHEN r.is_instead THEN 'INSTEAD' ELSE 'ALSO' END,
              r.ev_class::regclass)
FROM pg_rewrite r
WHERE r.ev_type = '2' AND r.ev_enabled <> 'D' AND r.ev_class IN (SELECT to_regclass(%(table)s)
      UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s)))
ORDER BY 1
"""


_HIDING = """
SELECT format('row security policy %%I (%%s) on %%s', p.polname,
              CASE p.polcmd WHEN 'r' THEN 'FOR SELECT' ELSE 'FOR ALL' END, p.polrelid::regclass)
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
WHERE p.polrelid = to_regclass(%(table)s) AND c.relrowsecurity AND p.polcmd IN ('r', '*')
  AND row_security_active(p.polrelid)
ORDER BY 1
"""


def hiding_policies(conn: Connection, job: JobConfig) -> list[str]:
    """Row security policies that decide which source rows this role sees (the rest never move)."""
    with pg_errors("read the source's policies", conn), conn.cursor() as cur:
        cur.execute(_HIDING, {"table": qualified(job).as_string(conn)})
        found = [str(row[0]) for row in cur.fetchall()]
    conn.rollback()
    return found


# Rows of the source table (every partition) this transaction has updated, inserted and deleted
# so far, from PostgreSQL's per-transaction counters (they count what triggers do too).
_CHANGES = """
SELECT coalesce(sum(pg_stat_get_xact_tuples_updated(t.oid)), 0),
       coalesce(sum(pg_stat_get_xact_tuples_inserted(t.oid)), 0),
       coalesce(sum(pg_stat_get_xact_tuples_deleted(t.oid)), 0)
FROM (SELECT to_regclass(%(table)s) AS oid UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))) t
"""


def changes_in_transaction(cur: Any, job: JobConfig) -> tuple[int, int, int]:
    """(updated, inserted, deleted) rows of the source so far in the cursor's transaction."""
    cur.execute(_CHANGES, {"table": qualified(job).as_string(cur.connection)})
    row = cur.fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def mark_blockers(conn: Connection, job: JobConfig) -> list[str]:
    """The triggers and row security policies that can reset or refuse the mark of the flag, described."""
    with pg_errors("read the source's triggers and policies", conn), conn.cursor() as cur:
        cur.execute(_MARK_BLOCKERS, {"table": qualified(job).as_string(conn)})
        found = [str(row[0]) for row in cur.fetchall()]
    conn.rollback()
    return found


def hot_advice(conn: Connection, job: JobConfig) -> list[str]:
    """Why marking rows processed cannot be a HOT update here (docs/performance.md, "Tuning"), if it cannot.

    An UPDATE is HOT (no index entry written, about half the work and WAL) when no index but a
    BRIN one refers to the changed column and the row's page has room for the new version. A
    partitioned source is looked at partition by partition (their storage is what counts).
    """
    name = qualified(job).as_string(conn)
    flag = job.processed_column
    with pg_errors("read the source's indexes", conn), conn.cursor() as cur:
        cur.execute("SELECT attnum, quote_ident(attname) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
                    " AND attname = %s", (name, flag))
        found = cur.fetchone()
        cur.execute(_HOT, {"table": name, "attnum": found[0] if found else 0})
        tables = cur.fetchall()
    conn.commit()
    # the flag as pg_get_indexdef prints it (quoted when it must be), not followed by "(" (a function)
    mention = re.compile(r"(?<![\w\"])" + re.escape(found[1] if found else flag) + r"(?![\w\"])(?!\s*\()")
    advice: list[str] = []
    crowded: dict[str, None] = {}  # tables in order, once each
    for table, fillfactor, index_name, am, definition in tables:
        if index_name and mention.search(definition[definition.find(" USING "):]):
            advice.append(f"index {index_name} ({am}) on {table} refers to {flag}, so marking a row writes"
                          f" index entries (no HOT update): a partial BRIN index WHERE NOT {flag} serves a"
                          " backlog without that (docs/performance.md, Tuning)")
        if fillfactor == 100:
            crowded[table] = None
    if crowded:
        crowded_list = list(crowded)
        more = f" and {len(crowded_list) - 3} more" if len(crowded_list) > 3 else ""
        advice.append(f"{', '.join(crowded_list[:3])}{more} {'has' if len(crowded_list) == 1 else 'have'}"
                      " fillfactor 100: a marked row moves to another page (no HOT update); a batch marks whole"
                      f" pages at once, so ALTER TABLE {crowded_list[0]} SET (fillfactor = 50) leaves room for it"
                      " (docs/performance.md, Tuning)")
    return advice


# For a range join (see SourceShape.range_join): no probe per key, and the claimed keys sorted in
# memory (a batch's keys spill PostgreSQL's default 4MB work_mem: a sort on disk costs a third more).
RANGE_JOIN = "SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '64MB'"


# Each row's source version, the last column of every extracted chunk: the extraction snapshot's
# horizon (the next 64-bit transaction id when it was taken; every row it reads was committed
# before it) in the low 48 bits, and the timeline it belongs to (`ledger.timelines`) in the bits
# above. A later version of a row is read by a later snapshot — a row is claimed again only after
# the batch that loaded its earlier version is done, and that batch's own ledger writes took ids in
# between — so versions order a row's loads as their commits ordered them. The row's xmin would not:
# ids are handed out when a transaction first writes, not when it commits, so a long transaction
# can commit a newer version of a row under a lower id. No failover or restore makes an older load
# look newer either: a new timeline is higher, and versions that go backwards are refused.
VERSION_COLUMN = "_etl_version"
VERSION_MASK = (1 << 48) - 1  # the transaction id part of a version
_XID8 = "v.top"
_VERSION_BASE = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS top"


def _version(timelines: list[tuple[int, int]]) -> sql.Composable:
    """The version of the rows a snapshot reads: its timeline (the last one whose first id is at most its
    horizon) and its horizon."""
    if not timelines:
        return sql.SQL("(" + _XID8 + ")")
    case = sql.SQL(" ").join(sql.SQL("WHEN x.x8 >= {} THEN {}").format(sql.Literal(first), sql.Literal(tl))
                             for tl, first in reversed(timelines))
    return sql.SQL("((CASE {} ELSE {} END)::bigint << 48 | x.x8)").format(case, sql.Literal(timelines[0][0]))


def next_xid(conn: Connection) -> int:
    """The next transaction id the server hands out (64-bit)."""
    with pg_errors("read the next transaction id", conn), conn.cursor() as cur:
        cur.execute(_VERSION_BASE)
        top = int(cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return top


def timeline_now(conn: Connection) -> tuple[int, int]:
    """(the server's timeline, a transaction id no lower than the first one written on it if it is new).

    The checkpoint taken at promotion has the new timeline and the next id then; failing that, the
    next id now.
    """
    with pg_errors("read the server's timeline", conn), conn.cursor() as cur:
        cur.execute("SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int,"
                    " pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        timeline, top = cur.fetchone()  # type: ignore[misc]
    conn.rollback()
    try:  # a server that does not let this role read its control file: the next id now will do
        with conn.cursor() as cur:
            cur.execute("SELECT timeline_id, next_xid FROM pg_control_checkpoint()")
            checkpoint_timeline, next_xid = cur.fetchone()  # type: ignore[misc]
    except psycopg2.Error:
        checkpoint_timeline, next_xid = None, None
    conn.rollback()
    if checkpoint_timeline == timeline and next_xid:
        epoch, xid = (int(part) for part in str(next_xid).split(":"))
        return int(timeline), min(epoch << 32 | xid, int(top))
    return int(timeline), int(top)


def extract_chunk(conn: Connection, job: JobConfig, shape: SourceShape, ledger: str,
                  batch_id: int, first: int, last: int, timelines: list[tuple[int, int]] | None = None) -> pa.Table:
    """Stream keys [first, last] (1-based positions in the batch) out with COPY, parse into Arrow.

    Only rows whose xmin still equals the claimed one are extracted: a row changed since the
    claim is left for the next batch, which will load its new version. The last column is each
    row's source version (VERSION_COLUMN).
    Under the table's lock, the columns are checked first: SourceChanged if they are no longer
    the ones this run prepared the target for.
    """
    name = qualified(job).as_string(conn)
    buf = io.BytesIO()
    with pg_errors(f"extract batch {batch_id} rows {first}-{last}", conn), conn.cursor() as cur:
        # ACCESS SHARE until commit: no ALTER can change the columns between this check and the COPY.
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(qualified(job)))
        if _columns_changed(cur, job, shape, name):
            raise SourceChanged(f"{name} changed its columns during the run: starting over with the new ones")
        if shape.range_join:  # the planner takes the claimed keys for 10 rows: one probe each, else
            cur.execute(RANGE_JOIN)
        cur.copy_expert(_chunk_query(job, shape, ledger, batch_id, first, last, timelines or []), buf)
    conn.commit()
    return parse_csv(buf.getbuffer(), shape, versioned=True)  # a view: the chunk's text is not copied again


def _columns_changed(cur: psycopg2.extensions.cursor, job: JobConfig, shape: SourceShape, name: str) -> bool:
    """Whether the columns this run moves (all but the flag, without ETL_COLUMNS) differ from `shape`'s."""
    cur.execute(_DESCRIBE, (name,))
    now = {r[0]: (r[2], bool(r[3])) for r in cur.fetchall()}
    moved = {c.name: (c.pg_type, c.nullable) for c in shape.columns}
    if job.columns:
        return any(now.get(column) != described for column, described in moved.items())
    return {column: d for column, d in now.items() if column != job.processed_column} != moved


def _chunk_query(job: JobConfig, shape: SourceShape, ledger: str, batch_id: int, first: int,
                 last: int, timelines: list[tuple[int, int]]) -> sql.Composable:
    # The claimed keys are sorted, so the chunk is the key range keys[first]..keys[last]: one
    # index range scan merged with the claimed keys is about twice as fast as a lookup per key.
    # (Bounds from the array, not min()/max(): uuid, for one, has no min().)
    key = shape.key
    parts = [sql.SQL("{} AS {}").format(v, sql.Identifier(f"k{i}"))
             for i, v in enumerate(key.decode(sql.SQL("u.key")))]
    joined = sql.SQL(" AND ").join(sql.SQL("s.{} = k.{}").format(sql.Identifier(c), sql.Identifier(f"k{i}"))
                                   for i, c in enumerate(key.names))
    return sql.SQL(
        "COPY (WITH k AS MATERIALIZED (SELECT {parts}, u.x FROM {ledger}.batches b,"
        " unnest(b.keys[{first}:{last}], b.xmins[{first}:{last}]) AS u(key, x) WHERE b.batch_id = {batch}),"
        " r AS (SELECT b.keys[{first}] AS lo, b.keys[{last}] AS hi FROM {ledger}.batches b"
        " WHERE b.batch_id = {batch}), v AS MATERIALIZED (" + _VERSION_BASE + ")"
        " SELECT {exprs}, {version} FROM {src} s JOIN k ON {joined} AND s.xmin = k.x CROSS JOIN v"
        " CROSS JOIN LATERAL (SELECT " + _XID8 + " AS x8) x"
        " WHERE s.{flag} = false AND {above_lo} AND {below_hi})"
        " TO STDOUT WITH (FORMAT csv)"
    ).format(
        parts=sql.SQL(", ").join(parts),
        exprs=sql.SQL(", ").join(c.select for c in shape.columns),
        ledger=sql.Identifier(ledger),
        first=sql.Literal(first), last=sql.Literal(last),
        src=qualified(job), joined=joined, flag=sql.Identifier(job.processed_column),
        above_lo=key.compare("s", ">=", sql.SQL("(SELECT lo FROM r)")),
        below_hi=key.compare("s", "<=", sql.SQL("(SELECT hi FROM r)")),
        batch=sql.Literal(batch_id), version=_version(timelines),
    )


def parse_csv(data: bytes | memoryview, shape: SourceShape, versioned: bool = False) -> pa.Table:
    """Parse PostgreSQL's COPY CSV into an Arrow table with exact types, named by target column.

    `versioned`: the last field of each line is the row's source version (VERSION_COLUMN, UInt64).
    """
    names = [c.name for c in shape.columns] + ([VERSION_COLUMN] if versioned else [])
    if not data:
        empty = {t: pa.array([], c.arrow_type) for c, t in zip(shape.columns, shape.targets, strict=True)}
        return pa.table({**empty, VERSION_COLUMN: pa.array([], pa.uint64())} if versioned else empty)
    try:
        return _parse_csv(data, shape, names)
    except (pa.ArrowException, ValueError) as exc:
        raise BadSourceValues(f"cannot convert a value to its column type: {_first_line(exc)}") from exc


def _parse_csv(data: bytes | memoryview, shape: SourceShape, names: list[str]) -> pa.Table:
    try:
        return _read_csv(data, shape, names, 8 << 20)
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc):
            raise
    # A row longer than a block (a value of several MB): parse the chunk as one block. Its
    # bytes are in memory already; only the parse loses its parallelism.
    return _read_csv(data, shape, names, len(data) + 1)


def _read_csv(data: bytes | memoryview, shape: SourceShape, names: list[str], block_size: int) -> pa.Table:
    table = pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(column_names=names, block_size=block_size),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={**{c.name: c.csv_type for c in shape.columns}, VERSION_COLUMN: pa.uint64()},
            true_values=["t"], false_values=["f"],
            # COPY CSV writes NULL as an empty unquoted field and '' as "".
            null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False,
        ),
    )
    arrays = []
    for i, col in enumerate(shape.columns):
        arr = table.column(i).combine_chunks()
        arrays.append(col.convert(arr) if col.convert else arr)
    extra = [VERSION_COLUMN] if len(names) > len(shape.columns) else []
    arrays.extend(table.column(VERSION_COLUMN).combine_chunks() for _ in extra)
    return pa.Table.from_arrays(arrays, names=list(shape.targets) + extra)
