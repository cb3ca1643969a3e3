"""Extraction: a claimed batch's rows out of PostgreSQL in its binary COPY format, read into Arrow.

The rows travel as PostgreSQL's binary COPY, which the ADBC PostgreSQL driver (Apache Arrow's)
reads straight into Arrow arrays: no text is printed by the server or parsed by the service for
the mapped types. The driver holds a connection of its own, one per run (`Extractor`), opened on
the first chunk; the run's other work stays on psycopg2. Each chunk is one transaction on it:
the table's lock, the check that its columns are the ones the run prepared the target for, and
the SELECT, which the driver sends as `COPY (…) TO STDOUT (FORMAT binary)`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import adbc_driver_manager
import adbc_driver_postgresql.dbapi as adbc
import psycopg2.extensions
import pyarrow as pa
from psycopg2 import sql

from etl_service.errors import BadSourceValues, ConfigError, SourceChanged, SourceError, SourceUnavailable
from etl_service.postgres.catalog import COLUMNS_NOW, DENSE_AT_LEAST, RANGE_JOIN, SourceShape, columns_changed
from etl_service.postgres.connection import (
    Connection,
    changed,
    permanent,
    qualified,
    require_primary_answer,
    session_options,
)
from etl_service.postgres.typemap import Unfit
from etl_service.postgres.versioning import VERSION_BASE, VERSION_COLUMN, XID8, version_expr
from etl_service.postgres.widths import row_bytes
from etl_service.settings.model import JobConfig, Settings


class Extractor:
    """One run's reader of claimed rows: a connection of the ADBC driver, opened on first need."""

    def __init__(self, settings: Settings, purpose: str) -> None:
        self.settings = settings
        self.purpose = purpose
        self._conn: Any = None

    def chunk(self, conn: Connection, job: JobConfig, shape: SourceShape, batch_id: int, first: int, last: int,
              timelines: list[tuple[int, int]] | None = None, as_text: frozenset[str] = frozenset(),
              depths: dict[str, int] | None = None) -> pa.Table:
        """Keys [first, last] (1-based positions in the batch) as Arrow, named by target column.

        Only rows whose xmin still equals the claimed one are extracted: a row changed since the
        claim is left for the next batch, which will load its new version. The last column is each
        row's source version (VERSION_COLUMN). Under the table's lock, the columns are checked
        first: SourceChanged if they are no longer the ones this run prepared the target for.
        `conn` (the run's psycopg2 connection) only quotes the statements; `as_text`: source
        columns read as PostgreSQL's text (a target column of type String made for them earlier);
        `depths`: array columns read as deep as their target column nests (made when they declared another).
        BadSourceValues (a row error) when a value cannot be held by its ClickHouse type.
        """
        shape = _with_text(shape, as_text, depths)
        name = qualified(job).as_string(conn)
        with self._transaction(f"extract batch {batch_id} rows {first}-{last}") as cur:
            # ACCESS SHARE until commit: no ALTER can change the columns between this check and the COPY.
            _run(cur, sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(qualified(job)).as_string(conn))
            cur.execute(_quoted(conn, COLUMNS_NOW, (name,)))
            if columns_changed(cur.fetch_arrow_table().to_pylist(), job, shape):
                raise SourceChanged(f"{name} changed its columns during the run: starting over with the new ones")
            if shape.range_join:  # the planner takes the claimed keys for 10 rows: one probe each, else
                _run(cur, RANGE_JOIN)
            elif self._dense(cur, conn, shape, batch_id, first, last):  # most keys of the range are claimed
                _run(cur, RANGE_JOIN + "; SET LOCAL enable_seqscan = off")
            cur.execute(chunk_query(job, shape, self.settings.ledger_schema, batch_id, first, last,
                                    timelines or []).as_string(conn))
            table = cur.fetch_arrow_table()
        return to_target(table, shape)

    def _dense(self, cur: Any, conn: Connection, shape: SourceShape, batch_id: int, first: int, last: int) -> bool:
        """Whether at least half of the integer keys between the chunk's first and last are claimed in it (a
        backlog loaded in key order): then reading the key range of the table's own key index and merging it
        with the claimed keys costs a quarter of a probe per key (docs/performance.md)."""
        if not shape.key.integer or last - first < DENSE_AT_LEAST:
            return False
        cur.execute(f"SELECT keys[{int(first)}]::bigint AS lo, keys[{int(last)}]::bigint AS hi"
                    f" FROM {sql.Identifier(self.settings.ledger_schema).as_string(conn)}.batches"
                    f" WHERE batch_id = {int(batch_id)}")
        found = cur.fetch_arrow_table().to_pylist()
        if not found or found[0]["lo"] is None or found[0]["hi"] is None:
            return False
        return 2 * (last - first + 1) >= found[0]["hi"] - found[0]["lo"] + 1

    def read_nothing(self, conn: Connection, job: JobConfig, shape: SourceShape) -> None:
        """Read no rows of the source the way a claim sizes rows and a chunk reads them (LIMIT 0)."""
        exprs = [sql.SQL("{} AS {}").format(expr, sql.Identifier(f"c{i}_{j}"))
                 for i, column in enumerate(shape.columns) for j, expr in enumerate(column.select)]
        query = sql.SQL("SELECT {}, {} AS _bytes, 0::bigint AS {} FROM {} s LIMIT 0").format(
            sql.SQL(", ").join(exprs), row_bytes(shape), sql.Identifier(VERSION_COLUMN), qualified(job))
        with self._transaction(f"read the columns of {'.'.join(job.source_table)}") as cur:
            cur.execute(query.as_string(conn))
            table = cur.fetch_arrow_table()
        to_target(table, shape)

    def close(self) -> None:
        """Close the driver's connection (the next chunk opens a new one)."""
        if self._conn is not None:
            with suppress(adbc_driver_manager.Error):
                self._conn.close()
            self._conn = None

    @contextmanager
    def _transaction(self, action: str) -> Iterator[Any]:
        """A cursor in one transaction, committed at the end; the driver's errors in our exception tree.

        A connection that broke is closed (the next chunk opens another); otherwise the
        transaction is rolled back, so the connection can go on.
        """
        try:
            with self._connect().cursor() as cur:
                yield cur
            self._conn.commit()
        except adbc_driver_manager.Error as exc:
            error = _translate(action, exc)
            if isinstance(error, SourceUnavailable | ConfigError):
                self.close()
            else:
                self._rollback()
            raise error from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._conn is not None:
            with suppress(adbc_driver_manager.Error):
                self._conn.rollback()

    def _connect(self) -> Any:
        if self._conn is None:
            self._conn = adbc.connect(_conninfo(self.settings, self.purpose))
            with self._conn.cursor() as cur:  # a standby would read a past the claim has left behind
                cur.execute("SELECT pg_is_in_recovery() AS standby,"
                            " current_setting('transaction_read_only') = 'on' AS read_only")
                answer = cur.fetch_arrow_table().to_pylist()[0]
            self._conn.rollback()
            try:
                require_primary_answer(bool(answer["standby"]), bool(answer["read_only"]), self.settings.pg_display)
            except ConfigError:
                self.close()
                raise
        return self._conn


