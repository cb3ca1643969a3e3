"""Settings: read `.env`, the environment and the jobs file once, validate, freeze.

This is the only module that reads settings from `os.environ` (`service.systemd` and `logs` read
only what systemd itself sets: NOTIFY_SOCKET, WATCHDOG_USEC/PID, JOURNAL_STREAM). Every setting is
declared once, in `declared.SECTIONS`: its variable, its key in a jobs file (job settings), its
default, the reader that parses and checks it, and one line of help. That table drives the reading
here, fills `JobConfig` and `Settings` (a job setting's key is its attribute; a service setting
names its `attr`), and is what `python -m etl_service.settings --env-example / --reference` print
(see `docgen`). Every problem becomes a `ConfigError` that names the variable (in a jobs file:
`path [jobs.NAME] key`) and the fix; the CLI turns it into exit status 78.
"""

from __future__ import annotations

import io
import os
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from dotenv.parser import parse_stream

from etl_service.errors import ConfigError
from etl_service.settings import clickhouse_target
from etl_service.settings.cron import CrontabTrigger
from etl_service.settings.declared import JOB_SETTINGS, SERVICE_SETTINGS, Getter, check_identifier
from etl_service.settings.model import JobConfig, Settings


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
    get = Getter(env)
    jobs = _load_jobs(get)
    pg_dsn = _pg_dsn(get)
    target = clickhouse_target.target_from(get, secret)
    service = {setting.attr: get.read(setting) for setting in SERVICE_SETTINGS}
    return Settings(pg_dsn=pg_dsn, pg_display=redact_pg_dsn(pg_dsn), clickhouse=target, jobs=jobs,
                    env_file_values=file_values, **service)


def _load_jobs(get: Getter) -> tuple[JobConfig, ...]:
    jobs_file = get.read("ETL_JOBS_FILE")
    if not jobs_file:
        return (_job_from(get.read("ETL_JOB_NAME"), get),)
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
    defaults = {**_env_view(get.values), **data.get("defaults", {})}
    keys = [setting.key for setting in JOB_SETTINGS]
    jobs = []
    for name, table in tables.items():
        label = f"{path} [jobs.{name}] "
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(label + unknown[0], "is not a job setting", f"known settings: {', '.join(keys)}")
        jobs.append(_job_from(name.strip() or get.read("ETL_JOB_NAME"), Getter({**defaults, **table}, label)))
    _check_owners(jobs, "ETL_JOBS_FILE")
    return tuple(jobs)


def _env_view(env: Mapping[str, str]) -> dict[str, Any]:
    """Job settings from .env, under their jobs-file keys (only those that are set)."""
    return {s.key: env[s.variable] for s in JOB_SETTINGS if env.get(s.variable, "").strip()}


def _job_from(name: str, get: Getter) -> JobConfig:
    """The job `name` (empty: the source table's name) from .env or one table of a jobs file."""
    values = {setting.key: get.read(setting) for setting in JOB_SETTINGS}
    table = values["source_table"][1]
    _check_schedule(get.name("ETL_SCHEDULE"), get.name("ETL_TIMEZONE"), values["schedule"], values["timezone"])
    if values["deleted_column"]:
        check_identifier(get.name("ETL_DELETED_COLUMN"), values["deleted_column"])
        if values["deleted_column"] == values["processed_column"]:
            raise ConfigError(get.name("ETL_DELETED_COLUMN"), f"{values['deleted_column']!r} is also"
                              " ETL_PROCESSED_COLUMN: the service sets that flag once it has moved a row, so it cannot"
                              " also say that a row was deleted", "name the boolean column that marks a row deleted,"
                              " or leave ETL_DELETED_COLUMN empty")
        if values["target_mode"] != "latest":
            raise ConfigError(get.name("ETL_DELETED_COLUMN"), "a deleted column needs ETL_TARGET_MODE=latest (in"
                              " append mode every version is kept, deleted or not)",
                              "set ETL_TARGET_MODE=latest, or leave ETL_DELETED_COLUMN empty")
    return JobConfig(**{**values, "name": name or table, "target_table": values["target_table"] or table,
                        "chunk_size": min(values["batch_size"], values["chunk_size"])})


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


def _pg_dsn(get: Getter) -> str:
    dsn = get.read("PG_DSN")
    if dsn:
        try:
            psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError:
            raise ConfigError("PG_DSN", "is not a valid libpq connection string",
                              "use postgresql://user:password@host:5432/db or 'host=… dbname=…'") from None
        password = secret(get, "PG_PASSWORD")
        if password and not psycopg2.extensions.parse_dsn(dsn).get("password"):
            dsn = psycopg2.extensions.make_dsn(dsn, password=password)
        return dsn
    port = get.read("PG_PORT")
    parts = {"host": get.read("PG_HOST"), "port": str(port), "user": get.read("PG_USER"),
             "dbname": get.read("PG_DATABASE")}
    password = secret(get, "PG_PASSWORD")
    if password:
        parts["password"] = password
    return psycopg2.extensions.make_dsn(**parts)


def secret(get: Getter, name: str) -> str:
    """A password from `NAME` (as given: never stripped), else the file `NAME_FILE`, else the systemd credential.

    systemd's `LoadCredential=pg_password:/etc/etl-service/pg_password` puts it in
    $CREDENTIALS_DIRECTORY, readable by the service only; nothing has to sit in an env file.
    """
    env = get.values
    if env.get(name, ""):
        return str(env[name])
    path, variable = get.read(f"{name}_FILE"), f"{name}_FILE"
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
