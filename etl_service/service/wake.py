"""Wake-ups (ETL_WAKE=notify): a commit that leaves rows to move wakes its job within about a second.

Two triggers on the source call `<ledger schema>.etl_wake(channel)`, which sends `NOTIFY` on the
job's channel; PostgreSQL delivers it when the writing transaction commits, once per channel per
transaction however many statements or rows fired it:
- `etl_wake_<job>`, `AFTER INSERT … FOR EACH STATEMENT` (one call for a bulk insert), on the
  source and each partition (a statement that names a partition fires that partition's);
- `etl_wake_u_<job>`, `AFTER UPDATE … FOR EACH ROW WHEN (NEW.<flag> IS FALSE AND OLD.<flag> IS
  DISTINCT FROM NEW.<flag>)`: only an update that makes a row one to move (its flag set back,
  by the statement or by a BEFORE trigger) calls it. An update of rows already processed (a
  `seen_at`, a counter, an ORM's save of every column), or of rows already waiting, or the
  service's own mark, is one condition per row and wakes no one. PostgreSQL clones it onto
  every partition, present and future.

`Listener` keeps one connection that LISTENs on every such job's channel and hands what arrives
to the daemon; the daemon coalesces (daemon.Gate). When the connection drops (PostgreSQL
restarted, failed over, a network cut) it reconnects with backoff, listens again and asks for one
run of every job to catch up on what it missed. The schedule keeps running as a safety net.
"""

from __future__ import annotations

import hashlib
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import psycopg2
from loguru import logger
from psycopg2 import sql

from etl_service.errors import ConfigError, EtlError
from etl_service.ledger import Ledger
from etl_service.postgres import connection
from etl_service.postgres.connection import Connection, pg_errors, qualified
from etl_service.settings.model import JobConfig, Settings

FUNCTION = "etl_wake"
# This often the listener sees that every trigger is in place (which also probes its connection: a cut
# network shows no error by itself).
PROBE_SECONDS = 15.0
# Reconnecting waits 1, 2, 4 ... seconds, at most this long.
MOST_BACKOFF = 30.0
# Creating the trigger takes a lock that waits for writes in progress and holds new ones back: not for
# long (a busy table is tried again at the next probe).
LOCK_TIMEOUT = "200ms"


def channel(job: JobConfig) -> str:
    """The job's channel, also the name of its trigger: `etl_wake_<job>`, hashed to fit 63 bytes when long."""
    return _identifier("etl_wake_", job)


def update_trigger(job: JobConfig) -> str:
    """The name of the job's row-level UPDATE wake-up trigger (see the module docstring)."""
    return _identifier("etl_wake_u_", job)


def _identifier(prefix: str, job: JobConfig) -> str:
    """`<prefix><job>`, or with the job's name cut and a digest of it where that passes PostgreSQL's 63 bytes."""
    name = prefix + job.name
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(job.name.encode()).hexdigest()[:10]
    return f"{prefix}{job.name.encode()[:49 - len(prefix)].decode(errors='ignore')}_{digest}"


def _function(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {schema}.{fn}() RETURNS trigger LANGUAGE plpgsql AS $etl$ BEGIN"
        " IF coalesce(current_setting('etl_service.marking', true), '') <> 'on' THEN"
        " PERFORM pg_notify(TG_ARGV[0], ''); END IF; RETURN NULL; END $etl$").format(
        schema=sql.Identifier(schema), fn=sql.Identifier(FUNCTION))


def _trigger(schema: str, job: JobConfig, table: sql.Composable) -> list[sql.Composed]:
    name = sql.Identifier(channel(job))
    return [sql.SQL("CREATE TRIGGER {name} AFTER INSERT ON {table} FOR EACH STATEMENT"
                    " EXECUTE FUNCTION {schema}.{fn}({channel})").format(
                name=name, table=table, schema=sql.Identifier(schema), fn=sql.Identifier(FUNCTION),
                channel=sql.Literal(channel(job))),
            _always(job, table)]


