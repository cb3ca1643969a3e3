"""Read-only inspection: connectivity for start-up, `check` and `status` reports.

`check` and `status` print plain lines to stdout (they are for people); start-up waits for
both databases with backoff, logging each failure, and never crashes on an outage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from loguru import logger
from psycopg2 import sql

from etl_service import cron, sink, source, target
from etl_service.config import JobConfig, Settings
from etl_service.errors import ConfigError, EtlError, TransientError
from etl_service.ledger import Ledger

Print = Callable[[str], None]
QUARANTINE_SHOWN = 5


def ping_pg(settings: Settings) -> str:
    """PostgreSQL's version; SourceUnavailable if it is down, ConfigError if it refuses us."""
    conn = source.connect(settings, "check")
    try:
        with source.pg_errors("read server version"), conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return str(cur.fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()


def ping_ch(settings: Settings) -> str:
    """ClickHouse's version; SinkUnavailable (EngineBusy for a chDB folder held elsewhere) if unreachable."""
    client = sink.connect(settings, "check")
    try:
        return str(sink.query_rows(client, "SELECT version()")[0][0])
    finally:
        sink.release(client)


def ping(settings: Settings) -> tuple[str, str]:
    """Versions of both servers; raises SourceUnavailable / SinkUnavailable if one is down."""
    return ping_pg(settings), ping_ch(settings)


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
        out(f"  ok   PostgreSQL {ping_pg(settings)}")
        out(f"  ok   ClickHouse {ping_ch(settings)}")
    except sink.EngineBusy as exc:
        out(f"  note {exc}: the ClickHouse part is not checked")
    except EtlError as exc:
        out(f"  FAIL {exc}")
        return False
    healthy = True
    for job in settings.jobs:
        out(f"job {job.name}: {'.'.join(job.source_table)} -> {settings.clickhouse.database}.{job.target_table}"
            f" on '{job.schedule}' ({job.timezone})")
        try:
            for line in _check_job(settings, job):
                out(f"  {'note' if line.startswith('note: ') else 'ok  '} {line.removeprefix('note: ')}")
        except EtlError as exc:
            out(f"  FAIL {exc}")
            healthy = False
    return healthy


def _check_job(settings: Settings, job: JobConfig) -> list[str]:
    lines = [cron.format_next_runs(job.trigger())]
    conn = source.connect(settings, "check")
    try:
        shape = source.describe(conn, job)
        key = shape.key
        lines.append(f"source has {len(shape.columns)} column(s) to move; key {key.label}"
                     f" ({', '.join(c.pg_type for c in key.columns)}) is unique")
        lines.extend(_pg_privileges(conn, settings, job))
        ledger = Ledger(conn, settings.ledger_schema, job)
        lines.append(f"{ledger.backlog()} unprocessed row(s)")
        nulls = ledger.null_keys(key)
        if nulls:
            lines.append(f"note: {nulls} unprocessed row(s) cannot move: their key has a NULL")
        if ledger_exists(conn, settings.ledger_schema):
            for other in ledger.foreign():
                lines.append(f"note: batch {other.batch_id} of job {other.job!r} holds keys of this source: adopt"
                             " or release it (see `status`)")
    finally:
        conn.close()
    return lines + _check_target(settings, job, shape)


def _check_target(settings: Settings, job: JobConfig, shape: source.SourceShape) -> list[str]:
    lines = []
    try:
        client = sink.connect(settings, "check")
    except sink.EngineBusy as exc:
        return [f"note: ClickHouse part not checked: {exc}"]
    try:
        db, table = settings.clickhouse.database, job.target_table
        name = sink.table_name(db, table)
        described = sink.describe_target(client, db, table)
        if described is None:
            lines.append(f"target {db}.{table} does not exist yet: the first run creates it")
        else:
            info, views = described
            lines.append(f"target {db}.{table} exists ({info.engine}, {len(info.columns)} column(s))")
            accepted = target.check_dedup(info, name, job.target_dedup)
            lines.append(f"note: {accepted}" if accepted else f"target drops a repeated insert ({info.engine})")
            lines.extend(f"note: {line}" for line in sink.doubling_views(client, views))
            if not job.transform:
                plan = target.evolve(info, shape, name, "", job.schema_changes == "auto")
                lines.extend(f"note: the next run will apply: {change}" for change in plan.changes)
                lines.extend(f"note: {w}" for w in plan.warnings)
        lines.append(sink.check_grants(client, db, table, described is not None))
        if job.ready_query:
            ready = sink.is_ready(client, job.ready_query, 0, settings.ch_query_timeout)
            lines.append(f"readiness query runs (currently {'ready' if ready else 'not ready'})")
    finally:
        sink.release(client)
    return lines


_PG_PRIVILEGES = """
SELECT current_user, has_table_privilege(%(src)s, 'SELECT'), has_column_privilege(%(src)s, %(flag)s, 'UPDATE'),
       CASE WHEN to_regnamespace(%(quoted_schema)s) IS NULL THEN has_database_privilege(current_database(), 'CREATE')
            ELSE has_schema_privilege(%(schema)s, 'USAGE') AND has_schema_privilege(%(schema)s, 'CREATE') END
"""


def _pg_privileges(conn: source.Connection, settings: Settings, job: JobConfig) -> list[str]:
    """The privileges a run needs on PostgreSQL; ConfigError naming the missing one."""
    src = source.qualified(job).as_string(conn)
    schema = settings.ledger_schema
    with source.pg_errors("check privileges", conn), conn.cursor() as cur:
        cur.execute(_PG_PRIVILEGES, {"src": src, "flag": job.processed_column, "schema": schema,
                                     "quoted_schema": sql.Identifier(schema).as_string(conn)})
        user, select, update, ledger = cur.fetchone()  # type: ignore[misc]
    conn.rollback()
    to = f"TO {sql.Identifier(user).as_string(conn)}"
    missing = [grant for ok, grant in (
        (select, f"GRANT SELECT ON {src} {to}"),
        (update, f"GRANT UPDATE ({sql.Identifier(job.processed_column).as_string(conn)}) ON {src} {to}"),
        (ledger, f"GRANT USAGE, CREATE ON SCHEMA {sql.Identifier(schema).as_string(conn)} {to}"
                 " (or CREATE on the database, for the first run to create it)"),
    ) if not ok]
    if missing:
        raise ConfigError("PG_USER", "lacks privileges the service needs", "; ".join(missing))
    return ["PostgreSQL privileges: SELECT and UPDATE of the flag on the source, USAGE and CREATE on the ledger"]


def preflight(settings: Settings) -> None:
    """At start: every job's source, key and privileges are right, or ConfigError (exit 78)."""
    conn = source.connect(settings, "start")
    try:
        for job in settings.jobs:
            source.describe(conn, job)
            _pg_privileges(conn, settings, job)
    finally:
        conn.close()


def status(settings: Settings, out: Print = print) -> bool:
    """Per job: backlog, unfinished batches, recent runs. True if every job could be read."""
    conn = source.connect(settings, "status")
    healthy = True
    try:
        for job in settings.jobs:
            out(f"job {job.name} ({'.'.join(job.source_table)} -> {job.target_table}):")
            try:
                healthy = _job_status(conn, settings, job, out) and healthy
            except EtlError as exc:
                out(f"  cannot read: {exc}")
                healthy = False
    finally:
        conn.close()
    return healthy


def _job_status(conn: source.Connection, settings: Settings, job: JobConfig, out: Print) -> bool:
    """Print one job's state; False when it needs attention (failed run, quarantine, foreign batches)."""
    shape = source.describe(conn, job)
    ledger = Ledger(conn, settings.ledger_schema, job)
    out(f"  backlog: {ledger.backlog()} unprocessed row(s)")
    nulls = ledger.null_keys(shape.key)
    if nulls:
        out(f"  cannot move: {nulls} row(s) with a NULL key ({shape.key.label}); they are never claimed")
    if not ledger_exists(conn, settings.ledger_schema):
        out("  no runs yet (the ledger is created by the first run)")
        return True
    healthy = _batches(ledger, job, out)
    count, recent = ledger.quarantined(QUARANTINE_SHOWN)
    out(f"  quarantined rows: {count}" + (" (release with `requeue` after fixing them)" if count else ""))
    for key, reason, when in recent:
        out(f"    {shape.key.label}={key} at {when:%Y-%m-%d %H:%M:%S}: {reason}")
    if count > len(recent):
        out(f"    and {count - len(recent)} more")
    runs = ledger.recent_runs()
    out("  last runs:" if runs else "  last runs: none")
    for started, st, batches, loaded, marked, seconds, message in runs:
        tail = f" — {message}" if message else ""
        out(f"    {started:%Y-%m-%d %H:%M:%S} {st:8} batches={batches} loaded={loaded} marked={marked}"
            f" {seconds:.1f}s{tail}")
    return healthy and not count and not (runs and runs[0][1] == "failed")


def _batches(ledger: Ledger, job: JobConfig, out: Print) -> bool:
    by_state: dict[str, list[int]] = {}
    for batch in ledger.unfinished():
        by_state.setdefault(batch.state, []).append(batch.batch_id)
    out("  unfinished batches: " + (", ".join(f"{s}: {ids}" for s, ids in by_state.items()) or "none"))
    foreign = ledger.foreign()
    for other in foreign:
        where = "this source" if other.source else "an unknown source (recorded by an older version)"
        out(f"  batch {other.batch_id} of job {other.job!r} (not this job) holds {other.row_count} key(s) of {where}:"
            f" {other.state}, {other.chunks_loaded} chunk(s) loaded, claimed {other.claimed_at:%Y-%m-%d %H:%M:%S};"
            " its keys are not claimed until you `adopt --batch"
            f" {other.batch_id} --job {job.name}` (finish it, no reload) or `release` it")
    return not foreign


def ledger_exists(conn: source.Connection, schema: str) -> bool:
    with source.pg_errors("look for the ledger", conn), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                    (sql.Identifier(schema, "runs").as_string(conn),))
        found = bool(cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return found
