"""Marks loaded batches done in the background, on a second connection, one batch at a time.

The marking UPDATE costs more than extracting and loading the same rows, so while batch N is
marked, batch N+1 is claimed, extracted and loaded on the main connection. At most one mark is
in flight; `settle()` waits for it and reports its result (or raises its error) in the caller's
thread. A crash while a mark is in flight leaves that batch `loaded`: the next run marks it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from etl_service.ledger import Batch, Ledger, MarkResult
from etl_service.postgres import connection
from etl_service.postgres.catalog import SourceShape
from etl_service.settings.model import JobConfig, Settings

Done = Callable[[Batch, MarkResult], None]


class Marker:
    """One background worker with its own PostgreSQL connection, opened on first use."""

    def __init__(self, settings: Settings, job: JobConfig, before_commit: Callable[[], None]) -> None:
        self.settings = settings
        self.job = job
        self.before_commit = before_commit
        self._pool: ThreadPoolExecutor | None = None
        self._ledger: Ledger | None = None
        self._pending: tuple[Future[MarkResult], Batch, Done] | None = None

    def submit(self, batch: Batch, shape: SourceShape, done: Done) -> None:
        """Start marking `batch` once the previous mark has finished; `done(batch, result)` reports it."""
        self.settle()
        if self._ledger is None:
            conn = connection.connect(self.settings, f"{self.job.name}-mark")
            self._ledger = Ledger(conn, self.settings.ledger_schema, self.job)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mark-{self.job.name}")
        assert self._pool is not None
        future = self._pool.submit(self._ledger.mark.run, batch, shape, self.before_commit)
        self._pending = (future, batch, done)

    def settle(self) -> None:
        """Wait for the mark in flight (if any) and report it; raises what the mark raised."""
        if self._pending is None:
            return
        future, batch, done = self._pending
        self._pending = None
        done(batch, future.result())

    def close(self) -> None:
        """Wait for any mark in flight (its outcome was already reported or is moot), then disconnect."""
        if self._pending is not None:
            self._pending[0].exception()  # wait; an error here leaves the batch loaded for the next run
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._ledger is not None:
            self._ledger.conn.close()
            self._ledger = None  # a retried attempt opens a fresh connection
