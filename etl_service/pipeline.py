"""One run of one job: resume unfinished batches, then claim -> extract -> transform -> load ->
await ready -> mark done, batch after batch until the backlog is empty, then post-process.

The data path reads top to bottom in `Run._process`. I/O is in `source`, `ledger` and `sink`;
this module decides order and outcome. Every run ends with one summary line and a row in the
ledger's runs table.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from loguru import logger
from psycopg2 import sql

from etl_service import fit, metrics, sink, source, target, transform
from etl_service.config import JobConfig, Settings
from etl_service.errors import BadSinkValues, ConfigError, EtlError, RowError, TransientError
from etl_service.faults import Faults
from etl_service.ledger import Batch, ForeignBatch, Ledger
from etl_service.marker import Marker
from etl_service.progress import Progress
from etl_service.source import SourceShape, pg_errors

# Run outcomes. `ok` and `idle` are success; the rest make `--once` exit non-zero.
OK, IDLE, WAITING, SKIPPED, STOPPED, FAILED = "ok", "idle", "waiting", "skipped", "stopped", "failed"
SUCCESS = (OK, IDLE)
OUTCOMES = (OK, IDLE, WAITING, SKIPPED, STOPPED, FAILED)
# Batches in a row that may mark nothing before a run gives up (it must progress or end).
BARREN_LIMIT = 3
# Rows in a row that all fail alone before a run takes the transform or target as broken.
BROKEN_ROWS = 10


@dataclass
class RunResult:
    """What one run did; `line()` is the summary logged and shown in STATUS=."""

    job: str
    status: str
    batches: int = 0
    rows_loaded: int = 0
    rows_marked: int = 0
    rows_quarantined: int = 0
    seconds: float = 0.0
    message: str = ""
    permanent: bool = False  # failed on a configuration error: retrying cannot help (exit 78)

    def line(self) -> str:
        rate = f" ({self.rows_marked / self.seconds:,.0f} rows/s)" if self.rows_marked and self.seconds else ""
        text = (f"job={self.job} status={self.status} batches={self.batches} rows_loaded={self.rows_loaded}"
                f" rows_marked={self.rows_marked} rows_quarantined={self.rows_quarantined}"
                f" seconds={self.seconds:.2f}{rate}")
        return f"{text}: {self.message}" if self.message else text


@dataclass
class _Streak:
    """Chunks in a row of a run whose every row failed alone (nothing of them reached the target).

    With the run's counts before them, their quarantined keys per batch and the first such chunk
    of each batch: the batch in hand can go back to it, since none of those chunks inserted a row.
    """

    failed: int
    quarantined: int
    keys: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # batch -> its quarantined keys
    chunks: dict[int, int] = dataclasses.field(default_factory=dict)  # batch -> its first chunk in the streak
    rows: int = 0
    start: tuple[int, int] = (0, 0)  # (batch, position) of its first row
    end: tuple[int, int] = (0, 0)  # and of its last

    def add(self, batch: Batch, chunk: int, keys: list[str], first: int, last: int) -> None:
        if not self.keys:
            self.start = (batch.batch_id, first)
        self.keys.setdefault(batch.batch_id, []).extend(keys)
        self.chunks.setdefault(batch.batch_id, chunk)
        self.rows += len(keys)
        self.end = (batch.batch_id, last)

    def where(self) -> str:
        (b1, p1), (b2, p2) = self.start, self.end
        if b1 == b2:
            return f"every row of positions {p1}-{p2} in batch {b1} failed"
        return f"{self.rows} rows in a row failed, from position {p1} of batch {b1} to position {p2} of batch {b2}"


class _Outcome(Exception):
    """Ends a run early with a status that is not an error (waiting, skipped, stopped)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
        self.faults = Faults(settings.crash_at, settings.fail_at)
        self.marker = Marker(settings, job, lambda: self.faults.reached("inside_mark"))
        self._ch: Any = None
        self._target_types: dict[str, str] = {}
        self._last_reason = ""
        self._quarantine_lines: list[tuple[int, str]] = []  # (batch, line): logged once known not all bad
        self._streak: _Streak | None = None  # rows in a row that all failed, across chunks and batches
        self._chunk_fails: list[tuple[int, str, bool]] = []  # the chunk's failed rows: position, key, new
        self._ledger: Ledger | None = None  # the run's ledger, once the job's lock is held
        self._target_created = False  # this run made the target (a loaded batch must go again)
        self._barren = 0  # batches in a row that marked nothing: a run must progress or end
        self._failed = 0  # rows that failed alone in this run (quarantined now or by an earlier attempt)
        self._requarantined = False  # the batch being loaded has rows an earlier attempt quarantined

    def execute(self) -> RunResult:
        """Run with bounded retries of transient errors; never raises for a run failure."""
        t0 = self.clock()
        attempt = 0
        while True:
            try:
                self._attempt(t0)
                break
            except _Outcome as out:
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
        self._flush_quarantine_lines()  # a streak of failed rows shorter than BROKEN_ROWS: real bad rows
        self.progress.finish()  # the bar goes before the summary line
        self.result.seconds = self.clock() - t0
        metrics.RUN_SECONDS.labels(self.job.name, self.result.status).observe(self.result.seconds)
        if self.result.status in SUCCESS:
            metrics.LAST_SUCCESS.labels(self.job.name).set(time.time())
        level = "ERROR" if self.result.status == FAILED else "INFO"
        r = self.result
        summary = {"status": r.status, "batches": r.batches, "rows_loaded": r.rows_loaded, "rows_marked": r.rows_marked,
                   "rows_quarantined": r.rows_quarantined, "seconds": round(r.seconds, 3)}
        self.log.bind(summary=summary).log(level, "run finished: {}", r.line())
        return self.result

    def _fail(self, message: str) -> None:
        self.result.status, self.result.message = FAILED, message

    def _attempt(self, t0: float) -> None:
        self._flush_quarantine_lines()  # a retried attempt meets the same rows again: no streak carries over
        self._streak = None
        conn = source.connect(self.settings, self.job.name)
        try:
            ledger = Ledger(conn, self.settings.ledger_schema, self.job)
            ledger.ensure_schema()
            if not ledger.lock.take():
                raise _Outcome(SKIPPED, f"skipped: {ledger.lock.holder()} is running this job")
            started = datetime.now(UTC)  # on record from the lock on: runs of one source never overlap
            self._ledger = ledger
            try:
                try:
                    self._drain(conn, ledger, t0)
                finally:
                    self.marker.settle()
                self._finish(conn)
            except _Outcome as out:
                self._record(ledger, started, t0, out.status, out.message)
                raise
            except EtlError as exc:
                self._record(ledger, started, t0, FAILED, str(exc))
                raise
            else:
                self._record(ledger, started, t0, self.result.status, self.result.message)
            finally:
                self._quietly(self.marker.close)
                self._close_clickhouse()
                if self.settings.metrics_port:  # counts the backlog: only when someone reads it
                    self._quietly(lambda: metrics.record_health(self.job.name, ledger.runs.health()))
                self._quietly(ledger.lock.release)
        finally:
            conn.close()

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

    def _drain(self, conn: source.Connection, ledger: Ledger, t0: float) -> None:
        shape = source.describe(conn, self.job)
        self.progress.begin(ledger.runs.to_move(shape.key))  # one count; unfinished batches' rows are in it
        held = ledger.others.held_elsewhere(shape.key)
        self._tell_held(held, ledger)
        for batch in ledger.batches.unfinished():
            self.log.info("resuming batch {} ({} rows, state {}, {}/{} chunks loaded)", batch.batch_id,
                          batch.row_count, batch.state, batch.chunks_loaded, batch.chunk_count)
            self._process(conn, ledger, shape, batch)
        after: str | None = None  # keyset: claim past the batch whose mark may still be in flight
        while True:
            if self.stop.is_set():
                raise _Outcome(STOPPED, "stop requested; the ledger is consistent")
            if self.clock() - t0 > self.job.max_run_seconds:
                self.result.message = f"time budget of {self.job.max_run_seconds:.0f}s spent; backlog remains"
                break
            if after is None:
                self.marker.settle()  # a claim from the start must not see keys still being marked
            if self._barren >= BARREN_LIMIT:
                raise EtlError(f"{self._barren} batches in a row were claimed and none of their rows could be"
                               " marked: every claimed row changed or vanished between claim and mark. Is"
                               f" something updating {'.'.join(self.job.source_table)} all the time? See"
                               " `status`; the rows stay unprocessed")
            claimed = ledger.batches.claim(shape, after, skip_foreign=bool(held))
            if claimed is None:
                if after is None:
                    break
                after = None  # end of the key range: look again from the start for late rows
                continue
            after = claimed.last_key
            self.faults.reached("after_claim")
            self._process(conn, ledger, shape, claimed)

    def _finish(self, conn: source.Connection) -> None:
        if self.result.batches == 0:
            self.result.status = IDLE
        else:
            self._post_process(conn)

    def _process(self, conn: source.Connection, ledger: Ledger, shape: SourceShape, batch: Batch) -> None:
        """One batch through every step; raises _Outcome when it must stop short."""
        shape = self._shape_of(batch, shape)
        bt0 = self.clock()
        failed_before = self._failed
        sent = 0
        if batch.state == "loaded" or batch.chunks_loaded:
            self._clickhouse(shape)  # the target is checked (and made again if it was dropped) first
            if self._target_created:  # what the batch loaded before went with the old table
                sent = self._reload(conn, ledger, shape, batch, "the target table was missing")
                batch = dataclasses.replace(batch, state="loaded", chunks_loaded=batch.chunk_count, rows_loaded=0)
        if batch.state == "claimed":
            sent = self._load(conn, ledger, shape, batch)
        self.faults.reached("during_ready")
        if self.job.ready_query:
            waited = self.clock()
            ready = sink.await_ready(self._clickhouse(shape), self.job.ready_query, batch.batch_id,
                                     self.job.ready_timeout, self.job.ready_poll_interval, self.stop.wait,
                                     self.clock)
            metrics.READY_WAIT_SECONDS.labels(self.job.name).observe(self.clock() - waited)
            if not ready:
                status = STOPPED if self.stop.is_set() else WAITING
                raise _Outcome(status, f"batch {batch.batch_id} is loaded but ClickHouse is not ready;"
                               " the next run polls again")
        self.faults.reached("after_ready")
        self._verify(conn, ledger, shape, batch, batch.rows_loaded + sent)
        if source.retyped(conn, self.job, batch.generation):
            self.log.bind(batch=batch.batch_id).warning(
                "{} was rewritten by ALTER … TYPE while batch {} was in flight: every row has a new xmin, so its"
                " {} rows look changed and load again (an update made before the rewrite cannot be told apart)",
                ".".join(self.job.source_table), batch.batch_id, batch.row_count)
        failed = self._failed - failed_before
        self.marker.submit(batch, shape, lambda done, counts: self._marked(done, *counts, failed, bt0))

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

    def _marked(self, batch: Batch, marked: int, quarantined: int, failed: int, bt0: float) -> None:
        """Report a marked batch: `quarantined` rows of it are in quarantine, `failed` of them failed in this run."""
        self._barren = self._barren + 1 if batch.row_count and not marked and not failed else 0
        self.result.batches += 1
        self.result.rows_marked += marked
        self.progress.done(marked + failed)
        metrics.ROWS.labels(self.job.name, "marked").inc(marked)
        metrics.BATCH_SECONDS.labels(self.job.name).observe(self.clock() - bt0)
        unmarked = batch.row_count - marked - quarantined
        notes = (f", {quarantined} quarantined" if quarantined else "") + \
            (f", {unmarked} changed since claim (left for the next batch)" if unmarked > 0 else "")
        self.log.bind(batch=batch.batch_id).info("batch {} done: {} rows claimed, {} marked processed{} in {:.2f}s",
                                                 batch.batch_id, batch.row_count, marked, notes, self.clock() - bt0)

    def _verify(self, conn: source.Connection, ledger: Ledger, shape: SourceShape, batch: Batch,
                expected: int) -> None:
        """Before marking: ClickHouse holds exactly the rows sent for this batch (ETL_VERIFY_LOAD).

        If it holds none of them (the target was dropped or emptied while the batch waited), the
        batch is loaded again once, with the same tokens: a target that still knows them drops
        the repeat, and the count then fails the run.
        """
        if not self.job.verify_load or not expected:
            return
        client = self._clickhouse(shape)
        if sink.BATCH_COLUMN not in self._target_types:
            return
        db, table = self.settings.clickhouse.database, self.job.target_table
        held = sink.batch_rows(client, db, table, batch.batch_id)
        if held == 0:
            expected = self._reload(conn, ledger, shape, batch, f"ClickHouse holds none of its {expected} rows")
            held = sink.batch_rows(client, db, table, batch.batch_id)
        if held != expected:
            raise EtlError(f"batch {batch.batch_id}: ClickHouse holds {held} of its rows but {expected} were sent,"
                           " so it is not marked and stays loaded. Did a TTL, a row-collapsing engine or a DELETE"
                           " remove rows, or did a retried insert land twice? For a target that drops or folds rows"
                           " by design set ETL_VERIFY_LOAD=off — which would mark this batch as it is")

    def _reload(self, conn: source.Connection, ledger: Ledger, shape: SourceShape, batch: Batch, why: str) -> int:
        """Send a loaded batch again, with the same tokens (a target that still knows them drops them)."""
        self.log.bind(batch=batch.batch_id).warning("batch {}: {} (was the target dropped or emptied?): loading it"
                                                    " again", batch.batch_id, why)
        ledger.batches.reload(batch)
        return self._load(conn, ledger, shape, dataclasses.replace(batch, state="claimed", chunks_loaded=0,
                                                                   rows_loaded=0))

    def _load(self, conn: source.Connection, ledger: Ledger, shape: SourceShape, batch: Batch) -> int:
        """Insert the chunks not yet recorded as loaded, recording each; mark the batch loaded. Returns rows sent."""
        split = set(batch.split)
        total = 0
        self._requarantined = ledger.quarantine.in_batch(batch)  # an earlier attempt set rows of it aside
        for index in range(batch.chunks_loaded, batch.chunk_count):
            if self.stop.is_set():
                raise _Outcome(STOPPED, f"stop requested; batch {batch.batch_id} resumes at chunk {index}")
            first, last = batch.chunk_bounds(index)
            self._chunk_fails = []
            sent = self._load_range(conn, ledger, shape, batch, first, last, split)
            self._follow_streak(ledger, batch, index, first, last, sent)
            last_chunk = index + 1 == batch.chunk_count
            if last_chunk:
                self.faults.reached("after_last_insert")
            ledger.batches.record_chunk(batch, index + 1, sent)
            if not last_chunk:
                self.faults.reached("between_chunks")
            self.result.rows_loaded += sent
            self.progress.loaded(sent)
            total += sent
            self.log.bind(batch=batch.batch_id).debug("chunk {}/{}: {} rows loaded", index + 1,
                                                      batch.chunk_count, sent)
        ledger.batches.set_loaded(batch)
        return total

    def _load_range(self, conn: source.Connection, ledger: Ledger, shape: SourceShape, batch: Batch,
                    first: int, last: int, split: set[str]) -> int:
        """Load key positions [first, last]; on bad rows, split in halves until each bad row is alone.

        A range once split is recorded in the ledger before its halves are sent, so a resumed
        batch takes the same path and every insert keeps its deduplication token.
        """
        if f"{first}-{last}" not in split:
            try:
                sent = self._insert_range(conn, shape, batch, first, last)
                if self._requarantined:  # rows an earlier attempt quarantined went this time
                    ledger.quarantine.forget_loaded(batch, first, last)
                return sent
            except RowError as exc:
                if first == last:
                    self._quarantine(ledger, shape, batch, first, exc)
                    return 0
                self.log.bind(batch=batch.batch_id).warning(
                    "rows {}-{} of batch {}: {} — splitting to find the bad rows", first, last, batch.batch_id, exc)
                ledger.batches.record_split(batch, first, last)
                split.add(f"{first}-{last}")
        middle = (first + last) // 2
        return (self._load_range(conn, ledger, shape, batch, first, middle, split)
                + self._load_range(conn, ledger, shape, batch, middle + 1, last, split))

    def _insert_range(self, conn: source.Connection, shape: SourceShape, batch: Batch, first: int,
                      last: int) -> int:
        client = self._clickhouse(shape)
        data = source.extract_chunk(conn, self.job, shape, self.settings.ledger_schema, batch.batch_id, first, last)
        self.faults.reached("mid_extract")
        metrics.ROWS.labels(self.job.name, "extracted").inc(data.num_rows)
        data = transform.apply(data, self.job.transform, shape.key_targets)
        if not data.num_rows:
            return 0
        misfit = fit.first_misfit(data, self._target_types)
        if misfit:
            raise BadSinkValues(f"{misfit} in {self.settings.clickhouse.database}.{self.job.target_table}")
        sent = sink.insert_chunk(client, self.settings.clickhouse.database, self.job.target_table, data,
                                 batch.batch_id, batch.range_token(first, last),
                                 sink.BATCH_COLUMN in self._target_types)
        metrics.ROWS.labels(self.job.name, "loaded").inc(sent)
        return sent

    def _quarantine(self, ledger: Ledger, shape: SourceShape, batch: Batch, position: int, exc: EtlError) -> None:
        self._last_reason = str(exc)
        found = ledger.quarantine.add(batch, shape, position, str(exc))
        if found is None:
            return  # the row was deleted meanwhile: nothing to set aside
        key, new = found
        self._failed += 1
        self._chunk_fails.append((position, key, new))
        if not new:  # a resumed batch meets a row an earlier attempt quarantined: counted then
            return
        self.result.rows_quarantined += 1
        metrics.ROWS.labels(self.job.name, "quarantined").inc()
        self._quarantine_lines.append((batch.batch_id, f"row {shape.key.label}={key} quarantined: {exc}"))
        if self.result.rows_quarantined > self.settings.quarantine_limit:
            self._flush_quarantine_lines()
            raise EtlError(f"more than ETL_QUARANTINE_LIMIT={self.settings.quarantine_limit} rows quarantined in"
                           " this run: is the transform or the target table broken? See `status`; release"
                           " rows with `requeue` after the fix")

    def _flush_quarantine_lines(self, keep: int = 0) -> None:
        """Log the quarantine lines held, but the last `keep` (rows a streak may still prove not bad)."""
        flushed = len(self._quarantine_lines) - keep
        for batch_id, line in self._quarantine_lines[:flushed]:
            self.log.bind(batch=batch_id).warning(line)
        del self._quarantine_lines[:flushed]

    def _follow_streak(self, ledger: Ledger, batch: Batch, chunk: int, first: int, last: int, sent: int) -> None:
        """Count a chunk whose every row failed into the run's streak of such chunks (see `_broken`).

        Only whole chunks count: a chunk that inserted a row must never be sent again under a
        transform that may have changed (the target would keep the first copy, or the row would
        be quarantined although it is there). A row that goes ends the streak.
        """
        fails = self._chunk_fails
        if sent or len(fails) != last - first + 1:
            self._streak = None
            self._flush_quarantine_lines()  # held while a streak might still prove them not bad
            return
        if self._streak is None:
            self._streak = _Streak(self._failed - len(fails), self.result.rows_quarantined - sum(f[2] for f in fails))
        self._streak.add(batch, chunk, [f[1] for f in fails], first, last)
        if self._streak.rows >= BROKEN_ROWS:
            self._broken(ledger)

    def _broken(self, ledger: Ledger) -> None:
        """Ten rows in a row failed, in whole chunks: a broken transform or target. Undo their
        quarantine and fail the run.

        Batches of the streak before this one were marked without those rows (waited for here):
        released, the rows are simply unprocessed again. This batch goes back to the streak's
        first chunk in it; none of those chunks inserted a row, so sending them again under a
        fixed transform is safe.
        """
        streak = self._streak
        assert streak is not None
        self.marker.settle()  # an earlier batch's mark must not run after its rows leave the quarantine
        for batch_id, keys in streak.keys.items():
            ledger.quarantine.release_keys(batch_id, keys, streak.chunks[batch_id])
        self._failed, self.result.rows_quarantined = streak.failed, streak.quarantined
        self._quarantine_lines.clear()
        self._streak = None
        others = self.result.rows_quarantined
        kept = (f"they were not quarantined ({others} other row(s) of this run were: `status` lists them)" if others
                else "nothing was quarantined")
        raise EtlError(f"{streak.where()} (last reason: {self._last_reason}): a broken transform or target, not"
                       f" bad rows; {kept} — fix it and the next run retries")

    def _clickhouse(self, shape: SourceShape) -> Any:
        """Connect to ClickHouse on first need (an idle run never does) and prepare the target."""
        if self._ch is None:
            client = sink.connect(self.settings, f"job:{self.job.name}")
            try:
                self._prepare_target(client, shape)
            except BaseException:
                sink.release(client)
                raise
            self._ch = client
        return self._ch

    def _prepare_target(self, client: Any, shape: SourceShape) -> None:
        """Create the target, or check that it deduplicates and bring it in step with the source."""
        database, table = self.settings.clickhouse.database, self.job.target_table
        name = sink.table_name(database, table)
        described = sink.describe_target(client, database, table)
        if described is None:
            sink.create_target(client, database, table, shape, ".".join(self.job.source_table),
                               self.settings.clickhouse.cluster)
            self._target_created = True
            self.log.info("created ClickHouse table {}.{} from the source column types", database, table)
            described = sink.describe_target(client, database, table)
            if described is None:
                raise EtlError(f"{name} was created but ClickHouse does not list it")
        info, views = described
        accepted = target.check_dedup(info, name, self.job.target_dedup)
        if accepted:
            self.log.warning(accepted)
        for line in sink.doubling_views(client, views):
            _warn_once(self.log, line)
        if not self.job.transform:  # a transform decides its own columns: ClickHouse checks them at insert
            info = self._evolve(client, info, shape, database, table)
        self._target_types = info.columns

    def _evolve(self, client: Any, info: target.TargetInfo, shape: SourceShape, database: str,
                table: str) -> target.TargetInfo:
        cluster = self.settings.clickhouse.cluster
        on_cluster = f" ON CLUSTER {sink.quote_identifier(cluster)}" if cluster else ""
        aligned = self._ledger.shapes.aligned(table) if self._ledger else None
        plan = target.evolve(info, shape, sink.table_name(database, table), on_cluster,
                             self.job.schema_changes == "auto", aligned)
        for statement, change in zip(plan.statements, plan.changes, strict=True):
            sink.run_statement(client, statement)
            self.log.info("schema change at the source: {} in {}.{}", change, database, table)
        for line in plan.warnings:
            _warn_once(self.log, line)
        if self._ledger and aligned != target.source_types(shape):
            self._ledger.shapes.record(table, target.source_types(shape))
        if plan.statements:
            described = sink.describe_target(client, database, table)
            if described:
                return described[0]
        return info

    def _close_clickhouse(self) -> None:
        if self._ch is not None:
            self._quietly(lambda: sink.release(self._ch))
            self._ch = None
        self._target_created = False  # a retried attempt prepares the target afresh

    def _post_process(self, conn: source.Connection) -> None:
        if self.job.post_pg_sql:
            with pg_errors("post-processing SQL on PostgreSQL", conn), conn.cursor() as cur:
                cur.execute(sql.SQL(self.job.post_pg_sql))  # operator-written SQL from config
                conn.commit()
        if self.job.post_ch_sql:
            sink.run_sql(self._ch, self.job.post_ch_sql)

    def _record(self, ledger: Ledger, started: datetime, t0: float, status: str, message: str) -> None:
        r = self.result
        self._quietly(lambda: ledger.runs.record(started, status, r.batches, r.rows_loaded, r.rows_marked,
                                                self.clock() - t0, message))

    def _quietly(self, action: Callable[[], Any]) -> None:
        """Best-effort cleanup: a broken connection must not mask the run's real outcome."""
        try:
            action()
        except Exception as exc:
            self.log.debug("cleanup step failed: {}", exc)


_WARNED: set[str] = set()  # facts that stay true run after run: logged once per process


def _warn_once(log: Any, line: str) -> None:
    if line not in _WARNED:
        _WARNED.add(line)
        log.warning(line)


def run_job(settings: Settings, job: JobConfig, stop: threading.Event | None = None,
            clock: Callable[[], float] = time.monotonic, terminal: TextIO | None = None) -> RunResult:
    """Run one job now and drain its backlog (within its time budget).

    `terminal`: draw a progress bar there (`--once` on a terminal) instead of logging progress lines.
    """
    progress = Progress(logger.bind(job=job.name), settings.progress_seconds, clock, terminal, job.name)
    return Run(settings, job, stop or threading.Event(), clock, progress).execute()
