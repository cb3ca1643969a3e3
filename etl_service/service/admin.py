"""Commands that change the ledger by hand: requeue quarantined rows, adopt or release another job's batch.

Each prints plain lines for a person and returns True when it did what was asked. Adopting
and releasing take the source's lock first (waiting for a run in progress to end), so they
never change a batch under a running job.
"""

from __future__ import annotations

from collections.abc import Callable

from etl_service.clickhouse import clients, target_table
from etl_service.errors import EtlError
from etl_service.ledger import ForeignBatch, Ledger
from etl_service.postgres import catalog, connection
from etl_service.service.checks import ledger_exists
from etl_service.settings.model import JobConfig, Settings

Print = Callable[[str], None]
LOCK_WAIT = 60.0  # seconds to wait for a run in progress to finish


def requeue(settings: Settings, jobs: list[JobConfig], keys: list[str] | None, out: Print = print) -> bool:
    """Release quarantined rows so the next run claims them again. False if a named key was not quarantined."""
    conn = connection.connect(settings, "requeue")
    try:
        if not ledger_exists(conn, settings.ledger_schema):
            out("nothing to requeue: no run has created the ledger yet")
            return not keys
        ok = True
        for job in jobs:
            key = catalog.describe(conn, job).key
            done = Ledger(conn, settings.ledger_schema, job).quarantine.requeue(key, keys)
            released, unknown, held = done.released, done.unknown, done.held
            out(f"job {job.name}: {len(released)} row(s) released" + (f" ({_few(released)})" if released else ""))
            if done.marked:
                out(f"job {job.name}: {len(done.marked)} row(s) already in ClickHouse marked processed, not loaded"
                    f" again ({_few(done.marked)})")
            if done.stuck:
                out(f"job {job.name}: {len(done.stuck)} row(s) already in ClickHouse still cannot be marked (a trigger"
                    f" or policy on the source resets or refuses the flag; `check` names them): they stay set aside,"
                    f" never loaded again: {_few(done.stuck)}")
                ok = False
            if held:
                out(f"job {job.name}: {len(held)} row(s) stay quarantined until their batch is done (it is marked"
                    f" without them; run `requeue` again then, `status` shows the batch): {_few(held)}")
                ok = False
            if unknown and len(jobs) == 1:
                out(f"job {job.name}: not quarantined, nothing done: {key.label} = {', '.join(unknown)}")
                ok = False
        return ok
    except EtlError as exc:
        out(f"cannot requeue: {exc}")
        return False
    finally:
        conn.close()


def _few(items: list[str]) -> str:
    return ", ".join(items[:20]) + (f" and {len(items) - 20} more" if len(items) > 20 else "")


def adopt(settings: Settings, job: JobConfig, batch_id: int, out: Print = print) -> bool:
    """Make another job name's unfinished batch on `job`'s source `job`'s own; the next run finishes it."""
    return _change(settings, job, batch_id, "adopt", out)


def release(settings: Settings, job: JobConfig, batch_id: int, force: bool, out: Print = print) -> bool:
    """Forget another job name's unfinished batch so its rows are claimed again.

    Refused, unless `force`, when any of its rows may already be in ClickHouse: they would be
    loaded a second time. `adopt` finishes such a batch without reloading.
    """
    return _change(settings, job, batch_id, "release", out, force)


def _change(settings: Settings, job: JobConfig, batch_id: int, action: str, out: Print, force: bool = False) -> bool:
    conn = connection.connect(settings, action)
    try:
        ledger = Ledger(conn, settings.ledger_schema, job)
        ledger.ensure_schema()
        ledger.lock.wait(LOCK_WAIT)
        try:
            key = catalog.describe(conn, job).key
            if action == "release" and not force:
                batch = next((b for b in ledger.others.held_elsewhere(key) if b.batch_id == batch_id), None)
                refusal = _release_refusal(settings, job, batch) if batch else None
                if refusal:
                    out(f"not released: {refusal}")
                    return False
            done = ledger.others.adopt(batch_id) if action == "adopt" else ledger.others.release(batch_id, key)
        finally:
            ledger.lock.release()
    except EtlError as exc:  # UnknownBatch among them
        out(f"cannot {action} batch {batch_id}: {exc}")
        return False
    finally:
        conn.close()
    if action == "adopt":
        out(f"batch {batch_id} ({done.row_count} rows, {done.state}) of job {done.job!r} now belongs to job"
            f" {job.name!r}: its next run finishes it, without loading its loaded chunks again")
    else:
        out(f"batch {batch_id} of job {done.job!r} released: its {done.row_count} row(s) will be claimed again")
    return True


def _release_refusal(settings: Settings, job: JobConfig, batch: ForeignBatch) -> str | None:
    """Why releasing `batch` could load rows twice, or None when ClickHouse shows none of it arrived."""
    if batch.flag not in (None, job.processed_column):
        return (f"batch {batch.batch_id} belongs to job {batch.job!r}, which consumes the flag {batch.flag}: while that"
                " job exists it finishes the batch itself. If it is gone for good, --force releases it")
    if batch.state != "claimed" or batch.chunks_loaded:
        return (f"batch {batch.batch_id} is {batch.state} with {batch.chunks_loaded} chunk(s) in ClickHouse; its"
                f" rows would be loaded twice. `adopt --batch {batch.batch_id}` finishes it instead (or --force)")
    db, table = settings.clickhouse.database, job.target_table
    try:
        client = clients.connect(settings, "admin")
    except EtlError as exc:
        return f"cannot check ClickHouse for rows of batch {batch.batch_id} ({exc}); try again, or --force"
    try:
        columns = target_table.target_columns(client, db, table) or {}
        if target_table.BATCH_COLUMN not in columns:
            return (f"{db}.{table} has no {target_table.BATCH_COLUMN} column, so a chunk inserted just before a crash"
                    f" cannot be ruled out; `adopt` is safe (or --force)")
        rows = clients.query_rows(client, f"SELECT count() FROM {target_table.table_name(db, table)}"
                                  f" WHERE {target_table.BATCH_COLUMN} = {batch.batch_id}")
    finally:
        clients.release(client)
    if rows[0][0]:
        return (f"{db}.{table} already holds {rows[0][0]} row(s) of batch {batch.batch_id}: `adopt` finishes it"
                " without loading them again (or --force)")
    return None
