"""Rows sent again: the processed rows of the source that ClickHouse holds differently, set back to unprocessed.

After a column change the rows already loaded cannot show by themselves (a column added with a volatile
default, or by a table rewrite; a type change that converted every value), the run sets the flag of
those rows back to false, a slice of keys at a time, so that the normal path loads each again, as a
newer version of its row (in latest mode FINAL then equals the source; in append mode each key's
newest version does). That is the write an application makes to have a row sent again; it takes the
same row locks as the mark, briefly, and yields to the application's transactions.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg2 import sql

from etl_service.errors import SourceConflict
from etl_service.ledger.store import Store
from etl_service.postgres.connection import pg_errors, qualified
from etl_service.postgres.keys import Key

SLICE = 10_000  # rows set back per transaction
WAITS = (0.1, 0.5, 1.0, 2.0, 5.0)  # a slice that met the application's locks is tried again after these


def resend(store: Store, key: Key, condition: sql.Composable, what: str, log: Any) -> int:
    """Set the flag of the processed rows meeting `condition` back to false; returns how many."""
    job, conn = store.job, store.conn
    flag = sql.Identifier(job.processed_column)
    statement = sql.SQL(
        "UPDATE {t} AS s SET {flag} = false WHERE s.{flag} AND ({row}) IN"
        " (SELECT {inner} FROM {t} AS i WHERE i.{flag} AND {condition} LIMIT {n})").format(
        t=qualified(job), flag=flag, row=key.row("s"), inner=key.row("i"), condition=condition,
        n=sql.Literal(SLICE))
    done, started, told = 0, time.monotonic(), time.monotonic()
    while True:
        for attempt, wait in enumerate((*WAITS, None)):
            try:
                with pg_errors(f"send again the rows of {what}", conn), conn.cursor() as cur:
                    cur.execute("SET LOCAL lock_timeout = '2s'")
                    cur.execute(statement)
                    count = cur.rowcount
                conn.commit()
                break
            except SourceConflict as exc:  # the application's locks, a deadlock: rolled back, safe to redo
                conn.rollback()
                if wait is None:
                    raise
                log.info("sending the rows of {} again: a slice met the application's locks ({}); again in {}s"
                         " (attempt {})", what, str(exc)[:160], wait, attempt + 1)
                time.sleep(wait)
        done += count
        if count < SLICE:
            break
        if time.monotonic() - told >= 10:
            log.info("sending the rows of {} again: {:,} so far ({:.0f}s)", what, done, time.monotonic() - started)
            told = time.monotonic()
    return done
