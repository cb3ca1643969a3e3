"""The PostgreSQL timelines the service has seen, each with the first transaction id written on it.

A row's source version names the timeline its writing transaction belongs to (`postgres.versioning`):
after a failover the new primary hands out transaction ids the lost primary had already used, so
an id alone does not say which transaction wrote a row. A timeline is recorded the first time a
run sees it, with an id no lower than its first transaction's: the checkpoint taken at promotion
(its next id), or the next id now. Ids below it belong to the timelines before.
"""

from __future__ import annotations

from psycopg2 import sql

from etl_service.ledger.store import Store
from etl_service.postgres import versioning


class Timelines:
    """The server's timelines as the ledger has seen them: [(timeline, first transaction id)], oldest first."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def see(self) -> list[tuple[int, int]]:
        """Record the server's current timeline if it is new; return every timeline seen."""
        now, first = versioning.timeline_now(self.store.conn)
        rows = self.store.run("record the server's timeline", sql.SQL(
            "WITH seen AS (INSERT INTO {s}.timelines (timeline, first_xid)"
            " SELECT %(tl)s, CASE WHEN EXISTS (SELECT 1 FROM {s}.timelines) THEN %(first)s ELSE 0 END"
            " WHERE NOT EXISTS (SELECT 1 FROM {s}.timelines WHERE timeline >= %(tl)s)"
            " RETURNING timeline, first_xid)"
            " SELECT timeline, first_xid FROM {s}.timelines UNION SELECT timeline, first_xid FROM seen"
            " ORDER BY 2, 1").format(s=self.store.schema), {"tl": now, "first": first})
        return [(int(r[0]), int(r[1])) for r in rows]
