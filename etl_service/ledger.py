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
from psycopg2.extras import Json

from etl_service.config import JobConfig
from etl_service.errors import ConfigError, SourceError
from etl_service.keys import Key
from etl_service.source import RANGE_JOIN, Connection, SourceShape, generation, pg_errors, qualified, row_bytes

# Unfinished batches of other job names on this job's source and flag (or of unknown source:
# recorded before batches named it): a renamed or removed job's, to adopt or release.
# Parameters: job, source, flag.
# A batch's source is this job's table if it names it, or if it was claimed from the same table
# under another name (renamed since: the table's oid stays).
_SAME_SOURCE = "(b.source = %(source)s OR b.source_oid = to_regclass(%(quoted)s)::oid)"
_FOREIGN = (" WHERE b.state <> 'done' AND b.job <> %(job)s"
            " AND (b.source IS NULL OR (" + _SAME_SOURCE + " AND b.flag = %(flag)s))")
# Unfinished batches of any other job on this job's source, whatever its flag: their keys are
# never claimed meanwhile. Another consumer's marking rewrites the row (a new xmin), so two
# batches holding one key at once would each see the other's mark as an update and load it again.
_HELD = " WHERE b.state <> 'done' AND b.job <> %(job)s AND (b.source IS NULL OR " + _SAME_SOURCE + ")"

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
-- The source column types each job's target was last brought in step with: a type that differs
-- from it is a change at the source (one that matches is the operator's choice, left alone).
CREATE TABLE IF NOT EXISTS {schema}.target_shapes (
    job        text        NOT NULL,
    target     text        NOT NULL,
    columns    jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, target)
);
"""


_BATCH_COLUMNS = ("batch_id, state, row_count, chunk_size, chunks_loaded, rows_loaded, claimed_at, split,"
                  " keys[cardinality(keys)], coalesce(origin, job), generation, key_columns, chunk_ends")


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
    origin: str = ""  # the job name that claimed it: part of every insert token
    generation: str | None = None  # the source's storage when claimed (source.GENERATION)
    key_columns: tuple[str, ...] | None = None  # the key's columns, in the order of its stored keys
    chunk_ends: tuple[int, ...] | None = None  # each chunk's last position; None: every chunk_size rows

    @property
    def chunk_count(self) -> int:
        if self.chunk_ends:
            return len(self.chunk_ends)
        return -(-self.row_count // self.chunk_size)

    def range_token(self, first: int, last: int) -> str:
        """The insert_deduplication_token of key positions [first, last]: the same on every retry.

        claimed_at makes it unique even if the ledger is recreated and batch ids restart; the
        claiming job's name stays in it when another job adopts the batch.
        """
        return f"etl-service/{self.origin}/{self.batch_id}/{self.claimed_at.timestamp():.6f}/{first}-{last}"

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """1-based inclusive positions of chunk `index` in the batch's key array."""
        if self.chunk_ends:
            return (self.chunk_ends[index - 1] + 1 if index else 1), self.chunk_ends[index]
        first = index * self.chunk_size + 1
        return first, min(self.row_count, first + self.chunk_size - 1)


def _batch(row: tuple[Any, ...]) -> Batch:
    """A Batch from a row of the _BATCH_COLUMNS select list."""
    batch_id, state, row_count, chunk_size, chunks_loaded, rows_loaded, claimed_at, split, last_key, origin, gen, \
        key_columns, chunk_ends = row
    return Batch(batch_id, state, row_count, chunk_size, chunks_loaded, rows_loaded, claimed_at, tuple(split),
                 last_key, origin, gen, tuple(key_columns) if key_columns else None,
                 tuple(chunk_ends) if chunk_ends else None)


@dataclass(frozen=True)
class Health:
    """How far behind a job is, for metrics and `status`."""

    backlog: int  # unprocessed source rows
    lag_seconds: float  # age of the oldest unprocessed row (see Ledger.health); 0 without a backlog
    waiting: int  # batches loaded but not marked (waiting for readiness)
    quarantined: int
    last_success: datetime | None  # when a run last ended ok or idle


