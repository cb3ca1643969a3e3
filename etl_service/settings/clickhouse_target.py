"""Where ClickHouse is: the CLICK_* settings read into a `ClickHouseTarget`, one reader per kind of target.

A new kind of connection is added here (how its CLICK_* settings are read; new variables are
declared in `declared.SECTIONS`) and in `clickhouse.clients` (how a client is opened).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from etl_service.errors import ConfigError
from etl_service.settings.declared import Getter

NATIVE_PORTS = {"9000": "8123", "9440": "8443"}
Secret = Callable[[Getter, str], str]  # the reader of a password, its file or systemd credential (`reading.secret`)


@dataclass(frozen=True)
class ClickHouseTarget:
    """How to reach ClickHouse; `client_kwargs` feeds `clickhouse_connect.get_client`."""

    kind: str  # "chdb" or "http"
    display: str  # safe to print: no password
    database: str
    client_kwargs: Mapping[str, Any] = field(repr=False)
    cluster: str = ""  # CLICK_CLUSTER: create and alter ON CLUSTER, as ReplicatedMergeTree


def target_from(get: Getter, secret: Secret) -> ClickHouseTarget:
    """The configured ClickHouse (CLICK_DSN, or CLICK_HOST and the other parts); ConfigError naming the variable."""
    target = _target(get, secret)
    cluster = get.read("CLICK_CLUSTER")
    if cluster and target.kind == "chdb":
        raise ConfigError("CLICK_CLUSTER", "has no meaning for an embedded chdb:// target", "leave it empty")
    return ClickHouseTarget(target.kind, target.display, target.database, target.client_kwargs, cluster)


def _target(get: Getter, secret: Secret) -> ClickHouseTarget:
    dsn = get.read("CLICK_DSN")
    if dsn.startswith("chdb://"):
        path = dsn[len("chdb://"):]
        if not path.startswith("/"):
            raise ConfigError("CLICK_DSN", "a chdb:// path must be absolute",
                              "write chdb:///var/lib/etl-service/chdb (three slashes)")
        if importlib.util.find_spec("chdb") is None:
            raise ConfigError("CLICK_DSN", "a chdb:/// target needs the embedded ClickHouse engine, which is not"
                              " installed", "install it: pip install 'etl-service[embedded]' (deploy/install.sh"
                              " --embedded; ./run_etl.sh demo installs it too)")
        database = get.read("CLICK_DATABASE")
        return ClickHouseTarget("chdb", f"chdb://{path} database={database}", database,
                                {"dsn": dsn, "database": database})
    if dsn:
        return _from_url(dsn, get, secret)
    port = get.read("CLICK_PORT")
    _check_click_port("CLICK_PORT", port)
    return _http_target(get.read("CLICK_HOST"), int(port), get.read("CLICK_USER"), secret(get, "CLICK_PASSWORD"),
                        get.read("CLICK_DATABASE"), get.read("CLICK_SECURE"), _tls(get))


def _from_url(dsn: str, get: Getter, secret: Secret) -> ClickHouseTarget:
    url = urlsplit(dsn)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("CLICK_DSN", "must start with http://, https:// or chdb:///",
                          "e.g. http://default:password@localhost:8123/default")
    try:
        port = url.port or (8443 if url.scheme == "https" else 8123)
    except ValueError:
        raise ConfigError("CLICK_DSN", "has a port that is not a number") from None
    _check_click_port("CLICK_DSN", str(port))
    database = url.path.strip("/") or get.read("CLICK_DATABASE")
    return _http_target(url.hostname, port, unquote(url.username or "default"),
                        unquote(url.password or "") or secret(get, "CLICK_PASSWORD"), database,
                        url.scheme == "https", _tls(get))


def _tls(get: Getter) -> dict[str, Any]:
    """clickhouse-connect's TLS options: a private CA (CLICK_CA_CERT) and certificate checks (CLICK_VERIFY)."""
    options: dict[str, Any] = {"verify": get.read("CLICK_VERIFY")}
    ca_cert = get.read("CLICK_CA_CERT")
    if ca_cert:
        if not Path(ca_cert).is_file():
            raise ConfigError("CLICK_CA_CERT", f"{ca_cert} is not a readable file",
                              "give the PEM file of the CA that signed ClickHouse's certificate")
        options["ca_cert"] = ca_cert
    return options


def _http_target(host: str, port: int, user: str, password: str, database: str, secure: bool,
                 tls: Mapping[str, Any]) -> ClickHouseTarget:
    scheme = "https" if secure else "http"
    kwargs = {"host": host, "port": port, "username": user, "password": password,
              "database": database, "secure": secure, **(tls if secure else {})}
    return ClickHouseTarget("http", f"{scheme}://{user}@{host}:{port}/{database}", database, kwargs)


def _check_click_port(variable: str, port: str) -> None:
    if not port.isdigit():
        raise ConfigError(variable, f"port must be a number, got {port!r}", "ClickHouse's HTTP port is 8123")
    if port in NATIVE_PORTS:
        raise ConfigError(variable, f"port {port} is ClickHouse's native TCP port, which clickhouse-connect"
                          " does not speak", f"use the HTTP interface port {NATIVE_PORTS[port]}")
