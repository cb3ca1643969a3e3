"""The quarantine: rows set aside with their reason, so the rest of their batch goes on.

A quarantined row stays unprocessed and is never marked with its batch (the mark leaves out every
row quarantined in that batch, under whichever job name). Only the ledger's own rules live here;
when a row is set aside, and when a streak of failures is a broken transform instead, is the
bad-row policy's (`etl_service.badrows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql

from etl_service.errors import MarkNotKept, SourceError
from etl_service.ledger.batches import Batch
from etl_service.ledger.mark import Beyond
from etl_service.ledger.store import MINE, Store
from etl_service.postgres import logic
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.connection import pg_errors, qualified
from etl_service.postgres.keys import Key


@dataclass(frozen=True)
class Requeued:
    """What `requeue` did, key by key."""

    released: list[str]  # the next run claims them (a failed row, or a loaded one that has changed since)
    marked: list[str]  # loaded rows marked now, not loaded again
    stuck: list[str]  # loaded rows whose mark still does not stick: they stay
    unknown: list[str]  # asked-for keys that were not quarantined
    held: list[str]  # rows of unfinished batches, each as "key (batch N, state)"


class Quarantine:
    """The job's quarantined rows."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, batch: Batch, shape: SourceShape, position: int, reason: str) -> tuple[str, bool] | None:
        """Set aside the row at `position` of the batch with its reason.

        Returns (its key, whether it is newly quarantined: not by an earlier attempt), or None if
        the row is gone.
        """
        rows = self.store.run("quarantine row", sql.SQL(
            "INSERT INTO {s}.quarantine (job, key, batch_id, reason, row)"
            " SELECT %(job)s, b.keys[%(pos)s], b.batch_id, %(reason)s, to_jsonb(s) FROM {s}.batches b"
            " JOIN {src} s ON {matches} WHERE b.batch_id = %(batch)s"
            " ON CONFLICT (job, key) DO UPDATE SET batch_id = EXCLUDED.batch_id, reason = EXCLUDED.reason,"
            " row = EXCLUDED.row, quarantined_at = now(), kind = 'failed' RETURNING key, xmax = 0"
        ).format(s=self.store.schema, src=qualified(self.store.job),
                 matches=shape.key.matches("s", sql.SQL("b.keys[%(pos)s]"))),
            {"job": self.store.job.name, "pos": position, "reason": reason[:2000], "batch": batch.batch_id})
        return (str(rows[0][0]), bool(rows[0][1])) if rows else None

    def in_batch(self, batch: Batch) -> bool:
        """Whether rows of `batch` are quarantined (by an earlier attempt at it)."""
        return bool(self.store.run("look for the batch's quarantined rows", sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {s}.quarantine WHERE batch_id = %s)").format(s=self.store.schema),
            (batch.batch_id,))[0][0])

    def forget_loaded(self, batch: Batch, first: int, last: int) -> None:
        """Forget the quarantine of key positions [first, last] of `batch`: they have just been loaded.

        An earlier attempt quarantined them (the transform then raised, say); loaded now, they
        must be marked with the batch, not left quarantined for a `requeue` to load them twice.
        """
        self.store.run("clear the quarantine of loaded rows", sql.SQL(
            "DELETE FROM {s}.quarantine q USING {s}.batches b WHERE b.batch_id = %(batch)s"
            " AND q.batch_id = b.batch_id AND q.key = ANY(b.keys[%(first)s:%(last)s])").format(s=self.store.schema),
            {"batch": batch.batch_id, "first": first, "last": last})

    def release_keys(self, batch_id: int, keys: list[str], chunks_loaded: int) -> None:
        """Undo the quarantine of `keys` of a batch (a failure that was not the rows').

        An unfinished batch goes back to `chunks_loaded` in the same transaction, so those chunks
        (which inserted nothing) are loaded again. A done batch was marked without these rows:
        released, they are unprocessed rows like any other.
        """
        self.store.run("release quarantined rows", sql.SQL(
            "DELETE FROM {s}.quarantine WHERE batch_id = %(batch)s AND key = ANY(%(keys)s);"
            " UPDATE {s}.batches SET chunks_loaded = %(chunks)s"
            " WHERE batch_id = %(batch)s AND state <> 'done' AND chunks_loaded > %(chunks)s"
        ).format(s=self.store.schema), {"batch": batch_id, "keys": keys, "chunks": chunks_loaded})

    def requeue(self, key: Key, keys: list[str] | None = None) -> Requeued:
        """Release quarantined rows (all of the job's, or `keys`) so the next run claims them again.

        A row that failed is released: the next run claims and loads it. A row set aside as loaded
        but not marked is in ClickHouse: it is marked now, never loaded again, if its data is what
        was loaded (the same xmin, or every column but the flag unchanged: an operator who set a
        NULL flag to false has not changed the row); if its mark still does not stick it stays; if
        its data has changed since, it is released (its new version is loaded like any change).
        A row whose batch is unfinished stays quarantined: that batch is marked without it, and
        releasing it first would let the mark flag a row that never reached ClickHouse.
        Rows set aside as loaded under an earlier name of this job (same table and flag) count as
        the job's own.
        """
        keys = list(dict.fromkeys(keys)) if keys else keys  # a key asked for twice is one key
        wanted = [self._canonical(key, k) for k in keys] if keys else None
        where = sql.SQL(" AND q.key = ANY(%(keys)s)") if wanted is not None else sql.SQL("")
        params = {**self.store.names(), "keys": wanted}
        mine = sql.SQL(MINE).format(s=self.store.schema)
        marked, stuck = self._mark_loaded(key, mine, where, params)
        rows = self.store.run("requeue quarantined rows", sql.SQL(
            "DELETE FROM {s}.quarantine q WHERE {mine}{where} AND NOT EXISTS (SELECT 1 FROM {s}.batches b"
            " WHERE b.batch_id = q.batch_id AND b.state <> 'done') AND NOT q.key = ANY(%(stuck)s)"
            " RETURNING q.key").format(s=self.store.schema, mine=mine, where=where), {**params, "stuck": stuck})
        held = self.store.run("look for quarantined rows of unfinished batches", sql.SQL(
            "SELECT q.key, b.batch_id, b.state FROM {s}.quarantine q JOIN {s}.batches b ON b.batch_id = q.batch_id"
            " WHERE {mine}{where} AND b.state <> 'done' ORDER BY b.batch_id, q.key").format(
                s=self.store.schema, mine=mine, where=where), params)
        gone = {str(r[0]) for r in rows}
        released = sorted(gone - set(marked))
        waiting = {str(r[0]) for r in held}
        known = gone | waiting | set(stuck)
        unknown = [k for k, c in zip(keys or [], wanted or [], strict=True) if c not in known]
        return Requeued(released, sorted(gone & set(marked)), sorted(stuck), unknown,
                        [f"{r[0]} (batch {r[1]}, {r[2]})" for r in held])

    def _mark_loaded(self, key: Key, mine: sql.Composable, where: sql.Composable,
                     params: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Mark the rows set aside as loaded whose data is what was loaded; (marked keys, keys still not kept).

        Still not kept: a row whose data is unchanged but whose flag is not true after the mark
        (reset again, or not reached). A mark that changes more than those rows' flag (a trigger's
        other work) is rolled back: MarkNotKept.
        """
        job, conn = self.store.job, self.store.conn
        flag = sql.Identifier(job.processed_column)
        matches = key.matches("s", sql.SQL("q.key"))
        # the row as it was loaded: its xmin then, or every column but the flag as it was then
        same = sql.SQL("(s.xmin = q.row_xmin OR (to_jsonb(s) - %(flag)s) = (q.row - %(flag)s))")
        loaded = sql.SQL("FROM {s}.quarantine q WHERE {mine}{where} AND q.kind <> 'failed'").format(
            s=self.store.schema, mine=mine, where=where)
        mark = sql.SQL("UPDATE {src} s SET {flag} = true {loaded} AND {matches} AND {same}{one}"
                       " RETURNING q.key, {encoded} IS DISTINCT FROM q.key")
        with pg_errors("mark rows set aside as loaded", conn), conn.cursor() as cur:
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
            beyond = Beyond()
            cur.execute("SAVEPOINT etl_requeue")
            try:
                before = logic.changes_in_transaction(cur, job)
                cur.execute(mark.format(src=qualified(job), flag=flag, loaded=loaded, one=sql.SQL(""),
                                        matches=matches, same=same, encoded=key.encode("s")), params)
                done = cur.fetchall()
                tried, rekeyed = [str(r[0]) for r in done], [str(r[0]) for r in done if r[1]]
                beyond.add(before, logic.changes_in_transaction(cur, job), len(tried))
            except psycopg2.DatabaseError:  # PostgreSQL still refuses some: one at a time, the rest go
                cur.execute("ROLLBACK TO SAVEPOINT etl_requeue")
                tried, rekeyed = self._mark_one_by_one(cur, mark.format(
                    src=qualified(job), flag=flag, loaded=loaded, one=sql.SQL(" AND q.key = %(one)s"),
                    matches=matches, same=same, encoded=key.encode("s")), loaded, params, beyond)
            if beyond or rekeyed:
                conn.rollback()
                what = f"changed the key of {', '.join(rekeyed[:5])}" if rekeyed else beyond.describe()
                raise MarkNotKept(f"requeue: marking the rows set aside as loaded did more than set {flag.string}:"
                                  f" something {what} in the same transaction. On the source:"
                                  f" {'; '.join(logic.mark_blockers(conn, job)) or 'no trigger on UPDATE is found'}."
                                  " Nothing was marked and nothing is loaded again; they stay set aside until that"
                                  " trigger leaves the service's mark alone")
            # not kept: unchanged but not flagged (tried and reset, or never reached); their xmin is kept up to date
            cur.execute(sql.SQL(
                "UPDATE {s}.quarantine q SET row_xmin = s.xmin FROM {src} s WHERE {mine}{where} AND q.kind <> 'failed'"
                " AND {matches} AND s.{flag} IS NOT TRUE AND (q.key = ANY(%(tried)s) OR {same}) RETURNING q.key")
                .format(s=self.store.schema, src=qualified(job), flag=flag, mine=mine, where=where,
                        matches=matches, same=same), {**params, "tried": tried})
            stuck = [str(r[0]) for r in cur.fetchall()]
            conn.commit()
        return sorted(set(tried) - set(stuck)), stuck

    def _mark_one_by_one(self, cur: Any, mark: sql.Composable, loaded: sql.Composable, params: dict[str, Any],
                         beyond: Beyond) -> tuple[list[str], list[str]]:
        """(keys marked, keys whose key the mark changed), each row in a savepoint of its own (a row
        PostgreSQL refuses stays unmarked)."""
        cur.execute(sql.SQL("SELECT q.key {loaded}").format(loaded=loaded), params)
        tried: list[str] = []
        rekeyed: list[str] = []
        for (one,) in cur.fetchall():
            cur.execute("SAVEPOINT etl_requeue_one")
            try:
                before = logic.changes_in_transaction(cur, self.store.job)
                cur.execute(mark, {**params, "one": one})
                done = cur.fetchall()
                beyond.add(before, logic.changes_in_transaction(cur, self.store.job), len(done))
                tried.extend(str(r[0]) for r in done)
                rekeyed.extend(str(r[0]) for r in done if r[1])
                cur.execute("RELEASE SAVEPOINT etl_requeue_one")
            except psycopg2.DatabaseError:
                cur.execute("ROLLBACK TO SAVEPOINT etl_requeue_one")
        return tried, rekeyed

    def stuck(self) -> tuple[int, int, list[str]]:
        """Rows whose mark did not stick: (how many were reset, how many refused, a few keys)."""
        rows = self.store.run("look for rows whose mark did not stick", sql.SQL(
            "SELECT count(*) FILTER (WHERE kind = 'reset') OVER (), count(*) FILTER (WHERE kind = 'refused') OVER (),"
            " key FROM {s}.quarantine q WHERE {mine} AND kind IN ('reset', 'refused')"
            " ORDER BY quarantined_at DESC, key LIMIT 5").format(s=self.store.schema,
                                                                 mine=sql.SQL(MINE).format(s=self.store.schema)),
            self.store.names())
        if not rows:
            return 0, 0, []
        return int(rows[0][0]), int(rows[0][1]), [str(r[2]) for r in rows]

    def _canonical(self, key: Key, text: str) -> str:
        """`text` as the ledger stores this key (`007` -> `7`); SourceError if it is not one."""
        try:
            query = sql.SQL("SELECT {}").format(key.canonical(sql.SQL("%(k)s")))
            rows = self.store.run(f"read key {text!r}", query, {"k": text})
        except SourceError as exc:
            example = "42" if len(key.columns) == 1 else "[7, 42]"
            raise SourceError(f"{text!r} is not a key of {self.store.source} ({key.label}; e.g. {example}):"
                              f" {exc}") from None
        return str(rows[0][0])

    def summary(self, limit: int = 5) -> tuple[int, list[tuple[Any, ...]]]:
        """How many rows of this job are quarantined, and the most recent few (key, reason, when)."""
        mine = sql.SQL(MINE).format(s=self.store.schema)
        count = self.store.run("count quarantine", sql.SQL(
            "SELECT count(*) FROM {s}.quarantine q WHERE {mine}").format(s=self.store.schema, mine=mine),
            self.store.names())
        recent = self.store.run("read quarantine", sql.SQL(
            "SELECT key, reason, quarantined_at FROM {s}.quarantine q WHERE {mine}"
            " ORDER BY quarantined_at DESC LIMIT %(limit)s").format(s=self.store.schema, mine=mine),
            {**self.store.names(), "limit": limit})
        return int(count[0][0]), recent
