"""Prometheus metrics; served on ETL_METRICS_ADDRESS:ETL_METRICS_PORT by the daemon when the port is set.

Recording is always on (it is a few counter increments per batch); only the HTTP endpoint and
the per-run backlog count are optional.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
LAG = Gauge("etl_lag_seconds", "Age of the oldest unprocessed row after the last run (README, Lag)", ["job"],
            registry=REGISTRY)
WAITING = Gauge("etl_batches_waiting", "Batches loaded but not marked (waiting for readiness)", ["job"],
                registry=REGISTRY)
QUARANTINED = Gauge("etl_quarantined_rows", "Rows set aside with their reason, awaiting `requeue`", ["job"],
                    registry=REGISTRY)
LAST_SUCCESS = Gauge("etl_last_success_timestamp_seconds", "When a run last succeeded (Unix time)", ["job"],
                     registry=REGISTRY)


def serve(address: str, port: int) -> None:
    """Expose /metrics over HTTP on `address`:`port`."""
    start_http_server(port, addr=address, registry=REGISTRY)