def dry_run(settings: Settings, conn: Connection, job: JobConfig, shape: SourceShape) -> None:
    """ConfigError naming a column that the claim or the extraction cannot read (found before the first
    run, not by every run)."""
    extractor = Extractor(settings, "check")
    try:
        try:
            extractor.read_nothing(conn, job, shape)
            return
        except SourceError:
            pass
        for column, target in zip(shape.columns, shape.targets, strict=True):
            try:
                extractor.read_nothing(conn, job, SourceShape(shape.key, (column,), (target,)))
            except SourceError as exc:
                raise ConfigError("ETL_COLUMNS", f"column {column.name} of {'.'.join(job.source_table)}"
                                  f" ({column.pg_type}) cannot be read: {exc}",
                                  "leave it out (ETL_COLUMNS lists the columns to move), or change its type") from None
    finally:
        extractor.close()


def chunk_query(job: JobConfig, shape: SourceShape, ledger: str, batch_id: int, first: int,
                last: int, timelines: list[tuple[int, int]]) -> sql.Composable:
    """The SELECT of one chunk: its columns' expressions (`c<i>_<j>`), then each row's source version."""
    # The claimed keys are sorted, so the chunk is the key range keys[first]..keys[last]: one
    # index range scan merged with the claimed keys is about twice as fast as a lookup per key.
    # (Bounds from the array, not min()/max(): uuid, for one, has no min().)
    key = shape.key
    parts = [sql.SQL("{} AS {}").format(v, sql.Identifier(f"k{i}"))
             for i, v in enumerate(key.decode(sql.SQL("u.key")))]
    joined = sql.SQL(" AND ").join(sql.SQL("s.{} = k.{}").format(sql.Identifier(c), sql.Identifier(f"k{i}"))
                                   for i, c in enumerate(key.names))
    exprs = [sql.SQL("{} AS {}").format(expr, sql.Identifier(f"c{i}_{j}"))
             for i, column in enumerate(shape.columns) for j, expr in enumerate(column.select)]
    return sql.SQL(
        "WITH k AS MATERIALIZED (SELECT {parts}, u.x FROM {ledger}.batches b,"
        " unnest(b.keys[{first}:{last}], b.xmins[{first}:{last}]) AS u(key, x) WHERE b.batch_id = {batch}),"
        " r AS (SELECT b.keys[{first}] AS lo, b.keys[{last}] AS hi FROM {ledger}.batches b"
        " WHERE b.batch_id = {batch}), v AS MATERIALIZED (" + VERSION_BASE + ")"
        " SELECT {exprs}, {version} AS {version_name} FROM {src} s JOIN k ON {joined} AND s.xmin = k.x CROSS JOIN v"
        " CROSS JOIN LATERAL (SELECT " + XID8 + " AS x8) x"
        " WHERE s.{flag} = false AND {above_lo} AND {below_hi}"
    ).format(
        parts=sql.SQL(", ").join(parts), exprs=sql.SQL(", ").join(exprs),
        ledger=sql.Identifier(ledger),
        first=sql.Literal(first), last=sql.Literal(last),
        src=qualified(job), joined=joined, flag=sql.Identifier(job.processed_column),
        above_lo=key.compare("s", ">=", sql.SQL("(SELECT lo FROM r)")),
        below_hi=key.compare("s", "<=", sql.SQL("(SELECT hi FROM r)")),
        batch=sql.Literal(batch_id), version=version_expr(timelines), version_name=sql.Identifier(VERSION_COLUMN),
    )


