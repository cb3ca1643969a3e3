"""The ledger in PostgreSQL: the service's memory of every batch, its quarantine and its runs.

One package, one module per thing that changes:

    store       one job's handle on the tables: connection, names, one transaction per statement
    schema      the tables, created or brought forward
    lock        one runner per source (an advisory lock)
    batches     claim -> loaded -> done; the key-order rule every step relies on is stated there
    mark        the mark of a loaded batch, in one transaction, and whether it sticks
    quarantine  rows set aside with their reason
    others      other jobs' unfinished batches on the same source: skip, adopt, release
    runs        run records, backlog, lag and what waits
    shapes      the source types each target was last brought in step with
    resend      rows ClickHouse holds differently after a column change, set back to unprocessed
    reconcile   batch ids ClickHouse holds that the ledger lost, until reconciled
    timelines   the server's timelines, each with its first transaction id (rows' source versions)

A `Ledger` opens all of them on one connection (which also holds the job's lock).
"""

from __future__ import annotations

from etl_service.ledger import schema
from etl_service.ledger.batches import Batch, Batches
from etl_service.ledger.lock import Lock
from etl_service.ledger.mark import Mark, MarkResult
from etl_service.ledger.others import ForeignBatch, OtherJobs
from etl_service.ledger.quarantine import Quarantine
from etl_service.ledger.reconcile import Reconciles, Span
from etl_service.ledger.runs import Health, Runs
from etl_service.ledger.shapes import TargetShapes
from etl_service.ledger.store import Store
from etl_service.ledger.timelines import Timelines
from etl_service.postgres.connection import Connection
from etl_service.settings.model import JobConfig

__all__ = ["Batch", "ForeignBatch", "Health", "Ledger", "MarkResult", "Span"]


class Ledger:
    """The ledger for one job on one connection."""

    def __init__(self, conn: Connection, schema_name: str, job: JobConfig) -> None:
        store = Store(conn, schema_name, job)
        self.conn = conn
        self.job = job
        self.source = store.source
        self.store = store
        self.lock = Lock(store)
        self.batches = Batches(store)
        self.mark = Mark(store)
        self.quarantine = Quarantine(store)
        self.others = OtherJobs(store)
        self.runs = Runs(store)
        self.shapes = TargetShapes(store)
        self.reconcile = Reconciles(store)
        self.timelines = Timelines(store)

    def ensure_schema(self) -> None:
        """Create the ledger's tables if absent, or bring them forward (idempotent)."""
        schema.ensure(self.store)
