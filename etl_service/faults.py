"""Fault injection for the crash and outage tests: inert unless ETL_CRASH_AT / ETL_FAIL_AT is set.

`ETL_CRASH_AT=point[:n]` SIGKILLs this process the n-th time (default 1st) the run reaches
`point`; `ETL_FAIL_AT=point[:n]` raises a transient error there instead, as an outage would.
Points, in cycle order: after_claim, mid_extract, between_chunks, after_last_insert,
during_ready, after_ready, inside_mark. Production configurations never set either variable.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from etl_service.errors import SinkUnavailable, SourceUnavailable

POINTS = ("after_claim", "mid_extract", "between_chunks", "after_last_insert", "during_ready", "after_ready",
          "inside_mark")
# Which side an injected failure pretends to come from.
_SINK_POINTS = {"mid_extract", "between_chunks", "after_last_insert", "during_ready"}


def parse(spec: str) -> tuple[str, int] | None:
    """`point[:n]` -> (point, n); None for an empty spec; ValueError for an unknown point."""
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"unknown point {point!r}; points are {', '.join(POINTS)}")
    return point, int(count or 1)


class Faults:
    """Counts how often each point is reached and fires the configured fault once."""

    def __init__(self, crash_at: tuple[str, int] | None, fail_at: tuple[str, int] | None) -> None:
        self.crash_at = crash_at
        self.fail_at = fail_at
        self.seen: Counter[str] = Counter()

    def reached(self, point: str) -> None:
        if self.crash_at is None and self.fail_at is None:
            return
        self.seen[point] += 1
        if self.crash_at == (point, self.seen[point]):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_at == (point, self.seen[point]):
            error = SinkUnavailable if point in _SINK_POINTS else SourceUnavailable
            raise error(f"injected failure at {point} (ETL_FAIL_AT)")