def to_target(table: pa.Table, shape: SourceShape) -> pa.Table:
    """The driver's table as the target's: each column converted to its Arrow type, named by target column.

    BadSourceValues naming the column and the value when one cannot be held as it is.
    """
    arrays = []
    try:
        for i, column in enumerate(shape.columns):
            parts = [_combined(table.column(f"c{i}_{j}")) for j in range(len(column.select))]
            arrays.append(column.to_arrow(parts))
    except Unfit as exc:
        raise BadSourceValues(str(exc)) from None
    arrays.append(table.column(VERSION_COLUMN).combine_chunks().cast(pa.uint64()))
    return pa.Table.from_arrays(arrays, names=[*shape.targets, VERSION_COLUMN])


def _combined(column: pa.ChunkedArray) -> pa.Array:
    """One array of a column; an empty one (no chunks) typed by its storage (no empty extension array is made)."""
    if column.num_chunks:
        return column.combine_chunks()
    return pa.array([], _storage(column.type))


def _storage(kind: pa.DataType) -> pa.DataType:
    if isinstance(kind, pa.BaseExtensionType):
        return _storage(kind.storage_type)
    if pa.types.is_list(kind):
        return pa.list_(_storage(kind.value_type))
    return kind


def _with_text(shape: SourceShape, as_text: frozenset[str], depths: dict[str, int] | None = None) -> SourceShape:
    if not as_text and not depths:
        return shape
    depths = depths or {}
    columns = tuple(c.as_text() if c.name in as_text else c.nested(depths[c.name]) if c.name in depths else c
                    for c in shape.columns)
    return SourceShape(shape.key, columns, shape.targets, shape.range_join)


def _quoted(conn: Connection, query: str, args: tuple[Any, ...]) -> str:
    with conn.cursor() as cur:
        return cur.mogrify(query, args).decode()


def _run(cur: Any, statement: str) -> None:
    """A statement without rows (the driver sends every query through COPY otherwise)."""
    cur.adbc_statement.set_sql_query(statement)
    cur.adbc_statement.execute_update()


def _conninfo(settings: Settings, purpose: str) -> str:
    """The service's DSN as libpq key=value pairs, with the session settings of `connection.connect`
    (pinned output settings: the columns read as text come out the same whatever the role's defaults)."""
    app = f"etl-service/{purpose}/{socket.gethostname()}/{os.getpid()}"[:63]
    return psycopg2.extensions.make_dsn(settings.pg_dsn, connect_timeout=10, application_name=app, keepalives=1,
                                        keepalives_idle=30, options=session_options(settings))


def _translate(action: str, exc: adbc_driver_manager.Error) -> SourceError | ConfigError:
    """The driver's error in our exception tree (as `connection.pg_errors` does psycopg2's)."""
    text = str(exc).strip()
    state = getattr(exc, "sqlstate", None) or ""
    found = permanent(action, text, privilege=state == "42501")
    if found is not None:
        return found
    first = text.splitlines()[0] if text else type(exc).__name__
    if state in ("22021", "22P05"):  # one value, in a database that is not UTF-8: that row is set aside
        return BadSourceValues(f"{action}: {first} (a text value this database holds in another encoding has no"
                               " UTF-8 form)")
    if state == "42703":  # a column the chunk reads was dropped or renamed while the run went on
        return SourceChanged(changed(action, first))
    if state == "57014":
        return SourceUnavailable(f"{action}: statement timed out (PG_STATEMENT_TIMEOUT)")
    if isinstance(exc, adbc_driver_manager.OperationalError) or state.startswith(("08", "57P")) \
            or "Failed to connect" in text or "server closed the connection" in text:
        return SourceUnavailable(f"{action}: {first}")
    return SourceError(f"{action}: {first}")
