"""The ledger's tables: created when absent, and brought forward when an older version made them.

Every change is idempotent (`IF NOT EXISTS`), taken under one transaction-level advisory lock so
two processes starting at once do not race, and skipped altogether when one catalog query finds
the newest version in place.
"""

from __future__ import annotations

from psycopg2 import sql

from etl_service.errors import ConfigError
from etl_service.ledger.store import Store
from etl_service.postgres.connection import Connection, pg_errors

SCHEMA_SQL = """
SELECT pg_advisory_xact_lock(hashtextextended('etl-service:ledger-schema', 0));
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.batches (
    batch_id      bigserial PRIMARY KEY,
    job           text        NOT NULL,
    state         text        NOT NULL CHECK (state IN ('claimed', 'loaded', 'done')),
    keys          text[]      NOT NULL,
    xmins         xid[]       NOT NULL,
    row_count     integer     NOT NULL,
    chunk_size    integer     NOT NULL,
    chunks_loaded integer     NOT NULL DEFAULT 0,
    rows_loaded   bigint      NOT NULL DEFAULT 0,
    rows_marked   bigint,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    loaded_at     timestamptz,
    done_at       timestamptz
);
CREATE INDEX IF NOT EXISTS batches_open ON {schema}.batches (job, batch_id) WHERE state <> 'done';
-- Key ranges ('first-last' positions) whose insert failed for bad rows and that were split in
-- two: a resumed batch walks the same halves, so every insert keeps its token.
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS split text[] NOT NULL DEFAULT '{{}}';
CREATE TABLE IF NOT EXISTS {schema}.quarantine (
    job            text        NOT NULL,
    key            text        NOT NULL,
    batch_id       bigint      NOT NULL,
    reason         text        NOT NULL,
    row            jsonb,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, key)
);
CREATE TABLE IF NOT EXISTS {schema}.runs (
    run_id      bigserial PRIMARY KEY,
    job         text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    status      text        NOT NULL,
    batches     integer     NOT NULL,
    rows_loaded bigint      NOT NULL,
    rows_marked bigint      NOT NULL,
    seconds     double precision NOT NULL,
    message     text
);
CREATE INDEX IF NOT EXISTS runs_job ON {schema}.runs (job, run_id);
-- Which source table and flag a batch consumes, and the job name that claimed it (its insert
-- tokens keep that name when another job adopts the batch).
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS source text,
    ADD COLUMN IF NOT EXISTS flag text, ADD COLUMN IF NOT EXISTS origin text;
CREATE INDEX IF NOT EXISTS batches_open_source ON {schema}.batches (source, flag) WHERE state <> 'done';
-- The source's storage at claim time: when a rewrite changed it, xmins no longer tell changes.
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS generation text;
-- The key's columns, in the order its stored keys list them.
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS key_columns text[];
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS source_oid oid;
-- Where each chunk ends (positions), fixed at claim time: chunks end by rows and by bytes.
ALTER TABLE {schema}.batches ADD COLUMN IF NOT EXISTS chunk_ends integer[];
-- A batch's quarantined rows, whichever job name set them aside: its mark leaves them alone.
CREATE INDEX IF NOT EXISTS quarantine_batch ON {schema}.quarantine (batch_id);
-- What a quarantined row is: 'failed' (never loaded: it stays unprocessed and a requeue loads it),
-- or loaded but not marked: 'unmarked' (PostgreSQL refused its mark), 'reset' (something set the
-- flag back in the mark's transaction), 'refused' (the mark did not reach it); with its xmin then:
-- a requeue marks such a row (if it has not changed since), it never loads it again.
ALTER TABLE {schema}.quarantine ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'failed',
    ADD COLUMN IF NOT EXISTS row_xmin xid;
-- The source column types each job's target was last brought in step with: a type that differs
-- from it is a change at the source (one that matches is the operator's choice, left alone).
-- Batch ids ClickHouse held beyond the ledger's highest when found (the ledger lost history):
-- until a run has claimed every unprocessed row, rows ClickHouse holds there are not loaded again.
CREATE TABLE IF NOT EXISTS {schema}.reconcile (
    job       text        NOT NULL,
    target    text        NOT NULL,
    above     bigint      NOT NULL,
    upto      bigint      NOT NULL,
    rows_held bigint      NOT NULL,
    matched   bigint      NOT NULL DEFAULT 0,
    since     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, target)
);
-- The PostgreSQL timelines seen, each with a transaction id no lower than its first (ledger.timelines).
CREATE TABLE IF NOT EXISTS {schema}.timelines (
    timeline  integer     PRIMARY KEY,
    first_xid bigint      NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
-- What started each run (start, schedule, wake-up, catch-up, once), the notifications gathered
-- into it, and the longest commit-to-mark of a row it marked (ETL_LAG_COLUMN), in seconds.
ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS cause text, ADD COLUMN IF NOT EXISTS wakeups integer,
    ADD COLUMN IF NOT EXISTS latency double precision;
CREATE TABLE IF NOT EXISTS {schema}.target_shapes (
    job        text        NOT NULL,
    target     text        NOT NULL,
    columns    jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, target)
);
-- Each target column's source column by number (pg_attribute.attnum), whatever its name: a column
-- renamed at the source is renamed in the target.
ALTER TABLE {schema}.target_shapes ADD COLUMN IF NOT EXISTS numbers jsonb;
-- What the last column change at the source did to the target and its rows (for status), and when.
ALTER TABLE {schema}.target_shapes ADD COLUMN IF NOT EXISTS last_change text,
    ADD COLUMN IF NOT EXISTS changed_at timestamptz;
"""


