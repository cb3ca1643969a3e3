"""Source versions: each extracted row's version, from its snapshot's horizon and the server's timeline.
"""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from etl_service.postgres.connection import Connection, pg_errors

# Each row's source version, the last column of every extracted chunk: the extraction snapshot's
# horizon (the next 64-bit transaction id when it was taken; every row it reads was committed
# before it) in the low 48 bits, and the timeline it belongs to (`ledger.timelines`) in the bits
# above. A later version of a row is read by a later snapshot — a row is claimed again only after
# the batch that loaded its earlier version is done, and that batch's own ledger writes took ids in
# between — so versions order a row's loads as their commits ordered them. The row's xmin would not:
# ids are handed out when a transaction first writes, not when it commits, so a long transaction
# can commit a newer version of a row under a lower id. No failover or restore makes an older load
# look newer either: a new timeline is higher, and versions that go backwards are refused.
VERSION_COLUMN = "_etl_version"
VERSION_MASK = (1 << 48) - 1  # the transaction id part of a version
XID8 = "v.top"
VERSION_BASE = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS top"


def version_expr(timelines: list[tuple[int, int]]) -> sql.Composable:
    """The version of the rows a snapshot reads: its timeline (the last one whose first id is at most its
    horizon) and its horizon."""
    if not timelines:
        return sql.SQL("(" + XID8 + ")")
    case = sql.SQL(" ").join(sql.SQL("WHEN x.x8 >= {} THEN {}").format(sql.Literal(first), sql.Literal(tl))
                             for tl, first in reversed(timelines))
    return sql.SQL("((CASE {} ELSE {} END)::bigint << 48 | x.x8)").format(case, sql.Literal(timelines[0][0]))


def next_xid(conn: Connection) -> int:
    """The next transaction id the server hands out (64-bit)."""
    with pg_errors("read the next transaction id", conn), conn.cursor() as cur:
        cur.execute(VERSION_BASE)
        top = int(cur.fetchone()[0])  # type: ignore[index]
    conn.rollback()
    return top


def timeline_now(conn: Connection) -> tuple[int, int]:
    """(the server's timeline, a transaction id no lower than the first one written on it if it is new).

    The checkpoint taken at promotion has the new timeline and the next id then; failing that, the
    next id now.
    """
    with pg_errors("read the server's timeline", conn), conn.cursor() as cur:
        cur.execute("SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int,"
                    " pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        timeline, top = cur.fetchone()  # type: ignore[misc]
    conn.rollback()
    try:  # a server that does not let this role read its control file: the next id now will do
        with conn.cursor() as cur:
            cur.execute("SELECT timeline_id, next_xid FROM pg_control_checkpoint()")
            checkpoint_timeline, next_xid = cur.fetchone()  # type: ignore[misc]
    except psycopg2.Error:
        checkpoint_timeline, next_xid = None, None
    conn.rollback()
    if checkpoint_timeline == timeline and next_xid:
        epoch, xid = (int(part) for part in str(next_xid).split(":"))
        return int(timeline), min(epoch << 32 | xid, int(top))
    return int(timeline), int(top)