def _update_trigger(schema: str, job: JobConfig, table: sql.Composable) -> list[sql.Composed]:
    flag = sql.Identifier(job.processed_column)
    return [sql.SQL("CREATE TRIGGER {name} AFTER UPDATE ON {table} FOR EACH ROW WHEN (NEW.{flag} IS FALSE AND"
                    " OLD.{flag} IS DISTINCT FROM NEW.{flag}) EXECUTE FUNCTION {schema}.{fn}({channel})").format(
                name=sql.Identifier(update_trigger(job)), table=table, flag=flag, schema=sql.Identifier(schema),
                fn=sql.Identifier(FUNCTION), channel=sql.Literal(channel(job))),
            _always(job, table, update_trigger(job))]


def _always(job: JobConfig, table: sql.Composable, name: str | None = None) -> sql.Composed:
    # replication apply workers and pg_restore write with session_replication_role = replica
    return sql.SQL("ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}").format(
        table=table, name=sql.Identifier(name or channel(job)))


def statements(schema: str, job: JobConfig, tables: list[str] | None = None,
               update_on: str | None = None) -> list[sql.Composed]:
    """What makes wake-ups work for `job`: the function (in the ledger schema), the INSERT trigger on its
    source (and on each of its partitions: a statement that names a partition fires that partition's
    triggers) and the UPDATE trigger on the source (`update_on`, when only that one is missing)."""
    names = [sql.SQL(t) for t in tables] if tables is not None else [qualified(job)]
    update = [] if tables is not None and update_on is None else _update_trigger(
        schema, job, sql.SQL(update_on) if update_on else qualified(job))
    return [_function(schema), *(statement for table in names for statement in _trigger(schema, job, table)), *update]


def statements_text(conn: Connection, schema: str, job: JobConfig, tables: list[str] | None = None,
                    update_on: str | None = None) -> str:
    return "; ".join(s.as_string(conn) for s in statements(schema, job, tables, update_on))


# The source and every partition under it, each with its wake-up triggers' tgenabled (NULL: none):
# 'A' fires always, 'O' not in replica mode, 'R' only there, 'D' never; and whether the INSERT
# trigger still fires for UPDATE too (the form made before updates had their own trigger).
_TRIGGER_STATE = """
SELECT t.relid::regclass::text, ins.tgenabled::text, upd.tgenabled::text, coalesce(ins.tgtype & 16 <> 0, false)
FROM (SELECT to_regclass(%(table)s) AS relid, 0 AS level
      UNION SELECT relid, level FROM pg_partition_tree(to_regclass(%(table)s))) t
JOIN pg_class c ON c.oid = t.relid AND c.relkind IN ('r', 'p')
LEFT JOIN (pg_trigger ins JOIN pg_proc p ON p.oid = ins.tgfoid AND p.proname = %(fn)s)
       ON ins.tgrelid = t.relid AND ins.tgname = %(name)s
LEFT JOIN (pg_trigger upd JOIN pg_proc q ON q.oid = upd.tgfoid AND q.proname = %(fn)s)
       ON upd.tgrelid = t.relid AND upd.tgname = %(update)s
ORDER BY t.level, 1
"""


def _tables(conn: Connection, job: JobConfig) -> list[tuple[str, str | None, str | None, bool]]:
    """(table, INSERT trigger's state, UPDATE trigger's state, whether the INSERT trigger is the old form)."""
    with pg_errors("look for the wake-up trigger", conn), conn.cursor() as cur:
        cur.execute(_TRIGGER_STATE, {"table": qualified(job).as_string(conn), "name": channel(job), "fn": FUNCTION,
                                     "update": update_trigger(job)})
        found = [(str(table), None if ins is None else str(ins), None if upd is None else str(upd), bool(old))
                 for table, ins, upd, old in cur.fetchall()]
    if not conn.autocommit:
        conn.rollback()
    return found


def trigger_state(conn: Connection, job: JobConfig) -> str:
    """'present' (on the source and every partition, firing always), 'missing', 'disabled' or 'partial'
    (it does not fire in replica mode somewhere)."""
    states = {state for _, ins, upd, _ in _tables(conn, job) for state in (ins, upd)}
    return ("missing" if None in states else "disabled" if "D" in states else
            "present" if states <= {"A"} else "partial")


