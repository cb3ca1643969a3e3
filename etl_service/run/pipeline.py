"""One run of one job: retries and outcome around the drain loop.

A run takes the job's lock, finishes the batches the ledger holds unfinished, then claims batch
after batch and hands each to `loading.BatchLoader` until the backlog is empty, the time budget
is spent or a stop is asked; then it post-processes. Transient errors are retried here, with
backoff, and nowhere else. Every run ends with one summary line and a row in the ledger's runs
table. What one attempt works with (its connection, ledger, target session, bad-row policy and
marker) is made afresh for each attempt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from loguru import logger

from etl_service.clickhouse import clients
from etl_service.errors import ConfigError, EtlError, MarkNotKept, TransientError
from etl_service.faults import Faults
from etl_service.ledger import Batch, ForeignBatch, Ledger, MarkResult
from etl_service.ledger.mark import not_kept
from etl_service.postgres import catalog, connection, logic
from etl_service.run import metrics
from etl_service.run.badrows import BadRows
from etl_service.run.context import (
    FAILED,
    IDLE,
    OK,
    OUTCOMES,
    SKIPPED,
    STOPPED,
    SUCCESS,
    WAITING,
    Outcome,
    RunContext,
    RunResult,
)
from etl_service.run.loading import BatchLoader
from etl_service.run.marker import Marker
from etl_service.run.progress import Progress
from etl_service.run.target_session import TargetSession
from etl_service.settings.model import JobConfig, Settings

__all__ = ["FAILED", "IDLE", "OK", "OUTCOMES", "SKIPPED", "STOPPED", "SUCCESS", "WAITING", "Run", "RunResult",
           "run_job"]

# Batches in a row that may mark nothing before a run gives up (it must progress or end).
BARREN_LIMIT = 3


class Run:
    """One run of one job. Use `run_job()`; tests may drive it directly."""

    def __init__(self, settings: Settings, job: JobConfig, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic, progress: Progress | None = None) -> None:
        self.settings = settings
        self.job = job
        self.stop = stop
        self.clock = clock
        self.log = logger.bind(job=job.name)
        self.progress = progress or Progress(self.log, settings.progress_seconds, clock)
        self.result = RunResult(job.name, OK)
        self.faults = Faults(settings.crash_at, settings.fail_at)  # counts reach points across attempts
        self.ctx = RunContext(settings, job, stop, clock, self.faults, self.progress, self.result, self.log)
        self._barren = 0  # batches in a row that marked nothing: a run must progress or end

    def execute(self) -> RunResult:
        """Run with bounded retries of transient errors; never raises for a run failure."""
        t0 = self.clock()
        attempt = 0
        while True:
            try:
                self._attempt(t0)
                break
            except Outcome as out:
                self.result.status, self.result.message = out.status, out.message
                break
            except TransientError as exc:
                attempt += 1
                if attempt >= self.settings.retry_attempts or self.stop.is_set():
                    self._fail(f"{exc} (gave up after {attempt} attempts; the next run starts over)")
                    break
                delay = self.settings.retry_backoff * 2 ** (attempt - 1)
                self.log.warning("{} — retrying in {:.1f}s (attempt {}/{})", exc, delay, attempt + 1,
                                 self.settings.retry_attempts)
                if self.stop.wait(delay):
                    self._fail(f"{exc} (stopping, not retried)")
                    break
            except ConfigError as exc:
                self._fail(f"configuration error: {exc}")
                self.result.permanent = True
                break
            except EtlError as exc:
                self._fail(str(exc))
                break
            except Exception as exc:  # a bug: report it with its traceback, keep the daemon alive
                self.log.opt(exception=exc).error("unexpected error in run")
                self._fail(f"unexpected {type(exc).__name__}: {exc}")
                break
        summary = self._summarize(t0)
        # logged here: journal entries name this function as the run's summary line (CODE_FUNC=execute)
        self.log.bind(summary=summary).log("ERROR" if self.result.status == FAILED else "INFO",
                                           "run finished: {}", self.result.line())
        return self.result

    def _summarize(self, t0: float) -> dict[str, Any]:
        """Close the run's figures (progress, seconds, metrics); the summary line's fields."""
        self.progress.finish()  # the bar goes before the summary line
        r = self.result
        r.seconds = self.clock() - t0
        metrics.RUN_SECONDS.labels(self.job.name, r.status).observe(r.seconds)
        if r.status in SUCCESS:
            metrics.LAST_SUCCESS.labels(self.job.name).set(time.time())
        return {"status": r.status, "batches": r.batches, "rows_loaded": r.rows_loaded, "rows_marked": r.rows_marked,
                "rows_quarantined": r.rows_quarantined, "seconds": round(r.seconds, 3)}

    def _fail(self, message: str) -> None:
        self.result.status, self.result.message = FAILED, message

    def _attempt(self, t0: float) -> None:
        conn = connection.connect(self.settings, self.job.name)
        try:
            ledger = Ledger(conn, self.settings.ledger_schema, self.job)
            ledger.ensure_schema()
            if not ledger.lock.take():
                raise Outcome(SKIPPED, f"skipped: {ledger.lock.holder()} is running this job")
            try:
                self._locked(conn, ledger, t0)
            finally:
                if self.settings.metrics_port:  # counts the backlog: only when someone reads it
                    self._quietly(lambda: metrics.record_health(self.job.name, ledger.runs.health()))
                self._quietly(ledger.lock.release)
        finally:
            conn.close()

    def _locked(self, conn: connection.Connection, ledger: Ledger, t0: float) -> None:
        """The attempt, once the job's lock is held; its outcome goes on record in the ledger."""
        started = datetime.now(UTC)  # on record from the lock on: runs of one source never overlap
        marker = Marker(self.settings, self.job, lambda: self.faults.reached("inside_mark"))
        target = TargetSession(self.settings, self.job, ledger.shapes, self.log)
        bad = BadRows(self.ctx, ledger.quarantine, marker.settle)
        loader = BatchLoader(self.ctx, conn, ledger, target, bad, marker, self._marked)
        try:
            try:
                self._drain(ledger, loader, marker, t0)
            finally:
                marker.settle()
            self._finish(conn, target)
        except Outcome as out:
            self._record(ledger, started, t0, out.status, out.message)
            raise
        except EtlError as exc:
            self._record(ledger, started, t0, FAILED, str(exc))
            raise
        else:
            self._record(ledger, started, t0, self.result.status, self.result.message)
        finally:
            bad.flush()  # a streak of failed rows shorter than BROKEN_ROWS: real bad rows
            self._quietly(marker.close)
            loader.close()
            target.close()

    def _tell_held(self, held: list[ForeignBatch], ledger: Ledger) -> None:
        """Say which keys this run leaves alone, and what to do about a renamed or removed job's batch."""
        for other in held:
            if other.flag not in (None, self.job.processed_column):
                self.log.info("batch {} of job {!r} (flag {}) is unfinished: its {} keys are left alone until it is"
                              " done", other.batch_id, other.job, other.flag, other.row_count)
                continue
            self.log.warning("batch {} of job {!r} ({} rows, {}) is unfinished and holds keys of {}: they are"
                             " left alone until it is adopted (`etl-service adopt --batch {} --job {}`) or"
                             " released (`etl-service release --batch {} --job {}`)", other.batch_id, other.job,
                             other.row_count, other.state, ledger.source, other.batch_id, self.job.name,
                             other.batch_id, self.job.name)

    def _drain(self, ledger: Ledger, loader: BatchLoader, marker: Marker, t0: float) -> None:
        """Finish unfinished batches, then claim and load until nothing is left, time is up or a stop is asked."""
        shape = catalog.describe(loader.conn, self.job)
        self.progress.begin(ledger.runs.to_move(shape.key))  # one count; unfinished batches' rows are in it
        reset, refused, keys = ledger.quarantine.stuck()
        if reset or refused:  # rows whose mark a trigger or policy undid are waiting for the fix: load nothing more
            raise MarkNotKept(not_kept(self.job, f"an earlier mark (e.g. of {shape.key.label} = {', '.join(keys)})",
                                       reset, refused, logic.mark_blockers(loader.conn, self.job)))
        held = ledger.others.held_elsewhere(shape.key)
        self._tell_held(held, ledger)
        for batch in ledger.batches.unfinished():
            self.log.info("resuming batch {} ({} rows, state {}, {}/{} chunks loaded)", batch.batch_id,
                          batch.row_count, batch.state, batch.chunks_loaded, batch.chunk_count)
            loader.process(shape, batch)
        after: str | None = None  # keyset: claim past the batch whose mark may still be in flight
        while self._may_claim(t0):
            if after is None:
                marker.settle()  # a claim from the start must not see keys still being marked
            claimed = ledger.batches.claim(shape, after, skip_foreign=bool(held))
            if claimed is None:
                if after is None:
                    marker.settle()
                    loader.reconcile.finish(shape)  # every unprocessed row has been claimed
                    break
                after = None  # end of the key range: look again from the start for late rows
                continue
            after = claimed.last_key
            self.faults.reached("after_claim")
            loader.process(shape, claimed, fresh=True)
            if self.job.wake == "notify" and claimed.row_count < self.job.batch_size:
                # rows trickling in as the run drains: gather them as a woken run would, not batch by tiny batch
                self.stop.wait(self.job.wake_delay)

    def _may_claim(self, t0: float) -> bool:
        """Whether the drain goes on: False when the time budget is spent; raises on a stop or a barren streak."""
        if self.stop.is_set():
            raise Outcome(STOPPED, "stop requested; the ledger is consistent")
        if self.clock() - t0 > self.job.max_run_seconds:
            self.result.message = f"time budget of {self.job.max_run_seconds:.0f}s spent; backlog remains"
            return False
        if self._barren >= BARREN_LIMIT:
            raise EtlError(f"{self._barren} batches in a row were claimed and none of their rows could be"
                           " marked: every claimed row changed or vanished between claim and mark. Is"
                           f" something updating {'.'.join(self.job.source_table)} all the time? See"
                           " `status`; the rows stay unprocessed")
        return True

    def _finish(self, conn: connection.Connection, target: TargetSession) -> None:
        if self.result.batches == 0:
            self.result.status = IDLE
            return
        if self.job.post_pg_sql:
            connection.run_sql(conn, self.job.post_pg_sql)
        if self.job.post_ch_sql:
            clients.run_sql(target.client, self.job.post_ch_sql)

    def _marked(self, batch: Batch, mark: MarkResult, failed: int, bt0: float, oldest: float | None) -> None:
        """Report a marked batch: `failed` of its quarantined rows failed in this run; `oldest`: the
        earliest ETL_LAG_COLUMN time (Unix) among the rows it loaded in this run, if known.

        MarkNotKept when the mark did not stick on some rows (they were set aside): the job stops.
        """
        marked, quarantined = mark.marked, mark.quarantined
        self._barren = self._barren + 1 if batch.row_count and not marked and not failed else 0
        self.result.batches += 1
        self.result.rows_marked += marked
        self.progress.done(marked + failed)
        metrics.ROWS.labels(self.job.name, "marked").inc(marked)
        metrics.BATCH_SECONDS.labels(self.job.name).observe(self.clock() - bt0)
        if oldest is not None and marked:
            latency = max(0.0, mark.at - oldest)
            metrics.MARK_LATENCY.labels(self.job.name).observe(latency)
            self.result.latency = max(latency, self.result.latency or 0.0)
        unmarked = batch.row_count - marked - quarantined
        notes = (f", {quarantined} quarantined" if quarantined else "") + \
            (f", {unmarked} changed since claim (left for the next batch)" if unmarked > 0 else "")
        log = self.log.bind(batch=batch.batch_id)
        log.info("batch {} done: {} rows claimed, {} marked processed{} in {:.2f}s", batch.batch_id, batch.row_count,
                 marked, notes, self.clock() - bt0)
        for key, reason in mark.raised:
            log.warning("row with key {} is in ClickHouse but PostgreSQL refused its mark: set aside as loaded, not"
                        " marked (`requeue` marks it once that is fixed; it is never loaded again): {}", key, reason)
        if mark.stuck:
            raise MarkNotKept(not_kept(self.job, f"the mark of batch {batch.batch_id}", len(mark.reset),
                                       len(mark.refused), mark.blockers))

    def _record(self, ledger: Ledger, started: datetime, t0: float, status: str, message: str) -> None:
        r = self.result
        self._quietly(lambda: ledger.runs.record(started, status, r.batches, r.rows_loaded, r.rows_marked,
                                                 self.clock() - t0, message, r.cause, r.wakeups, r.latency))

    def _quietly(self, action: Callable[[], Any]) -> None:
        """Best-effort cleanup: a broken connection must not mask the run's real outcome."""
        try:
            action()
        except Exception as exc:
            self.log.debug("cleanup step failed: {}", exc)


def run_job(settings: Settings, job: JobConfig, stop: threading.Event | None = None,
            clock: Callable[[], float] = time.monotonic, terminal: TextIO | None = None, cause: str = "once",
            wakeups: int = 0) -> RunResult:
    """Run one job now and drain its backlog (within its time budget).

    `terminal`: draw a progress bar there (`--once` on a terminal) instead of logging progress lines.
    `cause` (start, schedule, wake-up, catch-up, once) and `wakeups` (notifications gathered into
    this run) go on record with the run.
    """
    progress = Progress(logger.bind(job=job.name), settings.progress_seconds, clock, terminal, job.name)
    run = Run(settings, job, stop or threading.Event(), clock, progress)
    run.result.cause, run.result.wakeups = cause, wakeups
    return run.execute()
