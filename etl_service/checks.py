"""Read-only inspection: connectivity for start-up, `check` and `status` reports.

`check` and `status` print plain lines to stdout (they are for people); start-up waits for
both databases with backoff, logging each failure, and never crashes on an outage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from loguru import logger
from psycopg2 import sql

from etl_service import sink, source
from etl_service.config import JobConfig, Settings
from etl_service.errors import EtlError, TransientError
from etl_service.ledger import Ledger

Print = Callable[[str], None]


def ping(settings: Settings) -> tuple[str, str]:
    """Versions of both servers; raises SourceUnavailable / SinkUnavailable if one is down."""
    conn = source.connect(settings, "check")
    try:
        with source.pg_errors("read server version"), conn.cursor() as cur:
            cur.execute("SHOW server_version")
            pg_version = str(cur.fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()
    client = sink.connect(settings)
    try:
        ch_version = str(sink.query_rows(client, "SELECT version()")[0][0])
    finally:
        client.close()
    return pg_version, ch_version


def wait_until_reachable(settings: Settings, stop: threading.Event, max_delay: float = 60.0) -> bool:
    """Retry `ping` with capped exponential backoff; False if stopped before both answered."""
    delay = settings.retry_backoff
    while not stop.is_set():
        try:
            pg_version, ch_version = ping(settings)
            logger.info("PostgreSQL {} and ClickHouse {} reachable", pg_version, ch_version)
            return True
        except TransientError as exc:
            logger.error("{} — retrying in {:.1f}s", exc, delay)
            if stop.wait(delay):
                break
            delay = min(delay * 2, max_delay)
    return False


def check(settings: Settings, out: Print = print) -> bool:
    """Validate connectivity and every job's source and target; print findings. True if all is well."""
    out(f"PostgreSQL: {settings.pg_display}")
    out(f"ClickHouse: {settings.clickhouse.display}")
    try:
        pg_version, ch_version = ping(settings)
    except EtlError as exc:
        out(f"  FAIL {exc}")
        return False
    out(f"  ok   PostgreSQL {pg_version}, ClickHouse {ch_version}")
    healthy = True
    for job in settings.jobs:
        out(f"job {job.name}: {'.'.join(job.source_table)} -> {settings.clickhouse.database}.{job.target_table}"
            f" on '{job.schedule}' ({job.timezone})")
        try:
            for line in _check_job(settings, job):
                out(f"  ok   {line}")
        except EtlError as exc:
            out(f"  FAIL {exc}")
            healthy = False
    return healthy


def _check_job(settings: Settings, job: JobConfig) -> list[str]:
    lines = []
    conn = source.connect(settings, "check")
    try:
        shape = source.describe(conn, job)
        lines.append(f"source has {len(shape.columns)} column(s) to move, key {job.source_key} ({shape.key_type})")
        backlog = Ledger(conn, settings.ledger_schema, job).backlog()
        lines.append(f"{backlog} unprocessed row(s)")
    finally:
        conn.close()
    client = sink.connect(settings)
    try:
        db, table = settings.clickhouse.database, job.target_table
        existing = sink.target_columns(client, db, table)
        if existing is None:
            lines.append(f"target {db}.{table} does not exist yet: the first run creates it")
        else:
            warnings = [] if job.transform else sink.fit_columns(existing, list(shape.targets), f"{db}.{table}")
            lines.append(f"target {db}.{table} exists with {len(existing)} column(s)")
            lines.extend(f"note: {w}" for w in warnings)
        if job.ready_query:
            ready = sink.is_ready(client, job.ready_query, 0, settings.ch_query_timeout)
            lines.append(f"readiness query runs (currently {'ready' if ready else 'not ready'})")
    finally:
        client.close()
    return lines


def status(settings: Settings, out: Print = print) -> bool:
    """Per job: backlog, unfinished batches, recent runs. True if every job could be read."""
    conn = source.connect(settings, "status")
    healthy = True
    try:
        for job in settings.jobs:
            out(f"job {job.name} ({'.'.join(job.source_table)} -> {job.target_table}):")
            try:
                _job_status(conn, settings, job, out)
            except EtlError as exc:
                out(f"  cannot read: {exc}")
                healthy = False
    finally:
        conn.close()
    return healthy


def _job_status(conn: source.Connection, settings: Settings, job: JobConfig, out: Print) -> None:
    ledger = Ledger(conn, settings.ledger_schema, job)
    out(f"  backlog: {ledger.backlog()} unprocessed row(s)")
    if not _ledger_exists(conn, settings.ledger_schema):
        out("  no runs yet (the ledger is created by the first run)")
        return
    unfinished = ledger.unfinished()
    by_state: dict[str, list[int]] = {}
    for batch in unfinished:
        by_state.setdefault(batch.state, []).append(batch.batch_id)
    out("  unfinished batches: " + (", ".join(f"{s}: {ids}" for s, ids in by_state.items()) or "none"))
    count, recent = ledger.quarantined()
    out(f"  quarantined rows: {count}" + (" (release with `requeue` after fixing them)" if count else ""))
    for key, reason, when in recent:
        out(f"    {job.source_key}={key} at {when:%Y-%m-%d %H:%M:%S}: {reason}")
    runs = ledger.recent_runs()
    out("  last runs:" if runs else "  last runs: none")
    for started, st, batches, loaded, marked, seconds, message in runs:
        tail = f" — {message}" if message else ""
        out(f"    {started:%Y-%m-%d %H:%M:%S} {st:8} batches={batches} loaded={loaded} marked={marked}"
            f" {seconds:.1f}s{tail}")


def requeue(settings: Settings, jobs: list[JobConfig], keys: list[str] | None, out: Print = print) -> bool:
    """Release quarantined rows so the next run claims them again. True if it could be done."""
    conn = source.connect(settings, "requeue")
    try:
        if not _ledger_exists(conn, settings.ledger_schema):
            out("nothing to requeue: no run has created the ledger yet")
            return True
        for job in jobs:
            released = Ledger(conn, settings.ledger_schema, job).requeue(keys)
            shown = ", ".join(released[:20]) + (" …" if len(released) > 20 else "")
            out(f"job {job.name}: {len(released)} row(s) released" + (f" ({shown})" if released else ""))
    except EtlError as exc:
        out(f"cannot requeue: {exc}")
        return False
    finally:
        conn.close()
    return True


def _ledger_exists(conn: source.Connection, schema: str) -> bool:
    with source.pg_errors("look for the ledger", conn), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                    (sql.Identifier(schema, "runs").as_string(conn),))
        found = bool(cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return found
