"""The mark: flag a loaded batch's rows processed in one transaction, and see that it sticks.

In the mark's own transaction:
1. flag exactly the claimed rows whose xmin is still the claimed one (a row changed since the
   claim is left for the next batch), leaving out the batch's quarantined rows;
2. if PostgreSQL raises for some rows (a trigger that refuses one), mark the batch in halves
   under savepoints until each such row is alone, and set it aside as loaded-not-marked; more
   than MARK_FAILURES rows raising alone is no longer "some rows": the whole mark is rolled back;
3. count what the marking statements did to the source table (PostgreSQL's per-transaction
   row counters, every partition): anything beyond updating the rows they reached — another row
   updated (a trigger that resets rows of an earlier batch, marks child rows, or updates the row
   itself and drops the mark), a row inserted or deleted — or a reached row that no longer has its
   key (a trigger that changed it) means the mark did more than mark: the whole transaction is
   rolled back and the job stops (MarkNotKept). The batch stays loaded and is marked, never loaded
   again, once the trigger leaves the service's mark alone. Deferred constraint triggers fire
   inside the statement (SET CONSTRAINTS ALL IMMEDIATE), so they are counted too;
4. look at the batch's rows again: one still unprocessed that the UPDATE reached (its keys are
   kept in a temporary table as it runs) had its mark reset (a BEFORE trigger set the flag back);
   one whose xmin is still the claimed one was not reached (a trigger returned NULL, a row
   security policy hides it from UPDATE). Neither is counted as marked, and both are set aside as
   loaded-not-marked, so no run claims and loads them again; the run then stops
   (`MarkResult.stuck`). A row that changed since the claim (another xmin, not reached) is left
   for the next batch, as always;
5. close the batch.

A row set aside as loaded is in ClickHouse: `requeue` marks it (never loads it again) once the
cause is fixed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2
import psycopg2.errors
from loguru import logger
from psycopg2 import sql

from etl_service.errors import MarkNotKept, SourceConflict, SourceError
from etl_service.ledger.batches import Batch
from etl_service.ledger.store import SAME_SOURCE, Store
from etl_service.postgres import logic
from etl_service.postgres.catalog import DENSE_AT_LEAST, RANGE_JOIN, SourceShape
from etl_service.postgres.connection import pg_errors, qualified
from etl_service.settings.model import JobConfig

# Rows of one batch whose mark may raise alone before the mark takes the cause as systematic.
MARK_FAILURES = 10
# Errors of the marking statement that are not its rows' doing: a broken connection, a deadlock with the
# application's transactions, a serialization conflict, a lock or statement timeout. The mark is not split for
# them (no row is set aside): the whole transaction is done again (`CONFLICT_WAITS`) or the run retries.
_NOT_THE_ROWS = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.errors.DeadlockDetected,
                 psycopg2.errors.SerializationFailure, psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled)
# A mark that was a deadlock's victim is done again after these many seconds, one after the other.
CONFLICT_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)


@dataclass(frozen=True)
class MarkResult:
    """What a mark did: rows marked, rows of the batch in quarantine, and rows set aside by this mark."""

    marked: int
    quarantined: int
    reset: list[str] = field(default_factory=list)  # keys whose flag was set back in the mark's transaction
    refused: list[str] = field(default_factory=list)  # keys the UPDATE did not reach although unchanged
    raised: list[tuple[str, str]] = field(default_factory=list)  # (key, error) whose mark raised alone
    blockers: list[str] = field(default_factory=list)  # the source's triggers and policies on UPDATE, described
    at: float = 0.0  # when the mark committed (Unix time)

    @property
    def stuck(self) -> bool:
        """The mark did not stick on some rows: a trigger or policy works against it (the job must stop)."""
        return bool(self.reset or self.refused)


class _Raised(Exception):
    """More than MARK_FAILURES rows of a batch raised alone."""


@dataclass
class Beyond:
    """Changes the marking statements made to the source beyond updating the rows they reached."""

    updated: int = 0
    inserted: int = 0
    deleted: int = 0

    def add(self, before: tuple[int, int, int], after: tuple[int, int, int], reached: int) -> None:
        updated, inserted, deleted = (a - b for a, b in zip(after, before, strict=True))
        moved = min(inserted, deleted)  # a row moved to another partition (a flag in the partition key)
        self.updated += updated + moved - reached
        self.inserted += inserted - moved
        self.deleted += deleted - moved

    def __bool__(self) -> bool:
        # Only more is a sign: fewer (counters a server keeps otherwise) must not stop a job.
        return self.updated > 0 or self.inserted > 0 or self.deleted > 0

    def describe(self) -> str:
        parts = [f"{what} {n} other row(s)" for n, what in ((self.updated, "updated"), (self.inserted, "inserted"),
                                                             (self.deleted, "deleted")) if n > 0]
        return ", ".join(parts) or "changed fewer rows than the mark reached"


class Mark:
    """Marks one batch at a time on the store's connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._odd_table = False  # the session's table of reached rows whose mark did not stay exists
        self._others: list[str] | None = None  # other jobs' flags on this table, once read

    def run(self, batch: Batch, shape: SourceShape, before_commit: Callable[[], None]) -> MarkResult:
        """Mark `batch` (see the module docstring); commits unless something raised.

        A mark PostgreSQL rolled back to end a deadlock (the application's transactions locking the
        same rows in another order) is done again, after a short wait, up to len(CONFLICT_WAITS) times.
        """
        waits = iter(CONFLICT_WAITS)
        while True:
            try:
                return self._mark(batch, shape, before_commit)
            except SourceConflict as exc:
                wait = next(waits, None)
                if wait is None:
                    raise
                logger.bind(job=self.store.job.name, batch=batch.batch_id).info("{} — marking again in {:.2f}s",
                                                                                 exc, wait)
                time.sleep(wait)

    def _mark(self, batch: Batch, shape: SourceShape, before_commit: Callable[[], None]) -> MarkResult:
        conn = self.store.conn
        self._other_flags()  # read (and committed) before the mark's transaction begins
        with pg_errors(f"mark batch {batch.batch_id} done", conn), conn.cursor() as cur:
            if not self._odd_table:
                cur.execute("CREATE TEMP TABLE IF NOT EXISTS etl_unkept (key text, rekeyed boolean, reopened boolean)"
                            " ON COMMIT DELETE ROWS")
                conn.commit()
                self._odd_table = True
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # deferred triggers fire where the mark counts them
            cur.execute(logic.MARKING)  # the source's wake-up trigger (ETL_WAKE=notify) stays quiet for it
            ranged = shape.range_join or self._dense(cur, batch, shape)
            if ranged:
                cur.execute(RANGE_JOIN if shape.range_join else RANGE_JOIN + "; SET LOCAL enable_seqscan = off")
            raised: list[tuple[int, str]] = []
            beyond = Beyond()
            try:
                marked = self._update(cur, batch, shape, None, raised, beyond, ranged)
            except _Raised:
                conn.rollback()
                raise SourceError(f"mark batch {batch.batch_id} done: PostgreSQL refused the mark of more than"
                                  f" {MARK_FAILURES} of its rows, one by one (last: {raised[-1][1]}): a trigger or"
                                  " policy on the source refuses the flag; the batch stays loaded, and the next run"
                                  " marks it once that is fixed") from None
            if ranged:  # the checks below probe a few keys each
                cur.execute("SET LOCAL enable_nestloop = on; SET LOCAL enable_seqscan = on")
            cur.execute("SELECT key, rekeyed, reopened FROM pg_temp.etl_unkept ORDER BY key")
            unkept = cur.fetchall()
            rekeyed = [str(key) for key, moved, _ in unkept if moved]
            reopened = [str(key) for key, _, other in unkept if other]
            if beyond or rekeyed or reopened:
                conn.rollback()
                what = (f"changed the key of reached rows (e.g. {', '.join(rekeyed[:5])})" if rekeyed else
                        f"set another job's flag ({', '.join(self._other_flags())}) back to false on rows it had"
                        f" marked (e.g. {', '.join(reopened[:5])}): that job would load them again" if reopened
                        else beyond.describe())
                raise MarkNotKept(beyond_mark(self.store.job, batch.batch_id, what,
                                              logic.mark_blockers(conn, self.store.job)))
            raised_keys = self._set_aside_raised(cur, batch, shape, raised)
            quarantined = self._quarantined(cur, batch)
            reset = [str(key) for key, _, _ in unkept]
            refused = self._refused(cur, batch, shape) if marked + quarantined < batch.row_count else []
            self._set_aside_stuck(cur, batch, shape, reset, refused)
            if marked + quarantined + len(refused) < batch.row_count:
                self._set_aside_hidden(cur, batch, shape)
            marked -= len(reset)  # the UPDATE reached them, but the flag did not stay
            cur.execute(sql.SQL(
                "UPDATE {s}.batches SET state = 'done', done_at = now(), rows_marked = %s,"
                " keys = '{{}}', xmins = '{{}}' WHERE batch_id = %s AND state = 'loaded'").format(s=self.store.schema),
                (marked, batch.batch_id))
            if cur.rowcount == 0:  # the batch left the ledger while it was loaded (truncated, dropped, released)
                conn.rollback()
                ledger = self.store.schema.string
                raise SourceError(f"batch {batch.batch_id} is no longer in the ledger as loaded (was {ledger}.batches"
                                  " truncated, the schema dropped, or the batch released?): its mark is rolled back."
                                  " Its rows are in ClickHouse; the next run finds ClickHouse holding batch ids the"
                                  " ledger lost and marks those rows without loading them again")
            quarantined = self._quarantined(cur, batch)
            before_commit()
            conn.commit()
            at = time.time()
        blockers = logic.mark_blockers(conn, self.store.job) if reset or refused or raised_keys else []
        return MarkResult(int(marked), int(quarantined), reset, refused, raised_keys, blockers, at)

    def _quarantined(self, cur: psycopg2.extensions.cursor, batch: Batch) -> int:
        cur.execute(sql.SQL("SELECT count(*) FROM {s}.quarantine WHERE batch_id = %s").format(s=self.store.schema),
                    (batch.batch_id,))
        return int(cur.fetchone()[0])  # type: ignore[index]

    def _dense(self, cur: psycopg2.extensions.cursor, batch: Batch, shape: SourceShape) -> bool:
        """Whether at least half of the integer keys between the batch's first and last are claimed in it (a
        backlog marked in key order, with no index of the unprocessed rows): then one range of the table's
        key index merged with the claimed keys costs less than a probe per key (docs/performance.md)."""
        if not shape.key.integer or batch.row_count < DENSE_AT_LEAST:
            return False
        cur.execute(sql.SQL("SELECT keys[1]::bigint, keys[cardinality(keys)]::bigint FROM {}.batches"
                            " WHERE batch_id = %s").format(self.store.schema), (batch.batch_id,))
        found = cur.fetchone()
        return bool(found and found[0] is not None and found[1] is not None
                    and 2 * batch.row_count >= found[1] - found[0] + 1)

    def _statement(self, shape: SourceShape, sliced: bool, ranged: bool) -> sql.Composable:
        """The marking UPDATE of the whole batch, or (sliced) of positions %(first)s..%(last)s.

        Returns how many rows it reached. A reached row whose flag is not true after the BEFORE
        triggers, or whose key is not the claimed one any more, goes into pg_temp.etl_unkept.
        """
        key, job, schema = shape.key, self.store.job, self.store.schema
        # With an index of the unprocessed rows on the key, the batch's key range is one ordered
        # pass over it, joined with the claimed keys (a third less work than a probe per key).
        span = sql.SQL(" AND s.{flag} = false AND {lo} AND {hi}").format(
            flag=sql.Identifier(job.processed_column),
            lo=key.compare("s", ">=", sql.SQL("(SELECT keys[1] FROM {}.batches WHERE batch_id = %(batch)s)")
                           .format(schema)),
            hi=key.compare("s", "<=", sql.SQL("(SELECT keys[cardinality(keys)] FROM {}.batches"
                                              " WHERE batch_id = %(batch)s)").format(schema)),
        ) if ranged and not sliced else sql.SQL("")
        keys = sql.SQL("b.keys[%(first)s:%(last)s], b.xmins[%(first)s:%(last)s]" if sliced else "b.keys, b.xmins")
        # Another job's flag on this table set back by the mark's triggers: the row before the
        # UPDATE (a subquery in RETURNING reads the statement's snapshot) against the row after it.
        others = self._other_flags()
        reopened = sql.SQL("(SELECT {} FROM {} o WHERE {})").format(
            sql.SQL(" OR ").join(sql.SQL("(o.{f} IS TRUE AND s.{f} IS NOT TRUE)").format(f=sql.Identifier(f))
                                 for f in others),
            qualified(job), key.matches("o", sql.SQL("k.key"))) if others else sql.SQL("false")
        return sql.SQL(
            "WITH m AS (UPDATE {src} AS s SET {flag} = true FROM {s}.batches b"
            " CROSS JOIN LATERAL unnest({keys}) AS k(key, x)"
            " WHERE b.batch_id = %(batch)s AND {matches} AND s.xmin = k.x{span}"
            # rows quarantined in this batch, under whichever job name: never loaded, never marked
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.batch_id = b.batch_id AND q.key = k.key)"
            " RETURNING k.key, s.{flag} IS TRUE AS kept, {encoded} IS DISTINCT FROM k.key AS rekeyed,"
            " coalesce({reopened}, false) AS reopened),"
            " odd AS (INSERT INTO pg_temp.etl_unkept SELECT key, rekeyed, reopened FROM m"
            " WHERE NOT kept OR rekeyed OR reopened)"
            " SELECT count(*) FROM m"
        ).format(src=qualified(job), flag=sql.Identifier(job.processed_column), s=schema, keys=keys,
                 matches=key.matches("s", sql.SQL("k.key")), span=span, encoded=key.encode("s"), reopened=reopened)

    def _other_flags(self) -> list[str]:
        """The flags other jobs have claimed rows of this table by, that the table still has."""
        if self._others is None:
            rows = self.store.run("read the other jobs' flags on this table", sql.SQL(
                "SELECT DISTINCT b.flag FROM {s}.batches b JOIN pg_attribute a ON a.attrelid = to_regclass(%(quoted)s)"
                " AND a.attname = b.flag AND NOT a.attisdropped WHERE b.flag <> %(flag)s AND " + SAME_SOURCE
                + " ORDER BY 1").format(s=self.store.schema), self.store.names())
            self._others = [str(r[0]) for r in rows]
        return self._others

    def _update(self, cur: psycopg2.extensions.cursor, batch: Batch, shape: SourceShape,
                positions: tuple[int, int] | None, raised: list[tuple[int, str]], beyond: Beyond,
                ranged: bool = False) -> int:
        """Mark the batch (or `positions` of it); on a refusal, halves under savepoints. Returns rows reached.

        What each statement that went through did to the source beyond the rows it reached is
        added to `beyond` (a statement rolled back to its savepoint changed nothing).
        """
        params = {"batch": batch.batch_id, "job": self.store.job.name}
        if positions:
            params.update(first=positions[0], last=positions[1])
        cur.execute("SAVEPOINT etl_mark")
        try:
            before = logic.changes_in_transaction(cur, self.store.job)
            cur.execute(self._statement(shape, positions is not None, ranged), params)
            reached = int(cur.fetchone()[0])  # type: ignore[index]
        except psycopg2.Error as exc:
            if cur.connection.closed or isinstance(exc, _NOT_THE_ROWS):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT etl_mark")
            cur.execute("RELEASE SAVEPOINT etl_mark")
            first, last = positions or (1, batch.row_count)
            if first == last:
                raised.append((first, str(exc).strip().splitlines()[0][:500] if str(exc).strip() else "refused"))
                if len(raised) > MARK_FAILURES:
                    raise _Raised from None
                return 0
            middle = (first + last) // 2
            return (self._update(cur, batch, shape, (first, middle), raised, beyond)
                    + self._update(cur, batch, shape, (middle + 1, last), raised, beyond))
        beyond.add(before, logic.changes_in_transaction(cur, self.store.job), reached)
        cur.execute("RELEASE SAVEPOINT etl_mark")
        return reached

    def _set_aside_raised(self, cur: psycopg2.extensions.cursor, batch: Batch, shape: SourceShape,
                          raised: list[tuple[int, str]]) -> list[tuple[str, str]]:
        """Set aside, as loaded-not-marked, the rows whose mark raised alone."""
        found: list[tuple[str, str]] = []
        for position, reason in raised:
            cur.execute(self._aside(shape, sql.SQL("b.keys[%(pos)s]"), "unmarked"),
                        {"batch": batch.batch_id, "job": self.store.job.name, "pos": position,
                         "reason": f"loaded, not marked: PostgreSQL refused the mark: {reason}"})
            found.extend((str(row[0]), reason) for row in cur.fetchall())
        return found

    def _refused(self, cur: psycopg2.extensions.cursor, batch: Batch, shape: SourceShape) -> list[str]:
        """Batch rows the UPDATE did not reach although unchanged: still the claimed xmin (a reached row
        has a new one), not flagged, not quarantined. Looked for only when fewer rows were reached
        than the batch has."""
        job, schema = self.store.job, self.store.schema
        cur.execute(sql.SQL(
            "SELECT k.key FROM {s}.batches b CROSS JOIN LATERAL unnest(b.keys, b.xmins) AS k(key, x)"
            " JOIN {src} s ON {matches} WHERE b.batch_id = %(batch)s AND s.xmin = k.x AND s.{flag} IS NOT TRUE"
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.batch_id = b.batch_id AND q.key = k.key)"
        ).format(s=schema, src=qualified(job), flag=sql.Identifier(job.processed_column),
                 matches=shape.key.matches("s", sql.SQL("k.key"))), {"batch": batch.batch_id})
        return [str(row[0]) for row in cur.fetchall()]

    def _set_aside_hidden(self, cur: psycopg2.extensions.cursor, batch: Batch, shape: SourceShape) -> None:
        """Under row security, set aside the batch's rows this role no longer sees (a policy that hides them
        now): they are in ClickHouse, and when they show again unchanged they must not look new. A row
        deleted since looks the same, and `requeue` lets it go. The job goes on."""
        job, schema = self.store.job, self.store.schema
        cur.execute(sql.SQL(
            "INSERT INTO {s}.quarantine (job, key, batch_id, reason, kind, row_xmin)"
            " SELECT %(job)s, k.key, b.batch_id, %(reason)s, 'hidden', k.x"
            " FROM {s}.batches b CROSS JOIN LATERAL unnest(b.keys, b.xmins) AS k(key, x)"
            " WHERE b.batch_id = %(batch)s AND row_security_active(%(table)s::regclass)"
            " AND NOT EXISTS (SELECT 1 FROM {src} s WHERE {matches})"
            " AND NOT EXISTS (SELECT 1 FROM {s}.quarantine q WHERE q.batch_id = b.batch_id AND q.key = k.key)"
            " ON CONFLICT (job, key) DO UPDATE SET batch_id = EXCLUDED.batch_id, reason = EXCLUDED.reason,"
            " row = NULL, quarantined_at = now(), kind = 'hidden', row_xmin = EXCLUDED.row_xmin"
        ).format(s=schema, src=qualified(job), matches=shape.key.matches("s", sql.SQL("k.key"))),
            {"job": job.name, "batch": batch.batch_id, "table": self.store.quoted_source(),
             "reason": "loaded, not marked: row security hid the row from the service's role at the mark (or it"
                       " was deleted); `requeue` marks it if it shows again unchanged"})

    def _set_aside_stuck(self, cur: psycopg2.extensions.cursor, batch: Batch, shape: SourceShape,
                         reset: list[str], refused: list[str]) -> None:
        """Set aside, as loaded-not-marked, the batch's rows the mark did not stick on."""
        job = self.store.job
        for keys, kind, reason in ((reset, "reset", "the mark was set back to false in its own transaction"),
                                   (refused, "refused", "the mark did not reach the row although it had not"
                                                        " changed since the claim")):
            if keys:
                cur.execute(self._aside(shape, sql.SQL("k.key"), kind, keys=True),
                            {"batch": batch.batch_id, "job": job.name, "keys": keys,
                             "reason": f"loaded, not marked: {reason}"})

    def _aside(self, shape: SourceShape, key: sql.Composable, kind: str, keys: bool = False) -> sql.Composable:
        """INSERT of batch rows into the quarantine as loaded (kind), with the row's xmin now."""
        job = self.store.job
        pick = sql.SQL(" CROSS JOIN LATERAL unnest(%(keys)s::text[]) AS k(key)") if keys else sql.SQL("")
        return sql.SQL(
            "INSERT INTO {s}.quarantine (job, key, batch_id, reason, row, kind, row_xmin)"
            " SELECT %(job)s, {key}, b.batch_id, %(reason)s, to_jsonb(s), {kind}, s.xmin FROM {s}.batches b{pick}"
            " JOIN {src} s ON {matches} WHERE b.batch_id = %(batch)s"
            " ON CONFLICT (job, key) DO UPDATE SET batch_id = EXCLUDED.batch_id, reason = EXCLUDED.reason,"
            " row = EXCLUDED.row, quarantined_at = now(), kind = EXCLUDED.kind, row_xmin = EXCLUDED.row_xmin"
            " RETURNING key"
        ).format(s=self.store.schema, key=key, kind=sql.Literal(kind), pick=pick, src=qualified(job),
                 matches=shape.key.matches("s", key))


