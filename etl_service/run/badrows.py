"""The bad-row policy: quarantine a row that fails alone; ten in a row mean a broken transform.

The rule, in one place:
- A chunk whose insert fails for its rows' data is split in halves until each bad row is alone
  (`loading`); a row that fails alone is quarantined here, with its reason, and stays unprocessed.
- Chunks in a row whose every row failed alone form a streak, across chunk and batch ends. When
  it reaches BROKEN_ROWS rows, their quarantine is undone and the run fails: batches of the streak
  already marked were marked without those rows (released, they are simply unprocessed again);
  the batch in hand goes back to the streak's first chunk in it, which is safe because none of
  those chunks inserted a row. Only whole chunks count: a chunk that inserted a row is never sent
  again under a transform that may have changed.
- A row that goes ends the streak; the quarantine lines held while a streak might still prove its
  rows not bad are then logged.
- More than ETL_QUARANTINE_LIMIT rows quarantined in one run fail the run.
- A row an earlier attempt quarantined and this attempt loads leaves the quarantine (it is in
  ClickHouse now: it must be marked with its batch, not released to load twice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from etl_service.errors import EtlError
from etl_service.ledger.batches import Batch
from etl_service.ledger.quarantine import Quarantine
from etl_service.postgres.catalog import SourceShape
from etl_service.run import metrics
from etl_service.run.context import RunContext

# Rows in a row that all fail alone before a run takes the transform or target as broken.
BROKEN_ROWS = 10
# Quarantined rows of a batch the log names one by one; the rest are counted in one line.
SHOWN_ROWS = 5


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


class BadRows:
    """The bad rows of one attempt of a run.

    `settle` waits for the mark in flight: an earlier batch's mark must not run after its rows
    leave the quarantine.
    """

    def __init__(self, ctx: RunContext, quarantine: Quarantine, settle: Callable[[], None]) -> None:
        self.ctx = ctx
        self.quarantine = quarantine
        self.settle = settle
        self.failed = 0  # rows that failed alone (quarantined now or by an earlier attempt)
        self._lines: list[tuple[int, str]] = []  # (batch, line): logged once known not all bad
        self._shown: dict[int, int] = {}  # per batch: quarantine lines logged or counted so far
        self._streak: _Streak | None = None
        self._chunk_fails: list[tuple[int, str, bool]] = []  # the chunk's failed rows: position, key, new
        self._last_reason = ""
        self._requarantined = False  # the batch being loaded has rows an earlier attempt quarantined

    def begin_batch(self, batch: Batch) -> None:
        self._requarantined = self.quarantine.in_batch(batch)

    def begin_chunk(self) -> None:
        self._chunk_fails = []

    def loaded(self, batch: Batch, first: int, last: int) -> None:
        """Positions [first, last] of `batch` reached ClickHouse."""
        if self._requarantined:  # rows an earlier attempt quarantined went this time
            self.quarantine.forget_loaded(batch, first, last)

    def failed_alone(self, batch: Batch, shape: SourceShape, position: int, exc: EtlError) -> None:
        """The row at `position` failed on its own: quarantine it (or the run, past the limit)."""
        result = self.ctx.result
        self._last_reason = str(exc)
        found = self.quarantine.add(batch, shape, position, str(exc))
        if found is None:
            return  # the row was deleted meanwhile: nothing to set aside
        key, new = found
        self.failed += 1
        self._chunk_fails.append((position, key, new))
        if not new:  # a resumed batch meets a row an earlier attempt quarantined: counted then
            return
        result.rows_quarantined += 1
        metrics.ROWS.labels(self.ctx.job.name, "quarantined").inc()
        self._lines.append((batch.batch_id, f"row {shape.key.label}={key} quarantined: {exc}"))
        limit = self.ctx.settings.quarantine_limit
        if result.rows_quarantined > limit:
            self.flush()
            raise EtlError(f"more than ETL_QUARANTINE_LIMIT={limit} rows quarantined in"
                           " this run: is the transform or the target table broken? See `status`; release"
                           " rows with `requeue` after the fix")

    def end_chunk(self, batch: Batch, chunk: int, first: int, last: int, sent: int) -> None:
        """Count a chunk whose every row failed into the streak (see the module docstring)."""
        fails = self._chunk_fails
        if sent or len(fails) != last - first + 1:
            self._streak = None
            self.flush()  # held while a streak might still prove them not bad
            return
        if self._streak is None:
            self._streak = _Streak(self.failed - len(fails),
                                   self.ctx.result.rows_quarantined - sum(f[2] for f in fails))
        self._streak.add(batch, chunk, [f[1] for f in fails], first, last)
        if self._streak.rows >= BROKEN_ROWS:
            self._broken(self._streak)

    def flush(self) -> None:
        """Log the quarantine lines held: a batch's first SHOWN_ROWS rows by name, the rest counted."""
        by_batch: dict[int, list[str]] = {}
        for batch_id, line in self._lines:
            by_batch.setdefault(batch_id, []).append(line)
        for batch_id, lines in by_batch.items():
            log = self.ctx.log.bind(batch=batch_id)
            room = max(0, SHOWN_ROWS - self._shown.get(batch_id, 0))
            for line in lines[:room]:
                log.warning(line)
            self._shown[batch_id] = self._shown.get(batch_id, 0) + len(lines)
            if len(lines) > room:
                log.warning("… and {} more row(s) of batch {} quarantined ({} so far; `status` lists each with its"
                            " reason)", len(lines) - room, batch_id, self._shown[batch_id])
        self._lines.clear()

    def _broken(self, streak: _Streak) -> None:
        """A broken transform or target: undo the streak's quarantine and fail the run."""
        result = self.ctx.result
        self.settle()
        for batch_id, keys in streak.keys.items():
            self.quarantine.release_keys(batch_id, keys, streak.chunks[batch_id])
        self.failed, result.rows_quarantined = streak.failed, streak.quarantined
        self._lines.clear()
        self._streak = None
        others = result.rows_quarantined
        kept = (f"they were not quarantined ({others} other row(s) of this run were: `status` lists them)" if others
                else "nothing was quarantined")
        raise EtlError(f"{streak.where()} (last reason: {self._last_reason}): a broken transform or target, not"
                       f" bad rows; {kept} — fix it and the next run retries")
