"""Read-only inspection: connectivity for start-up, `check` and `status` reports.

`check` and `status` print plain lines to stdout (they are for people); start-up waits for
both databases with backoff, logging each failure, and never crashes on an outage.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from loguru import logger
from psycopg2 import sql

from etl_service.clickhouse import clients, evolution, fit, guard, inserts, readiness, target_table
from etl_service.errors import ConfigError, EtlError, MarkNotKept, TransientError
from etl_service.ledger import Ledger, schema
from etl_service.ledger.mark import not_kept
from etl_service.ledger.runs import null_flag_fix
from etl_service.postgres import catalog, connection, extract, logic
from etl_service.service import wake
from etl_service.settings import cron
from etl_service.settings.model import JobConfig, Settings

Print = Callable[[str], None]


def ping_pg(settings: Settings) -> str:
    """PostgreSQL's version; SourceUnavailable if it is down, ConfigError if it refuses us."""
    conn = connection.connect(settings, "check")
    try:
        with connection.pg_errors("read server version"), conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return str(cur.fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()


def ping_ch(settings: Settings) -> str:
    """ClickHouse's version; SinkUnavailable (EngineBusy for a chDB folder held elsewhere) if unreachable,
    ConfigError if this user's profile would keep a retried insert twice."""
    client = clients.connect(settings, "check")
    try:
        version = str(clients.query_rows(client, "SELECT version()")[0][0])
        notes = inserts.check_insert_settings(client)
        return version + (f" ({'; '.join(notes)})" if notes else "")
    finally:
        clients.release(client)


def ping(settings: Settings) -> tuple[str, str]:
    """Versions of both servers; raises SourceUnavailable / SinkUnavailable if one is down."""
    return ping_pg(settings), ping_ch(settings)


def wait_until_reachable(settings: Settings, stop: threading.Event, max_delay: float = 60.0) -> bool:
    """Retry `ping` with capped exponential backoff; False if stopped before both answered."""
    delay = settings.retry_backoff
    while not stop.is_set():
        try:
            pg_version, ch_version = ping(settings)
            logger.info("reachable: PostgreSQL {}, ClickHouse {}", pg_version, ch_version)
            return True
        except TransientError as exc:
            logger.error("{} — retrying in {:.1f}s", exc, delay)
            if stop.wait(delay):
                break
            delay = min(delay * 2, max_delay)
    return False


def check(settings: Settings, out: Print = print, as_json: bool = False) -> bool:
    """Validate connectivity and every job's source and target; print findings. True if all is well."""
    if as_json:
        found = _Findings(settings)
        healthy = _check(settings, found.add)
        out(json.dumps({"healthy": healthy, **found.data}, indent=2))
        return healthy
    return _check(settings, out)


class _Findings:
    """Collects `check`'s lines as data: the connections' findings, then each job's."""

    def __init__(self, settings: Settings) -> None:
        self.jobs = iter(settings.jobs)
        self.data: dict[str, Any] = {"connections": [], "jobs": []}
        self.current: list[dict[str, str]] = self.data["connections"]

    def add(self, line: str) -> None:
        if line.startswith("job "):
            job = next(self.jobs)
            self.data["jobs"].append({"job": job.name, "summary": line, "findings": []})
            self.current = self.data["jobs"][-1]["findings"]
        elif line.startswith("  "):
            level, _, text = line.strip().partition(" ")
            self.current.append({"level": level.lower(), "text": text.strip()})
        else:
            self.current.append({"level": "info", "text": line})


def _check(settings: Settings, out: Print) -> bool:
    out(f"PostgreSQL: {settings.pg_display}")
    out(f"ClickHouse: {settings.clickhouse.display}")
    try:
        out(f"  ok   PostgreSQL {ping_pg(settings)}")
        out(f"  ok   ClickHouse {ping_ch(settings)}")
    except clients.EngineBusy as exc:
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
                word = next((w for w in ("note", "FAIL") if line.startswith(f"{w}: ")), "")
                out(f"  {word or 'ok  '} {line.removeprefix(f'{word}: ')}")
                healthy = healthy and word != "FAIL"
        except EtlError as exc:
            out(f"  FAIL {exc}")
            healthy = False
    return healthy


def _check_job(settings: Settings, job: JobConfig) -> list[str]:
    lines = [cron.format_next_runs(job.trigger())]
    conn = connection.connect(settings, "check")
    try:
        shape = catalog.describe(conn, job)
        key = shape.key
        lines.append(f"source has {len(shape.columns)} column(s) to move; key {key.label}"
                     f" ({', '.join(c.pg_type for c in key.columns)}) is unique")
        extract.dry_run(settings, conn, job, shape)
        lines.append("every column reads (binary COPY) into its ClickHouse type")
        lines.extend(_pg_privileges(conn, settings, job))
        lines.extend(f"note: {advice}" for advice in logic.hot_advice(conn, job))
        lines.extend(f"note: {found} can reset or refuse the service's mark of {job.processed_column}: a trigger"
                     f" must leave it alone (e.g. fire only WHEN (old.{job.processed_column} IS NOT DISTINCT FROM"
                     f" new.{job.processed_column})), a policy must let the service's role update the rows it reads;"
                     " a mark that does not stick stops the job" for found in logic.mark_blockers(conn, job))
        lines.extend(f"note: {found} applies to this role: rows it hides are not seen, so they never move and are"
                     " not in the backlog" for found in logic.hiding_policies(conn, job))
        schema.check_not_foreign(conn, settings.ledger_schema)
        ledger = Ledger(conn, settings.ledger_schema, job)
        lines.append(f"{ledger.runs.backlog()} unprocessed row(s)")
        nulls = ledger.runs.null_keys(key)
        if nulls:
            lines.append(f"note: {nulls} unprocessed row(s) cannot move: their key has a NULL")
        null_flags = ledger.runs.null_flags()
        if null_flags:
            lines.append(f"note: cannot move: {null_flags} row(s) with a NULL flag ({job.processed_column}): NULL is"
                         f" not false, they are never claimed; to send them,"
                         f" {null_flag_fix('.'.join(job.source_table), job.processed_column)}")
        if job.wake == "notify":
            lines.extend(wake.check_lines(conn, settings, job))
        aligned = None  # the source types the target was last brought in step with (None: never)
        targets = dict(zip((c.name for c in shape.columns), shape.targets, strict=True))
        defaults = {targets[name]: text for name, (_, text) in catalog.missing_values(conn, job, shape.columns).items()
                    if text is not None}  # what rows that predate a column hold in it (see catalog.missing_values)
        if ledger_exists(conn, settings.ledger_schema):
            aligned = ledger.shapes.aligned(job.target_table)
            reset, refused, stuck = ledger.quarantine.stuck()
            if reset or refused:  # the job is stopped until the cause is fixed and the rows requeued
                raise MarkNotKept(not_kept(job, f"an earlier mark (e.g. of {key.label} = {', '.join(stuck)})", reset,
                                           refused, logic.mark_blockers(conn, job)))
            span = ledger.reconcile.open_span(f"{settings.clickhouse.database}.{job.target_table}")
            if span:
                lines.append(f"note: reconciling with ClickHouse since {span.since:%Y-%m-%d %H:%M:%S}: the ledger had"
                             f" lost batches {span.above + 1}..{span.upto} ({span.rows} rows in ClickHouse); rows"
                             " found there are marked, not loaded again, until a run has claimed every row")
            for other in ledger.others.held_elsewhere(key):  # ConfigError if another consumer uses another key
                lines.append(f"note: batch {other.batch_id} of job {other.job!r} (flag {other.flag}) holds keys of"
                             " this source, which this job skips until it is done (see `status`)")
    finally:
        conn.close()
    return lines + _check_target(settings, job, shape, aligned, defaults)


def _check_target(settings: Settings, job: JobConfig, shape: catalog.SourceShape,
                  aligned: dict[str, str] | None, defaults: dict[str, str]) -> list[str]:
    lines = []
    try:
        client = clients.connect(settings, "check")
    except clients.EngineBusy as exc:
        return [f"note: ClickHouse part not checked: {exc}"]
    try:
        db, table = settings.clickhouse.database, job.target_table
        name = target_table.table_name(db, table)
        described = target_table.describe_target(client, db, table)
        if described is None:
            target_table.check_types(client, shape)
            lines.append(f"target {db}.{table} does not exist yet: the first run creates it (every column's type"
                         " checked on this server)")
        else:
            info, views = described
            lines.append(f"target {db}.{table} exists ({info.engine}, {len(info.columns)} column(s))")
            accepted = guard.check_dedup(info, name, job.target_dedup)
            lines.append(f"note: {accepted}" if accepted else f"target drops a repeated insert ({info.engine})")
            if job.target_mode == "latest":
                guard.check_latest(info, name, bool(job.deleted_column),
                                   ", ".join(f"`{c}` {t}" for c, t in info.columns.items()), shape.key_targets)
                lines.append("target keeps the latest version of each key (SELECT … FINAL: the current rows)")
            lines.extend(f"note: {line}" for line in target_table.doubling_views(client, views))
            if not job.transform:
                lines.extend(f"FAIL: {problem}" for problem in fit.refused(
                    [(t, c.pg_type, c.arrow_type) for c, t in zip(shape.columns, shape.targets, strict=True)],
                    info.columns))
                # what the next run will do, or the SchemaChangeError (with the statement) that would stop it
                plan = evolution.evolve(info, shape, name, "", job.schema_changes == "auto", aligned, defaults)
                lines.extend(f"note: the next run will apply: {change}" for change in plan.changes)
                lines.extend(f"note: the next run will make {name} again with sort-key column {column} {kind}"
                             " (ClickHouse cannot change a sort-key column's type), copying its rows, if no view"
                             " reads it and no batch waits to be marked" for column, kind, _ in plan.recreate)
                lines.extend(f"note: {w}" for w in plan.warnings)
        lines.append(target_table.check_grants(client, db, table, described is not None))
        if job.ready_query:
            readiness.check_ready_query(client, job.ready_query)
            ready = readiness.is_ready(client, job.ready_query, 0, settings.ch_query_timeout)
            lines.append(f"readiness query runs (currently {'ready' if ready else 'not ready'})")
    finally:
        clients.release(client)
    return lines


_PG_PRIVILEGES = """
SELECT current_user, has_table_privilege(%(src)s, 'SELECT'), has_column_privilege(%(src)s, %(flag)s, 'UPDATE'),
       CASE WHEN to_regnamespace(%(quoted_schema)s) IS NULL THEN has_database_privilege(current_database(), 'CREATE')
            ELSE has_schema_privilege(%(schema)s, 'USAGE') AND has_schema_privilege(%(schema)s, 'CREATE') END
"""


def _pg_privileges(conn: connection.Connection, settings: Settings, job: JobConfig) -> list[str]:
    """The privileges a run needs on PostgreSQL; ConfigError naming the missing one."""
    src = connection.qualified(job).as_string(conn)
    schema = settings.ledger_schema
    with connection.pg_errors("check privileges", conn), conn.cursor() as cur:
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
    conn = connection.connect(settings, "start")
    try:
        schema.check_not_foreign(conn, settings.ledger_schema)
        for job in settings.jobs:
            shape = catalog.describe(conn, job)
            _pg_privileges(conn, settings, job)
            extract.dry_run(settings, conn, job, shape)
    finally:
        conn.close()


def ledger_exists(conn: connection.Connection, schema: str) -> bool:
    with connection.pg_errors("look for the ledger", conn), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                    (sql.Identifier(schema, "runs").as_string(conn),))
        found = bool(cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return found
