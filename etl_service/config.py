"""Settings: read `.env`, the environment and the jobs file once, validate, freeze.

This is the only module that reads `os.environ`. Every problem becomes a `ConfigError` that
names the variable and the fix; the CLI turns it into exit status 78.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg2
import psycopg2.extensions
from dotenv.parser import parse_stream

from etl_service import faults
from etl_service.cron import CrontabTrigger
from etl_service.errors import ConfigError

NATIVE_PORTS = {"9000": "8123", "9440": "8443"}

# Job keys: name in the jobs file -> (variable in .env, default). None means "no default".
JOB_KEYS: dict[str, tuple[str, Any]] = {
    "source_table": ("ETL_SOURCE_TABLE", None),
    "source_key": ("ETL_SOURCE_KEY", "id"),
    "processed_column": ("ETL_PROCESSED_COLUMN", "processed"),
    "target_table": ("ETL_TARGET_TABLE", None),
    "columns": ("ETL_COLUMNS", ""),
    "schedule": ("ETL_SCHEDULE", "*/5 * * * *"),
    "timezone": ("ETL_TIMEZONE", "UTC"),
    "batch_size": ("ETL_BATCH_SIZE", "100000"),
    "chunk_bytes": ("ETL_CHUNK_BYTES", "8MiB"),
    "chunk_size": ("ETL_CHUNK_SIZE", "50000"),
    "ready_query": ("ETL_READY_QUERY", ""),
    "ready_timeout": ("ETL_READY_TIMEOUT", "300"),
    "ready_poll_interval": ("ETL_READY_POLL_INTERVAL", "5"),
    "transform": ("ETL_TRANSFORM", ""),
    "post_pg_sql": ("ETL_POST_PG_SQL", ""),
    "post_ch_sql": ("ETL_POST_CH_SQL", ""),
    "max_run_seconds": ("ETL_MAX_RUN_SECONDS", "3600"),
    "target_dedup": ("ETL_TARGET_DEDUP", "on"),
    "schema_changes": ("ETL_SCHEMA_CHANGES", "auto"),
    "verify_load": ("ETL_VERIFY_LOAD", "on"),
    "lag_column": ("ETL_LAG_COLUMN", ""),
}


@dataclass(frozen=True)
class JobConfig:
    """One job: which source rows go to which trigger table, when, and how."""

    name: str
    source_table: tuple[str, str]  # (schema, table)
    source_key: tuple[str, ...]  # one column, or several for a composite key
    processed_column: str
    target_table: str
    columns: tuple[tuple[str, str], ...]  # (source column, target column); empty = all
    schedule: str
    timezone: str
    batch_size: int
    chunk_size: int
    chunk_bytes: int  # a chunk ends at ETL_CHUNK_SIZE rows or about this many bytes, whichever comes first
    ready_query: str
    ready_timeout: float
    ready_poll_interval: float
    transform: str
    post_pg_sql: str
    post_ch_sql: str
    max_run_seconds: float
    target_dedup: bool = True  # refuse a target that would not drop a repeated insert
    schema_changes: str = "auto"  # auto: follow the source; fail: never alter an operator-made table
    verify_load: bool = True  # count the batch's rows in ClickHouse before marking
    lag_column: str = ""  # a timestamp of the source rows (created_at): lag is the oldest unprocessed one's age

    def trigger(self) -> CrontabTrigger:
        """The APScheduler trigger for this job's schedule (validated at load): crontab(5) semantics."""
        return CrontabTrigger(self.schedule, self.timezone)


@dataclass(frozen=True)
class ClickHouseTarget:
    """How to reach ClickHouse; `client_kwargs` feeds `clickhouse_connect.get_client`."""

    kind: str  # "chdb" or "http"
    display: str  # safe to print: no password
    database: str
    client_kwargs: Mapping[str, Any] = field(repr=False)
    cluster: str = ""  # CLICK_CLUSTER: create and alter ON CLUSTER, as ReplicatedMergeTree


