"""Permanent refusals are configuration errors naming the variable; outages stay transient (no servers)."""

from __future__ import annotations

import psycopg2
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from etl_service.clickhouse.clients import ch_errors
from etl_service.errors import BadSinkValues, ConfigError, SinkError, SinkUnavailable, SourceError, SourceUnavailable
from etl_service.postgres.connection import pg_errors


@pytest.mark.parametrize(("message", "variable"), [
    ('connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  password authentication failed for user'
     ' "etl"', "PG_PASSWORD"),
    ('connection to server on socket "/run/pg/.s.PGSQL.5432" failed: FATAL:  role "etl" does not exist', "PG_USER"),
    ('connection to server at "db", port 5432 failed: FATAL:  database "orders" does not exist', "PG_DATABASE"),
    ('connection to server at "db", port 5432 failed: FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "etl",'
     ' database "orders", no encryption', "PG_USER"),
    ("connection to server at \"db\", port 5432 failed: fe_sendauth: no password supplied", "PG_PASSWORD"),
    ('connection to server at "db", port 5432 failed: FATAL:  pg_hba.conf rejects connection for host "10.0.0.9",'
     ' user "etl", database "orders", no encryption', "PG_USER"),
])
def test_postgres_refusals_at_connect_are_configuration_errors(message: str, variable: str) -> None:
    with pytest.raises(ConfigError) as err, pg_errors("connect to PostgreSQL"):
        raise psycopg2.OperationalError(message)
    assert err.value.variable == variable


# libpq's words for TLS settings that no retry cures (PG_DSN's sslmode, sslrootcert, sslcert, sslkey)
@pytest.mark.parametrize(("message", "fix"), [
    ('connection to server at "db" (10.0.0.5), port 5432 failed: SSL error: certificate verify failed', "sslrootcert"),
    ('connection to server at "10.0.0.5", port 5432 failed: server certificate for "db" does not match host name'
     ' "10.0.0.5"', "subjectAltName"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: root certificate file "/root/.postgresql/root.crt"'
     " does not exist\nEither provide the file, use the system's trusted roots with sslrootcert=system, or change"
     " sslmode to disable server certificate verification.", "sslrootcert"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: could not read root certificate file'
     ' "/etc/etl-service/pg-ca.pem": Permission denied', "readable by the service user"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: private key file "/etc/etl-service/pg.key" has'
     " group or world access; file must have permissions u=rw (0600) or less", "sslkey"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: certificate present, but not private key file'
     ' "/etc/etl-service/pg.key"', "sslkey"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: could not open certificate file'
     ' "/etc/etl-service/pg.crt": No such file or directory', "sslcert"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: SSL error: tlsv1 alert unknown ca', "ssl_ca_file"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  connection requires a valid client'
     " certificate", "sslcert"),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: server does not support SSL, but SSL was required',
     "sslmode"),
    # "localhost": the first address refused, the second one is where the certificate failed
    ('connection to server at "localhost" (::1), port 5432 failed: Connection refused\n\tIs the server running on'
     ' that host and accepting TCP/IP connections?\nconnection to server at "localhost" (127.0.0.1), port 5432'
     " failed: SSL error: certificate verify failed", "sslrootcert"),
])
def test_postgres_tls_refusals_are_configuration_errors_naming_pg_dsn(message: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err, pg_errors("connect to PostgreSQL (host=db)"):
        raise psycopg2.OperationalError(message)
    assert err.value.variable == "PG_DSN" and fix in err.value.fix
    assert str(err.value).startswith("PG_DSN: connect to PostgreSQL (host=db): connection to server at")
    assert "Connection refused" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("message", [
    'connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused',
    'connection to server at "db" (10.0.0.5), port 5432 failed: SSL SYSCALL error: EOF detected',
    "server closed the connection unexpectedly",
    'connection to server at "db", port 5432 failed: FATAL:  the database system is starting up',
])
def test_postgres_outages_stay_transient(message: str) -> None:
    with pytest.raises(SourceUnavailable), pg_errors("connect to PostgreSQL"):
        raise psycopg2.OperationalError(message)


@pytest.mark.parametrize("message", [
    "error with status PGRES_COPY_OUT and no message from the libpq",  # a restart during COPY
    "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally",
])
def test_a_connection_lost_mid_statement_is_an_outage_even_as_a_plain_database_error(message: str) -> None:
    with pytest.raises(SourceUnavailable) as err, pg_errors("extract batch 3 rows 1-400"):
        raise psycopg2.DatabaseError(message)
    assert str(err.value).startswith("extract batch 3 rows 1-400: ") and "\n" not in str(err.value)


def test_a_refused_statement_stays_a_refusal() -> None:
    with pytest.raises(SourceError) as err, pg_errors("claim batch"):
        raise psycopg2.DatabaseError('relation "src" does not exist')
    assert not isinstance(err.value, SourceUnavailable)


@pytest.mark.parametrize(("code", "variable"), [
    (516, "CLICK_PASSWORD"), (192, "CLICK_USER"), (194, "CLICK_PASSWORD"), (81, "CLICK_DATABASE"),
    (497, "CLICK_USER"), (164, "CLICK_USER"),
])
def test_clickhouse_refusals_are_configuration_errors(code: int, variable: str) -> None:
    # clickhouse-connect's wording for an HTTP error answer
    text = (f"HTTPDriver for http://ch:8123 received ClickHouse error code {code}\n"
            f" Code: {code}. DB::Exception: refused. (SOMETHING) (version 25.8.1.1)")
    with pytest.raises(ConfigError) as err, ch_errors("connect to ClickHouse"):
        raise DatabaseError(text)
    assert err.value.variable == variable


def test_clickhouse_data_errors_and_outages_keep_their_kinds() -> None:
    with pytest.raises(BadSinkValues), ch_errors("insert"):
        raise DatabaseError("Code: 53. DB::Exception: Type mismatch. (TYPE_MISMATCH)")
    with pytest.raises(SinkUnavailable), ch_errors("insert"):
        raise OperationalError("Error HTTPConnectionPool: Max retries exceeded")
    with pytest.raises(SinkError) as err, ch_errors("query"):
        raise DatabaseError("Code: 62. DB::Exception: Syntax error. (SYNTAX_ERROR)")
    assert not isinstance(err.value, ConfigError | BadSinkValues)
