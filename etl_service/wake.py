"""Wake-ups (ETL_WAKE=notify): a commit that writes source rows wakes its job within about a second.

A statement-level trigger on the source (`AFTER INSERT OR UPDATE … FOR EACH STATEMENT`) calls
`<ledger schema>.etl_wake(channel)`, which sends `NOTIFY` on the job's channel; PostgreSQL
delivers it when the writing transaction commits, once per channel per transaction however many
statements it ran. The service's own mark sets `etl_service.marking` in its transaction
(source.MARKING), so marking rows processed wakes no one.

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

from etl_service import source
from etl_service.config import JobConfig, Settings
from etl_service.errors import ConfigError, EtlError
from etl_service.ledger import Ledger
from etl_service.source import Connection, pg_errors, qualified

FUNCTION = "etl_wake"
# Without traffic, the listening connection is probed this often (a cut network shows no error by itself).
PROBE_SECONDS = 15.0
# Reconnecting waits 1, 2, 4 ... seconds, at most this long.
MOST_BACKOFF = 30.0
# Creating the trigger takes a lock that waits for writes in progress and holds new ones back: not for long.
LOCK_TIMEOUT = "5s"


def channel(job: JobConfig) -> str:
    """The job's channel, also the name of its trigger: `etl_wake_<job>`, hashed to fit 63 bytes when long."""
    name = f"etl_wake_{job.name}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(job.name.encode()).hexdigest()[:10]
    return f"etl_wake_{job.name.encode()[:40].decode(errors='ignore')}_{digest}"


def statements(schema: str, job: JobConfig) -> list[sql.Composed]:
    """What makes wake-ups work for `job`: the function (in the ledger schema) and the trigger on its source."""
    function = sql.SQL(
        "CREATE OR REPLACE FUNCTION {schema}.{fn}() RETURNS trigger LANGUAGE plpgsql AS $etl$ BEGIN"
        " IF coalesce(current_setting('etl_service.marking', true), '') <> 'on' THEN"
        " PERFORM pg_notify(TG_ARGV[0], ''); END IF; RETURN NULL; END $etl$").format(
        schema=sql.Identifier(schema), fn=sql.Identifier(FUNCTION))
    trigger = sql.SQL(
        "CREATE TRIGGER {name} AFTER INSERT OR UPDATE ON {table} FOR EACH STATEMENT"
        " EXECUTE FUNCTION {schema}.{fn}({channel})").format(
        name=sql.Identifier(channel(job)), table=qualified(job), schema=sql.Identifier(schema),
        fn=sql.Identifier(FUNCTION), channel=sql.Literal(channel(job)))
    return [function, trigger]


def statements_text(conn: Connection, schema: str, job: JobConfig) -> str:
    return "; ".join(s.as_string(conn) for s in statements(schema, job))


_TRIGGER_STATE = """
SELECT tg.tgenabled::text FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
WHERE tg.tgrelid = to_regclass(%(table)s) AND tg.tgname = %(name)s AND p.proname = %(fn)s
"""


def trigger_state(conn: Connection, job: JobConfig) -> str:
    """'present', 'missing' or 'disabled': the job's wake-up trigger on its source table."""
    with pg_errors("look for the wake-up trigger", conn), conn.cursor() as cur:
        cur.execute(_TRIGGER_STATE, {"table": qualified(job).as_string(conn), "name": channel(job), "fn": FUNCTION})
        row = cur.fetchone()
    conn.rollback()
    return "missing" if row is None else "disabled" if row[0] == "D" else "present"


def ensure_trigger(conn: Connection, schema: str, job: JobConfig) -> str | None:
    """Create the job's wake-up trigger if it is missing; None when it is in place, else why not (with the fix)."""
    state = trigger_state(conn, job)
    if state == "present":
        return None
    if state == "disabled":
        return (f"the wake-up trigger {channel(job)} on {'.'.join(job.source_table)} is disabled: ALTER TABLE"
                f" {qualified(job).as_string(conn)} ENABLE TRIGGER {sql.Identifier(channel(job)).as_string(conn)}")
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            for statement in statements(schema, job):
                cur.execute(statement)
        conn.commit()
    except psycopg2.errors.DuplicateObject:  # another process made it meanwhile
        conn.rollback()
        return None
    except psycopg2.Error as exc:
        conn.rollback()
        first = (exc.pgerror or str(exc)).strip().splitlines()[0] if (exc.pgerror or str(exc)) else type(exc).__name__
        return (f"cannot create the wake-up trigger on {'.'.join(job.source_table)} ({first}); run as its owner:"
                f" {statements_text(conn, schema, job)}")
    logger.bind(job=job.name).info("wake-up trigger {} created on {}: commits that write rows wake the job",
                                   channel(job), ".".join(job.source_table))
    return None


def round_trip(conn: Connection, settings: Settings, wait: float = 3.0) -> bool:
    """Whether a NOTIFY sent on another connection reaches a LISTEN on `conn` (a pooler in transaction
    mode loses it: LISTEN then binds a server connection the pooler hands to someone else)."""
    probe = f"etl_wake_probe_{threading.get_ident()}_{time.monotonic_ns()}"
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(probe)))
        other = source.connect(settings, "check")
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
        conn = source.connect(self.settings, "listen")
        try:
            # the ledger schema holds the trigger's function
            Ledger(conn, self.settings.ledger_schema, next(iter(self.jobs.values()))).ensure_schema()
            for job in self.jobs.values():
                problem = ensure_trigger(conn, self.settings.ledger_schema, job)
                if problem:
                    logger.bind(job=job.name).warning("wake-ups: {}; until then the job runs on its schedule only",
                                                      problem)
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

    def _serve(self, conn: Connection) -> None:
        quiet_since = time.monotonic()
        while not self._done():
            if select.select([conn], [], [], 1.0) == ([], [], []):
                if time.monotonic() - quiet_since >= PROBE_SECONDS:
                    with conn.cursor() as cur:  # raises if the connection is gone
                        cur.execute("SELECT 1")
                    quiet_since = time.monotonic()
                continue
            conn.poll()
            quiet_since = time.monotonic()
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


def check_lines(conn: Connection, settings: Settings, job: JobConfig) -> list[str]:
    """`check`'s lines for a job with ETL_WAKE=notify: the trigger, and whether notifications get through."""
    state = trigger_state(conn, job)
    lines = []
    if state == "present":
        lines.append(f"wake-ups: trigger {channel(job)} on {'.'.join(job.source_table)} notifies channel"
                     f" {channel(job)}")
    elif state == "disabled":
        lines.append(f"FAIL: wake-ups: trigger {channel(job)} on {'.'.join(job.source_table)} is disabled: ALTER"
                     f" TABLE {qualified(job).as_string(conn)} ENABLE TRIGGER"
                     f" {sql.Identifier(channel(job)).as_string(conn)} (until then the job runs on its schedule only)")
    else:
        lines.append(f"FAIL: wake-ups: the trigger {channel(job)} on {'.'.join(job.source_table)} is missing (the"
                     f" daemon creates it at start if its role may; or run as the table's owner:"
                     f" {statements_text(conn, settings.ledger_schema, job)}); until then the job runs on its"
                     " schedule only")
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
