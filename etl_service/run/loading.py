"""Loading one batch: its chunks into ClickHouse, readiness, the count check, then the marker.

The data path of one batch reads top to bottom in `BatchLoader.process`:

    load the chunks not yet recorded -> await ready -> verify the count -> hand to the marker

A chunk whose insert fails for its rows' data is split in halves until each bad row is alone
(`_load_range`); what then happens to that row is the bad-row policy's (`badrows`). Each step is
recorded in the ledger before the next, so a batch resumed after a crash takes the same path and
every insert keeps its deduplication token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from etl_service.clickhouse import readback, readiness, target_table
from etl_service.errors import ConfigError, EtlError, RowError
from etl_service.ledger import Batch, Ledger, MarkResult
from etl_service.postgres import catalog, connection, versioning
from etl_service.postgres.catalog import SourceShape
from etl_service.run import metrics
from etl_service.run.badrows import BadRows
from etl_service.run.chunk import ChunkLoader
from etl_service.run.context import STOPPED, WAITING, Outcome, RunContext
from etl_service.run.marker import Marker
from etl_service.run.reconcile import Reconciler
from etl_service.run.target_session import TargetSession

# Counts of a batch below the rows sent, on a Replicated target, before they count as missing
# (waiting 1, 2, 4, 8 and 16 s: a replica behind a load balancer catching up).
VERIFY_WAITS = 5
# A woken job (ETL_WAKE=notify) polls readiness first after this many seconds, then doubling up to
# ETL_READY_POLL_INTERVAL: every poll interval waited adds to a row's latency.
WOKEN_FIRST_POLL = 0.05
# Reports a marked batch: (batch, what the mark did, rows that failed alone in this run, start time,
# the earliest ETL_LAG_COLUMN time among the rows loaded in this run, as Unix time, if known).
Marked = Callable[[Batch, MarkResult, int, float, float | None], None]


class BatchLoader:
    """Takes the batches of one attempt from whatever state the ledger holds them in to marked."""

    def __init__(self, ctx: RunContext, conn: connection.Connection, ledger: Ledger, target: TargetSession,
                 bad: BadRows, marker: Marker, marked: Marked) -> None:
        self.ctx = ctx
        self.job = ctx.job
        self.conn = conn
        self.ledger = ledger
        self.target = target
        self.bad = bad
        self.marker = marker
        self.marked = marked
        self.reconcile = Reconciler(ctx, ledger, target)
        self.chunks = ChunkLoader(ctx, conn, target, self.reconcile)
        self._detected = False  # whether this run has looked for batch ids the ledger lost

    def close(self) -> None:
        """Close what the attempt opened for its chunks."""
        self.chunks.close()

    def process(self, shape: SourceShape, batch: Batch, fresh: bool = False) -> None:
        """One batch through every step; raises Outcome when it must stop short.

        `fresh`: claimed just now, so nothing of it can be in ClickHouse yet (see `_own_id`).
        """
        ctx = self.ctx
        shape = self._shape_of(batch, shape)
        if not self._detected:  # once per run, and only in a run that loads: an idle run asks ClickHouse nothing
            self.chunks.timelines = self.ledger.timelines.see()
            self.reconcile.detect(shape, batch.batch_id if fresh else None)
            if self.job.target_mode == "latest":
                self._versions_forward(shape)
            self._detected = True
        if fresh:
            batch = self._own_id(shape, batch)
        bt0 = ctx.clock()
        failed_before = self.bad.failed
        sent = 0
        if batch.state == "loaded" or batch.chunks_loaded:
            self.target.connect(shape)  # the target is checked (and made again if it was dropped) first
            if self.target.created:  # what the batch loaded before went with the old table
                sent = self._reload(shape, batch, "the target table was missing")
                batch = dataclasses.replace(batch, state="loaded", chunks_loaded=batch.chunk_count, rows_loaded=0)
        if batch.state == "claimed":
            sent = self._load(shape, batch)
        ctx.faults.reached("during_ready")
        if self.job.ready_query:
            self._await_ready(shape, batch)
        ctx.faults.reached("after_ready")
        self._verify(shape, batch, batch.rows_loaded + sent)
        if catalog.retyped(self.conn, self.job, batch.generation):
            ctx.log.bind(batch=batch.batch_id).warning(
                "{} was rewritten by ALTER … TYPE while batch {} was in flight: every row has a new xmin, so its"
                " {} rows look changed and load again (an update made before the rewrite cannot be told apart)",
                ".".join(self.job.source_table), batch.batch_id, batch.row_count)
        failed = self.bad.failed - failed_before
        oldest = self.chunks.oldest.pop(batch.batch_id, None)
        self.marker.submit(batch, shape, lambda done, mark: self.marked(done, mark, failed, bt0, oldest))

    def _versions_forward(self, shape: SourceShape) -> None:
        """Latest mode: ConfigError if the target holds source versions newer than anything this PostgreSQL
        has written (a database restored into a new cluster restarts its transaction ids): the rows loaded
        now would lose to the older ones in FINAL."""
        client = self.target.connect(shape)
        if target_table.VERSION_COLUMN not in self.target.types:
            return
        db, table = self.ctx.settings.clickhouse.database, self.job.target_table
        held = readback.max_version(client, db, table)
        now = (self.chunks.timelines[-1][0] << 48 | versioning.next_xid(self.conn)) if self.chunks.timelines else 0
        if now and held > now:
            raise ConfigError("ETL_TARGET_MODE", f"{db}.{table} holds source versions up to {held} (timeline"
                              f" {held >> 48}, transaction {held & versioning.VERSION_MASK}), newer than anything this"
                              f" PostgreSQL has written yet (timeline {now >> 48}, next transaction"
                              f" {now & versioning.VERSION_MASK}): was the database restored into a new cluster? Rows"
                              " loaded now would lose to older ones in FINAL",
                              f"rebuild the target from the source: TRUNCATE TABLE {db}.{table}, then UPDATE"
                              f" {'.'.join(self.job.source_table)} SET {self.job.processed_column} = false (every"
                              " row is loaded once, with its new version)")

    def _own_id(self, shape: SourceShape, batch: Batch) -> Batch:
        """Batch ids never repeat in the target: a fresh batch whose id ClickHouse already holds rows of
        (the ledger was dropped, restored from an older dump, or PostgreSQL failed over to a standby
        that missed commits, so its sequence restarted or went back) takes an id past the target's
        highest before anything of it is sent. The check counts one id through the batch column's
        skip index; the highest id is read only when the ledger is behind.
        """
        if not self.job.verify_load:
            return batch
        client = self.target.connect(shape)
        if not self.target.has_batch_column:
            return batch
        db, table = self.ctx.settings.clickhouse.database, self.job.target_table
        if not readback.batch_rows(client, db, table, batch.batch_id):
            return batch
        top = readback.max_batch(client, db, table)
        renumbered = self.ledger.batches.renumber(batch, top)
        self.ctx.log.bind(batch=renumbered.batch_id).warning(
            "the ledger is behind ClickHouse: {}.{} already holds batch ids up to {} (was the ledger dropped or"
            " restored, or did PostgreSQL fail over to a standby that missed commits?); batch {} is batch {} now,"
            " and later ids follow it", db, table, top, batch.batch_id, renumbered.batch_id)
        return renumbered

    def _shape_of(self, batch: Batch, shape: SourceShape) -> SourceShape:
        """The shape whose key reads `batch`'s stored keys: their column order is the one at claim time."""
        claimed = batch.key_columns
        if not claimed or claimed == shape.key.names:
            return shape
        if set(claimed) != set(shape.key.names):
            raise ConfigError("ETL_SOURCE_KEY", f"batch {batch.batch_id} was claimed with the key"
                              f" ({', '.join(claimed)}) but the key is now {shape.key.label}: its stored keys"
                              " cannot be matched",
                              "set ETL_SOURCE_KEY back until the batch is done (`status` shows it), then change it")
        # the index of unprocessed rows follows the key's new order, not the batch's: no range join
        return dataclasses.replace(shape, key=shape.key.ordered(claimed), range_join=False)

    def _await_ready(self, shape: SourceShape, batch: Batch) -> None:
        """Poll ETL_READY_QUERY; Outcome (waiting, or stopped) if the deadline passes first."""
        ctx, job = self.ctx, self.job
        waited = ctx.clock()
        ready = readiness.await_ready(self.target.connect(shape), job.ready_query, batch.batch_id, job.ready_timeout,
                                      job.ready_poll_interval, ctx.stop.wait, ctx.clock,
                                      first=WOKEN_FIRST_POLL if job.wake == "notify" else None)
        metrics.READY_WAIT_SECONDS.labels(job.name).observe(ctx.clock() - waited)
        if not ready:
            status = STOPPED if ctx.stop.is_set() else WAITING
            raise Outcome(status, f"batch {batch.batch_id} is loaded but ClickHouse is not ready;"
                          " the next run polls again")

    def _verify(self, shape: SourceShape, batch: Batch, expected: int) -> None:
        """Before marking: ClickHouse holds exactly the rows sent for this batch (ETL_VERIFY_LOAD).

        If it holds none of them (the target was dropped or emptied while the batch waited), the
        batch is loaded again once, with the same tokens: a target that still knows them drops
        the repeat, and the count then fails the run. On a Replicated target a count below the
        rows sent may come from a replica that has not fetched every part yet: it syncs and
        counts again (VERIFY_WAITS times, backing off) before it counts as missing rows.
        """
        if not self.job.verify_load or not expected:
            return
        client = self.target.connect(shape)
        if not self.target.has_batch_column:
            return
        db, table = self.ctx.settings.clickhouse.database, self.job.target_table
        held = readback.batch_rows(client, db, table, batch.batch_id)
        if held == 0:
            expected = self._reload(shape, batch, f"ClickHouse holds none of its {expected} rows")
            held = readback.batch_rows(client, db, table, batch.batch_id)
        for wait in range(VERIFY_WAITS if self.target.replicated else 0):
            if held >= expected or self.ctx.stop.wait(2.0 ** wait):
                break
            readback.sync_replica(client, db, table)
            held = readback.batch_rows(client, db, table, batch.batch_id)
        if held > expected:
            doubled = readback.doubled_keys(client, db, table, batch.batch_id, shape.key_targets)
            if not doubled:  # no key twice: an insert made before a restart holds rows that changed since
                self.ctx.log.bind(batch=batch.batch_id).info(
                    "batch {}: ClickHouse holds {} of its rows, {} more than were sent now: an insert made before a"
                    " restart holds rows that changed since (a new xmin: updated, or the table rewritten); no key is"
                    " there twice, and those rows are not marked, so they load again as newer versions",
                    batch.batch_id, held, held - expected)
                return
            raise EtlError(f"batch {batch.batch_id}: ClickHouse holds {held} of its rows but {expected} were sent:"
                           f" {', '.join(doubled) or 'some rows'} are there more than once — a retried insert was"
                           " kept twice (the target or the server's settings did not drop it; `check` says which)."
                           " The batch is not marked and stays loaded: remove the extra copies (rows with"
                           f" {target_table.BATCH_COLUMN} = {batch.batch_id}) and the next run counts again"
                           " and marks it")
        if held < expected:
            raise EtlError(f"batch {batch.batch_id}: ClickHouse holds {held} of its rows but {expected} were sent:"
                           f" {expected - held} are missing, so it is not marked and stays loaded. Did a TTL, a"
                           " row-collapsing engine or a DELETE remove rows? For a target that drops or folds rows by"
                           " design, ETL_VERIFY_LOAD=off marks batches without counting (this one included)")

    def _reload(self, shape: SourceShape, batch: Batch, why: str) -> int:
        """Send a loaded batch again, with the same tokens (a target that still knows them drops them)."""
        self.ctx.log.bind(batch=batch.batch_id).warning("batch {}: {} (was the target dropped or emptied?): loading"
                                                        " it again", batch.batch_id, why)
        self.ledger.batches.reload(batch)
        return self._load(shape, dataclasses.replace(batch, state="claimed", chunks_loaded=0, rows_loaded=0))

    def _load(self, shape: SourceShape, batch: Batch) -> int:
        """Insert the chunks not yet recorded as loaded, recording each; mark the batch loaded. Returns rows sent."""
        ctx = self.ctx
        split = set(batch.split)
        total = 0
        self.bad.begin_batch(batch)
        for index in range(batch.chunks_loaded, batch.chunk_count):
            if ctx.stop.is_set():
                raise Outcome(STOPPED, f"stop requested; batch {batch.batch_id} resumes at chunk {index}")
            first, last = batch.chunk_bounds(index)
            self.bad.begin_chunk()
            sent = self._load_range(shape, batch, first, last, split)
            self.bad.end_chunk(batch, index, first, last, sent)
            last_chunk = index + 1 == batch.chunk_count
            if last_chunk:
                ctx.faults.reached("after_last_insert")
            self.ledger.batches.record_chunk(batch, index + 1, sent)
            if not last_chunk:
                ctx.faults.reached("between_chunks")
            ctx.result.rows_loaded += sent
            ctx.progress.loaded(sent)
            total += sent
            ctx.log.bind(batch=batch.batch_id).debug("chunk {}/{}: {} rows loaded", index + 1, batch.chunk_count, sent)
        self.ledger.batches.set_loaded(batch)
        return total

    def _load_range(self, shape: SourceShape, batch: Batch, first: int, last: int, split: set[str],
                    half: bool = False) -> int:
        """Load key positions [first, last]; on bad rows, split in halves until each bad row is alone.

        A range once split is recorded in the ledger before its halves are sent, so a resumed
        batch takes the same path and every insert keeps its deduplication token. The split of a
        chunk is a warning; the splits of its halves (`half`) are details.
        """
        if f"{first}-{last}" not in split:
            try:
                sent = self.chunks.insert(shape, batch, first, last)
                self.bad.loaded(batch, first, last)
                return sent
            except RowError as exc:
                if first == last:
                    self.bad.failed_alone(batch, shape, first, exc)
                    return 0
                self.ctx.log.bind(batch=batch.batch_id).log(
                    "DEBUG" if half else "WARNING", "rows {}-{} of batch {}: {} — splitting to find the bad rows",
                    first, last, batch.batch_id, exc)
                self.ledger.batches.record_split(batch, first, last)
                split.add(f"{first}-{last}")
        middle = (first + last) // 2
        return (self._load_range(shape, batch, first, middle, split, half=True)
                + self._load_range(shape, batch, middle + 1, last, split, half=True))