@dataclass(frozen=True)
class ForeignBatch:
    """An unfinished batch of another job name that holds keys of this job's source."""

    batch_id: int
    job: str
    state: str
    row_count: int
    chunks_loaded: int
    claimed_at: datetime
    source: str | None  # None: recorded before batches named their source
    flag: str | None = None  # the processed column it consumes


class Ledger:
    """Ledger operations for one job on one connection (which also holds the job's lock)."""

    def __init__(self, conn: Connection, schema: str, job: JobConfig) -> None:
        self.conn = conn
        self.schema = sql.Identifier(schema)
        self.job = job
        self.source = ".".join(job.source_table)

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
            " OR (attrelid = to_regclass(%(b)s) AND attname = 'source_oid')"
            " OR (attrelid = to_regclass(%(b)s) AND attname = 'chunk_ends')"
            " OR (attrelid = to_regclass(%(t)s) AND attname = 'columns')"
            " OR (attrelid = to_regclass(%(qb)s) AND attname = 'batch_id')"
            " OR (attrelid = to_regclass(%(r)s) AND attname = 'message'))"),
            {"b": f"{self._quoted()}.batches", "q": f"{self._quoted()}.quarantine", "r": f"{self._quoted()}.runs",
             "t": f"{self._quoted()}.target_shapes", "qb": f"{self._quoted()}.quarantine_batch"})
        if present[0][0] < 7:
            self._run("create ledger schema", sql.SQL(SCHEMA_SQL).format(schema=self.schema))
            # Batches recorded before batches named their source: this job's own are on its source.
            self._run("record the source of older batches", sql.SQL(
                "UPDATE {s}.batches SET source = %(source)s, flag = %(flag)s, origin = coalesce(origin, job)"
                " WHERE job = %(job)s AND source IS NULL AND state <> 'done'").format(s=self.schema),
                self._names())

    def _names(self) -> dict[str, str]:
        return {"job": self.job.name, "source": self.source, "flag": self.job.processed_column,
                "quoted": self._quoted_source()}

    def _quoted(self) -> str:
        return self.schema.as_string(self.conn)

    def try_lock(self) -> bool:
        """Take the source's session-level advisory lock if free; held until `unlock` or disconnect.

        The lock is on the source table (the root of its partition tree), not the job name or the
        ledger: a renamed job, a second consumer with its own flag, a job on one of its partitions,
        or a second daemon with another configuration never runs beside this one.
        """
        rows = self._run("take job lock", sql.SQL("SELECT pg_try_advisory_lock({})").format(self._lock_key()),
                         {"src": self._quoted_source()})
        return bool(rows[0][0])

    def unlock(self) -> None:
        self._run("release job lock", sql.SQL("SELECT pg_advisory_unlock({})").format(self._lock_key()),
                  {"src": self._quoted_source()})

    def lock_holder(self) -> str:
        """Who holds the job's lock, for the 'skipped' log line."""
        rows = self._run("find lock holder", sql.SQL(
            "SELECT a.application_name, a.pid, a.backend_start FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = {}").format(self._lock_key()),
            {"src": self._quoted_source()})
        if not rows:
            return "another runner (gone now)"
        app, pid, since = rows[0]
        return f"{app or 'unknown application'} (backend pid {pid}, connected since {since:%Y-%m-%d %H:%M:%S})"

    def lock(self, wait_seconds: float) -> None:
        """Wait up to `wait_seconds` for the source's lock (for commands that change batches)."""
        with pg_errors("wait for the job's lock (is a run in progress?)", self.conn), self.conn.cursor() as cur:
            cur.execute("SET lock_timeout = %s", (f"{int(wait_seconds * 1000)}ms",))
            cur.execute(sql.SQL("SELECT pg_advisory_lock({})").format(self._lock_key()), {"src": self._quoted_source()})
            cur.execute("RESET lock_timeout")
            self.conn.commit()

    @staticmethod
    def _lock_key() -> sql.Composable:
        # A missing table (the run then says so) locks on its name.
        return sql.SQL("hashtextextended('etl-service:' || coalesce(coalesce(pg_partition_root(to_regclass(%(src)s)),"
                       " to_regclass(%(src)s))::oid::text, %(src)s), 0)")

    def _quoted_source(self) -> str:
        return qualified(self.job).as_string(self.conn)

    def unfinished(self) -> list[Batch]:
        """Batches of this job that are claimed or loaded, oldest first."""
        rows = self._run("read unfinished batches", sql.SQL(
            "SELECT " + _BATCH_COLUMNS + " FROM {s}.batches b WHERE job = %(job)s AND state <> 'done'"
            " AND (source IS NULL OR (" + _SAME_SOURCE + " AND flag = %(flag)s))"  # a reused name: another table's
            " ORDER BY batch_id").format(s=self.schema), self._names())
        return [_batch(row) for row in rows]

    def claim(self, shape: SourceShape, after: str | None = None, skip_foreign: bool = False) -> Batch | None:
        """Record the next batch of unprocessed keys (with their xmin), above `after` if given.

        None when there are none. Keys come in key order, so a run can claim the next batch
        past one that is still being marked. Rows with a NULL in the key are never claimed.
        `skip_foreign`: leave out keys held by other jobs' unfinished batches (see `held_elsewhere`).
        """
        key = shape.key
        above = sql.SQL(" AND {}").format(key.compare("s", ">", sql.SQL("%(after)s"))) if after is not None \
            else sql.SQL("")
        held = sql.SQL(" AND NOT EXISTS (SELECT 1 FROM held h WHERE h.key = {})").format(key.encode("s")) \
            if skip_foreign else sql.SQL("")
        order = sql.SQL(", ").join(sql.Identifier(f"o{i}") for i in range(len(key.columns)))
        query = sql.SQL(
            "WITH held AS MATERIALIZED (SELECT unnest(b.keys) AS key FROM {s}.batches b" + _HELD + ")"
            " INSERT INTO {s}.batches (job, origin, source, flag, state, keys, xmins, row_count, chunk_size,"
            " generation, key_columns, source_oid, chunk_ends)"
            " SELECT %(job)s, %(job)s, %(source)s, %(flag)s, 'claimed', array_agg(n.k ORDER BY {order}),"
            " array_agg(n.x ORDER BY {order}), count(*), %(chunk)s, {generation}, %(key_columns)s,"
            " to_regclass(%(quoted)s)::oid, array_append(array_agg(n.pos - 1 ORDER BY {order}) FILTER (WHERE n.pos > 1"
            # A chunk ends after ETL_CHUNK_SIZE rows or where the running byte count crosses a
            # multiple of ETL_CHUNK_BYTES: at most that many bytes plus one row. A row starts a
            # chunk when its position or its bytes so far (without it, then with it) cross such a
            # line; the chunk before ends one position earlier, the last at the batch's end. One
            # pass in key order, no second window. Recorded now, so a resumed batch sends the same
            # chunks with the same tokens.
            " AND ((n.pos - 1) %% %(chunk)s = 0"
            " OR (n.total - n.size - 1) / %(chunk_bytes)s::bigint <> (n.total - 1) / %(chunk_bytes)s::bigint)),"
            " count(*))"
            " FROM (SELECT o.*, row_number() OVER w AS pos, sum(o.size) OVER w AS total"
            " FROM (SELECT {encoded} AS k, s.xmin AS x, {size} AS size, {ordered} FROM {src} s"
            " WHERE s.{flag} = false AND {not_null}{above}{held}"
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.job = %(job)s AND q.key = {encoded})"
            " ORDER BY {row} LIMIT %(limit)s) o WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)) n"
            " HAVING count(*) > 0"
            " RETURNING " + _BATCH_COLUMNS
        ).format(s=self.schema, src=qualified(self.job), flag=sql.Identifier(self.job.processed_column),
                 encoded=key.encode("s"), row=key.row("s"), order=order, not_null=key.not_null("s"),
                 ordered=sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.Identifier("s", c), sql.Identifier(f"o{i}"))
                                            for i, c in enumerate(key.names)),
                 above=above, held=held, generation=generation(qualified(self.job).as_string(self.conn)),
                 size=row_bytes(shape))
        rows = self._run("claim batch", query, {**self._names(), "chunk": self.job.chunk_size, "after": after,
                                                "chunk_bytes": self.job.chunk_bytes,
                                                "limit": self.job.batch_size, "key_columns": list(key.names)})
        return _batch(rows[0]) if rows else None

    def held_elsewhere(self, key: Key) -> list[ForeignBatch]:
        """Other jobs' unfinished batches on this source (their keys are skipped), any flag.

        ConfigError if one was claimed with another key: its keys could not be compared with ours.
        """
        rows = self._run("look for other jobs' batches on this source", sql.SQL(
            "SELECT b.batch_id, b.job, b.state, b.row_count, b.chunks_loaded, b.claimed_at, b.source, b.flag,"
            " b.key_columns FROM {s}.batches b" + _HELD + " ORDER BY b.batch_id").format(s=self.schema),
            self._names())
        for row in rows:
            if row[8] and set(row[8]) != set(key.names):
                raise ConfigError("ETL_SOURCE_KEY", f"job {row[1]!r} consumes {self.source} with the key"
                                  f" ({', '.join(row[8])}) and this job with {key.label}: unfinished batches of one"
                                  " table can only be kept apart with one key", "give every job on a table the same"
                                  " ETL_SOURCE_KEY")
        return [ForeignBatch(*row[:8]) for row in rows]

    def foreign(self) -> list[ForeignBatch]:
        """Unfinished batches of other job names that hold keys of this job's source (renamed or removed jobs)."""
        rows = self._run("look for other jobs' batches on this source", sql.SQL(
            "SELECT b.batch_id, b.job, b.state, b.row_count, b.chunks_loaded, b.claimed_at, b.source, b.flag"
            " FROM {s}.batches b" + _FOREIGN + " ORDER BY b.batch_id").format(s=self.schema), self._names())
        return [ForeignBatch(*row) for row in rows]

    def adopt(self, batch_id: int) -> ForeignBatch:
        """Make another job name's unfinished batch on this source this job's; it resumes at the next run.

        Its insert tokens keep the claiming job's name, so chunks already in ClickHouse are not
        loaded again; its quarantined rows move along, so they are not marked processed.
        """
        batch = self._foreign_one(batch_id)
        params = {**self._names(), "batch": batch_id, "old": batch.job}
        self._run("adopt batch", sql.SQL(
            "UPDATE {s}.batches SET job = %(job)s, origin = coalesce(origin, job), source = %(source)s,"
            " flag = %(flag)s WHERE batch_id = %(batch)s AND state <> 'done';"
            # A key this job has quarantined already (from an older batch) takes the adopted
            # batch's entry: the row's latest failure, in the batch that holds it now.
            " UPDATE {s}.quarantine o SET batch_id = q.batch_id, reason = q.reason, row = q.row,"
            " quarantined_at = q.quarantined_at FROM {s}.quarantine q WHERE q.job = %(old)s"
            " AND q.batch_id = %(batch)s AND o.job = %(job)s AND o.key = q.key;"
            " DELETE FROM {s}.quarantine q WHERE q.job = %(old)s AND q.batch_id = %(batch)s"
            " AND EXISTS (SELECT 1 FROM {s}.quarantine o WHERE o.job = %(job)s AND o.key = q.key);"
            " UPDATE {s}.quarantine q SET job = %(job)s WHERE q.job = %(old)s AND q.batch_id = %(batch)s"
        ).format(s=self.schema), params)
        return batch

    def release(self, batch_id: int, key: Key) -> ForeignBatch:
        """Forget another job's unfinished batch on this source (any flag): its keys can be claimed again."""
        batch = next((b for b in self.held_elsewhere(key) if b.batch_id == batch_id), None) or \
            self._foreign_one(batch_id)
        self._run("release batch", sql.SQL("DELETE FROM {s}.batches WHERE batch_id = %s AND state <> 'done'")
                  .format(s=self.schema), (batch_id,))
        return batch

    def _foreign_one(self, batch_id: int) -> ForeignBatch:
        for batch in self.foreign():
            if batch.batch_id == batch_id:
                return batch
        raise LookupError(f"batch {batch_id} is not an unfinished batch of another job on {self.source}"
                          f" (flag {self.job.processed_column}); `status` lists those")

    def record_chunk(self, batch: Batch, chunks_loaded: int, rows: int) -> None:
        """Remember that chunks [0, chunks_loaded) are in ClickHouse."""
        self._run("record chunk", sql.SQL(
            "UPDATE {s}.batches SET chunks_loaded = %s, rows_loaded = rows_loaded + %s"
            " WHERE batch_id = %s").format(s=self.schema), (chunks_loaded, rows, batch.batch_id))

    def reload(self, batch: Batch) -> None:
        """Send a loaded batch again from its first chunk (ClickHouse lost all of it)."""
        self._run("reset batch for reloading", sql.SQL(
            "UPDATE {s}.batches SET state = 'claimed', chunks_loaded = 0, rows_loaded = 0, loaded_at = NULL"
            " WHERE batch_id = %s AND state <> 'done'").format(s=self.schema), (batch.batch_id,))

    def set_loaded(self, batch: Batch) -> None:
        self._run("record batch loaded", sql.SQL(
            "UPDATE {s}.batches SET state = 'loaded', loaded_at = now() WHERE batch_id = %s"
            " AND state = 'claimed'").format(s=self.schema), (batch.batch_id,))

    def mark_done(self, batch: Batch, shape: SourceShape, before_commit: Callable[[], None]) -> tuple[int, int]:
        """In one transaction: flag exactly the claimed, unchanged, unquarantined rows; close the batch.

        Returns (rows marked, rows of the batch in quarantine: by this run or an earlier attempt).
        """
        key = shape.key
        # With an index of the unprocessed rows on the key, the batch's key range is one ordered
        # pass over it, joined with the claimed keys (a third less work than a probe per key).
        span = sql.SQL(" AND s.{flag} = false AND {lo} AND {hi}").format(
            flag=sql.Identifier(self.job.processed_column),
            lo=key.compare("s", ">=", sql.SQL("(SELECT keys[1] FROM {}.batches WHERE batch_id = %(batch)s)")
                           .format(self.schema)),
            hi=key.compare("s", "<=", sql.SQL("(SELECT keys[cardinality(keys)] FROM {}.batches"
                                              " WHERE batch_id = %(batch)s)").format(self.schema)),
        ) if shape.range_join else sql.SQL("")
        mark = sql.SQL(
            "UPDATE {src} AS s SET {flag} = true FROM {s}.batches b"
            " CROSS JOIN LATERAL unnest(b.keys, b.xmins) AS k(key, x)"
            " WHERE b.batch_id = %(batch)s AND {matches} AND s.xmin = k.x{span}"
            # rows quarantined in this batch, under whichever job name: never loaded, never marked
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.batch_id = b.batch_id AND q.key = k.key)")
        close = sql.SQL(
            "UPDATE {s}.batches SET state = 'done', done_at = now(), rows_marked = %s,"
            " keys = '{{}}', xmins = '{{}}' WHERE batch_id = %s AND state = 'loaded'").format(s=self.schema)
        with pg_errors(f"mark batch {batch.batch_id} done", self.conn), self.conn.cursor() as cur:
            if shape.range_join:
                cur.execute(RANGE_JOIN)
            cur.execute(mark.format(src=qualified(self.job), flag=sql.Identifier(self.job.processed_column),
                                    s=self.schema, matches=key.matches("s", sql.SQL("k.key")),
                                    span=span),
                        {"batch": batch.batch_id, "job": self.job.name})
            marked = cur.rowcount
            cur.execute(close, (marked, batch.batch_id))
            cur.execute(sql.SQL("SELECT count(*) FROM {s}.quarantine WHERE batch_id = %s").format(s=self.schema),
                        (batch.batch_id,))
            quarantined = cur.fetchone()[0]  # type: ignore[index]
            before_commit()
            self.conn.commit()
        return int(marked), int(quarantined)

    def record_split(self, batch: Batch, first: int, last: int) -> None:
        """Remember that key positions [first, last] are loaded as two halves from now on."""
        self._run("record split", sql.SQL(
            "UPDATE {s}.batches SET split = array_append(split, %(r)s) WHERE batch_id = %(b)s"
            " AND NOT %(r)s = ANY(split)").format(s=self.schema), {"r": f"{first}-{last}", "b": batch.batch_id})

    def quarantine(self, batch: Batch, shape: SourceShape, position: int, reason: str) -> tuple[str, bool] | None:
        """Set aside the row at `position` of the batch with its reason.

        Returns (its key, whether it is newly quarantined: not by an earlier attempt), or None if
        the row is gone.
        """
        rows = self._run("quarantine row", sql.SQL(
            "INSERT INTO {s}.quarantine (job, key, batch_id, reason, row)"
            " SELECT %(job)s, b.keys[%(pos)s], b.batch_id, %(reason)s, to_jsonb(s) FROM {s}.batches b"
            " JOIN {src} s ON {matches} WHERE b.batch_id = %(batch)s"
            " ON CONFLICT (job, key) DO UPDATE SET batch_id = EXCLUDED.batch_id, reason = EXCLUDED.reason,"
            " row = EXCLUDED.row, quarantined_at = now() RETURNING key, xmax = 0"
        ).format(s=self.schema, src=qualified(self.job), matches=shape.key.matches("s", sql.SQL("b.keys[%(pos)s]"))),
            {"job": self.job.name, "pos": position, "reason": reason[:2000], "batch": batch.batch_id})
        return (str(rows[0][0]), bool(rows[0][1])) if rows else None

    def has_quarantine(self, batch: Batch) -> bool:
        """Whether rows of `batch` are quarantined (by an earlier attempt at it)."""
        return bool(self._run("look for the batch's quarantined rows", sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {s}.quarantine WHERE batch_id = %s)").format(s=self.schema),
            (batch.batch_id,))[0][0])

    def unquarantine(self, batch: Batch, first: int, last: int) -> None:
        """Forget the quarantine of key positions [first, last] of `batch`: they have just been loaded.

        An earlier attempt quarantined them (the transform then raised, say); loaded now, they
        must be marked with the batch, not left quarantined for a `requeue` to load them twice.
        """
        self._run("clear the quarantine of loaded rows", sql.SQL(
            "DELETE FROM {s}.quarantine q USING {s}.batches b WHERE b.batch_id = %(batch)s"
            " AND q.batch_id = b.batch_id AND q.key = ANY(b.keys[%(first)s:%(last)s])").format(s=self.schema),
            {"batch": batch.batch_id, "first": first, "last": last})

    def release_keys(self, batch_id: int, keys: list[str], chunks_loaded: int) -> None:
        """Undo the quarantine of `keys` of a batch (a failure that was not the rows').

        An unfinished batch goes back to `chunks_loaded` in the same transaction, so those chunks
        (which inserted nothing) are loaded again. A done batch was marked without these rows:
        released, they are unprocessed rows like any other.
        """
        self._run("release quarantined rows", sql.SQL(
            "DELETE FROM {s}.quarantine WHERE batch_id = %(batch)s AND key = ANY(%(keys)s);"
            " UPDATE {s}.batches SET chunks_loaded = %(chunks)s"
            " WHERE batch_id = %(batch)s AND state <> 'done' AND chunks_loaded > %(chunks)s"
        ).format(s=self.schema), {"batch": batch_id, "keys": keys, "chunks": chunks_loaded})

    def requeue(self, key: Key, keys: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
        """Release quarantined rows (all of the job's, or `keys`) so the next run claims them again.

        A row whose batch is unfinished stays quarantined: that batch is marked without it, and
        releasing it first would let the mark flag a row that never reached ClickHouse.
        Returns (released keys, asked-for keys that were not quarantined, keys held by an
        unfinished batch, each as "key (batch N, state)").
        """
        wanted = [self._canonical(key, k) for k in keys] if keys else None
        where = sql.SQL(" AND q.key = ANY(%(keys)s)") if wanted is not None else sql.SQL("")
        params = {"job": self.job.name, "keys": wanted}
        rows = self._run("requeue quarantined rows", sql.SQL(
            "DELETE FROM {s}.quarantine q WHERE q.job = %(job)s{where} AND NOT EXISTS (SELECT 1 FROM {s}.batches b"
            " WHERE b.batch_id = q.batch_id AND b.state <> 'done') RETURNING q.key").format(s=self.schema,
                                                                                           where=where), params)
        held = self._run("look for quarantined rows of unfinished batches", sql.SQL(
            "SELECT q.key, b.batch_id, b.state FROM {s}.quarantine q JOIN {s}.batches b ON b.batch_id = q.batch_id"
            " WHERE q.job = %(job)s{where} AND b.state <> 'done' ORDER BY b.batch_id, q.key").format(
                s=self.schema, where=where), params)
        released = sorted(str(r[0]) for r in rows)
        waiting = {str(r[0]) for r in held}
        unknown = [k for k, c in zip(keys or [], wanted or [], strict=True) if c not in released and c not in waiting]
        return released, unknown, [f"{r[0]} (batch {r[1]}, {r[2]})" for r in held]

    def _canonical(self, key: Key, text: str) -> str:
        """`text` as the ledger stores this key (`007` -> `7`); SourceError if it is not one."""
        try:
            query = sql.SQL("SELECT {}").format(key.canonical(sql.SQL("%(k)s")))
            rows = self._run(f"read key {text!r}", query, {"k": text})
        except SourceError as exc:
            example = "42" if len(key.columns) == 1 else "[7, 42]"
            raise SourceError(f"{text!r} is not a key of {self.source} ({key.label}; e.g. {example}): {exc}") from None
        return str(rows[0][0])

    def aligned_shape(self, target: str) -> dict[str, str] | None:
        """Source column -> type the target was last brought in step with (None: never recorded)."""
        rows = self._run("read the target's recorded shape", sql.SQL(
            "SELECT columns FROM {s}.target_shapes WHERE job = %s AND target = %s").format(s=self.schema),
            (self.job.name, target))
        return dict(rows[0][0]) if rows else None

    def record_shape(self, target: str, columns: dict[str, str]) -> None:
        self._run("record the target's shape", sql.SQL(
            "INSERT INTO {s}.target_shapes (job, target, columns) VALUES (%s, %s, %s)"
            " ON CONFLICT (job, target) DO UPDATE SET columns = EXCLUDED.columns, updated_at = now()").format(
            s=self.schema), (self.job.name, target, Json(columns)))

    def null_keys(self, key: Key) -> int:
        """Unprocessed rows that cannot be moved because their key has a NULL part."""
        if not any(c.nullable for c in key.columns):
            return 0
        rows = self._run("count rows with a NULL key", sql.SQL(
            "SELECT count(*) FROM {src} s WHERE s.{flag} = false AND ({nulls})").format(
            src=qualified(self.job), flag=sql.Identifier(self.job.processed_column), nulls=key.has_null("s")))
        return int(rows[0][0])

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

    def health(self) -> Health:
        """Backlog, lag, waiting batches, quarantine and last success, in one statement.

        Lag is the age of the oldest unprocessed row: exact with ETL_LAG_COLUMN; otherwise the age
        of the oldest unfinished batch, else the time since a run last ended with nothing left to
        claim (idle, or ok without a message: not stopped by its time budget; every row waiting
        now arrived after it), else since the job's first run.
        """
        src, flag = qualified(self.job), sql.Identifier(self.job.processed_column)
        oldest = sql.SQL(
            "coalesce((SELECT min(claimed_at) FROM {s}.batches WHERE job = %(job)s AND state <> 'done'),"
            " (SELECT max(finished_at) FROM {s}.runs WHERE job = %(job)s AND status IN ('idle', 'ok')"
            " AND coalesce(message, '') = ''),"
            " (SELECT min(started_at) FROM {s}.runs WHERE job = %(job)s))").format(s=self.schema)
        if self.job.lag_column:  # rows whose lag column is NULL: the estimate above, not a lag of 0
            oldest = sql.SQL("coalesce((SELECT min(s.{col})::timestamptz FROM {src} s WHERE s.{flag} = false),"
                             " {estimate})").format(col=sql.Identifier(self.job.lag_column), src=src, flag=flag,
                                                    estimate=oldest)
        rows = self._run("read the job's health", sql.SQL(
            "WITH b AS (SELECT count(*) AS n FROM {src} WHERE {flag} = false)"
            " SELECT b.n, CASE WHEN b.n = 0 THEN 0 ELSE"
            " coalesce(extract(epoch FROM now() - {oldest})::float8, 0) END,"
            " (SELECT count(*) FROM {s}.batches b WHERE job = %(job)s AND state = 'loaded'"
            " AND (source IS NULL OR " + _SAME_SOURCE + ")),"
            " (SELECT count(*) FROM {s}.quarantine WHERE job = %(job)s),"
            " (SELECT max(finished_at) FROM {s}.runs WHERE job = %(job)s AND status IN ('ok', 'idle'))"
            " FROM b").format(src=src, flag=flag, oldest=oldest, s=self.schema), self._names())
        backlog, lag, waiting, quarantined, last_success = rows[0]
        return Health(int(backlog), max(0.0, float(lag)), int(waiting), int(quarantined), last_success)

    def backlog(self) -> int:
        """Source rows not yet flagged processed."""
        rows = self._run("count backlog", sql.SQL("SELECT count(*) FROM {src} WHERE {flag} = false").format(
            src=qualified(self.job), flag=sql.Identifier(self.job.processed_column)))
        return int(rows[0][0])

    def to_move(self, key: Key) -> int:
        """Unprocessed rows a run can take: the backlog less quarantined rows and rows with a NULL key."""
        rows = self._run("count the rows to move", sql.SQL(
            "SELECT (SELECT count(*) FROM {src} s WHERE s.{flag} = false AND {not_null})"
            " - (SELECT count(*) FROM {s}.quarantine WHERE job = %s)").format(
            src=qualified(self.job), flag=sql.Identifier(self.job.processed_column), not_null=key.not_null("s"),
            s=self.schema), (self.job.name,))
        return max(0, int(rows[0][0]))

    def recent_runs(self, limit: int = 5) -> list[tuple[Any, ...]]:
        return self._run("read runs", sql.SQL(
            "SELECT started_at, status, batches, rows_loaded, rows_marked, seconds, message"
            " FROM {s}.runs WHERE job = %s ORDER BY run_id DESC LIMIT %s").format(s=self.schema),
            (self.job.name, limit))
