"""One job's handle on the ledger tables: its connection, names, and one transaction per statement.

Every part of the ledger package works through a `Store`; none of them holds policy.
"""

from __future__ import annotations

from typing import Any

from psycopg2 import sql

from etl_service.postgres.connection import Connection, pg_errors, qualified
from etl_service.settings.model import JobConfig

# A batch's source is this job's table if it names it, or if it was claimed from the same table
# under another name (renamed since: the table's oid stays). Parameters: source, quoted.
SAME_SOURCE = "(b.source = %(source)s OR b.source_oid = to_regclass(%(quoted)s)::oid)"
# Unfinished batches of any other job on this job's source, whatever its flag: their keys are
# never claimed meanwhile. Another consumer's marking rewrites the row (a new xmin), so two
# batches holding one key at once would each see the other's mark as an update and load it again.
# Parameters: job, source, quoted.
HELD = " WHERE b.state <> 'done' AND b.job <> %(job)s AND (b.source IS NULL OR " + SAME_SOURCE + ")"
# Rows set aside as loaded (in ClickHouse, not marked) by another job name on this job's table and
# flag: the job under an earlier name. They are never claimed again, and this job shows and
# requeues them as its own. Alias q for the quarantine; {s} the schema. Parameters: job, flag,
# source, quoted.
ELSEWHERE = ("(q.job <> %(job)s AND q.kind <> 'failed' AND EXISTS (SELECT 1 FROM {s}.batches qb"
             " WHERE qb.batch_id = q.batch_id AND qb.flag = %(flag)s"
             " AND (qb.source = %(source)s OR qb.source_oid = to_regclass(%(quoted)s)::oid)))")
# The job's quarantined rows: its own, and those ELSEWHERE.
MINE = "(q.job = %(job)s OR " + ELSEWHERE + ")"


class Store:
    """The ledger schema seen from one job, on one connection."""

    def __init__(self, conn: Connection, schema: str, job: JobConfig) -> None:
        self.conn = conn
        self.schema = sql.Identifier(schema)
        self.job = job
        self.source = ".".join(job.source_table)

    def run(self, action: str, query: sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        """Execute in its own transaction; return the rows (if any)."""
        with pg_errors(action, self.conn), self.conn.cursor() as cur:
            cur.execute(query, params)
            rows = cur.fetchall() if cur.description else []
            self.conn.commit()
        return rows

    def names(self) -> dict[str, str]:
        """The job's parameters for SAME_SOURCE and HELD: job, source, flag, quoted."""
        return {"job": self.job.name, "source": self.source, "flag": self.job.processed_column,
                "quoted": self.quoted_source()}

    def quoted(self) -> str:
        """The schema as it appears in SQL."""
        return self.schema.as_string(self.conn)

    def quoted_source(self) -> str:
        return qualified(self.job).as_string(self.conn)
