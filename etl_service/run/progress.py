"""Progress of a run: rows done out of the backlog, as a bar on a terminal or a log line every 30 s.

Rows done are rows marked processed (a row a transform drops is marked too) plus rows
quarantined, counted when their batch's mark is reported; the total is the backlog counted at
the start of the run, grown if rows that arrived since push the count past it. Under `--once`
with the text format on a terminal, a tqdm bar shows them with rows/s, the time left and the
rows loaded so far, and log lines are written through the bar so they do not garble it.
Anywhere else (the daemon, journald, JSON, a pipe) a run that lasts longer than
ETL_PROGRESS_SECONDS logs one line per period, its figures also bound as `progress={...}`
(JSON keys, journal fields).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

from etl_service import logs

_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:,}/{total:,} rows [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


@dataclass(frozen=True)
class Figures:
    """Where a run stands: what a progress line says, and its fields."""

    rows_done: int
    rows_total: int
    seconds: float  # since the run began counting

    @property
    def rows_per_second(self) -> float:
        return self.rows_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the run's average rate so far; None before a row is done."""
        rate = self.rows_per_second
        return (self.rows_total - self.rows_done) / rate if rate else None

    def fields(self) -> dict[str, Any]:
        eta = self.eta_seconds
        return {"rows_done": self.rows_done, "rows_total": self.rows_total,
                "rows_per_second": round(self.rows_per_second, 1),
                "eta_seconds": None if eta is None else round(eta, 1)}

    def line(self) -> str:
        """`progress: 420,000 of 1,000,000 rows (42%), 84,000 rows/s, about 7 s left`."""
        percent = 100 * self.rows_done // self.rows_total if self.rows_total else 100
        eta = self.eta_seconds
        left = "time left unknown" if eta is None else f"about {_duration(eta)} left"
        return (f"progress: {self.rows_done:,} of {self.rows_total:,} rows ({percent}%),"
                f" {self.rows_per_second:,.0f} rows/s, {left}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


class Progress:
    """Counts one run's rows against its backlog and shows them: a bar on `terminal`, else periodic lines.

    `begin` is called at the start of each attempt of the run, `loaded` after each chunk is
    inserted, `done` when a batch's mark is reported, `finish` once at the end. The counting
    calls are safe from any thread and cost a lock and a time check unless a line is due.
    `interval` 0: no lines.
    """

    def __init__(self, log: Any, interval: float, clock: Callable[[], float] = time.monotonic,
                 terminal: TextIO | None = None, name: str = "") -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._terminal = terminal
        self._name = name
        self._lock = threading.Lock()
        self._bar: tqdm[Any] | None = None
        self._started: float | None = None
        self._next_line = 0.0
        self.rows_done = self.rows_total = self.rows_loaded = 0

    def begin(self, rows_left: int) -> None:
        """Count from here: the total is what this run has done so far plus `rows_left` (counted now)."""
        with self._lock:
            if self._started is None:
                self._started = self._clock()
                self._next_line = self._started + self._interval
            self.rows_total = self.rows_done + rows_left
            self._show()

    def loaded(self, rows: int) -> None:
        """A chunk of `rows` was inserted into ClickHouse (shown on the bar; not done until marked)."""
        with self._lock:
            self.rows_loaded += rows
            self._show()

    def done(self, rows: int) -> None:
        """`rows` were marked processed or quarantined."""
        with self._lock:
            self.rows_done += rows
            self.rows_total = max(self.rows_total, self.rows_done)  # rows that arrived since the count
            self._show()

    def finish(self) -> None:
        """Take the bar off the terminal (log lines go straight to it again)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
                logs.route_terminal(None)

    def _show(self) -> None:
        if self._started is None:
            return
        if self._terminal is not None:
            self._draw(self._terminal)
            return
        now = self._clock()
        if self._interval and now >= self._next_line:
            self._next_line = now + self._interval
            figures = Figures(self.rows_done, self.rows_total, now - self._started)
            self._log.bind(progress=figures.fields()).info(figures.line())

    def _draw(self, terminal: TextIO) -> None:
        if self._bar is None:
            if not self.rows_total:
                return  # nothing to do (yet): no bar flashing by
            self._bar = tqdm(total=self.rows_total, desc=self._name, unit=" rows", unit_scale=True, smoothing=0,
                             miniters=0, dynamic_ncols=True, leave=False, file=terminal, bar_format=_BAR_FORMAT)
            logs.route_terminal(lambda text: tqdm.write(text, file=terminal, end=""))
        bar = self._bar
        bar.total = self.rows_total
        bar.set_postfix_str(f"{self.rows_loaded:,} loaded", refresh=False)
        bar.update(self.rows_done - bar.n)  # draws at most every 0.1 s