@dataclass(frozen=True)
class Settings:
    """Everything the service needs, validated. `repr` never shows a password."""

    pg_dsn: str = field(repr=False)
    pg_display: str
    clickhouse: ClickHouseTarget
    jobs: tuple[JobConfig, ...]
    ledger_schema: str = "etl"
    pg_statement_timeout: float = 600.0
    ch_query_timeout: float = 300.0
    retry_attempts: int = 3
    retry_backoff: float = 2.0
    misfire_grace: float = 300.0
    log_level: str = "INFO"
    log_format: str = "auto"
    quarantine_limit: int = 1000
    progress_seconds: float = 30.0  # a progress line this often in a long run (no bar); 0: none
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_address: str = "127.0.0.1"
    crash_at: tuple[str, int] | None = None  # test hooks, see faults.py
    fail_at: tuple[str, int] | None = None
    env_file_values: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def job(self, name: str) -> JobConfig:
        """The job called `name`, or a ConfigError listing the known names."""
        for job in self.jobs:
            if job.name == name:
                return job
        known = ", ".join(j.name for j in self.jobs)
        raise ConfigError("--job", f"no job named {name!r}", f"known jobs: {known}")


def read_env(env_file: str | None, environ: Mapping[str, str] | None = None,
             previous_file: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Merge the env file under the environment; returns (merged, the file's own values).

    Variables already set in the environment win — except, on a reload, those whose value is
    the one the same file gave last time (`previous_file`): they came from that file (systemd's
    EnvironmentFile= loads it into the environment at start), so the edited file wins for them.
    `./.env` is read implicitly only for the real process environment (environ=None).
    """
    implicit = environ is None
    environ = os.environ if environ is None else environ
    file_values: dict[str, str] = {}
    path = Path(env_file) if env_file else Path(".env")
    if env_file or (implicit and path.exists()):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--env-file", f"cannot read {path}: {exc.strerror}",
                              "give a readable file (see .env.example)") from exc
        file_values = _parse_env_file(path, text)
    previous = previous_file or {}
    inherited = {k: v for k, v in environ.items() if k not in previous or previous[k] != v}
    return {**file_values, **inherited}, file_values


def _parse_env_file(path: Path, text: str) -> dict[str, str]:
    """KEY=value lines; a line dotenv cannot parse is an error, not a silently missing setting."""
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            # Name only the key: the rest of the line may hold a password.
            key = binding.original.string.split("=", 1)[0].strip()[:40]
            raise ConfigError(f"{path} line {binding.original.line}", f"cannot parse the line for {key!r}",
                              "quote values with spaces or quotes: KEY=\"…\" (escape \" and \\ inside)")
        if binding.key is not None and binding.value is not None:
            values[binding.key] = binding.value
    return values


def load(env_file: str | None = None, environ: Mapping[str, str] | None = None,
         previous: Settings | None = None) -> Settings:
    """Read and validate all settings; raises ConfigError naming the first bad variable.

    `previous`: the settings being replaced on a reload (see `read_env`).
    """
    env, file_values = read_env(env_file, environ, previous.env_file_values if previous else None)
    get = _Getter(env)
    jobs = _load_jobs(env, get)
    pg_dsn = _pg_dsn(env, get)
    return Settings(
        env_file_values=file_values,
        pg_dsn=pg_dsn,
        pg_display=redact_pg_dsn(pg_dsn),
        clickhouse=_clickhouse(env, get),
        jobs=jobs,
        ledger_schema=get.identifier("ETL_LEDGER_SCHEMA", "etl"),
        pg_statement_timeout=get.number("PG_STATEMENT_TIMEOUT", "600"),
        ch_query_timeout=get.number("CLICK_QUERY_TIMEOUT", "300"),
        retry_attempts=int(get.number("ETL_RETRY_ATTEMPTS", "3", whole=True)),
        retry_backoff=get.number("ETL_RETRY_BACKOFF", "2"),
        misfire_grace=get.number("ETL_MISFIRE_GRACE", "300"),
        log_level=get.choice("ETL_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=get.choice("ETL_LOG_FORMAT", "auto", ("auto", "text", "json", "journal")),
        quarantine_limit=int(get.number("ETL_QUARANTINE_LIMIT", "1000", whole=True)),
        progress_seconds=get.number("ETL_PROGRESS_SECONDS", "30", allow_zero=True),
        metrics_port=int(get.number("ETL_METRICS_PORT", "0", whole=True, allow_zero=True)),
        metrics_address=get.raw("ETL_METRICS_ADDRESS", "127.0.0.1"),
        crash_at=_fault(env, "ETL_CRASH_AT"),
        fail_at=_fault(env, "ETL_FAIL_AT"),
    )


def _fault(env: Mapping[str, str], variable: str) -> tuple[str, int] | None:
    try:
        return faults.parse(env.get(variable, "").strip())
    except ValueError as exc:
        raise ConfigError(variable, str(exc), "leave it unset outside the crash tests") from None


class _Getter:
    """Typed access to one flat mapping of settings, with errors that name the key."""

    def __init__(self, values: Mapping[str, Any], label: str = "") -> None:
        self.values = values
        self.label = label  # prefix for error names, e.g. "config/jobs.toml [jobs.orders] "

    def raw(self, key: str, default: Any) -> str:
        value = self.values.get(key)
        if value is None or str(value).strip() == "":
            if default is None:
                raise ConfigError(self.label + key, "is required but not set",
                                  "set it in .env (see .env.example)")
            return str(default)
        return str(value).strip()

    def number(self, key: str, default: Any, whole: bool = False, allow_zero: bool = False,
               most: tuple[float, str] | None = None) -> float:
        """A finite number > 0 (or >= 0); `most`: (the largest allowed, why)."""
        text = self.raw(key, default)
        try:
            value = float(int(text)) if whole else float(text)
        except ValueError:
            kind = "a whole number" if whole else "a number"
            raise ConfigError(self.label + key, f"must be {kind}, got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(self.label + key, f"must be a finite number, got {text!r}")
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(self.label + key, f"must be greater than 0, got {text!r}")
        if most and value > most[0]:
            raise ConfigError(self.label + key, f"must be at most {most[0]:.0f} ({most[1]}), got {text!r}")
        return value

    def size(self, key: str, default: Any) -> int:
        """A size in bytes: a whole number, optionally with KiB, MiB or GiB (KB, MB, GB: the same)."""
        text = self.raw(key, default)
        match = re.fullmatch(r"(\d+)\s*(?:([KMG])i?B)?", text, re.IGNORECASE)
        if not match or int(match[1]) == 0:
            raise ConfigError(self.label + key, f"must be a size greater than 0 such as 16MiB or 1048576, got {text!r}")
        size = int(match[1]) << {None: 0, "K": 10, "M": 20, "G": 30}[match[2] and match[2].upper()]
        if size > 64 << 30:
            raise ConfigError(self.label + key, f"must be at most 64GiB (a chunk is held in memory), got {text!r}")
        return size

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.raw(key, default)
        if value.upper() in allowed or value.lower() in allowed:
            return value.upper() if value.upper() in allowed else value.lower()
        raise ConfigError(self.label + key, f"got {value!r}", f"use one of {', '.join(allowed)}")

    def identifier(self, key: str, default: Any) -> str:
        value = self.raw(key, default)
        check_identifier(self.label + key, value)
        return value


def check_identifier(variable: str, value: str) -> None:
    """Identifiers are always quoted in SQL; only refuse what no quoting can carry."""
    if not value or "\x00" in value or len(value) > 63:
        raise ConfigError(variable, f"{value!r} is not a usable identifier",
                          "use a table or column name of 1-63 characters")



def _load_jobs(env: Mapping[str, str], get: _Getter) -> tuple[JobConfig, ...]:
    jobs_file = env.get("ETL_JOBS_FILE", "").strip()
    if not jobs_file:
        return (_job_from(env.get("ETL_JOB_NAME", ""), env, _env_view(env), ""),)
    path = Path(jobs_file)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("ETL_JOBS_FILE", f"cannot read {path}: {exc.strerror}",
                          "point it at a TOML file like config/jobs.example.toml") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("ETL_JOBS_FILE", f"{path} is not valid TOML: {exc}") from exc
    tables = data.get("jobs")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError("ETL_JOBS_FILE", f"{path} has no [jobs.NAME] tables",
                          "see config/jobs.example.toml")
    defaults = {**_env_view(env), **data.get("defaults", {})}
    jobs = []
    for name, table in tables.items():
        label = f"{path} [jobs.{name}] "
        unknown = sorted(set(table) - set(JOB_KEYS))
        if unknown:
            raise ConfigError(label + unknown[0], "is not a job setting",
                              f"known settings: {', '.join(JOB_KEYS)}")
        jobs.append(_job_from(name, env, {**defaults, **table}, label))
    _check_owners(jobs, "ETL_JOBS_FILE")
    return tuple(jobs)


def _env_view(env: Mapping[str, str]) -> dict[str, Any]:
    """Job settings from .env, under their jobs-file names (only those that are set)."""
    return {key: env[var] for key, (var, _) in JOB_KEYS.items() if env.get(var, "").strip()}


# A batch's keys and xmins are stored in one ledger row (PostgreSQL holds at most 1 GB in a value).
_MOST_ROWS = (10_000_000, "a batch's keys are stored in one ledger row")


def _job_from(name: str, env: Mapping[str, str], values: Mapping[str, Any], label: str) -> JobConfig:
    # Error names: the .env variable for the single-job form, the file key otherwise.
    keyed = {(JOB_KEYS[k][0] if not label else k): v for k, v in values.items()}
    get = _Getter(keyed, label)

    def key(k: str) -> str:
        return JOB_KEYS[k][0] if not label else k

    def default(k: str) -> Any:
        return JOB_KEYS[k][1]

    source = get.raw(key("source_table"), None)
    schema, _, table = source.rpartition(".")
    schema = schema or "public"
    check_identifier(label + key("source_table"), schema)
    check_identifier(label + key("source_table"), table)
    target = get.raw(key("target_table"), table)
    check_identifier(label + key("target_table"), target)
    schedule = get.raw(key("schedule"), default("schedule"))
    timezone = get.raw(key("timezone"), default("timezone"))
    _check_schedule(label + key("schedule"), label + key("timezone"), schedule, timezone)
    transform = get.raw(key("transform"), "")
    if transform:
        from etl_service.transform import load_user_function

        load_user_function(transform, variable=label + key("transform"))
    batch_size = int(get.number(key("batch_size"), default("batch_size"), whole=True, most=_MOST_ROWS))
    return JobConfig(
        name=name.strip() or str(env.get("ETL_JOB_NAME", "")).strip() or table,
        source_table=(schema, table),
        source_key=_parse_key(label + key("source_key"), get.raw(key("source_key"), default("source_key"))),
        processed_column=get.identifier(key("processed_column"), default("processed_column")),
        target_table=target,
        columns=_parse_columns(label + key("columns"), get.raw(key("columns"), "")),
        schedule=schedule,
        timezone=timezone,
        batch_size=batch_size,
        chunk_size=min(batch_size, int(get.number(key("chunk_size"), default("chunk_size"), whole=True,
                                                  most=_MOST_ROWS))),
        chunk_bytes=get.size(key("chunk_bytes"), default("chunk_bytes")),
        ready_query=get.raw(key("ready_query"), ""),
        ready_timeout=get.number(key("ready_timeout"), default("ready_timeout")),
        ready_poll_interval=get.number(key("ready_poll_interval"), default("ready_poll_interval")),
        transform=transform,
        post_pg_sql=get.raw(key("post_pg_sql"), ""),
        post_ch_sql=get.raw(key("post_ch_sql"), ""),
        max_run_seconds=get.number(key("max_run_seconds"), default("max_run_seconds")),
        target_dedup=get.choice(key("target_dedup"), default("target_dedup"), ("on", "off")) == "on",
        schema_changes=get.choice(key("schema_changes"), default("schema_changes"), ("auto", "fail")),
        verify_load=get.choice(key("verify_load"), default("verify_load"), ("on", "off")) == "on",
        lag_column=get.raw(key("lag_column"), ""),
    )


def _check_schedule(schedule_var: str, tz_var: str, schedule: str, timezone: str) -> None:
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(tz_var, f"unknown time zone {timezone!r}",
                          "use an IANA name such as UTC or Europe/Berlin") from None
    try:
        CrontabTrigger(schedule, timezone)
    except ValueError as exc:
        raise ConfigError(schedule_var, f"{schedule!r} is not a valid cron expression ({exc})",
                          "use 5 fields like '*/5 * * * *', or 6 with seconds first") from None


def _parse_key(variable: str, text: str) -> tuple[str, ...]:
    """`id` or `tenant_id, id`: the key's column names (its uniqueness is checked against the table)."""
    from etl_service.keys import parse_names

    names = parse_names(text)
    if not names:
        raise ConfigError(variable, "is empty", "name the key column(s), e.g. id or tenant_id, id")
    for name in names:
        check_identifier(variable, name)
    return names


def _check_owners(jobs: list[JobConfig], variable: str) -> None:
    """One source table + processed column has one job: two would race for the same flag."""
    owners: dict[tuple[str, str, str], str] = {}
    for job in jobs:
        owner = owners.setdefault((*job.source_table, job.processed_column), job.name)
        if owner != job.name:
            raise ConfigError(variable, f"jobs {owner!r} and {job.name!r} both consume {'.'.join(job.source_table)}"
                              f" through the flag column {job.processed_column!r}: they would race for the same"
                              " rows", "give the second consumer its own processed column (processed_column = …)")
    keys: dict[tuple[str, str], JobConfig] = {}
    for job in jobs:
        first = keys.setdefault(job.source_table, job)
        if set(first.source_key) != set(job.source_key):
            raise ConfigError(variable, f"jobs {first.name!r} and {job.name!r} consume {'.'.join(job.source_table)}"
                              " with different keys: batches of one table are kept apart by key",
                              "give both the same source_key")
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ConfigError(variable, "two jobs have the same name")


def _parse_columns(variable: str, text: str) -> tuple[tuple[str, str], ...]:
    """`a, b:bb, c` -> ((a, a), (b, bb), (c, c)): select and rename source columns."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, _, target = item.partition(":")
        source, target = source.strip(), (target.strip() or source.strip())
        check_identifier(variable, source)
        check_identifier(variable, target)
        pairs.append((source, target))
    return tuple(pairs)


def _pg_dsn(env: Mapping[str, str], get: _Getter) -> str:
    dsn = env.get("PG_DSN", "").strip()
    if dsn:
        try:
            psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError:
            raise ConfigError("PG_DSN", "is not a valid libpq connection string",
                              "use postgresql://user:password@host:5432/db or 'host=… dbname=…'") from None
        password = _secret(env, "PG_PASSWORD")
        if password and not psycopg2.extensions.parse_dsn(dsn).get("password"):
            dsn = psycopg2.extensions.make_dsn(dsn, password=password)
        return dsn
    port = int(get.number("PG_PORT", "5432", whole=True))
    parts = {
        "host": get.raw("PG_HOST", "localhost"),
        "port": str(port),
        "user": get.raw("PG_USER", "postgres"),
        "dbname": get.raw("PG_DATABASE", "postgres"),
    }
    password = _secret(env, "PG_PASSWORD")
    if password:
        parts["password"] = password
    return psycopg2.extensions.make_dsn(**parts)


def _secret(env: Mapping[str, str], name: str) -> str:
    """A password from `NAME`, else the file `NAME_FILE`, else the systemd credential `name`.

    systemd's `LoadCredential=pg_password:/etc/etl-service/pg_password` puts it in
    $CREDENTIALS_DIRECTORY, readable by the service only; nothing has to sit in an env file.
    """
    if env.get(name, ""):
        return env[name]
    path, variable = env.get(f"{name}_FILE", "").strip(), f"{name}_FILE"
    if not path and env.get("CREDENTIALS_DIRECTORY"):
        credential = Path(env["CREDENTIALS_DIRECTORY"]) / name.lower()
        if credential.exists():
            path, variable = str(credential), f"the systemd credential {name.lower()}"
    if not path:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.strerror}",
                          "give a file the service user may read (mode 600, owned by it)") from None


def redact_pg_dsn(dsn: str) -> str:
    """A libpq DSN or URI as `host=… port=… dbname=… user=…` (and its TLS files), with no password."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparseable DSN>"
    shown = [f"{k}={parts[k]}" for k in ("host", "port", "dbname", "user", "sslmode", "sslrootcert", "sslcert",
                                          "sslkey") if parts.get(k)]
    return " ".join(shown) or "<default libpq settings>"


def _clickhouse(env: Mapping[str, str], get: _Getter) -> ClickHouseTarget:
    target = _clickhouse_target(env, get)
    cluster = env.get("CLICK_CLUSTER", "").strip()
    if cluster and target.kind == "chdb":
        raise ConfigError("CLICK_CLUSTER", "has no meaning for an embedded chdb:// target", "leave it empty")
    return ClickHouseTarget(target.kind, target.display, target.database, target.client_kwargs, cluster)


def _clickhouse_target(env: Mapping[str, str], get: _Getter) -> ClickHouseTarget:
    dsn = env.get("CLICK_DSN", "").strip()
    if dsn.startswith("chdb://"):
        path = dsn[len("chdb://"):]
        if not path.startswith("/"):
            raise ConfigError("CLICK_DSN", "a chdb:// path must be absolute",
                              "write chdb:///var/lib/etl-service/chdb (three slashes)")
        if importlib.util.find_spec("chdb") is None:
            raise ConfigError("CLICK_DSN", "a chdb:/// target needs the embedded ClickHouse engine, which is not"
                              " installed", "install it: pip install 'etl-service[embedded]' (deploy/install.sh"
                              " --embedded; ./run_etl.sh demo installs it too)")
        database = get.raw("CLICK_DATABASE", "default")
        return ClickHouseTarget("chdb", f"chdb://{path} database={database}", database,
                                {"dsn": dsn, "database": database})
    if dsn:
        return _clickhouse_from_url(dsn, get)
    port = get.raw("CLICK_PORT", "8123")
    _check_click_port("CLICK_PORT", port)
    secure = get.raw("CLICK_SECURE", "false").lower() in ("1", "true", "yes")
    return _http_target(get.raw("CLICK_HOST", "localhost"), int(port), get.raw("CLICK_USER", "default"),
                        _secret(env, "CLICK_PASSWORD"), get.raw("CLICK_DATABASE", "default"), secure, _tls(env, get))


def _clickhouse_from_url(dsn: str, get: _Getter) -> ClickHouseTarget:
    url = urlsplit(dsn)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("CLICK_DSN", "must start with http://, https:// or chdb:///",
                          "e.g. http://default:password@localhost:8123/default")
    try:
        port = url.port or (8443 if url.scheme == "https" else 8123)
    except ValueError:
        raise ConfigError("CLICK_DSN", "has a port that is not a number") from None
    _check_click_port("CLICK_DSN", str(port))
    database = url.path.strip("/") or get.raw("CLICK_DATABASE", "default")
    return _http_target(url.hostname, port, unquote(url.username or "default"),
                        unquote(url.password or "") or _secret(get.values, "CLICK_PASSWORD"), database,
                        url.scheme == "https", _tls(get.values, get))


def _tls(env: Mapping[str, str], get: _Getter) -> dict[str, Any]:
    """clickhouse-connect's TLS options: a private CA (CLICK_CA_CERT) and certificate checks (CLICK_VERIFY)."""
    options: dict[str, Any] = {"verify": get.choice("CLICK_VERIFY", "true", ("true", "false")) == "true"}
    ca_cert = env.get("CLICK_CA_CERT", "").strip()
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
