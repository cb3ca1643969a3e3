"""`status`: what each job is doing, gathered as data, then shown as text for people or JSON for scripts.

Everything comes from PostgreSQL (the source and the ledger), so `status` works while the
daemon runs and holds a chDB folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from etl_service.errors import EtlError
from etl_service.ledger import Ledger
from etl_service.ledger.runs import null_flag_fix
from etl_service.postgres import catalog, connection
from etl_service.postgres.keys import Key
from etl_service.service import wake
from etl_service.service.checks import ledger_exists
from etl_service.settings.model import JobConfig, Settings

Print = Callable[[str], None]
QUARANTINE_SHOWN = 5


def status(settings: Settings, out: Print = print, as_json: bool = False) -> bool:
    """Per job: backlog, unfinished batches, quarantine, recent runs. True if nothing needs attention."""
    conn = connection.connect(settings, "status")
    try:
        jobs = [_job(conn, settings, job) for job in settings.jobs]
    finally:
        conn.close()
    healthy = not any(j["needs_attention"] for j in jobs)
    if as_json:
        out(json.dumps({"healthy": healthy, "jobs": jobs}, default=str, indent=2))
    else:
        for job in jobs:
            _render(job, out)
    return healthy


def _job(conn: connection.Connection, settings: Settings, job: JobConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"job": job.name, "source": ".".join(job.source_table), "target": job.target_table,
                            "flag": job.processed_column}
    try:
        shape = catalog.describe(conn, job)
        ledger = Ledger(conn, settings.ledger_schema, job)
        data.update(key=shape.key.label, null_keys=ledger.runs.null_keys(shape.key),
                    null_flags=ledger.runs.null_flags(), ledger=ledger_exists(conn, settings.ledger_schema))
        if data["ledger"]:
            health = ledger.runs.health()
            since = (datetime.now(UTC) - health.last_success).total_seconds() if health.last_success else None
            data.update(backlog=health.backlog, lag_seconds=round(health.lag_seconds, 1), waiting=health.waiting,
                        seconds_since_success=None if since is None else round(since, 1))
            _ledger_part(ledger, shape.key, data, settings.clickhouse.database)
        else:
            data["backlog"] = ledger.runs.backlog()
    except EtlError as exc:
        data["error"] = str(exc)
    data["needs_attention"] = bool(data.get("error") or data.get("foreign") or data.get("quarantined")
                                   or data.get("null_flags") or data.get("wake_trigger", "present") != "present"
                                   or (data.get("runs") and data["runs"][0]["status"] == "failed"))
    return data


def _ledger_part(ledger: Ledger, key: Key, data: dict[str, Any], database: str) -> None:
    data["unfinished"] = [{"batch": b.batch_id, "state": b.state, "rows": b.row_count}
                          for b in ledger.batches.unfinished()]
    data["foreign"] = [{"batch": f.batch_id, "job": f.job, "state": f.state, "rows": f.row_count,
                        "chunks_loaded": f.chunks_loaded, "claimed_at": f.claimed_at, "source": f.source}
                       for f in ledger.others.foreign()]
    data["held_by_other_consumers"] = [
        {"batch": h.batch_id, "job": h.job, "flag": h.flag, "state": h.state, "rows": h.row_count}
        for h in ledger.others.held_elsewhere(key) if h.flag not in (None, ledger.job.processed_column)]
    span = ledger.reconcile.open_span(f"{database}.{ledger.job.target_table}")
    data["reconciling"] = None if span is None else {
        "batches": [span.above + 1, span.upto], "rows_there_when_found": span.rows, "since": span.since,
        "matched": span.matched}
    count, recent = ledger.quarantine.summary(QUARANTINE_SHOWN)
    data["quarantined"] = count
    data["quarantine"] = [{"key": key, "reason": reason, "at": when} for key, reason, when in recent]
    data["runs"] = [{"started_at": started, "status": st, "batches": batches, "rows_loaded": loaded,
                     "rows_marked": marked, "seconds": round(seconds, 3), "message": message, "cause": cause,
                     "latency": None if latency is None else round(latency, 3)}
                    for started, st, batches, loaded, marked, seconds, message, cause, latency in ledger.runs.recent()]
    woken, other, wakeups, latency = ledger.runs.wakes()
    data["last_hour"] = {"runs_woken": woken, "runs_other": other, "wakeups": wakeups,
                         "longest_commit_to_mark": None if latency is None else round(latency, 3)}
    if ledger.job.wake == "notify":
        data["wake_trigger"] = wake.trigger_state(ledger.conn, ledger.job)
    change = ledger.shapes.last_change(ledger.job.target_table)
    data["last_column_change"] = None if change is None else {"did": change[0], "at": change[1]}


def _render(job: dict[str, Any], out: Print) -> None:
    out(f"job {job['job']} ({job['source']} -> {job['target']}):")
    if "error" in job:
        out(f"  cannot read: {job['error']}")
        return
    _render_backlog(job, out)
    if not job["ledger"]:
        out("  no runs yet (the ledger is created by the first run)")
        return
    by_state: dict[str, list[int]] = {}
    for batch in job["unfinished"]:
        by_state.setdefault(batch["state"], []).append(batch["batch"])
    out("  unfinished batches: " + (", ".join(f"{s}: {ids}" for s, ids in by_state.items()) or "none")
        + (f" ({job['waiting']} loaded, waiting for readiness)" if job["waiting"] else ""))
    since = job["seconds_since_success"]
    out(f"  last success: {'never' if since is None else _duration(since) + ' ago'}")
    for other in job["foreign"]:
        where = "this source" if other["source"] else "an unknown source (recorded by an older version)"
        claimed = f"{other['claimed_at']:%Y-%m-%d %H:%M:%S}"
        out(f"  batch {other['batch']} of job {other['job']!r} (not this job) holds {other['rows']} key(s) of {where}:"
            f" {other['state']}, {other['chunks_loaded']} chunk(s) loaded, claimed {claimed};"
            f" its keys are not claimed until you `adopt --batch {other['batch']} --job {job['job']}` (finish it,"
            " no reload) or `release` it")
    for held in job["held_by_other_consumers"]:
        out(f"  batch {held['batch']} of job {held['job']!r} (flag {held['flag']}, {held['state']}) holds"
            f" {held['rows']} key(s): this job skips them until it is done; if that job is gone for good,"
            f" `release --batch {held['batch']} --job {job['job']} --force`")
    if job.get("reconciling"):
        span = job["reconciling"]
        out(f"  reconciling with ClickHouse since {span['since']:%Y-%m-%d %H:%M:%S}: the ledger had lost batches"
            f" {span['batches'][0]}..{span['batches'][1]} ({span['rows_there_when_found']} rows in ClickHouse);"
            f" {span['matched']} row(s) found there so far were marked, not loaded again (closes after a run that"
            " claims every unprocessed row)")
    count = job["quarantined"]
    out(f"  quarantined rows: {count}" + (" (release with `requeue` after fixing them)" if count else ""))
    for row in job["quarantine"]:
        out(f"    {job['key']}={row['key']} at {row['at']:%Y-%m-%d %H:%M:%S}: {row['reason']}")
    if count > len(job["quarantine"]):
        out(f"    and {count - len(job['quarantine'])} more")
    _render_wakes(job, out)
    _render_change(job, out)
    out("  last runs:" if job["runs"] else "  last runs: none")
    for run in job["runs"]:
        tail = f" — {run['message']}" if run["message"] else ""
        cause = f" ({run['cause']})" if run["cause"] else ""
        latency = f" commit-to-mark≤{run['latency']:.2f}s" if run["latency"] is not None else ""
        out(f"    {run['started_at']:%Y-%m-%d %H:%M:%S} {run['status']:8} batches={run['batches']}"
            f" loaded={run['rows_loaded']} marked={run['rows_marked']} {run['seconds']:.1f}s{cause}{latency}{tail}")


def _render_change(job: dict[str, Any], out: Print) -> None:
    change = job.get("last_column_change")
    if change:
        out(f"  last column change at the source, followed {change['at']:%Y-%m-%d %H:%M:%S}: {change['did']}")


def _render_wakes(job: dict[str, Any], out: Print) -> None:
    hour = job["last_hour"]
    latency = hour["longest_commit_to_mark"]
    longest = f"; longest commit-to-mark {latency:.2f}s" if latency is not None else ""
    if "wake_trigger" in job:
        state = job["wake_trigger"]
        trigger = "" if state == "present" else \
            f" — the wake-up trigger is {state}: the job runs on its schedule only (`check` says how to fix it)"
        out(f"  wake-ups (last hour): {hour['wakeups']} notification(s) started {hour['runs_woken']} run(s),"
            f" {hour['runs_other']} other run(s){longest}{trigger}")
    elif latency is not None:
        out(f"  last hour: {hour['runs_woken'] + hour['runs_other']} run(s){longest}")


def _render_backlog(job: dict[str, Any], out: Print) -> None:
    lag = f"; the oldest waits {_duration(job['lag_seconds'])}" if job.get("lag_seconds") else ""
    out(f"  backlog: {job['backlog']} unprocessed row(s){lag}")
    if job["null_keys"]:
        out(f"  cannot move: {job['null_keys']} row(s) with a NULL key ({job['key']}); they are never claimed")
    if job["null_flags"]:
        out(f"  cannot move: {job['null_flags']} row(s) with a NULL flag ({job['flag']}): NULL is not false, they are"
            f" never claimed; to send them, {null_flag_fix(job['source'], job['flag'])}")


def _duration(seconds: float) -> str:
    """12 s, 4 min, 3.5 h, 2.1 days: enough precision for a person."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"
