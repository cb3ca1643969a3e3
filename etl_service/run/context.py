"""What a run is given and what it reports: its settings, clock and stop, its status and counts.

The run (`pipeline`), the batch loading (`loading`) and the bad-row policy (`badrows`) share this
vocabulary; none of them reaches for a global clock, stop flag or logger.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etl_service.faults import Faults
from etl_service.run.progress import Progress
from etl_service.settings.model import JobConfig, Settings

# Run outcomes. `ok` and `idle` are success; the rest make `--once` exit non-zero.
OK, IDLE, WAITING, SKIPPED, STOPPED, FAILED = "ok", "idle", "waiting", "skipped", "stopped", "failed"
SUCCESS = (OK, IDLE)
OUTCOMES = (OK, IDLE, WAITING, SKIPPED, STOPPED, FAILED)


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
    cause: str = "once"  # what started the run: once, start, schedule, wake-up, catch-up
    wakeups: int = 0  # notifications gathered into this run (ETL_WAKE=notify)
    latency: float | None = None  # the longest commit-to-mark of a row marked (ETL_LAG_COLUMN), seconds

    def line(self) -> str:
        rate = f" ({self.rows_marked / self.seconds:,.0f} rows/s)" if self.rows_marked and self.seconds else ""
        text = (f"job={self.job} status={self.status} batches={self.batches} rows_loaded={self.rows_loaded}"
                f" rows_marked={self.rows_marked} rows_quarantined={self.rows_quarantined}"
                f" seconds={self.seconds:.2f}{rate}")
        return f"{text}: {self.message}" if self.message else text


class Outcome(Exception):
    """Ends a run early with a status that is not an error (waiting, skipped, stopped)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RunContext:
    """One run's settings, job, stop event, clock, fault points, progress, result and logger."""

    settings: Settings
    job: JobConfig
    stop: threading.Event
    clock: Callable[[], float]
    faults: Faults
    progress: Progress
    result: RunResult
    log: Any  # loguru's logger bound to the job
