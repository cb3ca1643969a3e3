"""One run of one job: the cycle claim -> extract -> transform -> load -> await ready -> mark, batch after batch.

    pipeline        the run: retries, outcome, summary line, the drain loop (`run_job`)
    context         what a run is given and what it reports (settings, clock, stop, counts)
    loading         one batch: its chunks into ClickHouse, verification, readiness, then the marker
    transform       the built-in column mapping and the user's function, pure
    target_session  the ClickHouse target for one attempt: connect on first need, prepare, close
    marker          marks loaded batches in the background, one at a time
    badrows         the bad-row policy: quarantine a row that fails alone
    reconcile       when the ledger is behind ClickHouse: rows the target holds are marked, not reloaded
    progress        rows done out of the backlog, as a bar or a log line
    metrics         what runs count, as Prometheus metrics

It offers the service `run_job` and the outcome constants; it uses the ledger, the PostgreSQL and
ClickHouse sides, `settings` and `errors`, and nothing of `service`.
"""
