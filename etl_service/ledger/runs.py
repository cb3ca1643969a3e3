"""Run records and the job's standing: what each run did, the backlog, its lag, what waits.

Read by `status`, `check` and the metrics; written once per run. Counting the backlog scans the
unprocessed rows, so the metrics ask for it only when an endpoint is configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2 import sql

from etl_service.ledger.store import SAME_SOURCE, Store
from etl_service.postgres.connection import qualified
from etl_service.postgres.keys import Key


@dataclass(frozen=True)
class Health:
    """How far behind a job is, for metrics and `status`."""

    backlog: int  # unprocessed source rows
    lag_seconds: float  # age of the oldest unprocessed row (see Runs.health); 0 without a backlog
    waiting: int  # batches loaded but not marked (waiting for readiness)
    quarantined: int
    last_success: datetime | None  # when a run last ended ok or idle


class Runs:
    """The job's run records and standing."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def null_keys(self, key: Key) -> int:
        """Unprocessed rows that cannot be moved because their key has a NULL part."""
        if not any(c.nullable for c in key.columns):
            return 0
        rows = self.store.run("count rows with a NULL key", sql.SQL(
            "SELECT count(*) FROM {src} s WHERE s.{flag} = false AND ({nulls})").format(
            src=qualified(self.store.job), flag=sql.Identifier(self.store.job.processed_column),
            nulls=key.has_null("s")))
        return int(rows[0][0])

    def record(self, started_at: Any, status: str, batches: int, loaded: int, marked: int, seconds: float,
               message: str, cause: str = "once", wakeups: int = 0, latency: float | None = None) -> None:
        self.store.run("record run", sql.SQL(
            "INSERT INTO {s}.runs (job, started_at, status, batches, rows_loaded, rows_marked, seconds,"
            " message, cause, wakeups, latency) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)").format(
            s=self.store.schema),
            (self.store.job.name, started_at, status, batches, loaded, marked, seconds, message, cause, wakeups,
             latency))

    def wakes(self, hours: float = 1.0) -> tuple[int, int, int, float | None]:
        """Over the last `hours`: runs started by wake-ups (or catch-ups), other runs, notifications gathered, and
        the longest commit-to-mark of a marked row (ETL_LAG_COLUMN)."""
        rows = self.store.run("read recent runs' causes", sql.SQL(
            "SELECT count(*) FILTER (WHERE cause IN ('wake-up', 'catch-up')),"
            " count(*) FILTER (WHERE cause IS NULL OR cause NOT IN ('wake-up', 'catch-up')),"
            " coalesce(sum(wakeups), 0), max(latency)"
            " FROM {s}.runs WHERE job = %s AND started_at > now() - make_interval(secs => %s)").format(
            s=self.store.schema), (self.store.job.name, hours * 3600))
        woken, other, wakeups, latency = rows[0]
        return int(woken), int(other), int(wakeups), None if latency is None else float(latency)

    def health(self) -> Health:
        """Backlog, lag, waiting batches, quarantine and last success, in one statement.

        Lag is the age of the oldest unprocessed row: exact with ETL_LAG_COLUMN; otherwise the age
        of the oldest unfinished batch, else the time since a run last ended with nothing left to
        claim (idle, or ok without a message: not stopped by its time budget; every row waiting
        now arrived after it), else since the job's first run.
        """
        src, flag = qualified(self.store.job), sql.Identifier(self.store.job.processed_column)
        oldest = sql.SQL(
            "coalesce((SELECT min(claimed_at) FROM {s}.batches WHERE job = %(job)s AND state <> 'done'),"
            " (SELECT max(finished_at) FROM {s}.runs WHERE job = %(job)s AND status IN ('idle', 'ok')"
            " AND coalesce(message, '') = ''),"
            " (SELECT min(started_at) FROM {s}.runs WHERE job = %(job)s))").format(s=self.store.schema)
        if self.store.job.lag_column:  # rows whose lag column is NULL: the estimate above, not a lag of 0
            oldest = sql.SQL("coalesce((SELECT min(s.{col})::timestamptz FROM {src} s WHERE s.{flag} = false),"
                             " {estimate})").format(col=sql.Identifier(self.store.job.lag_column), src=src, flag=flag,
                                                    estimate=oldest)
        rows = self.store.run("read the job's health", sql.SQL(
            "WITH b AS (SELECT count(*) AS n FROM {src} WHERE {flag} = false)"
            " SELECT b.n, CASE WHEN b.n = 0 THEN 0 ELSE"
            " coalesce(extract(epoch FROM now() - {oldest})::float8, 0) END,"
            " (SELECT count(*) FROM {s}.batches b WHERE job = %(job)s AND state = 'loaded'"
            " AND (source IS NULL OR " + SAME_SOURCE + ")),"
            " (SELECT count(*) FROM {s}.quarantine WHERE job = %(job)s),"
            " (SELECT max(finished_at) FROM {s}.runs WHERE job = %(job)s AND status IN ('ok', 'idle'))"
            " FROM b").format(src=src, flag=flag, oldest=oldest, s=self.store.schema), self.store.names())
        backlog, lag, waiting, quarantined, last_success = rows[0]
        return Health(int(backlog), max(0.0, float(lag)), int(waiting), int(quarantined), last_success)

    def null_flags(self) -> int:
        """Rows whose flag is NULL: neither processed nor unprocessed, so never claimed (0 if it cannot be NULL)."""
        flag = self.store.job.processed_column
        rows = self.store.run("count rows with a NULL flag", sql.SQL(
            "SELECT CASE WHEN (SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s)"
            " THEN 0 ELSE (SELECT count(*) FROM {src} WHERE {flag} IS NULL) END").format(
            src=qualified(self.store.job), flag=sql.Identifier(flag)), (self.store.quoted_source(), flag))
        return int(rows[0][0])

    def backlog(self) -> int:
        """Source rows not yet flagged processed."""
        rows = self.store.run("count backlog", sql.SQL("SELECT count(*) FROM {src} WHERE {flag} = false").format(
            src=qualified(self.store.job), flag=sql.Identifier(self.store.job.processed_column)))
        return int(rows[0][0])

    def to_move(self, key: Key) -> int:
        """Unprocessed rows a run can take: the backlog less quarantined rows and rows with a NULL key."""
        rows = self.store.run("count the rows to move", sql.SQL(
            "SELECT (SELECT count(*) FROM {src} s WHERE s.{flag} = false AND {not_null})"
            " - (SELECT count(*) FROM {s}.quarantine WHERE job = %s)").format(
            src=qualified(self.store.job), flag=sql.Identifier(self.store.job.processed_column),
            not_null=key.not_null("s"), s=self.store.schema), (self.store.job.name,))
        return max(0, int(rows[0][0]))

    def recent(self, limit: int = 5) -> list[tuple[Any, ...]]:
        return self.store.run("read runs", sql.SQL(
            "SELECT started_at, status, batches, rows_loaded, rows_marked, seconds, message, cause, latency"
            " FROM {s}.runs WHERE job = %s ORDER BY run_id DESC LIMIT %s").format(s=self.store.schema),
            (self.store.job.name, limit))


def null_flag_fix(table: str, flag: str) -> str:
    """The statements that make rows with a NULL flag move, and keep new ones from having one."""
    return (f"UPDATE {table} SET {flag} = false WHERE {flag} IS NULL; and give the column a default:"
            f" ALTER TABLE {table} ALTER COLUMN {flag} SET DEFAULT false, ALTER COLUMN {flag} SET NOT NULL")
