"""Prometheus metrics; served on ETL_METRICS_ADDRESS:ETL_METRICS_PORT by the daemon when the port is set.

Recording is always on (it is a few counter increments per batch); only the HTTP endpoint and
the per-run backlog count are optional.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from etl_service.ledger import Health

REGISTRY = CollectorRegistry()
_DURATIONS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

ROWS = Counter("etl_rows", "Rows by step: extracted, loaded, marked, quarantined", ["job", "step"],
               registry=REGISTRY)
BATCH_SECONDS = Histogram("etl_batch_duration_seconds", "Claim to marked, per batch", ["job"],
                          buckets=_DURATIONS, registry=REGISTRY)
RUN_SECONDS = Histogram("etl_run_duration_seconds", "Whole runs, by outcome", ["job", "status"],
                        buckets=_DURATIONS, registry=REGISTRY)
READY_WAIT_SECONDS = Histogram("etl_readiness_wait_seconds", "Time spent polling the readiness query",
                               ["job"], buckets=_DURATIONS, registry=REGISTRY)
BACKLOG = Gauge("etl_backlog_rows", "Unprocessed source rows after the last run", ["job"], registry=REGISTRY)
LAG = Gauge("etl_lag_seconds", "Age of the oldest unprocessed row after the last run (docs/monitoring.md, Lag)",
            ["job"], registry=REGISTRY)
WAITING = Gauge("etl_batches_waiting", "Batches loaded but not marked (waiting for readiness)", ["job"],
                registry=REGISTRY)
QUARANTINED = Gauge("etl_quarantined_rows", "Rows set aside with their reason, awaiting `requeue`", ["job"],
                    registry=REGISTRY)
WAKEUPS = Counter("etl_wakeups", "Notifications received from commits on the source (ETL_WAKE=notify)", ["job"],
                  registry=REGISTRY)
RUNS_STARTED = Counter("etl_runs_started", "Runs started, by cause: start, schedule, wake-up, catch-up (after"
                       " the listening connection came back), once", ["job", "cause"], registry=REGISTRY)
MARK_LATENCY = Histogram("etl_commit_to_mark_seconds", "Per batch: from the oldest row's ETL_LAG_COLUMN timestamp"
                         " (its commit, about) to the mark of its batch", ["job"],
                         buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300, 1800, 3600, 86400), registry=REGISTRY)
LAST_SUCCESS = Gauge("etl_last_success_timestamp_seconds", "When a run last succeeded (Unix time)", ["job"],
                     registry=REGISTRY)


def declare(job: str, outcomes: Iterable[str]) -> None:
    """Start a scheduled job's run counts at 0 for every outcome.

    A series that appears with its first failure already at 1 shows no increase, so an alert on
    `increase(etl_run_duration_seconds_count{status="failed"}[...])` would miss a lone failure.
    """
    for outcome in outcomes:
        RUN_SECONDS.labels(job, outcome)


def record_health(job: str, health: Health) -> None:
    """Set the per-job gauges from the ledger after a run.

    The last success comes from the ledger too, so a restarted daemon whose runs have not
    succeeded yet still says when one last did (the run itself sets it again when it succeeds).
    """
    for gauge, value in ((BACKLOG, health.backlog), (LAG, health.lag_seconds), (WAITING, health.waiting),
                         (QUARANTINED, health.quarantined)):
        gauge.labels(job).set(value)
    if health.last_success is not None:
        LAST_SUCCESS.labels(job).set(health.last_success.timestamp())


def serve(address: str, port: int) -> None:
    """Expose /metrics over HTTP on `address`:`port`."""
    start_http_server(port, addr=address, registry=REGISTRY)