# Columns (and their types) every version of each ledger table has had: a table of that name
# without them, or a view, is not ours.
_OURS = {
    "batches": {"batch_id": "bigint", "job": "text", "state": "text", "keys": "text[]", "xmins": "xid[]",
                "row_count": "integer", "chunk_size": "integer", "chunks_loaded": "integer"},
    "quarantine": {"job": "text", "key": "text", "batch_id": "bigint", "reason": "text"},
    "runs": {"run_id": "bigint", "job": "text", "started_at": "timestamp with time zone", "status": "text",
             "rows_marked": "bigint"},
    "target_shapes": {"job": "text", "target": "text", "columns": "jsonb"},
    "reconcile": {"job": "text", "target": "text", "above": "bigint", "upto": "bigint"},
    "timelines": {"timeline": "integer", "first_xid": "bigint"},
}
_NOT_OURS = """
SELECT c.name, c.col, c.type, rel.relkind::text, format_type(a.atttypid, a.atttypmod)
FROM unnest(%(tables)s::text[], %(columns)s::text[], %(types)s::text[]) WITH ORDINALITY AS c(name, col, type, n)
JOIN pg_class rel ON rel.oid = to_regclass(format('%%I.%%I', %(schema)s::text, c.name))
LEFT JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attname = c.col AND NOT a.attisdropped
WHERE rel.relkind <> 'r' OR a.attname IS NULL OR format_type(a.atttypid, a.atttypmod) <> c.type
ORDER BY c.n LIMIT 1
"""


def check_not_foreign(conn: Connection, schema_name: str) -> None:
    """ConfigError naming ETL_LEDGER_SCHEMA when a relation there has a ledger table's name but is not one."""
    found_in = [(table, column, kind) for table, columns in _OURS.items() for column, kind in columns.items()]
    with pg_errors("look for the ledger", conn), conn.cursor() as cur:
        cur.execute(_NOT_OURS, {"tables": [t for t, _, _ in found_in], "columns": [c for _, c, _ in found_in],
                                "types": [k for _, _, k in found_in], "schema": schema_name})
        found = cur.fetchone()
    conn.rollback()
    if found:
        table, column, wanted, relkind, actual = found
        why = ("it is not a table" if relkind != "r" else f"it has no column {column}" if actual is None
               else f"its column {column} is {actual}, not {wanted}")
        raise ConfigError("ETL_LEDGER_SCHEMA", f"{schema_name}.{table} exists but is not the service's ledger"
                          f" table ({why})", "point ETL_LEDGER_SCHEMA at a schema of its own"
                          " (the service creates it), or move that relation elsewhere")


def ensure(store: Store) -> None:
    """Create the ledger schema and tables if absent (idempotent).

    Checked with one catalog query first: the DDL takes locks that a run with nothing to do
    should not take, and a run usually finds everything in place.
    """
    quoted = store.quoted()
    present = store.run("look for the ledger", sql.SQL(
        "SELECT count(*) FROM pg_attribute WHERE NOT attisdropped AND attnum > 0"
        " AND ((attrelid = to_regclass(%(b)s) AND attname = 'split')"
        " OR (attrelid = to_regclass(%(q)s) AND attname = 'row')"
        " OR (attrelid = to_regclass(%(b)s) AND attname = 'source_oid')"
        " OR (attrelid = to_regclass(%(b)s) AND attname = 'chunk_ends')"
        " OR (attrelid = to_regclass(%(t)s) AND attname = 'columns')"
        " OR (attrelid = to_regclass(%(qb)s) AND attname = 'batch_id')"
        " OR (attrelid = to_regclass(%(q)s) AND attname = 'kind')"
        " OR (attrelid = to_regclass(%(r)s) AND attname = 'message')"
        " OR (attrelid = to_regclass(%(rc)s) AND attname = 'matched')"
        " OR (attrelid = to_regclass(%(tl)s) AND attname = 'first_xid')"
        " OR (attrelid = to_regclass(%(r)s) AND attname = 'latency')"
        " OR (attrelid = to_regclass(%(t)s) AND attname = 'numbers')"
        " OR (attrelid = to_regclass(%(t)s) AND attname = 'changed_at'))"),
        {"b": f"{quoted}.batches", "q": f"{quoted}.quarantine", "r": f"{quoted}.runs",
         "t": f"{quoted}.target_shapes", "qb": f"{quoted}.quarantine_batch", "rc": f"{quoted}.reconcile",
         "tl": f"{quoted}.timelines"})
    if present[0][0] < 13:
        check_not_foreign(store.conn, store.schema.string)
        store.run("create ledger schema", sql.SQL(SCHEMA_SQL).format(schema=store.schema))
        # Batches recorded before batches named their source: this job's own are on its source.
        store.run("record the source of older batches", sql.SQL(
            "UPDATE {s}.batches SET source = %(source)s, flag = %(flag)s, origin = coalesce(origin, job)"
            " WHERE job = %(job)s AND source IS NULL AND state <> 'done'").format(s=store.schema),
            store.names())
