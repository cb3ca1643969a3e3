"""Permanent refusals are configuration errors naming the variable; outages stay transient (no servers)."""

from __future__ import annotations

import psycopg2
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from etl_service.errors import BadSinkValues, ConfigError, SinkError, SinkUnavailable, SourceUnavailable
from etl_service.sink import ch_errors
from etl_service.source import pg_errors


@pytest.mark.parametrize(("message", "variable"), [
    ('connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  password authentication failed for user'
     ' "etl"', "PG_PASSWORD"),
    ('connection to server on socket "/run/pg/.s.PGSQL.5432" failed: FATAL:  role "etl" does not exist', "PG_USER"),
    ('connection to server at "db", port 5432 failed: FATAL:  database "orders" does not exist', "PG_DATABASE"),
    ('connection to server at "db", port 5432 failed: FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "etl",'
     ' database "orders", no encryption', "PG_USER"),
    ("connection to server at \"db\", port 5432 failed: fe_sendauth: no password supplied", "PG_PASSWORD"),
])
def test_postgres_refusals_at_connect_are_configuration_errors(message: str, variable: str) -> None:
    with pytest.raises(ConfigError) as err, pg_errors("connect to PostgreSQL"):
        raise psycopg2.OperationalError(message)
    assert err.value.variable == variable


@pytest.mark.parametrize("message", [
    'connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused',
    "server closed the connection unexpectedly",
    'connection to server at "db", port 5432 failed: FATAL:  the database system is starting up',
])
def test_postgres_outages_stay_transient(message: str) -> None:
    with pytest.raises(SourceUnavailable), pg_errors("connect to PostgreSQL"):
        raise psycopg2.OperationalError(message)


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
