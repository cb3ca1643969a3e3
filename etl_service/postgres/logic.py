"""The database's own logic around the mark: triggers, rules and row security on the source, and HOT advice.
"""

from __future__ import annotations

import re
from typing import Any

from etl_service.postgres.connection import Connection, pg_errors, qualified
from etl_service.settings.model import JobConfig

# The source's tables that hold rows (its partitions, if partitioned), their fillfactor, and the
# indexes on them other than BRIN ones, with what those index and filter.
_HOT = """
SELECT t.relid::regclass::text, coalesce((SELECT option_value::int FROM pg_options_to_table(c.reloptions)
                                          WHERE option_name = 'fillfactor'), 100),
       x.relname, x.amname, x.definition
FROM (SELECT relid FROM pg_partition_tree(to_regclass(%(table)s)) WHERE isleaf
      UNION SELECT oid FROM pg_class WHERE oid = to_regclass(%(table)s) AND relkind = 'r') t
JOIN pg_class c ON c.oid = t.relid
LEFT JOIN LATERAL (
    SELECT ic.relname, am.amname, pg_get_indexdef(i.indexrelid) AS definition
    FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
    WHERE i.indrelid = t.relid AND am.amname <> 'brin'
      AND (%(attnum)s = ANY(i.indkey::int2[]) OR i.indpred IS NOT NULL OR i.indexprs IS NOT NULL)
) x ON true
ORDER BY 1, 3
"""


# The service's own wake-up trigger (ETL_WAKE=notify, wake.py) is quiet in the mark's transaction
# (MARKING) and changes no row: it is never a cause the mark looks for.
MARKING = "SET LOCAL etl_service.marking = 'on'"
_NOT_WAKE = "tg.tgfoid NOT IN (SELECT oid FROM pg_proc WHERE proname = 'etl_wake')"

# Triggers that fire on UPDATE and row security policies that govern UPDATE, on the source, its
# partitions and the tables it is a partition of: what can reset or refuse the service's mark.
_MARK_BLOCKERS = """
WITH t AS (SELECT to_regclass(%(table)s) AS oid UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))
           UNION SELECT relid FROM pg_partition_ancestors(to_regclass(%(table)s)))
SELECT format('%%strigger %%I (%%s UPDATE, for each %%s) on %%s',
              CASE WHEN tg.tginitdeferred THEN 'deferred constraint ' WHEN tg.tgconstraint <> 0 THEN 'constraint '
                   ELSE '' END, tg.tgname,
              CASE WHEN tg.tgtype & 2 = 2 THEN 'BEFORE' WHEN tg.tgtype & 64 = 64 THEN 'INSTEAD OF' ELSE 'AFTER' END,
              CASE WHEN tg.tgtype & 1 = 1 THEN 'row' ELSE 'statement' END, tg.tgrelid::regclass)
FROM pg_trigger tg WHERE tg.tgrelid IN (SELECT oid FROM t) AND NOT tg.tgisinternal AND tg.tgenabled <> 'D'
  AND tg.tgtype & 16 = 16 AND {NOT_WAKE}
UNION ALL
SELECT format('row security policy %%I (%%s) on %%s', p.polname,
              CASE p.polcmd WHEN 'w' THEN 'FOR UPDATE' ELSE 'FOR ALL' END, p.polrelid::regclass)
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
WHERE p.polrelid IN (SELECT oid FROM t) AND c.relrowsecurity AND p.polcmd IN ('w', '*')
ORDER BY 1
""".replace("{NOT_WAKE}", _NOT_WAKE)


# track_counts off (the per-transaction row counters the mark reads stay at 0) on a table whose
# triggers could act on a mark.
BLIND_COUNTERS = """
SELECT current_setting('track_counts') = 'off' AND EXISTS (
  SELECT 1 FROM pg_trigger tg WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D' AND tg.tgtype & 16 = 16
    AND {NOT_WAKE}
    AND tg.tgrelid IN (SELECT to_regclass(%(table)s) UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))
                       UNION SELECT relid FROM pg_partition_ancestors(to_regclass(%(table)s))))
""".replace("{NOT_WAKE}", _NOT_WAKE)


UPDATE_RULES = """
SELECT format('rule %%I (ON UPDATE DO %%s) on %%s', r.rulename, CASE WHEN r.is_instead THEN 'INSTEAD' ELSE 'ALSO' END,
              r.ev_class::regclass)
FROM pg_rewrite r
WHERE r.ev_type = '2' AND r.ev_enabled <> 'D' AND r.ev_class IN (SELECT to_regclass(%(table)s)
      UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s)))
ORDER BY 1
"""


