"""ClickHouse connections, one place per kind of target: open, share and close clients; translate errors.

Two kinds today: a server over HTTP(S) (clickhouse-connect's HTTP client, opened per use) and the
in-process chDB engine (`chdb:///path`, one client per owner for the life of the process). A new
kind of connection is added here (how a client is opened: `connect`) and in
`settings.clickhouse_target` (how its CLICK_* settings are read). The statements the service runs
(the other modules of this package) and the run that uses them do not change.
Driver errors are translated here too (`ch_errors`): connection problems become SinkUnavailable,
refusals SinkError, a refusal no retry can cure a ConfigError naming the variable.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError

from etl_service.errors import BadSinkValues, ConfigError, SinkError, SinkUnavailable
from etl_service.settings.model import Settings

# ClickHouse error codes that blame the inserted values, not the statement: the chunk is split
# to find the rows, which are quarantined (CANNOT_PARSE_*, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND,
# CANNOT_CONVERT_TYPE, INCORRECT_DATA, TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE,
# CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN, CANNOT_PARSE_UUID, DECIMAL_OVERFLOW, CANNOT_PARSE_BOOL,
# CANNOT_PARSE_IPV4 / IPV6, ATTEMPT_TO_READ_AFTER_EOF for a truncated array text, ...).
DATA_ERROR_CODES = {6, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 321, 349, 376, 407, 467, 675, 676, 691}
_CODE = re.compile(r"(?:Code:|error code) (\d+)")
# Refusals no retry can cure (authentication, unknown user or database, missing grants): the
# settings or the server's grants must change. code -> (variable, fix).
_PERMANENT = {
    516: ("CLICK_PASSWORD", "set the right user and password (CLICK_USER/CLICK_PASSWORD or in CLICK_DSN)"),
    192: ("CLICK_USER", "use an existing ClickHouse user"),
    193: ("CLICK_PASSWORD", "set the right password"),
    194: ("CLICK_PASSWORD", "this user needs a password: set CLICK_PASSWORD"),
    81: ("CLICK_DATABASE", "use an existing database, or grant CREATE DATABASE so the service creates it"),
    291: ("CLICK_USER", "grant this user access to the database"),
    497: ("CLICK_USER", "grant the missing privilege to this user (`check` lists what the service needs)"),
    164: ("CLICK_USER", "this user is read-only: use one that may INSERT (and CREATE, for a new target)"),
}


@contextmanager
def ch_errors(action: str) -> Iterator[None]:
    """Translate clickhouse-connect errors raised while doing `action`."""
    try:
        yield
    except OperationalError as exc:
        raise SinkUnavailable(f"{action}: {short_error(exc)}") from exc
    except (DatabaseError, ClickHouseError) as exc:
        text = str(exc)
        match = _CODE.search(text)
        code = int(match[1]) if match else None
        if code in _PERMANENT:
            variable, fix = _PERMANENT[code]
            raise ConfigError(variable, f"{action}: {short_error(exc)}", fix) from exc
        if code in DATA_ERROR_CODES:
            raise BadSinkValues(f"{action}: {short_error(exc)}") from exc
        raise SinkError(f"{action}: {short_error(exc)}") from exc


def short_error(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:500] if lines else type(exc).__name__


class EngineBusy(SinkUnavailable):
    """The chDB folder is held by another process (one process at a time can open it)."""


# Server settings for the embedded engine: see the file for why each is there.
ENGINE_CONFIG = Path(__file__).with_name("chdb_engine.xml")


def _open_chdb(dsn: str) -> Client:
    """Open the chDB engine folder, saying plainly why not when it cannot be opened."""
    path = dsn[len("chdb://"):]
    _check_folder(path)
    holder = chdb_holder(path)
    if holder is not None:  # asked before opening: the engine would print its own error on stderr
        raise EngineBusy(f"the chDB folder {path} is held by process {holder} (one process at a time can open it)")
    try:
        client = clickhouse_connect.get_client(dsn=dsn, chdb_options={"config-file": str(ENGINE_CONFIG)})
    except (DatabaseError, ClickHouseError) as exc:
        holder = chdb_holder(path)
        if holder is not None:
            raise EngineBusy(f"the chDB folder {path} is held by process {holder} (one process at a time can"
                             " open it)") from exc
        raise SinkError(f"cannot open the chDB folder {path}: {short_error(exc)}") from exc
    release_start_pages()
    return client


_MADV_PAGEOUT = 21  # Linux 5.4+


def release_start_pages() -> int:
    """Hand back the pages of the engine's library that only its start touched; returns bytes released.

    Loading and starting chDB reads about 170 MB of its 550 MB library (static initialisation,
    registration of every function and format). Those pages are clean copies of the file, so the
    kernel may drop them at no cost, but until it needs the memory they count in the process's RSS
    and cgroup. MADV_PAGEOUT drops them now; the few that runs use come back on first touch
    (docs/performance.md, "Benchmark": peak RSS). Best effort: 0 where the kernel or platform cannot.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        released = 0
        with open("/proc/self/maps", encoding="ascii") as maps:
            for line in maps:
                fields = line.split()
                # read-only or executable mappings of the library file: never written, always clean
                if len(fields) >= 6 and fields[5].endswith(".so") and "/chdb/" in fields[5] and "w" not in fields[1]:
                    low, high = (int(v, 16) for v in fields[0].split("-"))
                    if libc.madvise(low, high - low, _MADV_PAGEOUT) == 0:
                        released += high - low
        return released
    except (OSError, AttributeError, ValueError):
        return 0


