"""One runner per source: the session-level advisory lock a run holds while it works on a job.

The lock is on the source table (the root of its partition tree), not the job name or the
ledger: a renamed job, a second consumer with its own flag, a job on one of its partitions, or
a second daemon with another configuration never runs beside this one.
"""

from __future__ import annotations

from psycopg2 import sql

from etl_service.ledger.store import Store
from etl_service.postgres.connection import pg_errors

# A missing table (the run then says so) locks on its name.
_KEY = sql.SQL("hashtextextended('etl-service:' || coalesce(coalesce(pg_partition_root(to_regclass(%(src)s)),"
               " to_regclass(%(src)s))::oid::text, %(src)s), 0)")


class Lock:
    """The job's source lock, held by the store's connection until `release` or disconnect."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def take(self) -> bool:
        """Take the lock if it is free; False if another session holds it."""
        rows = self.store.run("take job lock", sql.SQL("SELECT pg_try_advisory_lock({})").format(_KEY),
                              {"src": self.store.quoted_source()})
        return bool(rows[0][0])

    def release(self) -> None:
        self.store.run("release job lock", sql.SQL("SELECT pg_advisory_unlock({})").format(_KEY),
                       {"src": self.store.quoted_source()})

    def holder(self) -> str:
        """Who holds the lock, for the 'skipped' log line."""
        rows = self.store.run("find lock holder", sql.SQL(
            "SELECT a.application_name, a.pid, a.backend_start FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = {}").format(_KEY),
            {"src": self.store.quoted_source()})
        if not rows:
            return "another runner (gone now)"
        app, pid, since = rows[0]
        return f"{app or 'unknown application'} (backend pid {pid}, connected since {since:%Y-%m-%d %H:%M:%S})"

    def wait(self, seconds: float) -> None:
        """Wait up to `seconds` for the lock (for commands that change batches)."""
        conn = self.store.conn
        with pg_errors("wait for the job's lock (is a run in progress?)", conn), conn.cursor() as cur:
            cur.execute("SET lock_timeout = %s", (f"{int(seconds * 1000)}ms",))
            cur.execute(sql.SQL("SELECT pg_advisory_lock({})").format(_KEY), {"src": self.store.quoted_source()})
            cur.execute("RESET lock_timeout")
            conn.commit()
