"""The source column types each job's target was last brought in step with.

A source type that differs from the recorded one is a change at the source, to follow; one that
matches it while the target differs is the operator's choice, left alone (`clickhouse.evolution.evolve`).
"""

from __future__ import annotations

from datetime import datetime

from psycopg2 import sql
from psycopg2.extras import Json

from etl_service.ledger.store import Store


class TargetShapes:
    """The recorded shapes of the job's targets."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def aligned(self, target: str) -> dict[str, str] | None:
        """Source column -> type the target was last brought in step with (None: never recorded)."""
        rows = self.store.run("read the target's recorded shape", sql.SQL(
            "SELECT columns FROM {s}.target_shapes WHERE job = %s AND target = %s").format(s=self.store.schema),
            (self.store.job.name, target))
        return dict(rows[0][0]) if rows else None

    def note_change(self, target: str, what: str) -> None:
        """Keep what a column change at the source did (the target's statements, rows sent again), for status."""
        self.store.run("record what a column change did", sql.SQL(
            "UPDATE {s}.target_shapes SET last_change = %s, changed_at = now() WHERE job = %s AND target = %s").format(
            s=self.store.schema), (what, self.store.job.name, target))

    def last_change(self, target: str) -> tuple[str, datetime] | None:
        """(what the last column change did, when), or None."""
        rows = self.store.run("read the last column change", sql.SQL(
            "SELECT last_change, changed_at FROM {s}.target_shapes WHERE job = %s AND target = %s"
            " AND last_change IS NOT NULL").format(s=self.store.schema), (self.store.job.name, target))
        return (str(rows[0][0]), rows[0][1]) if rows else None

    def numbers(self, target: str) -> dict[str, int]:
        """Target column -> the number (attnum) of the source column it was last in step with ({}: none recorded)."""
        rows = self.store.run("read the target's recorded column numbers", sql.SQL(
            "SELECT numbers FROM {s}.target_shapes WHERE job = %s AND target = %s").format(s=self.store.schema),
            (self.store.job.name, target))
        return {str(k): int(v) for k, v in (rows[0][0] or {}).items()} if rows else {}

    def record(self, target: str, columns: dict[str, str], numbers: dict[str, int] | None = None) -> None:
        self.store.run("record the target's shape", sql.SQL(
            "INSERT INTO {s}.target_shapes (job, target, columns, numbers) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (job, target) DO UPDATE SET columns = EXCLUDED.columns,"
            " numbers = coalesce(EXCLUDED.numbers, {s}.target_shapes.numbers), updated_at = now()").format(
            s=self.store.schema), (self.store.job.name, target, Json(columns), Json(numbers) if numbers else None))
