"""What the metrics endpoint shows for a job before and after its runs (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import generate_latest

from etl_service.ledger import Health
from etl_service.run import metrics
from etl_service.run.pipeline import OUTCOMES


def _samples(job: str) -> dict[str, float]:
    """`name{labels}` -> value for the job's series, as a scrape would read them."""
    lines = generate_latest(metrics.REGISTRY).decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if not line.startswith("#") and f'job="{job}"' in line and "_created" not in line}


def test_a_declared_job_counts_every_outcome_from_zero() -> None:
    metrics.declare("declared", OUTCOMES)
    counts = {k: v for k, v in _samples("declared").items() if k.startswith("etl_run_duration_seconds_count")}
    assert counts == {f'etl_run_duration_seconds_count{{job="declared",status="{outcome}"}}': 0.0
                      for outcome in ("ok", "idle", "waiting", "skipped", "stopped", "failed")}
    metrics.RUN_SECONDS.labels("declared", "failed").observe(1.5)
    assert _samples("declared")['etl_run_duration_seconds_count{job="declared",status="failed"}'] == 1.0


def test_health_sets_the_gauges_and_the_last_success_from_the_ledger() -> None:
    finished = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    metrics.record_health("healthy", Health(backlog=120, lag_seconds=42.5, waiting=1, quarantined=3,
                                            last_success=finished))
    assert _samples("healthy") == {'etl_backlog_rows{job="healthy"}': 120.0,
                                   'etl_lag_seconds{job="healthy"}': 42.5,
                                   'etl_batches_waiting{job="healthy"}': 1.0,
                                   'etl_quarantined_rows{job="healthy"}': 3.0,
                                   'etl_last_success_timestamp_seconds{job="healthy"}': finished.timestamp()}


def test_a_job_that_never_succeeded_has_no_last_success() -> None:
    metrics.record_health("never", Health(backlog=5, lag_seconds=0.0, waiting=0, quarantined=0, last_success=None))
    assert 'etl_last_success_timestamp_seconds{job="never"}' not in _samples("never")
    assert _samples("never")['etl_backlog_rows{job="never"}'] == 5.0
