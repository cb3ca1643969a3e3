"""One chunk's way from PostgreSQL to ClickHouse: extract, set aside what the target holds, transform, check, insert.

`loading.BatchLoader` decides which key ranges of a batch go (and splits a range whose rows the
target refuses); this module moves one range, as one insert under that range's own token.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from etl_service.clickhouse import fit, guard, inserts
from etl_service.errors import BadSinkValues
from etl_service.ledger import Batch
from etl_service.postgres import connection, extract
from etl_service.postgres.catalog import SourceShape
from etl_service.run import metrics, transform
from etl_service.run.context import RunContext
from etl_service.run.reconcile import Reconciler
from etl_service.run.target_session import TargetSession


class ChunkLoader:
    """Moves one key range of a batch into the target; keeps what the run learns on the way."""

    def __init__(self, ctx: RunContext, conn: connection.Connection, target: TargetSession,
                 reconcile: Reconciler) -> None:
        self.ctx = ctx
        self.job = ctx.job
        self.conn = conn
        self.target = target
        self.reconcile = reconcile
        self.timelines: list[tuple[int, int]] = []  # the server's timelines (rows' source versions), once read
        self.oldest: dict[int, float] = {}  # per batch: the earliest ETL_LAG_COLUMN time loaded in this run
        self.extractor = extract.Extractor(ctx.settings, ctx.job.name)

    def close(self) -> None:
        """Close the extraction's connection."""
        self.extractor.close()

    def insert(self, shape: SourceShape, batch: Batch, first: int, last: int) -> int:
        """Extract key positions [first, last] of `batch`, prepare them and insert them; returns rows sent."""
        settings, job = self.ctx.settings, self.job
        client = self.target.connect(shape)
        data = self.extractor.chunk(self.conn, job, shape, batch.batch_id, first, last, self.timelines,
                                    self._as_text(shape), self._depths(shape))
        self.ctx.faults.reached("mid_extract")
        metrics.ROWS.labels(job.name, "extracted").inc(data.num_rows)
        self._note_oldest(data, shape, batch.batch_id)
        data = self.reconcile.drop_held(data, shape, batch.batch_id)
        data = self._transform(self._deleted(data, shape), shape)
        if not data.num_rows:
            return 0
        misfit = fit.first_misfit(data, self.target.types, self.target.ranges)
        if misfit:
            raise BadSinkValues(f"{misfit} in {settings.clickhouse.database}.{job.target_table}")
        data = fit.prepared(data, self.target.types)
        data = data.drop_columns([c for c in data.column_names if c.startswith("_etl_") and c not in self.target.types])
        sent = inserts.insert_chunk(client, settings.clickhouse.database, job.target_table, data,
                                    batch.batch_id, batch.range_token(first, last), self.target.has_batch_column,
                                    self.target.has_version_column)
        metrics.ROWS.labels(job.name, "loaded").inc(sent)
        return sent

    def _as_text(self, shape: SourceShape) -> frozenset[str]:
        """Array columns whose target column is a String (made so by a version that sent arrays as text)."""
        return frozenset(c.name for c, t in zip(shape.columns, shape.targets, strict=True)
                         if c.ch_type.startswith("Array(") and fit.unwrap(self.target.types.get(t, ""))[0] == "String")

    def _depths(self, shape: SourceShape) -> dict[str, int]:
        """Array columns whose target column nests another depth than they declare now (`ALTER … TYPE int[][]`
        changes only the declaration): read as deep as the target holds; rows of another depth are bad rows."""
        depths = {}
        for c, t in zip(shape.columns, shape.targets, strict=True):
            inner = fit.unwrap(self.target.types.get(t, ""))[0]
            if c.ch_type.startswith("Array(") and inner.startswith("Array(") and \
                    inner.count("Array(") != c.ch_type.count("Array("):
                depths[c.name] = inner.count("Array(")
        return depths

    def _note_oldest(self, data: pa.Table, shape: SourceShape, batch_id: int) -> None:
        """Keep the earliest ETL_LAG_COLUMN time of the batch's rows, when that column is moved (commit-to-mark)."""
        if not self.job.lag_column or not data.num_rows:
            return
        name = dict(zip((c.name for c in shape.columns), shape.targets, strict=True)).get(self.job.lag_column)
        if name is None or name not in data.column_names:
            return
        first = pc.min(data.column(name)).as_py()
        if first is None:
            return
        if not isinstance(first, datetime):  # a date column
            first = datetime.combine(first, datetime.min.time())
        stamp = (first if first.tzinfo else first.replace(tzinfo=UTC)).timestamp()
        self.oldest[batch_id] = min(stamp, self.oldest.get(batch_id, stamp))

    def _transform(self, data: pa.Table, shape: SourceShape) -> pa.Table:
        """The user's transform, if any, on the rows without the service's own columns (_etl_version,
        _etl_deleted); each kept row gets its own back."""
        own = [name for name in data.column_names if name.startswith("_etl_")]
        if not self.job.transform or not own:
            return transform.apply(data, self.job.transform, shape.key_targets)
        kept = data.select([*shape.key_targets, *own])
        out = transform.apply(data.drop_columns(own), self.job.transform, shape.key_targets)
        own = [name for name in own if name not in out.column_names]
        if not own or not out.num_rows:
            return out
        keys = out.select(list(shape.key_targets)).cast(kept.select(list(shape.key_targets)).schema)
        rows = keys.append_column("__row", pa.array(range(out.num_rows)))
        found = rows.join(kept, list(shape.key_targets), join_type="left outer").sort_by("__row")
        for name in own:
            out = out.append_column(name, found.column(name))
        return out

    def _deleted(self, data: pa.Table, shape: SourceShape) -> pa.Table:
        """With ETL_DELETED_COLUMN, each row's _etl_deleted (1: deleted at the source) for the target's FINAL."""
        if not self.job.deleted_column or guard.DELETED_COLUMN not in self.target.types:
            return data
        name = dict(zip((c.name for c in shape.columns), shape.targets, strict=True))[self.job.deleted_column]
        flags = pc.fill_null(data.column(name), False)
        return data.append_column(guard.DELETED_COLUMN, pc.cast(flags, pa.uint8()))