_HIDING = """
SELECT format('row security policy %%I (%%s) on %%s', p.polname,
              CASE p.polcmd WHEN 'r' THEN 'FOR SELECT' ELSE 'FOR ALL' END, p.polrelid::regclass)
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
WHERE p.polrelid = to_regclass(%(table)s) AND c.relrowsecurity AND p.polcmd IN ('r', '*')
  AND row_security_active(p.polrelid)
ORDER BY 1
"""


def hiding_policies(conn: Connection, job: JobConfig) -> list[str]:
    """Row security policies that decide which source rows this role sees (the rest never move)."""
    with pg_errors("read the source's policies", conn), conn.cursor() as cur:
        cur.execute(_HIDING, {"table": qualified(job).as_string(conn)})
        found = [str(row[0]) for row in cur.fetchall()]
    conn.rollback()
    return found


# Rows of the source table (every partition) this transaction has updated, inserted and deleted
# so far, from PostgreSQL's per-transaction counters (they count what triggers do too).
_CHANGES = """
SELECT coalesce(sum(pg_stat_get_xact_tuples_updated(t.oid)), 0),
       coalesce(sum(pg_stat_get_xact_tuples_inserted(t.oid)), 0),
       coalesce(sum(pg_stat_get_xact_tuples_deleted(t.oid)), 0)
FROM (SELECT to_regclass(%(table)s) AS oid UNION SELECT relid FROM pg_partition_tree(to_regclass(%(table)s))) t
"""


def changes_in_transaction(cur: Any, job: JobConfig) -> tuple[int, int, int]:
    """(updated, inserted, deleted) rows of the source so far in the cursor's transaction."""
    cur.execute(_CHANGES, {"table": qualified(job).as_string(cur.connection)})
    row = cur.fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def mark_blockers(conn: Connection, job: JobConfig) -> list[str]:
    """The triggers and row security policies that can reset or refuse the mark of the flag, described."""
    with pg_errors("read the source's triggers and policies", conn), conn.cursor() as cur:
        cur.execute(_MARK_BLOCKERS, {"table": qualified(job).as_string(conn)})
        found = [str(row[0]) for row in cur.fetchall()]
    conn.rollback()
    return found


def hot_advice(conn: Connection, job: JobConfig) -> list[str]:
    """Why marking rows processed cannot be a HOT update here (docs/performance.md, "Tuning"), if it cannot.

    An UPDATE is HOT (no index entry written, about half the work and WAL) when no index but a
    BRIN one refers to the changed column and the row's page has room for the new version. A
    partitioned source is looked at partition by partition (their storage is what counts).
    """
    name = qualified(job).as_string(conn)
    flag = job.processed_column
    with pg_errors("read the source's indexes", conn), conn.cursor() as cur:
        cur.execute("SELECT attnum, quote_ident(attname) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
                    " AND attname = %s", (name, flag))
        found = cur.fetchone()
        cur.execute(_HOT, {"table": name, "attnum": found[0] if found else 0})
        tables = cur.fetchall()
    conn.commit()
    # the flag as pg_get_indexdef prints it (quoted when it must be), not followed by "(" (a function)
    mention = re.compile(r"(?<![\w\"])" + re.escape(found[1] if found else flag) + r"(?![\w\"])(?!\s*\()")
    advice: list[str] = []
    crowded: dict[str, None] = {}  # tables in order, once each
    for table, fillfactor, index_name, am, definition in tables:
        if index_name and mention.search(definition[definition.find(" USING "):]):
            advice.append(f"index {index_name} ({am}) on {table} refers to {flag}, so marking a row writes"
                          f" index entries (no HOT update): a partial BRIN index WHERE NOT {flag} serves a"
                          " backlog without that (docs/performance.md, Tuning)")
        if fillfactor == 100:
            crowded[table] = None
    if crowded:
        crowded_list = list(crowded)
        more = f" and {len(crowded_list) - 3} more" if len(crowded_list) > 3 else ""
        advice.append(f"{', '.join(crowded_list[:3])}{more} {'has' if len(crowded_list) == 1 else 'have'}"
                      " fillfactor 100: a marked row moves to another page (no HOT update); a batch marks whole"
                      f" pages at once, so ALTER TABLE {crowded_list[0]} SET (fillfactor = 50) leaves room for it"
                      " (docs/performance.md, Tuning)")
    return advice
