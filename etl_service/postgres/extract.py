"""Extraction: stream a claimed batch's rows out of PostgreSQL with COPY, parsed into Arrow by exact types.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg2 import sql

from etl_service.errors import BadSourceValues, SourceChanged
from etl_service.postgres.catalog import SourceShape, columns_changed
from etl_service.postgres.connection import Connection, first_line, pg_errors, qualified
from etl_service.postgres.versioning import VERSION_BASE, VERSION_COLUMN, XID8, version_expr
from etl_service.settings.model import JobConfig

# For a range join (see SourceShape.range_join): no probe per key, and the claimed keys sorted in
# memory (a batch's keys spill PostgreSQL's default 4MB work_mem: a sort on disk costs a third more).
RANGE_JOIN = "SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '64MB'"


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
        if columns_changed(cur, job, shape, name):
            raise SourceChanged(f"{name} changed its columns during the run: starting over with the new ones")
        if shape.range_join:  # the planner takes the claimed keys for 10 rows: one probe each, else
            cur.execute(RANGE_JOIN)
        cur.copy_expert(_chunk_query(job, shape, ledger, batch_id, first, last, timelines or []), buf)
    conn.commit()
    return parse_csv(buf.getbuffer(), shape, versioned=True)  # a view: the chunk's text is not copied again


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
        " WHERE b.batch_id = {batch}), v AS MATERIALIZED (" + VERSION_BASE + ")"
        " SELECT {exprs}, {version} FROM {src} s JOIN k ON {joined} AND s.xmin = k.x CROSS JOIN v"
        " CROSS JOIN LATERAL (SELECT " + XID8 + " AS x8) x"
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
        batch=sql.Literal(batch_id), version=version_expr(timelines),
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
        raise BadSourceValues(f"cannot convert a value to its column type: {first_line(exc)}") from exc


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
