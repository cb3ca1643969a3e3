"""Spans of batch ids ClickHouse holds that the ledger lost, per job and target, until reconciled.

While a span is open, rows about to be loaded are compared with the target's rows of those
batches (`etl_service.reconcile`); a run that has claimed every unprocessed row closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2 import sql

from etl_service.ledger.store import Store


@dataclass(frozen=True)
class Span:
    """Batch ids (above, upto] ClickHouse held, beyond the ledger's highest, when it was found."""

    above: int
    upto: int
    rows: int  # rows of those batches in the target when found
    since: datetime
    matched: int  # rows found already there and marked, not loaded again, so far


class Reconciles:
    """The job's open span, if any."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def open_span(self, target: str) -> Span | None:
        rows = self.store.run("read the open reconcile span", sql.SQL(
            "SELECT above, upto, rows_held, since, matched FROM {s}.reconcile WHERE job = %s AND target = %s").format(
            s=self.store.schema), (self.store.job.name, target))
        return Span(int(rows[0][0]), int(rows[0][1]), int(rows[0][2]), rows[0][3], int(rows[0][4])) if rows else None

    def open(self, target: str, above: int, upto: int, rows: int) -> Span:
        """Open a span (or widen the open one to cover it too)."""
        found = self.store.run("open a reconcile span", sql.SQL(
            "INSERT INTO {s}.reconcile AS r (job, target, above, upto, rows_held) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (job, target) DO UPDATE SET above = least(r.above, EXCLUDED.above),"
            " upto = greatest(r.upto, EXCLUDED.upto), rows_held = greatest(r.rows_held, EXCLUDED.rows_held)"
            " RETURNING above, upto, rows_held, since, matched").format(s=self.store.schema),
            (self.store.job.name, target, above, upto, rows))
        return Span(int(found[0][0]), int(found[0][1]), int(found[0][2]), found[0][3], int(found[0][4]))

    def count_matched(self, target: str, rows: int) -> None:
        self.store.run("count reconciled rows", sql.SQL(
            "UPDATE {s}.reconcile SET matched = matched + %s WHERE job = %s AND target = %s").format(
            s=self.store.schema), (rows, self.store.job.name, target))

    def close(self, target: str) -> None:
        self.store.run("close the reconcile span", sql.SQL(
            "DELETE FROM {s}.reconcile WHERE job = %s AND target = %s").format(s=self.store.schema),
            (self.store.job.name, target))

    def highest_batch(self, besides: int | None = None) -> int:
        """The highest batch id the ledger holds (any job's; 0 when none), `besides` (just claimed) left out."""
        rows = self.store.run("read the ledger's highest batch id", sql.SQL(
            "SELECT coalesce(max(batch_id), 0) FROM {s}.batches WHERE batch_id IS DISTINCT FROM %s").format(
            s=self.store.schema), (besides,))
        return int(rows[0][0])
