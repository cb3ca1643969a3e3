"""PostgreSQL connections: connect to the primary, translate driver errors, run SQL.

Driver errors are translated here: a broken or refused connection becomes SourceUnavailable
(transient), anything else PostgreSQL refuses becomes SourceError with its own message;
what no retry can cure (authentication, privileges, an unknown database) a ConfigError.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from etl_service.errors import ConfigError, SourceChanged, SourceConflict, SourceError, SourceUnavailable
from etl_service.settings.model import JobConfig, Settings

Connection = psycopg2.extensions.connection


def connect(settings: Settings, purpose: str = "etl") -> Connection:
    """Open a PostgreSQL connection with timeouts and the session settings extraction relies on."""
    options = session_options(settings)
    app = f"etl-service/{purpose}/{socket.gethostname()}/{os.getpid()}"[:63]
    with pg_errors(f"connect to PostgreSQL ({settings.pg_display})"):
        conn = psycopg2.connect(settings.pg_dsn, connect_timeout=10, application_name=app,
                                options=options, keepalives=1, keepalives_idle=30)
    if purpose != "status":  # `status` only reads: it may look at a standby
        try:
            require_primary(conn, settings.pg_display)
        except BaseException:
            conn.close()
            raise
    return conn


def session_options(settings: Settings) -> str:
    """libpq `options` of every service session: its statement timeout and pinned output settings."""
    timeout_ms = int(settings.pg_statement_timeout * 1000)
    # Output settings pinned, so a role's or database's own defaults never change the text a value
    # is read as; idle_session_timeout off, as a run's connection sits idle while ClickHouse gets
    # ready (a role or server setting would otherwise cut it, and every run would look like an outage).
    return (f"-c statement_timeout={timeout_ms} -c TimeZone=UTC -c DateStyle=ISO,YMD "
            "-c extra_float_digits=3 -c client_encoding=UTF8 -c bytea_output=hex -c IntervalStyle=postgres "
            "-c idle_session_timeout=0")


def require_primary(conn: Connection, display: str) -> None:
    """ConfigError unless this session may write: a hot standby, or a read-only session, is refused.

    The service writes the flag and its ledger; on a standby every write would fail, and a run
    that reads there would see a past the primary has left behind.
    """
    with pg_errors("ask whether PostgreSQL is the primary", conn), conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'")
        standby, read_only = cur.fetchone()  # type: ignore[misc]
    conn.rollback()
    require_primary_answer(standby, read_only, display)


def require_primary_answer(standby: bool, read_only: bool, display: str) -> None:
    """ConfigError for a session that said it is on a standby, or read-only (see `require_primary`)."""
    multi_host = ("connect to the primary: point PG_DSN (or PG_HOST) at it, or name every server with"
                  " target_session_attrs=read-write, e.g. postgresql://db1,db2/app?target_session_attrs=read-write,"
                  " so a failover needs no change")
    if standby:
        raise ConfigError("PG_DSN / PG_HOST", f"PostgreSQL at {display} is a hot standby (in recovery): the service"
                          " writes the processed flag and its ledger", multi_host)
    if read_only:
        raise ConfigError("PG_DSN / PG_HOST", f"sessions at {display} are read-only (default_transaction_read_only, a"
                          " read-only role, or a pooler routing to a replica): the service writes the processed flag"
                          " and its ledger", "use a role whose sessions may write, and " + multi_host)


@contextmanager
def pg_errors(action: str, conn: Connection | None = None, operator: bool = False) -> Iterator[None]:
    """Translate psycopg2 errors raised while doing `action` into our exception tree.

    With `conn`, a failed statement's transaction is rolled back, so the connection can go on
    (to record the failure in the ledger, to release the job's lock). `operator`: the statement is
    the operator's own SQL (a column it names that does not exist is its mistake, not a change of
    the source).
    """
    try:
        yield
    except psycopg2.Error as exc:
        if conn is not None and not conn.closed:
            with suppress(psycopg2.Error):
                conn.rollback()
        raise _translate(action, exc, conn, operator) from exc


# Refusals that no retry can cure: the settings (or the server's grants) must change. Matched on
# the server's message, as connection-time errors carry no SQLSTATE in psycopg2.
_PERMANENT = (
    ("password authentication failed", "PG_PASSWORD", "set the right password (PG_PASSWORD, or in PG_DSN)"),
    ("no password supplied", "PG_PASSWORD", "set PG_PASSWORD (or put the password in PG_DSN)"),
    ("role \"", "PG_USER", "use an existing role (PG_USER, or the user in PG_DSN)"),
    ("database \"", "PG_DATABASE", "use an existing database (PG_DATABASE, or the dbname in PG_DSN)"),
    ("no pg_hba.conf entry", "PG_USER",
     "the server does not let this user connect from this host to this database: add a pg_hba.conf entry"),
    ("pg_hba.conf rejects connection", "PG_USER",
     "the server's pg_hba.conf refuses this user from this host to this database; if it says \"no encryption\","
     " the server wants TLS: sslmode=verify-full in PG_DSN"),
    ("permission denied for database", "PG_USER", "GRANT CONNECT ON DATABASE … TO the user"),
    # TLS (libpq's words): the server's certificate, or the files PG_DSN names for it
    ("certificate verify failed", "PG_DSN",
     "the server's certificate is not signed by the CA in sslrootcert=, or has expired: point sslrootcert at"
     " the CA that issued it (docs/postgresql.md: PostgreSQL over TLS)"),
    ("does not match host name", "PG_DSN",
     "connect with a host name the server's certificate carries (its subjectAltName), or have it reissued"),
    ("root certificate file", "PG_DSN",
     "set sslrootcert= to the CA's file, readable by the service user (docs/postgresql.md: PostgreSQL over TLS)"),
    ("private key file", "PG_DSN", "sslkey= must name the client key, owned by the service user, mode 600"),
    ("certificate file", "PG_DSN", "sslcert= must name the client certificate, readable by the service user"),
    ("alert unknown ca", "PG_DSN",
     "the server does not trust the client certificate (sslcert=): have it issued by the server's ssl_ca_file"),
    ("client certificate", "PG_DSN", "the server wants a client certificate: set sslcert= and sslkey= in PG_DSN"),
    ("does not support SSL", "PG_DSN", "the server has TLS off: turn ssl on there, or change sslmode"),
)


def _permanent(action: str, exc: psycopg2.Error) -> ConfigError | None:
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return permanent(action, str(exc), privilege=True)
    if isinstance(exc, psycopg2.OperationalError) and exc.pgcode is None:
        return permanent(action, str(exc))
    return None


def permanent(action: str, text: str, privilege: bool = False) -> ConfigError | None:
    """The ConfigError for a refusal no retry can cure (a missing privilege, or one of _PERMANENT), else None."""
    if privilege:
        return ConfigError("PG_USER", f"{action}: {text.strip().splitlines()[0]}",
                           "grant the privilege to the user (`check` lists what the service needs)")
    # libpq says one line per address it tried ("localhost": ::1, then 127.0.0.1): any may be the cause
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for needle, variable, fix in _PERMANENT:
        for line in lines:
            if needle in line and ("does not exist" in line or not needle.endswith('"')):
                return ConfigError(variable, f"{action}: {line}", fix)
    return None


# libpq's words for a connection that went away mid-statement (a COPY, say), where psycopg2
# raises a plain DatabaseError rather than an OperationalError.
_LOST = ("no message from the libpq", "server closed the connection", "connection already closed",
         "terminating connection", "SSL connection has been closed")


def _translate(action: str, exc: psycopg2.Error, conn: Connection | None = None,
               operator: bool = False) -> SourceError | ConfigError:
    permanent = _permanent(action, exc)
    if permanent is not None:
        return permanent
    if isinstance(exc, psycopg2.errors.DeadlockDetected | psycopg2.errors.SerializationFailure
                  | psycopg2.errors.LockNotAvailable):
        return SourceConflict(f"{action}: {first_line(exc)} (a conflict with other transactions on the same rows;"
                              " PostgreSQL rolled this statement back)")
    if isinstance(exc, psycopg2.errors.UndefinedColumn) and not operator:
        return SourceChanged(changed(action, first_line(exc)))
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return SourceUnavailable(f"{action}: statement timed out (PG_STATEMENT_TIMEOUT)")
    if isinstance(exc, psycopg2.errors.IdleSessionTimeout):
        return SourceUnavailable(f"{action}: PostgreSQL closed the idle session (idle_session_timeout; a pooler"
                                 " that drops the service's session options lets a role's setting through)")
    lost = (conn is not None and conn.closed) or (exc.pgcode or "").startswith(("08", "57P")) \
        or any(text in str(exc) for text in _LOST)
    if lost or isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return SourceUnavailable(f"{action}: {first_line(exc)}")
    return SourceError(f"{action}: {first_line(exc)}")


def changed(action: str, error: str) -> str:
    """The message of a statement of the service's that met a column dropped or renamed while it ran."""
    return f"{action}: {error}: the source's columns changed during the run: starting over with the new ones"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_sql(conn: Connection, statements: str) -> None:
    """Run the operator's post-processing SQL (ETL_POST_PG_SQL) in one transaction."""
    with pg_errors("post-processing SQL on PostgreSQL", conn, operator=True), conn.cursor() as cur:
        cur.execute(sql.SQL(statements))  # operator-written SQL from config
        conn.commit()


def qualified(job: JobConfig) -> sql.Identifier:
    """The source table as a quoted schema.table identifier."""
    return sql.Identifier(*job.source_table)