def _missing(tables: list[tuple[str, str | None, str | None, bool]]) -> tuple[list[str], str | None]:
    """(tables missing the INSERT trigger, the source if it misses the UPDATE one: partitions get its clones)."""
    return ([t for t, ins, _, _ in tables if ins is None],
            tables[0][0] if tables and any(upd is None for _, _, upd, _ in tables) else None)


def _states(tables: list[tuple[str, str | None, str | None, bool]]) -> list[tuple[str, str, str]]:
    """(table, trigger name, state) for each trigger present."""
    return [(t, name, state) for t, ins, upd, _ in tables
            for name, state in (("i", ins), ("u", upd)) if state is not None]


def describe_problem(conn: Connection, schema: str, job: JobConfig) -> str | None:
    """What is wrong with the job's wake-up triggers, with the statements that fix it; None if nothing."""
    tables = _tables(conn, job)
    missing, update_on = _missing(tables)
    names = {"i": channel(job), "u": update_trigger(job)}
    disabled = [(t, names[n]) for t, n, state in _states(tables) if state == "D"]
    partial = [(t, names[n]) for t, n, state in _states(tables) if state in ("O", "R")]
    if missing or update_on:
        where = sorted(set(missing + ([update_on] if update_on else [])))
        return (f"the wake-up trigger {channel(job)} is missing on {', '.join(where)} (the daemon creates it if its"
                f" role may; or run as the table's owner: {statements_text(conn, schema, job, missing, update_on)})")
    if disabled:
        return (f"the wake-up trigger {channel(job)} is disabled on {', '.join(t for t, _ in disabled)}: "
                + "; ".join(f"ALTER TABLE {t} ENABLE ALWAYS TRIGGER {sql.Identifier(n).as_string(conn)}"
                            for t, n in disabled))
    if partial:
        return (f"the wake-up trigger {channel(job)} does not fire for writes in replica mode (session_replication_role"
                f" = replica: logical replication, pg_restore) on {', '.join(t for t, _ in partial)}: "
                + "; ".join(f"ALTER TABLE {t} ENABLE ALWAYS TRIGGER {sql.Identifier(n).as_string(conn)}"
                            for t, n in partial))
    return None


def ensure_trigger(conn: Connection, schema: str, job: JobConfig) -> str | None:
    """Create the job's wake-up triggers where they are missing (source and partitions), make them fire in
    replica mode too, and replace the older INSERT OR UPDATE form. None when they are in place, else what
    is wrong (with the fix). A disabled trigger is the operator's choice: reported, not enabled again."""
    tables = _tables(conn, job)
    missing, update_on = _missing(tables)
    old = [t for t, ins, _, was in tables if ins is not None and was]
    partial = [(t, n) for t, n, state in _states(tables) if state in ("O", "R")]
    if not (missing or update_on or old or partial):
        return describe_problem(conn, schema, job)
    problem = _make(conn, schema, job, missing, update_on, old, partial)
    if problem:
        return problem
    made = sorted(set(missing + ([update_on] if update_on else [])))
    if made:
        logger.bind(job=job.name).info("wake-up triggers {} and {} created on {}: commits that leave rows to move"
                                       " wake the job", channel(job), update_trigger(job), ", ".join(made))
    if old:
        logger.bind(job=job.name).info("wake-up trigger {} on {} now fires for inserts only; updates wake the job"
                                       " only when they leave a row to move ({})", channel(job), ", ".join(old),
                                       update_trigger(job))
    return describe_problem(conn, schema, job)


def _make(conn: Connection, schema: str, job: JobConfig, missing: list[str], update_on: str | None,
          old: list[str], partial: list[tuple[str, str]]) -> str | None:
    """Run the DDL `ensure_trigger` decided on, in one transaction; what went wrong, or None."""
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            # the DDL's lock waits for writes in progress and holds new ones back: only briefly
            cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            cur.execute(_function(schema))
            for table in old:  # fired for every UPDATE: made again for INSERT only, beside the UPDATE one
                cur.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(channel(job)), sql.SQL(table)))
            for table in missing + old:
                for statement in _trigger(schema, job, sql.SQL(table)):
                    cur.execute(statement)
            if update_on:
                for statement in _update_trigger(schema, job, sql.SQL(update_on)):
                    cur.execute(statement)
            for table, name in partial:
                cur.execute(_always(job, sql.SQL(table), update_trigger(job) if name == "u" else None))
        conn.commit()
    except psycopg2.errors.DuplicateObject:  # another process made it meanwhile
        conn.rollback()
    except psycopg2.errors.LockNotAvailable:
        conn.rollback()
        return (f"the wake-up trigger {channel(job)} could not be created on"
                f" {', '.join(sorted(set(missing + old + ([update_on] if update_on else []))))}:"
                f" the table was busy (a long transaction writes to it); trying again in {PROBE_SECONDS:.0f}s")
    except psycopg2.Error as exc:
        conn.rollback()
        return describe_problem(conn, schema, job) or _short(exc)
    finally:
        conn.autocommit = autocommit
    return None


