"""The batch ledger in PostgreSQL: claim keys, record progress, mark done, one runner per job.

A batch moves claimed -> loaded -> done. Its exact keys (and each row's xmin at claim time)
live in the batch row until it is done, so a crash at any point can be resumed: re-send the
chunks not yet recorded as loaded (ClickHouse drops a repeated chunk by its token), poll
readiness again, then mark exactly those keys in one transaction with the ledger update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2 import sql

from etl_service.config import JobConfig
from etl_service.source import Connection, SourceShape, pg_errors, qualified

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
"""


_BATCH_COLUMNS = ("batch_id, state, row_count, chunk_size, chunks_loaded, rows_loaded, claimed_at, split,"
                  " keys[cardinality(keys)]")


@dataclass(frozen=True)
class Batch:
    """One claimed batch as the ledger holds it."""

    batch_id: int
    state: str
    row_count: int
    chunk_size: int
    chunks_loaded: int
    rows_loaded: int
    claimed_at: datetime
    split: tuple[str, ...] = ()
    last_key: str | None = None

    @property
    def chunk_count(self) -> int:
        return -(-self.row_count // self.chunk_size)

    def range_token(self, job: str, first: int, last: int) -> str:
        """The insert_deduplication_token of key positions [first, last]: the same on every retry.

        claimed_at makes it unique even if the ledger is recreated and batch ids restart.
        """
        return f"etl-service/{job}/{self.batch_id}/{self.claimed_at.timestamp():.6f}/{first}-{last}"

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """1-based inclusive positions of chunk `index` in the batch's key array."""
        first = index * self.chunk_size + 1
        return first, min(self.row_count, first + self.chunk_size - 1)


def _batch(row: tuple[Any, ...]) -> Batch:
    """A Batch from a row of the _BATCH_COLUMNS select list."""
    batch_id, state, row_count, chunk_size, chunks_loaded, rows_loaded, claimed_at, split, last_key = row
    return Batch(batch_id, state, row_count, chunk_size, chunks_loaded, rows_loaded, claimed_at, tuple(split),
                 last_key)


class Ledger:
    """Ledger operations for one job on one connection (which also holds the job's lock)."""

    def __init__(self, conn: Connection, schema: str, job: JobConfig) -> None:
        self.conn = conn
        self.schema = sql.Identifier(schema)
        self.schema_name = schema
        self.job = job

    def _run(self, action: str, query: sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        """Execute in its own transaction; return the rows (if any)."""
        with pg_errors(action, self.conn), self.conn.cursor() as cur:
            cur.execute(query, params)
            rows = cur.fetchall() if cur.description else []
            self.conn.commit()
        return rows

    def ensure_schema(self) -> None:
        """Create the ledger schema and tables if absent (idempotent).

        Checked with one catalog query first: the DDL takes locks that a run with nothing to do
        should not take, and a run usually finds everything in place.
        """
        present = self._run("look for the ledger", sql.SQL(
            "SELECT count(*) FROM pg_attribute WHERE NOT attisdropped AND attnum > 0"
            " AND ((attrelid = to_regclass(%(b)s) AND attname = 'split')"
            " OR (attrelid = to_regclass(%(q)s) AND attname = 'row')"
            " OR (attrelid = to_regclass(%(r)s) AND attname = 'message'))"),
            {"b": f"{self._quoted()}.batches", "q": f"{self._quoted()}.quarantine", "r": f"{self._quoted()}.runs"})
        if present[0][0] < 3:
            self._run("create ledger schema", sql.SQL(SCHEMA_SQL).format(schema=self.schema))

    def _quoted(self) -> str:
        return self.schema.as_string(self.conn)

    def try_lock(self) -> bool:
        """Take the job's session-level advisory lock if free; held until `unlock` or disconnect."""
        rows = self._run("take job lock", sql.SQL("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"),
                         (self._lock_name(),))
        return bool(rows[0][0])

    def unlock(self) -> None:
        self._run("release job lock", sql.SQL("SELECT pg_advisory_unlock(hashtextextended(%s, 0))"),
                  (self._lock_name(),))

    def lock_holder(self) -> str:
        """Who holds the job's lock, for the 'skipped' log line."""
        rows = self._run("find lock holder", sql.SQL(
            "SELECT a.application_name, a.pid, a.backend_start FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0)"),
            (self._lock_name(),))
        if not rows:
            return "another runner (gone now)"
        app, pid, since = rows[0]
        return f"{app or 'unknown application'} (backend pid {pid}, connected since {since:%Y-%m-%d %H:%M:%S})"

    def _lock_name(self) -> str:
        return f"etl-service:{self.schema_name}:{self.job.name}"

    def unfinished(self) -> list[Batch]:
        """Batches of this job that are claimed or loaded, oldest first."""
        rows = self._run("read unfinished batches", sql.SQL(
            "SELECT " + _BATCH_COLUMNS + " FROM {s}.batches WHERE job = %s AND state <> 'done'"
            " ORDER BY batch_id").format(s=self.schema),
            (self.job.name,))
        return [_batch(row) for row in rows]

    def claim(self, shape: SourceShape, after: str | None = None) -> Batch | None:
        """Record the next batch of unprocessed keys (with their xmin), above `after` if given.

        None when there are none. Keys come in key order, so a run can claim the next batch
        past one that is still being marked.
        """
        above = sql.SQL(" AND s.{key} > %(after)s::{keytype}").format(
            key=sql.Identifier(self.job.source_key), keytype=sql.SQL(shape.key_type)) if after is not None \
            else sql.SQL("")
        query = sql.SQL(
            "INSERT INTO {s}.batches (job, state, keys, xmins, row_count, chunk_size)"
            " SELECT %(job)s, 'claimed', array_agg(p.k::text ORDER BY p.k), array_agg(p.x ORDER BY p.k),"
            " count(*), %(chunk)s"
            " FROM (SELECT s.{key} AS k, s.xmin AS x FROM {src} s WHERE s.{flag} = false{above}"
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.job = %(job)s AND q.key = s.{key}::text)"
            " ORDER BY s.{key} LIMIT %(limit)s) p HAVING count(*) > 0"
            " RETURNING " + _BATCH_COLUMNS
        ).format(s=self.schema, key=sql.Identifier(self.job.source_key), src=qualified(self.job),
                 flag=sql.Identifier(self.job.processed_column), above=above)
        rows = self._run("claim batch", query, {"job": self.job.name, "chunk": self.job.chunk_size,
                                                "limit": self.job.batch_size, "after": after})
        return _batch(rows[0]) if rows else None

    def record_chunk(self, batch: Batch, chunks_loaded: int, rows: int) -> None:
        """Remember that chunks [0, chunks_loaded) are in ClickHouse."""
        self._run("record chunk", sql.SQL(
            "UPDATE {s}.batches SET chunks_loaded = %s, rows_loaded = rows_loaded + %s"
            " WHERE batch_id = %s").format(s=self.schema), (chunks_loaded, rows, batch.batch_id))

    def set_loaded(self, batch: Batch) -> None:
        self._run("record batch loaded", sql.SQL(
            "UPDATE {s}.batches SET state = 'loaded', loaded_at = now() WHERE batch_id = %s"
            " AND state = 'claimed'").format(s=self.schema), (batch.batch_id,))

    def mark_done(self, batch: Batch, shape: SourceShape, before_commit: Callable[[], None]) -> int:
        """In one transaction: flag exactly the claimed, unchanged, unquarantined rows; close the batch."""
        mark = sql.SQL(
            "UPDATE {src} AS s SET {flag} = true FROM {s}.batches b"
            " CROSS JOIN LATERAL unnest(b.keys, b.xmins) AS k(key, x)"
            " WHERE b.batch_id = %(batch)s AND s.{key} = k.key::{keytype} AND s.xmin = k.x"
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.job = %(job)s AND q.key = k.key)"
        ).format(src=qualified(self.job), flag=sql.Identifier(self.job.processed_column), s=self.schema,
                 key=sql.Identifier(self.job.source_key), keytype=sql.SQL(shape.key_type))
        close = sql.SQL(
            "UPDATE {s}.batches SET state = 'done', done_at = now(), rows_marked = %s,"
            " keys = '{{}}', xmins = '{{}}' WHERE batch_id = %s AND state = 'loaded'").format(s=self.schema)
        with pg_errors(f"mark batch {batch.batch_id} done", self.conn), self.conn.cursor() as cur:
            cur.execute(mark, {"batch": batch.batch_id, "job": self.job.name})
            marked = cur.rowcount
            cur.execute(close, (marked, batch.batch_id))
            before_commit()
            self.conn.commit()
        return int(marked)

    def record_split(self, batch: Batch, first: int, last: int) -> None:
        """Remember that key positions [first, last] are loaded as two halves from now on."""
        self._run("record split", sql.SQL(
            "UPDATE {s}.batches SET split = array_append(split, %(r)s) WHERE batch_id = %(b)s"
            " AND NOT %(r)s = ANY(split)").format(s=self.schema), {"r": f"{first}-{last}", "b": batch.batch_id})

    def quarantine(self, batch: Batch, shape: SourceShape, position: int, reason: str) -> str | None:
        """Set aside the row at `position` of the batch with its reason; returns its key (None if gone)."""
        rows = self._run("quarantine row", sql.SQL(
            "INSERT INTO {s}.quarantine (job, key, batch_id, reason, row)"
            " SELECT %(job)s, b.keys[%(pos)s], b.batch_id, %(reason)s, to_jsonb(s) FROM {s}.batches b"
            " JOIN {src} s ON s.{key} = b.keys[%(pos)s]::{keytype} WHERE b.batch_id = %(batch)s"
            " ON CONFLICT (job, key) DO UPDATE SET batch_id = EXCLUDED.batch_id, reason = EXCLUDED.reason,"
            " row = EXCLUDED.row, quarantined_at = now() RETURNING key"
        ).format(s=self.schema, src=qualified(self.job), key=sql.Identifier(self.job.source_key),
                 keytype=sql.SQL(shape.key_type)),
            {"job": self.job.name, "pos": position, "reason": reason[:2000], "batch": batch.batch_id})
        return str(rows[0][0]) if rows else None

    def release_range(self, batch: Batch, first: int, last: int) -> None:
        """Undo the quarantine of key positions [first, last] of a batch (a failure that was not the rows')."""
        self._run("release quarantined range", sql.SQL(
            "DELETE FROM {s}.quarantine q USING {s}.batches b WHERE b.batch_id = %(batch)s"
            " AND q.job = %(job)s AND q.key = ANY(b.keys[%(first)s:%(last)s])").format(s=self.schema),
            {"batch": batch.batch_id, "job": self.job.name, "first": first, "last": last})

    def requeue(self, keys: list[str] | None = None) -> list[str]:
        """Release quarantined rows (all of the job's, or `keys`) so the next run claims them again."""
        where = sql.SQL(" AND key = ANY(%(keys)s)") if keys else sql.SQL("")
        rows = self._run("requeue quarantined rows", sql.SQL(
            "DELETE FROM {s}.quarantine WHERE job = %(job)s{where} RETURNING key").format(s=self.schema,
                                                                                         where=where),
            {"job": self.job.name, "keys": keys})
        return sorted(str(r[0]) for r in rows)

    def quarantined(self, limit: int = 5) -> tuple[int, list[tuple[Any, ...]]]:
        """How many rows of this job are quarantined, and the most recent few (key, reason, when)."""
        count = self._run("count quarantine", sql.SQL(
            "SELECT count(*) FROM {s}.quarantine WHERE job = %s").format(s=self.schema), (self.job.name,))
        recent = self._run("read quarantine", sql.SQL(
            "SELECT key, reason, quarantined_at FROM {s}.quarantine WHERE job = %s"
            " ORDER BY quarantined_at DESC LIMIT %s").format(s=self.schema), (self.job.name, limit))
        return int(count[0][0]), recent

    def record_run(self, started_at: Any, status: str, batches: int, loaded: int, marked: int,
                   seconds: float, message: str) -> None:
        self._run("record run", sql.SQL(
            "INSERT INTO {s}.runs (job, started_at, status, batches, rows_loaded, rows_marked, seconds,"
            " message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(s=self.schema),
            (self.job.name, started_at, status, batches, loaded, marked, seconds, message))

    def backlog(self) -> int:
        """Source rows not yet flagged processed."""
        rows = self._run("count backlog", sql.SQL("SELECT count(*) FROM {src} WHERE {flag} = false").format(
            src=qualified(self.job), flag=sql.Identifier(self.job.processed_column)))
        return int(rows[0][0])

    def recent_runs(self, limit: int = 5) -> list[tuple[Any, ...]]:
        return self._run("read runs", sql.SQL(
            "SELECT started_at, status, batches, rows_loaded, rows_marked, seconds, message"
            " FROM {s}.runs WHERE job = %s ORDER BY run_id DESC LIMIT %s").format(s=self.schema),
            (self.job.name, limit))
