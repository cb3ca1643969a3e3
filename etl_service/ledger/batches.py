"""Batches: claim the next keys, record each chunk loaded and the batch loaded (`mark` closes it).

A batch moves claimed -> loaded -> done. Its exact keys (and each row's xmin at claim time) live
in the batch row until it is done, so a crash at any point can be resumed: re-send the chunks
not yet recorded as loaded (ClickHouse drops a repeated chunk by its token), poll readiness
again, then mark exactly those keys in one transaction with the ledger update.

**Stored keys are in key order.** `claim` stores `keys` (and `xmins` beside them) sorted by the
key's columns in the order of `key_columns`, and everything downstream relies on it:
- chunk bounds are positions in that array, fixed at claim time (`chunk_ends`), so a resumed
  batch sends the same chunks with the same insert tokens;
- the chunk query (`postgres.extract.extract_chunk`) reads positions first..last as the key range
  keys[first]..keys[last], one index range scan;
- the mark's span (`mark.Mark`) bounds the join by keys[1] and keys[cardinality(keys)];
- the drain's keyset claims past `Batch.last_key`, the batch's highest key, while its mark is
  still in flight.
A claim that stored keys in any other order would send rows twice or mark rows never sent.
When the key's column order changes between claim and mark, the batch is read with the order it
was claimed with (`key_columns`), never the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from psycopg2 import sql

from etl_service.ledger.store import ELSEWHERE, HELD, SAME_SOURCE, Store
from etl_service.postgres.catalog import SourceShape, generation
from etl_service.postgres.connection import qualified
from etl_service.postgres.widths import row_bytes

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


class Batches:
    """The job's batches: the one place that writes a batch's state."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def unfinished(self) -> list[Batch]:
        """Batches of this job that are claimed or loaded, oldest first."""
        rows = self.store.run("read unfinished batches", sql.SQL(
            "SELECT " + _BATCH_COLUMNS + " FROM {s}.batches b WHERE job = %(job)s AND state <> 'done'"
            " AND (source IS NULL OR (" + SAME_SOURCE + " AND flag = %(flag)s))"  # a reused name: another table's
            " ORDER BY batch_id").format(s=self.store.schema), self.store.names())
        return [_batch(row) for row in rows]

    def claim(self, shape: SourceShape, after: str | None = None, skip_foreign: bool = False) -> Batch | None:
        """Record the next batch of unprocessed keys (with their xmin), above `after` if given.

        None when there are none. Keys come in key order, so a run can claim the next batch
        past one that is still being marked. Rows with a NULL in the key are never claimed.
        `skip_foreign`: leave out keys held by other jobs' unfinished batches (see `OtherJobs.held_elsewhere`).
        """
        key, job, conn = shape.key, self.store.job, self.store.conn
        above = sql.SQL(" AND {}").format(key.compare("s", ">", sql.SQL("%(after)s"))) if after is not None \
            else sql.SQL("")
        held = sql.SQL(" AND NOT EXISTS (SELECT 1 FROM held h WHERE h.key = {})").format(key.encode("s")) \
            if skip_foreign else sql.SQL("")
        order = sql.SQL(", ").join(sql.Identifier(f"o{i}") for i in range(len(key.columns)))
        query = sql.SQL(
            "WITH held AS MATERIALIZED (SELECT unnest(b.keys) AS key FROM {s}.batches b" + HELD + "),"
            " aside AS MATERIALIZED (SELECT q.key FROM {s}.quarantine q WHERE " + ELSEWHERE + ")"
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
            " AND NOT EXISTS (SELECT 1 FROM aside a WHERE a.key = {encoded})"
            " ORDER BY {row} LIMIT %(limit)s) o WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)) n"
            " HAVING count(*) > 0"
            " RETURNING " + _BATCH_COLUMNS
        ).format(s=self.store.schema, src=qualified(job), flag=sql.Identifier(job.processed_column),
                 encoded=key.encode("s"), row=key.row("s"), order=order, not_null=key.not_null("s"),
                 ordered=sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.Identifier("s", c), sql.Identifier(f"o{i}"))
                                            for i, c in enumerate(key.names)),
                 above=above, held=held, generation=generation(qualified(job).as_string(conn)),
                 size=row_bytes(shape))
        rows = self.store.run("claim batch", query, {**self.store.names(), "chunk": job.chunk_size, "after": after,
                                                     "chunk_bytes": job.chunk_bytes,
                                                     "limit": job.batch_size, "key_columns": list(key.names)})
        return _batch(rows[0]) if rows else None

    def record_chunk(self, batch: Batch, chunks_loaded: int, rows: int) -> None:
        """Remember that chunks [0, chunks_loaded) are in ClickHouse."""
        self.store.run("record chunk", sql.SQL(
            "UPDATE {s}.batches SET chunks_loaded = %s, rows_loaded = rows_loaded + %s"
            " WHERE batch_id = %s").format(s=self.store.schema), (chunks_loaded, rows, batch.batch_id))

    def reload(self, batch: Batch) -> None:
        """Send a loaded batch again from its first chunk (ClickHouse lost all of it)."""
        self.store.run("reset batch for reloading", sql.SQL(
            "UPDATE {s}.batches SET state = 'claimed', chunks_loaded = 0, rows_loaded = 0, loaded_at = NULL"
            " WHERE batch_id = %s AND state <> 'done'").format(s=self.store.schema), (batch.batch_id,))

    def record_split(self, batch: Batch, first: int, last: int) -> None:
        """Remember that key positions [first, last] are loaded as two halves from now on."""
        self.store.run("record split", sql.SQL(
            "UPDATE {s}.batches SET split = array_append(split, %(r)s) WHERE batch_id = %(b)s"
            " AND NOT %(r)s = ANY(split)").format(s=self.store.schema), {"r": f"{first}-{last}", "b": batch.batch_id})

    def set_loaded(self, batch: Batch) -> None:
        self.store.run("record batch loaded", sql.SQL(
            "UPDATE {s}.batches SET state = 'loaded', loaded_at = now() WHERE batch_id = %s"
            " AND state = 'claimed'").format(s=self.store.schema), (batch.batch_id,))

    def renumber(self, batch: Batch, above: int) -> Batch:
        """Give a batch nothing has been sent of yet an id past `above` (and move the sequence there)."""
        rows = self.store.run("renumber batch", sql.SQL(
            "SELECT setval(pg_get_serial_sequence(%(table)s, 'batch_id'), greatest(%(above)s,"
            " (SELECT max(batch_id) FROM {s}.batches)));"
            " UPDATE {s}.batches SET batch_id = nextval(pg_get_serial_sequence(%(table)s, 'batch_id'))"
            " WHERE batch_id = %(batch)s AND state = 'claimed' AND chunks_loaded = 0 RETURNING batch_id"
        ).format(s=self.store.schema), {"table": f"{self.store.quoted()}.batches", "above": above,
                                        "batch": batch.batch_id})
        return replace(batch, batch_id=int(rows[0][0]))