def round_trip(conn: Connection, settings: Settings, wait: float = 3.0) -> bool:
    """Whether a NOTIFY sent on another connection reaches a LISTEN on `conn` (a pooler in transaction
    mode loses it: LISTEN then binds a server connection the pooler hands to someone else)."""
    probe = f"etl_wake_probe_{threading.get_ident()}_{time.monotonic_ns()}"
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(probe)))
        other = connection.connect(settings, "check")
        try:
            with other.cursor() as cur:
                cur.execute("SELECT pg_notify(%s, 'probe')", (probe,))
            other.commit()
        finally:
            other.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if select.select([conn], [], [], max(0.0, deadline - time.monotonic())) != ([], [], []):
                conn.poll()
                if any(n.channel == probe for n in conn.notifies):
                    return True
        return False
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(probe)))
        conn.autocommit = False


class Listener(threading.Thread):
    """One connection LISTENing on the channels of `jobs`; `wake(job_name, count, cause)` is called for what arrives.

    cause is "wake-up" for notifications, "catch-up" after a reconnect (something may have been missed).
    """

    def __init__(self, settings: Settings, jobs: Sequence[JobConfig], wake: Callable[[str, int, str], None],
                 stop: threading.Event) -> None:
        super().__init__(name="etl-listen", daemon=True)
        self.settings = settings
        self.jobs = {channel(job): job for job in jobs}
        self.wake = wake
        self.stop = stop
        self.quit = threading.Event()  # this listener alone (a reload starts another)
        self.received: Counter[str] = Counter()  # notifications per job name, since start
        self.problems: dict[str, str | None] = {}  # per job: what was last found wrong with its trigger
        self.connects = 0

    def close(self) -> None:
        self.quit.set()
        self.join(timeout=10)

    def _done(self) -> bool:
        return self.stop.is_set() or self.quit.is_set()

    def run(self) -> None:
        backoff = 1.0
        while not self._done():
            conn: Connection | None = None
            try:
                conn = self._listen()
                backoff = 1.0
                if self.connects > 1:  # a run for each job: whatever committed while nobody listened
                    logger.info("listening again on {} channel(s): one catch-up run per job", len(self.jobs))
                    for job in self.jobs.values():
                        self.wake(job.name, 0, "catch-up")
                self._serve(conn)
            except (EtlError, psycopg2.Error, OSError) as exc:
                if self._done():
                    break
                logger.warning("wake-ups: {} — listening again in {:.0f}s (the schedule still runs the jobs)",
                               _short(exc), backoff)
                if self.quit.wait(backoff) or self.stop.is_set():
                    break
                backoff = min(backoff * 2, MOST_BACKOFF)
            finally:
                if conn is not None:
                    conn.close()

    def _listen(self) -> Connection:
        conn = connection.connect(self.settings, "listen")
        try:
            self._tend(conn)
            conn.autocommit = True
            with conn.cursor() as cur:
                for name in self.jobs:
                    cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
        except BaseException:
            conn.close()
            raise
        self.connects += 1
        logger.info("wake-ups: listening for commits on {} ({})", ", ".join(
            ".".join(job.source_table) for job in self.jobs.values()), ", ".join(j.name for j in self.jobs.values()))
        return conn

    def _tend(self, conn: Connection) -> None:
        """See that every job's trigger is in place (made again if dropped, e.g. with the ledger schema, or
        on a new partition); a problem is logged when it appears and when it is gone. A trigger made again
        may have missed commits: its job runs once to catch up."""
        autocommit = conn.autocommit
        conn.autocommit = False
        try:
            # the ledger schema holds the trigger's function
            Ledger(conn, self.settings.ledger_schema, next(iter(self.jobs.values()))).ensure_schema()
            for job in self.jobs.values():
                problem = ensure_trigger(conn, self.settings.ledger_schema, job)
                before = self.problems.get(job.name, "")
                if problem and problem != before:
                    logger.bind(job=job.name).warning("wake-ups: {}; until then the job runs on its schedule only",
                                                      problem)
                elif not problem and before:
                    logger.bind(job=job.name).info("wake-ups: the trigger is in place again; one run catches up")
                    self.wake(job.name, 0, "catch-up")
                self.problems[job.name] = problem or None
        finally:
            conn.autocommit = autocommit

    def _serve(self, conn: Connection) -> None:
        tended = time.monotonic()
        while not self._done():
            if time.monotonic() - tended >= PROBE_SECONDS:  # also shows a connection that is gone
                self._tend(conn)
                tended = time.monotonic()
            if select.select([conn], [], [], 1.0) == ([], [], []):
                continue
            conn.poll()
            counts: Counter[str] = Counter(n.channel for n in conn.notifies)
            conn.notifies.clear()
            for name, count in counts.items():
                job = self.jobs.get(name)
                if job is not None:
                    self.received[job.name] += count
                    self.wake(job.name, count, "wake-up")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _never_ran(conn: Connection, settings: Settings, job: JobConfig) -> bool:
    """No run of this job is on record (the daemon has not started it yet)."""
    runs = sql.Identifier(settings.ledger_schema, "runs")
    with pg_errors("look for the job's runs", conn), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NULL", (runs.as_string(conn),))
        never = bool(cur.fetchone()[0])  # type: ignore[index]
        if not never:
            cur.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {} WHERE job = %s)").format(runs), (job.name,))
            never = bool(cur.fetchone()[0])  # type: ignore[index]
    if not conn.autocommit:
        conn.rollback()
    return never