def _check_folder(path: str) -> None:
    """ConfigError if the chDB folder cannot be created or written (not an outage: no retry helps)."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "written" if existing == path else f"created ({existing} is not a writable folder)"
        raise ConfigError("CLICK_DSN", f"the chDB folder {path} cannot be {what}",
                          "point CLICK_DSN at a folder the service user may write (e.g. its StateDirectory)")


def chdb_holder(path: str) -> int | None:
    """The PID of another process holding a chDB folder, or None.

    The engine keeps its `status` file locked while it runs and writes its PID there: a lock we
    cannot take, with a PID that is not ours, is a folder in use.
    """
    try:
        with open(os.path.join(path, "status"), encoding="utf-8") as status:
            match = re.match(r"PID: (\d+)", status.readline())
            if not match or int(match[1]) == os.getpid():
                return None
            try:
                fcntl.flock(status.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return int(match[1])
            fcntl.flock(status.fileno(), fcntl.LOCK_UN)
    except OSError:
        return None
    return None


# chDB clients live as long as the process, one per owner (a job, or a command): every chDB
# connection leaves engine threads and descriptors behind when closed, so opening one per run
# grows the process without bound. An HTTP client holds no such state and is opened per use.
# Each shared client counts its users, so a reload that moves CLICK_DSN closes the old engine
# only once no run is using it.
@dataclass
class _Shared:
    client: Client
    users: int = 0


_SHARED: dict[tuple[str, str], _Shared] = {}
_SHARED_LOCK = threading.Lock()


def connect(settings: Settings, owner: str = "service") -> Client:
    """A client for the configured ClickHouse (`release` it after use); the target database is created if absent.

    For chDB, `owner`'s client is opened once and reused: the folder stays held by this process.
    """
    target = settings.clickhouse
    if target.kind == "chdb":
        client = _shared_chdb(target.client_kwargs["dsn"], owner)
    else:
        kwargs = {k: v for k, v in target.client_kwargs.items() if k != "database"}  # may not exist yet
        kwargs.update(connect_timeout=10, send_receive_timeout=int(settings.ch_query_timeout) + 30)
        with ch_errors(f"connect to ClickHouse ({target.display})"):
            client = clickhouse_connect.get_client(**kwargs)
    try:
        with ch_errors(f"create database {target.database}"):
            client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(target.database)}")
    except BaseException:
        release(client)
        raise
    return client


def _shared_chdb(dsn: str, owner: str) -> Client:
    with _SHARED_LOCK:
        _close_unused(keep=dsn)  # a reload moved the engine: one chDB folder per process
        shared = _SHARED.get((dsn, owner))
        if shared is None:
            with ch_errors(f"open chDB ({dsn})"):
                shared = _SHARED[(dsn, owner)] = _Shared(_open_chdb(dsn))
        shared.users += 1
        return shared.client


def _close_unused(keep: str | None) -> None:
    """Close shared clients of other folders than `keep` that no run is using (caller holds the lock)."""
    for (dsn, owner), shared in list(_SHARED.items()):
        if dsn != keep and shared.users == 0:
            shared.client.close()
            del _SHARED[(dsn, owner)]


def close_other_folders(settings: Settings) -> None:
    """After a reload: close chDB clients of a folder no longer configured (those not in use now)."""
    keep = settings.clickhouse.client_kwargs.get("dsn") if settings.clickhouse.kind == "chdb" else None
    with _SHARED_LOCK:
        _close_unused(keep)


def release(client: Client) -> None:
    """Done with a client for now: an HTTP client is closed, a shared chDB client stays open."""
    with _SHARED_LOCK:
        shared = next((s for s in _SHARED.values() if s.client is client), None)
        if shared is not None:
            shared.users -= 1
            return
    client.close()


def close_all() -> None:
    """Close the shared chDB clients (at exit: the folder is free for the next process)."""
    with _SHARED_LOCK:
        for shared in _SHARED.values():
            shared.client.close()
        _SHARED.clear()


def run_sql(client: Client, statements: str) -> None:
    """Run post-processing SQL (statements separated by ';')."""
    for stmt in filter(None, (s.strip() for s in statements.split(";"))):
        with ch_errors(f"post-processing SQL {stmt[:60]!r}"):
            client.command(stmt)


def query_rows(client: Client, query: str, parameters: dict[str, Any] | None = None) -> list[Any]:
    """Rows of a query (for status and the demo)."""
    with ch_errors("query"):
        return list(client.query(query, parameters=parameters).result_rows)
