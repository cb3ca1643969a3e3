"""When the ledger is behind ClickHouse: rows the target already holds are marked, not loaded again.

The ledger is the service's memory of what ClickHouse holds. A PostgreSQL failover to a standby
that missed the last commits, a ledger restored from an older dump, or a dropped or truncated
ledger table lose part of that memory while ClickHouse keeps everything: rows whose mark was lost
are unprocessed again although ClickHouse holds them.

Found at the start of each loading run with one query the batch column's skip index answers
without reading rows in normal operation: does the target hold batch ids above the ledger's
highest? If it does, that span of ids is recorded in the ledger, and until a run has claimed every
unprocessed row, each chunk about to be loaded is compared with the target's rows of those
batches in the chunk's key range: a row whose key's newest version there (the highest
`_etl_version`) has the same values is not sent, and is marked with its batch. Versions are not
compared: a row loaded again gets a new one (source.VERSION_COLUMN), and what matters is that
ClickHouse already holds the row as it is now. A key whose newest held version differs (the lost
primary wrote other values, or the row changed since) is loaded, with a higher version. A target
without `_etl_version` (made by an operator) is compared by key and values against every row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pyarrow as pa
import pyarrow.compute as pc
from psycopg2 import sql

from etl_service.clickhouse import readback
from etl_service.ledger import Ledger, Span
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.connection import qualified
from etl_service.run.context import RunContext
from etl_service.run.target_session import TargetSession

# A span of at most this many rows is compared with the source when it closes (rows ClickHouse
# holds that the source no longer has); a larger one (a dropped ledger: every batch) is not.
GONE_LIMIT = 200_000


class Reconciler:
    """One run's view of the open span, if any: `detect`, then `drop_held` per chunk, `finish` at the end."""

    def __init__(self, ctx: RunContext, ledger: Ledger, target: TargetSession) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.target = target
        self.span: Span | None = None
        db, table = ctx.settings.clickhouse.database, ctx.job.target_table
        self.db, self.table, self.name = db, table, f"{db}.{table}"

    def detect(self, shape: SourceShape, fresh: int | None = None) -> None:
        """Open a span if the target holds batch ids above the ledger's highest; else read the open one.

        `fresh`: a batch just claimed (nothing of it can be in ClickHouse yet) does not count.
        """
        if not self.ctx.job.verify_load:
            return
        client = self.target.connect(shape)
        if not self.target.has_batch_column:
            return
        highest = self.ledger.reconcile.highest_batch(besides=fresh)
        rows, top = readback.rows_above(client, self.db, self.table, highest)
        if rows:
            self.span = self.ledger.reconcile.open(self.name, highest, top, rows)
            self.ctx.log.warning(
                "the ledger is behind ClickHouse: {} holds {} rows of batches {}..{}, above the ledger's highest"
                " ({}): the ledger lost history (a failover to a standby that missed commits, a restored, dropped"
                " or truncated ledger). Until a run has claimed every unprocessed row, rows ClickHouse holds there"
                " as they are now (same key and values) are marked, not loaded again", self.name, rows,
                highest + 1, top, highest)
        else:
            self.span = self.ledger.reconcile.open_span(self.name)

    def drop_held(self, data: pa.Table, shape: SourceShape, batch_id: int) -> pa.Table:
        """`data` without the rows whose key's newest version in the open span has the same values."""
        span = self.span
        if span is None or not data.num_rows:
            return data
        keys = shape.key_targets
        versioned = self.target.has_version_column
        compared = [*keys, *(name for name in data.column_names if name in self.target.types
                             and name not in keys and not name.startswith("_etl_"))]
        ends = pc.min_max(data.column(keys[0]))
        bounds = (ends["min"].as_py(), ends["max"].as_py())
        held = {tuple(_norm(v) for v in row) for row in readback.held_rows(
            self.target.connect(shape), self.db, self.table, keys, compared, bounds,
            self.target.types.get(keys[0], ""), span.above, span.upto, newest=versioned)}
        if not held:
            return data
        columns = [data.column(name).to_pylist() for name in compared]
        keep = [tuple(_norm(column[i]) for column in columns) not in held for i in range(data.num_rows)]
        dropped = data.num_rows - sum(keep)
        if dropped:
            self.ledger.reconcile.count_matched(self.name, dropped)
            self.ctx.log.bind(batch=batch_id).info(
                "batch {}: {} row(s) already in {} (batches {}..{}) with the same {}: marked, not loaded again",
                batch_id, dropped, self.name, span.above + 1, span.upto,
                "key and values as its newest version there" if versioned else "key and values")
        return data.filter(pa.array(keep))

    def finish(self, shape: SourceShape) -> None:
        """Every unprocessed row has been claimed since the span opened: say what ClickHouse holds that the
        source no longer has (rows the lost primary wrote), then close the span."""
        span = self.span
        if span is None:
            return
        done = self.ledger.reconcile.open_span(self.name)
        self.ctx.log.info("reconciled with {}: {} row(s) ClickHouse already held were marked without loading them"
                          " again (batches {}..{}, {} rows there when found)", self.name,
                          done.matched if done else 0, span.above + 1, span.upto, span.rows)
        gone = self._gone(shape, span)
        if gone:
            count, batches = gone
            note = (f"{count} row(s) of batches {', '.join(map(str, batches[:10]))} in {self.name} are no longer in the"
                    f" source (written by a primary that was lost, or deleted since): they stay in ClickHouse")
            self.ctx.log.warning(note)
            self.ctx.result.message = "; ".join(filter(None, [self.ctx.result.message, note]))
        self.ledger.reconcile.close(self.name)
        self.span = None

    def _gone(self, shape: SourceShape, span: Span) -> tuple[int, list[int]] | None:
        """(rows of the span whose key the source no longer has, their batch ids); None if not counted
        (a key of several columns, or a span too large to read at once)."""
        if len(shape.key_targets) != 1 or span.rows > GONE_LIMIT or not self.target.has_batch_column:
            return None
        rows = readback.span_keys(self.target.connect(shape), self.db, self.table, shape.key_targets[0],
                                  span.above, span.upto)
        if not rows:
            return None
        found = self.ledger.store.run("look for the span's keys at the source", sql.SQL(
            "SELECT k FROM unnest(%s::text[]) AS k WHERE NOT EXISTS (SELECT 1 FROM {src} s WHERE s.{key}::text = k)")
            .format(src=qualified(self.ctx.job), key=sql.Identifier(shape.key.names[0])),
            ([str(_norm(key)) for key, _ in rows],))
        missing = {str(r[0]) for r in found}
        batches = sorted({int(batch) for key, batch in rows if str(_norm(key)) in missing})
        return (len(missing), batches) if missing else None


def _norm(value: Any) -> Any:
    """A value as both sides can compare it (ClickHouse's and Arrow's Python values), hashable."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return value.normalize()
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, list | tuple):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _norm(v)) for k, v in value.items()))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