def _will_create(conn: Connection, job: JobConfig) -> bool:
    """The trigger is only missing (not disabled anywhere) and this role may create it where it is missing."""
    tables = _tables(conn, job)
    missing, update_on = _missing(tables)
    missing = sorted(set(missing + ([update_on] if update_on else [])))
    if not missing or any(state != "A" for _, _, state in _states(tables)):
        return False
    with pg_errors("ask whether the wake-up trigger can be made", conn), conn.cursor() as cur:
        cur.execute("SELECT bool_and(has_table_privilege(t::regclass, 'TRIGGER')) FROM unnest(%s::text[]) t",
                    (missing,))
        may = bool(cur.fetchone()[0])  # type: ignore[index]
    if not conn.autocommit:
        conn.rollback()
    return may


def check_lines(conn: Connection, settings: Settings, job: JobConfig) -> list[str]:
    """`check`'s lines for a job with ETL_WAKE=notify: the trigger, and whether notifications get through."""
    problem = describe_problem(conn, settings.ledger_schema, job)
    if problem and _never_ran(conn, settings, job) and _will_create(conn, job):  # before the first start: all is well
        lines = [f"note: wake-ups: the trigger {channel(job)} is not on {'.'.join(job.source_table)} yet: the daemon"
                 " creates it when it starts (until then the job runs on its schedule only)"]
    else:
        lines = [f"FAIL: wake-ups: {problem}; until then the job runs on its schedule only" if problem else
                 f"wake-ups: trigger {channel(job)} on {'.'.join(job.source_table)} (and its partitions) notifies"
                 f" channel {channel(job)}"]
    try:
        through = round_trip(conn, settings)
    except (EtlError, psycopg2.Error) as exc:
        raise ConfigError("ETL_WAKE", f"cannot test LISTEN/NOTIFY: {_short(exc)}") from exc
    if through:
        lines.append("wake-ups: a NOTIFY reaches a LISTEN on this connection")
    else:
        lines.append("FAIL: wake-ups: a NOTIFY sent on one connection did not reach a LISTEN on another within 3s:"
                     " behind a connection pooler in transaction mode (PgBouncer pool_mode=transaction) LISTEN does"
                     " not work; point PG_DSN at PostgreSQL itself or at a session-mode pool")
    return lines