def beyond_mark(job: JobConfig, batch_id: int, what: str, blockers: list[str]) -> str:
    """Why the job stops when marking a batch changed more than its rows' flag (it was rolled back)."""
    table = ".".join(job.source_table)
    found = "; ".join(blockers) if blockers else "no trigger or rule on UPDATE is found now"
    return (f"marking batch {batch_id} on {table} did more than set {job.processed_column}: in the same transaction"
            f" something {what}. On the source: {found}. The mark was rolled back: the batch stays loaded in"
            f" ClickHouse and nothing of it is loaded again; the job stops until that trigger leaves the service's"
            f" mark alone (e.g. fire it only WHEN (old.{job.processed_column} IS NOT DISTINCT FROM"
            f" new.{job.processed_column})), and the next run then marks the batch")


def not_kept(job: JobConfig, where: str, reset: int, refused: int, blockers: list[str]) -> str:
    """Why the job stops when a mark did not stick, and the way out (nothing is loaded twice on it)."""
    flag, table = job.processed_column, ".".join(job.source_table)
    causes = []
    if reset:
        causes.append(f"{reset} row(s) had {flag} set back to false in the mark's own transaction (a trigger that"
                      " resets it)")
    if refused:
        causes.append(f"{refused} row(s) were not reached by the mark although unchanged since the claim (a trigger"
                      " that returns NULL, or a row security policy that hides them from UPDATE)")
    found = "; ".join(blockers) if blockers else "no trigger or policy on UPDATE is found now"
    fix = []
    if reset:
        fix.append(f"make the trigger leave the service's mark alone, e.g. fire it only WHEN (old.{flag} IS NOT"
                   f" DISTINCT FROM new.{flag}), or compare the rows without {flag} in its function")
    if refused:
        fix.append(f"let the service's role update {flag} on every row it reads (a policy FOR UPDATE for it, or"
                   " a trigger that returns NEW when only the flag changes)")
    return (f"{where} did not stick on {table}: {'; '.join(causes)}. On the source: {found}. Those rows are in"
            f" ClickHouse and set aside as loaded, not marked (`status` lists them); no run loads them again. The"
            f" job stops until this is fixed: {'; '.join(fix)}; then `etl-service requeue --job {job.name}` marks"
            " them without loading them again")
