"""PostgreSQL I/O: connect, describe the source table, stream claimed rows out as Arrow.

Driver errors are translated here: a broken or refused connection becomes SourceUnavailable
(transient), anything else PostgreSQL refuses becomes SourceError with its own message.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg2 import sql

from etl_service.config import JobConfig, Settings
from etl_service.errors import BadSourceValues, ConfigError, SourceError, SourceUnavailable
from etl_service.typemap import Column, map_column

Connection = psycopg2.extensions.connection


def connect(settings: Settings, purpose: str = "etl") -> Connection:
    """Open a PostgreSQL connection with timeouts and the session settings extraction relies on."""
    timeout_ms = int(settings.pg_statement_timeout * 1000)
    options = (f"-c statement_timeout={timeout_ms} -c TimeZone=UTC -c DateStyle=ISO,YMD "
               "-c extra_float_digits=3 -c client_encoding=UTF8 -c bytea_output=hex")
    app = f"etl-service/{purpose}/{socket.gethostname()}/{os.getpid()}"[:63]
    with pg_errors(f"connect to PostgreSQL ({settings.pg_display})"):
        conn = psycopg2.connect(settings.pg_dsn, connect_timeout=10, application_name=app,
                                options=options, keepalives=1, keepalives_idle=30)
    return conn


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
        raise _translate(action, exc) from exc


def _translate(action: str, exc: psycopg2.Error) -> SourceError:
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return SourceUnavailable(f"{action}: statement timed out (PG_STATEMENT_TIMEOUT)")
    if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return SourceUnavailable(f"{action}: {_first_line(exc)}")
    return SourceError(f"{action}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def qualified(job: JobConfig) -> sql.Identifier:
    """The source table as a quoted schema.table identifier."""
    return sql.Identifier(*job.source_table)


@dataclass(frozen=True)
class SourceShape:
    """What the source table looks like to a job: its key type and the columns to move."""

    key_type: str  # format_type() of the key column, e.g. bigint
    columns: tuple[Column, ...]  # selected source columns, in order
    targets: tuple[str, ...]  # their target column names (after ETL_COLUMNS renames)

    def target_of(self, source_name: str) -> str | None:
        for col, target in zip(self.columns, self.targets, strict=True):
            if col.name == source_name:
                return target
        return None


_DESCRIBE = """
SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull,
       t.typcategory, et.typname
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def describe(conn: Connection, job: JobConfig) -> SourceShape:
    """Read the source table's columns; ConfigError when the table or a named column is missing."""
    name = qualified(job).as_string(conn)
    with pg_errors(f"describe {name}", conn), conn.cursor() as cur:
        cur.execute(_DESCRIBE, (name,))
        rows = cur.fetchall()
    conn.rollback()
    if not rows:
        raise ConfigError("ETL_SOURCE_TABLE", f"table {name} does not exist in PostgreSQL",
                          "check the schema and table name (schema.table)")
    by_name = {r[0]: r for r in rows}
    for var, col in (("ETL_SOURCE_KEY", job.source_key), ("ETL_PROCESSED_COLUMN", job.processed_column)):
        if col not in by_name:
            raise ConfigError(var, f"column {col!r} does not exist in {name}",
                              f"columns are: {', '.join(by_name)}")
    if by_name[job.processed_column][1] != "bool":
        raise ConfigError("ETL_PROCESSED_COLUMN", f"column {job.processed_column!r} must be boolean")
    pairs = job.columns or tuple((r[0], r[0]) for r in rows if r[0] != job.processed_column)
    missing = [src for src, _ in pairs if src not in by_name]
    if missing:
        raise ConfigError("ETL_COLUMNS", f"{', '.join(missing)} not in {name}",
                          f"columns are: {', '.join(by_name)}")
    columns = tuple(map_column(src, by_name[src][1], by_name[src][2], by_name[src][3], by_name[src][4],
                               by_name[src][5]) for src, _ in pairs)
    return SourceShape(by_name[job.source_key][2], columns, tuple(t for _, t in pairs))


def extract_chunk(conn: Connection, job: JobConfig, shape: SourceShape, ledger: str,
                  batch_id: int, first: int, last: int) -> pa.Table:
    """Stream keys [first, last] (1-based positions in the batch) out with COPY, parse into Arrow.

    Only rows whose xmin still equals the claimed one are extracted: a row changed since the
    claim is left for the next batch, which will load its new version.
    """
    # The claimed keys are sorted, so the chunk is the key range keys[first]..keys[last]: one
    # index range scan merged with the key list is about twice as fast as a lookup per key.
    # (Bounds from the array, not min()/max(): uuid, for one, has no min().)
    query = sql.SQL(
        "COPY (WITH k AS MATERIALIZED (SELECT u.key::{keytype} AS key, u.x FROM {ledger}.batches b,"
        " unnest(b.keys[{first}:{last}], b.xmins[{first}:{last}]) AS u(key, x) WHERE b.batch_id = {batch}),"
        " r AS (SELECT b.keys[{first}]::{keytype} AS lo, b.keys[{last}]::{keytype} AS hi"
        " FROM {ledger}.batches b WHERE b.batch_id = {batch})"
        " SELECT {exprs} FROM {src} s JOIN k ON s.{key} = k.key AND s.xmin = k.x"
        " WHERE s.{key} BETWEEN (SELECT lo FROM r) AND (SELECT hi FROM r))"
        " TO STDOUT WITH (FORMAT csv)"
    ).format(
        exprs=sql.SQL(", ").join(c.select for c in shape.columns),
        ledger=sql.Identifier(ledger),
        first=sql.Literal(first), last=sql.Literal(last),
        src=qualified(job), key=sql.Identifier(job.source_key),
        # format_type() output from the catalog, not user text: safe to splice as a type name.
        keytype=sql.SQL(shape.key_type),
        batch=sql.Literal(batch_id),
    )
    buf = io.BytesIO()
    with pg_errors(f"extract batch {batch_id} rows {first}-{last}", conn), conn.cursor() as cur:
        cur.copy_expert(query, buf)
    conn.commit()
    return parse_csv(buf.getvalue(), shape)


def parse_csv(data: bytes, shape: SourceShape) -> pa.Table:
    """Parse PostgreSQL's COPY CSV into an Arrow table with exact types, named by target column."""
    names = [c.name for c in shape.columns]
    if not data:
        return pa.table({t: pa.array([], c.arrow_type) for c, t in zip(shape.columns, shape.targets,
                                                                         strict=True)})
    try:
        return _parse_csv(data, shape, names)
    except (pa.ArrowException, ValueError) as exc:
        raise BadSourceValues(f"cannot convert a value to its column type: {_first_line(exc)}") from exc


def _parse_csv(data: bytes, shape: SourceShape, names: list[str]) -> pa.Table:
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, block_size=8 << 20),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={c.name: c.csv_type for c in shape.columns},
            true_values=["t"], false_values=["f"],
            # COPY CSV writes NULL as an empty unquoted field and '' as "".
            null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False,
        ),
    )
    arrays = []
    for i, col in enumerate(shape.columns):
        arr = table.column(i).combine_chunks()
        arrays.append(col.convert(arr) if col.convert else arr)
    return pa.Table.from_arrays(arrays, names=list(shape.targets))
