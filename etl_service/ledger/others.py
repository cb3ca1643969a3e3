"""Other jobs' unfinished batches on this job's source: keep clear of them, adopt or release them.

A renamed or removed job leaves its unfinished batches behind, holding keys of the source; a
second consumer with its own flag holds keys while its batches are in flight. A run never claims
those keys (see `store.HELD`); `adopt` and `release` are the operator's way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2 import sql

from etl_service.errors import ConfigError, UnknownBatch
from etl_service.ledger.store import HELD, SAME_SOURCE, Store
from etl_service.postgres.keys import Key

# Unfinished batches of other job names on this job's source and flag (or of unknown source:
# recorded before batches named it): a renamed or removed job's, to adopt or release.
# Parameters: job, source, flag, quoted.
_FOREIGN = (" WHERE b.state <> 'done' AND b.job <> %(job)s"
            " AND (b.source IS NULL OR (" + SAME_SOURCE + " AND b.flag = %(flag)s))")


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


class OtherJobs:
    """Unfinished batches of other job names on the job's source."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def held_elsewhere(self, key: Key) -> list[ForeignBatch]:
        """Other jobs' unfinished batches on this source (their keys are skipped), any flag.

        ConfigError if one was claimed with another key: its keys could not be compared with ours.
        """
        rows = self.store.run("look for other jobs' batches on this source", sql.SQL(
            "SELECT b.batch_id, b.job, b.state, b.row_count, b.chunks_loaded, b.claimed_at, b.source, b.flag,"
            " b.key_columns FROM {s}.batches b" + HELD + " ORDER BY b.batch_id").format(s=self.store.schema),
            self.store.names())
        for row in rows:
            if row[8] and set(row[8]) != set(key.names):
                raise ConfigError("ETL_SOURCE_KEY", f"job {row[1]!r} consumes {self.store.source} with the key"
                                  f" ({', '.join(row[8])}) and this job with {key.label}: unfinished batches of one"
                                  " table can only be kept apart with one key", "give every job on a table the same"
                                  " ETL_SOURCE_KEY")
        return [ForeignBatch(*row[:8]) for row in rows]

    def foreign(self) -> list[ForeignBatch]:
        """Unfinished batches of other job names that hold keys of this job's source (renamed or removed jobs)."""
        rows = self.store.run("look for other jobs' batches on this source", sql.SQL(
            "SELECT b.batch_id, b.job, b.state, b.row_count, b.chunks_loaded, b.claimed_at, b.source, b.flag"
            " FROM {s}.batches b" + _FOREIGN + " ORDER BY b.batch_id").format(s=self.store.schema), self.store.names())
        return [ForeignBatch(*row) for row in rows]

    def adopt(self, batch_id: int) -> ForeignBatch:
        """Make another job name's unfinished batch on this source this job's; it resumes at the next run.

        Its insert tokens keep the claiming job's name, so chunks already in ClickHouse are not
        loaded again; its quarantined rows move along, so they are not marked processed.
        """
        batch = self._foreign_one(batch_id)
        params = {**self.store.names(), "batch": batch_id, "old": batch.job}
        self.store.run("adopt batch", sql.SQL(
            "UPDATE {s}.batches SET job = %(job)s, origin = coalesce(origin, job), source = %(source)s,"
            " flag = %(flag)s WHERE batch_id = %(batch)s AND state <> 'done';"
            # A key this job has quarantined already (from an older batch) takes the adopted
            # batch's entry: the row's latest failure, in the batch that holds it now.
            " UPDATE {s}.quarantine o SET batch_id = q.batch_id, reason = q.reason, row = q.row,"
            " quarantined_at = q.quarantined_at, kind = q.kind, row_xmin = q.row_xmin"
            " FROM {s}.quarantine q WHERE q.job = %(old)s"
            " AND q.batch_id = %(batch)s AND o.job = %(job)s AND o.key = q.key;"
            " DELETE FROM {s}.quarantine q WHERE q.job = %(old)s AND q.batch_id = %(batch)s"
            " AND EXISTS (SELECT 1 FROM {s}.quarantine o WHERE o.job = %(job)s AND o.key = q.key);"
            " UPDATE {s}.quarantine q SET job = %(job)s WHERE q.job = %(old)s AND q.batch_id = %(batch)s"
        ).format(s=self.store.schema), params)
        return batch

    def release(self, batch_id: int, key: Key) -> ForeignBatch:
        """Forget another job's unfinished batch on this source (any flag): its keys can be claimed again."""
        batch = next((b for b in self.held_elsewhere(key) if b.batch_id == batch_id), None) or \
            self._foreign_one(batch_id)
        self.store.run("release batch", sql.SQL("DELETE FROM {s}.batches WHERE batch_id = %s AND state <> 'done'")
                  .format(s=self.store.schema), (batch_id,))
        return batch

    def _foreign_one(self, batch_id: int) -> ForeignBatch:
        for batch in self.foreign():
            if batch.batch_id == batch_id:
                return batch
        raise UnknownBatch(f"batch {batch_id} is not an unfinished batch of another job on {self.store.source}"
                          f" (flag {self.store.job.processed_column}); `status` lists those")
