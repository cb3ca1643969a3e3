"""Every setting, declared once (`SECTIONS`), with the readers that parse and check its text.

A declaration gives the variable, its key in a jobs file (job settings), its default, the
reader and one line of help. That table drives the reading (`reading`), fills `JobConfig` and
`Settings` (a job setting's key is its attribute; a service setting names its `attr`), and is
what `python -m etl_service.settings --env-example / --reference` print (see `docgen`).
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from etl_service import faults
from etl_service.errors import ConfigError

if TYPE_CHECKING:  # pandas is imported only for a user function: a job without one never loads it
    import pandas as pd


class Getter:
    """Typed access to one flat mapping of settings, with errors that name the key.

    The mapping is the environment (named by variable), or one table of a jobs file (named by
    key: then `label` is set, e.g. "config/jobs.toml [jobs.orders] ", and prefixes error names).
    """

    def __init__(self, values: Mapping[str, Any], label: str = "") -> None:
        self.values = values
        self.label = label

    def read(self, setting: Setting | str) -> Any:
        """A declared setting (or its variable), parsed and checked by its declaration."""
        declared = DECLARED[setting] if isinstance(setting, str) else setting
        return declared.parse(self, self._key(declared), declared.default)

    def name(self, variable: str) -> str:
        """What errors call the declared setting `variable` here."""
        return self.label + self._key(DECLARED[variable])

    def _key(self, setting: Setting) -> str:
        return setting.key if self.label else setting.variable

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

    def whole(self, key: str, default: Any, allow_zero: bool = False, most: tuple[float, str] | None = None) -> int:
        """A whole number > 0 (or >= 0)."""
        return int(self.number(key, default, whole=True, allow_zero=allow_zero, most=most))

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

    def choice(self, key: str, default: str | None, allowed: tuple[str, ...]) -> str:
        value = self.raw(key, default)
        if value.upper() in allowed or value.lower() in allowed:
            return value.upper() if value.upper() in allowed else value.lower()
        raise ConfigError(self.label + key, f"got {value!r}", f"use one of {', '.join(allowed)}")

    def switch(self, key: str, default: str | None, allowed: tuple[str, str] = ("on", "off")) -> bool:
        """One of two words; True for the first."""
        return self.choice(key, default, allowed) == allowed[0]

    def identifier(self, key: str, default: Any) -> str:
        value = self.raw(key, default)
        check_identifier(self.label + key, value)
        return value


def check_identifier(variable: str, value: str) -> None:
    """Identifiers are always quoted in SQL; only refuse what no quoting can carry."""
    if not value or "\x00" in value or len(value) > 63:
        raise ConfigError(variable, f"{value!r} is not a usable identifier",
                          "use a table or column name of 1-63 characters")


# Readers beyond Getter's: (getter, name in its mapping, default) -> the value, or a ConfigError naming it.
def _source_table(get: Getter, key: str, default: str | None) -> tuple[str, str]:
    """`schema.table` -> (schema, table); the schema defaults to public."""
    schema, _, table = get.raw(key, default).rpartition(".")
    schema = schema or "public"
    check_identifier(get.label + key, schema)
    check_identifier(get.label + key, table)
    return schema, table


def _target_table(get: Getter, key: str, default: str | None) -> str:
    """A table name, or "" for the source table's (`_job_from` fills it in)."""
    target = get.raw(key, default)
    if target:
        check_identifier(get.label + key, target)
    return target


def _source_key(get: Getter, key: str, default: str | None) -> tuple[str, ...]:
    """`id` or `tenant_id, id`: the key's column names (its uniqueness is checked against the table)."""
    names = parse_names(get.raw(key, default))
    if not names:
        raise ConfigError(get.label + key, "is empty", "name the key column(s), e.g. id or tenant_id, id")
    for name in names:
        check_identifier(get.label + key, name)
    return names


def _columns(get: Getter, key: str, default: str | None) -> tuple[tuple[str, str], ...]:
    """`a, b:bb, c` -> ((a, a), (b, bb), (c, c)): select and rename source columns."""
    pairs = []
    for item in filter(None, (part.strip() for part in get.raw(key, default).split(","))):
        source, _, target = item.partition(":")
        source, target = source.strip(), (target.strip() or source.strip())
        check_identifier(get.label + key, source)
        check_identifier(get.label + key, target)
        pairs.append((source, target))
    return tuple(pairs)


def _transform(get: Getter, key: str, default: str | None) -> str:
    """`module:function`, imported now so that a typo is a config error, not a failed run."""
    transform = get.raw(key, default)
    if transform:
        load_user_function(transform, variable=get.label + key)
    return transform


def _yes(get: Getter, key: str, default: str | None) -> bool:
    """1, true or yes in any case; anything else is false, not an error (as it always was: a stricter check
    would refuse configurations that load today)."""
    return get.raw(key, default).lower() in ("1", "true", "yes")


def _fault(get: Getter, key: str, default: str | None) -> tuple[str, int] | None:
    try:
        return faults.parse(get.raw(key, default))
    except ValueError as exc:
        raise ConfigError(get.label + key, str(exc), "leave it unset outside the crash tests") from None


Reader = Callable[[Getter, str, str | None], Any]


@dataclass(frozen=True)
class Setting:
    """One setting, declared once; `.env.example` and the docs reference are generated from these."""

    variable: str  # in .env and the environment
    default: str | None  # as written in .env; None: required
    help: str  # one line (wrapped in .env.example, a table cell in the reference)
    parse: Reader = Getter.raw  # parses and checks the text; its errors name the variable (or key)
    attr: str = ""  # the JobConfig / Settings attribute it fills; "": read by a function of its own
    key: str = ""  # a job setting's key in a jobs file (= its JobConfig attribute)
    example: str | None = None  # what .env.example sets instead of the default (a required setting needs one)
    hidden: bool = False  # a test hook: commented out in .env.example, left out of the reference


@dataclass(frozen=True)
class Section:
    """A group of settings: a header in .env.example, a table in the reference."""

    title: str
    notes: str
    settings: tuple[Setting, ...]


def _job(variable: str, default: str | None, help: str, parse: Reader = Getter.raw,
         example: str | None = None) -> Setting:
    """A job setting: its jobs-file key and JobConfig attribute are the variable without ETL_, in lower case."""
    key = variable.removeprefix("ETL_").lower()
    return Setting(variable, default, help, parse, attr=key, key=key, example=example)


# A batch's keys and xmins are stored in one ledger row (PostgreSQL holds at most 1 GB in a value).
_MOST_ROWS = (10_000_000, "a batch's keys are stored in one ledger row")

# Every setting, in the order of .env.example and the reference. A job's settings are also read in
# this order (so of several bad values the first is named), and listed in it when a jobs file has
# an unknown key.
SECTIONS = (
    Section("PostgreSQL (the source, and the ledger in schema ETL_LEDGER_SCHEMA)",
            "Either one DSN (PG_DSN) or the parts (PG_HOST, PG_PORT, PG_USER, PG_PASSWORD, PG_DATABASE).", (
        Setting("PG_DSN", "", "A libpq URI or key=value string; it wins over the PG_* parts. TLS goes here too: e.g."
                " postgresql://etl@db:5432/app?sslmode=verify-full&sslrootcert=/etc/etl-service/pg-ca.pem (client"
                " certificates: &sslcert=...&sslkey=...; docs/postgresql.md \"PostgreSQL over TLS\" says where the"
                " files go)."),
        Setting("PG_HOST", "localhost", "Server host (without PG_DSN)."),
        Setting("PG_PORT", "5432", "Server port (without PG_DSN).", Getter.whole),
        Setting("PG_USER", "postgres", "User name (without PG_DSN)."),
        Setting("PG_PASSWORD", "", "Password (also added to a PG_DSN that has none)."),
        Setting("PG_PASSWORD_FILE", "", "Or a file holding the password (first line; mode 600), or, under systemd,"
                " the credential pg_password (LoadCredential=pg_password:/etc/etl-service/pg_password; see"
                " etl.service)."),
        Setting("PG_DATABASE", "postgres", "Database name (without PG_DSN)."),
        Setting("PG_STATEMENT_TIMEOUT", "600", "Longest any single PostgreSQL statement may run, in seconds.",
                Getter.number, attr="pg_statement_timeout"),
    )),
    Section("ClickHouse (the target)", "Either one DSN (CLICK_DSN) or the parts (CLICK_HOST, CLICK_PORT,"
            " CLICK_USER, CLICK_PASSWORD, CLICK_DATABASE, CLICK_SECURE).", (
        Setting("CLICK_DSN", "", "http://user:password@host:8123/database, https://…:8443/…, or chdb:///absolute/path"
                " for the embedded chDB engine (in-process, no server needed)."),
        Setting("CLICK_HOST", "localhost", "Server host (without CLICK_DSN)."),
        Setting("CLICK_PORT", "8123", "The HTTP port (8123; 8443 with CLICK_SECURE=true); 9000 is the native"
                " protocol, which the client library does not speak."),
        Setting("CLICK_USER", "default", "User name (without CLICK_DSN)."),
        Setting("CLICK_PASSWORD", "", "Password (also used with a CLICK_DSN that has none)."),
        Setting("CLICK_PASSWORD_FILE", "", "Or a file holding the password, or the systemd credential"
                " click_password (as for PostgreSQL)."),
        Setting("CLICK_DATABASE", "default", "Database of the trigger tables (a DSN's path wins)."),
        Setting("CLICK_SECURE", "false", "true: HTTPS (without CLICK_DSN; an https:// DSN is secure).", _yes),
        Setting("CLICK_CA_CERT", "", "With HTTPS: the PEM file of a private CA that signed the server's certificate"
                " (empty: the system's CAs)."),
        Setting("CLICK_VERIFY", "true", "With HTTPS: whether to check the server's certificate (false only for a"
                " test server).", partial(Getter.switch, allowed=("true", "false"))),
        Setting("CLICK_QUERY_TIMEOUT", "300", "Longest a ClickHouse query (e.g. the readiness query) may run, in"
                " seconds.", Getter.number, attr="ch_query_timeout"),
        Setting("CLICK_CLUSTER", "", "A ClickHouse cluster name: new targets are created ON CLUSTER as"
                " ReplicatedMergeTree (with the {shard}/{replica} macros) and schema changes run ON CLUSTER."
                " Empty: a single server. See docs/clickhouse.md, \"ClickHouse cluster\"."),
    )),
    Section("The job (one job straight from .env; for several, see ETL_JOBS_FILE)",
            "In a jobs file each job sets these by key: the variable without ETL_, in lower case.", (
        Setting("ETL_JOB_NAME", "", "Name used in logs and the ledger (empty: the source table's name; in a jobs"
                " file, NAME of [jobs.NAME]). Renaming a job with an unfinished batch: see docs/operations.md"
                " (\"Renamed or removed jobs\", the adopt/release commands)."),
        _job("ETL_SOURCE_TABLE", None, "Source table, schema.table (schema defaults to public). Required.",
             _source_table, example="public.orders"),
        _job("ETL_SOURCE_KEY", "id", "Key of the source table: one column or several (\"tenant_id, id\"). It must"
             " be the PRIMARY KEY or a UNIQUE index without WHERE on exactly these columns (checked; exit 78 if not)."
             " Rows whose key has a NULL are never claimed.", _source_key),
        _job("ETL_PROCESSED_COLUMN", "processed", "Boolean column that marks a row processed. Rows with false are"
             " picked up.", Getter.identifier),
        _job("ETL_TARGET_TABLE", "", "ClickHouse trigger table, in CLICK_DATABASE (empty: the source table's name)."
             " Created from the PostgreSQL column types if it does not exist (see docs/clickhouse.md,"
             " \"Type mapping\").",
             _target_table, example="orders_trigger"),
        _job("ETL_COLUMNS", "", "Columns to move, optionally renamed: \"id, amount:total, created_at\" (empty: all"
             " but the flag).", _columns),
        _job("ETL_SCHEDULE", "*/5 * * * *", "When to run: crontab(5) (0 and 7 are Sunday, 1-5 Mon-Fri, names,"
             " @daily ...), or 6 fields with seconds first. `check` prints the next three run times."),
        _job("ETL_TIMEZONE", "UTC", "Time zone of the schedule, an IANA name."),
        _job("ETL_BATCH_SIZE", "100000", "Rows per batch: each batch is claimed, loaded, awaited and marked as one"
             " unit (at most 10000000: a batch's keys are kept in one ledger row).",
             partial(Getter.whole, most=_MOST_ROWS)),
        _job("ETL_CHUNK_BYTES", "8MiB", "Bytes per insert, about (8MiB, 1GiB, or a number of bytes): a chunk ends at"
             " ETL_CHUNK_SIZE rows or where its rows reach this size (values count in full, compressed ones too), so"
             " memory follows bytes, not rows. A single row larger than this goes alone, or with the next few small"
             " ones.", Getter.size),
        _job("ETL_CHUNK_SIZE", "50000", "Rows per insert into ClickHouse (at most ETL_BATCH_SIZE).",
             partial(Getter.whole, most=_MOST_ROWS)),
        _job("ETL_READY_QUERY", "", "Optional ClickHouse query that returns a true first value once downstream work"
             " is done. It may use the batch id as a parameter: {batch_id:UInt64}. Empty: ready at once."),
        _job("ETL_READY_TIMEOUT", "300", "Seconds to wait for readiness before leaving the batch loaded for the next"
             " run.", Getter.number),
        _job("ETL_READY_POLL_INTERVAL", "5", "Seconds between readiness polls.", Getter.number),
        _job("ETL_TRANSFORM", "", "Optional pandas transform, module:function (DataFrame in, DataFrame out),"
             " importable from here.", _transform),
        _job("ETL_POST_PG_SQL", "", "Optional SQL run on PostgreSQL after a run marked rows (statements split on"
             " ';')."),
        _job("ETL_POST_CH_SQL", "", "Optional SQL run on ClickHouse after a run marked rows (statements split on"
             " ';')."),
        _job("ETL_MAX_RUN_SECONDS", "3600", "A run stops claiming new batches after this many seconds; the next run"
             " continues.", Getter.number),
        _job("ETL_TARGET_DEDUP", "on", "The target must drop a repeated insert token (a MergeTree deduplication"
             " window, or Replicated); otherwise runs are refused with the ALTER to run. off: accept at-least-once"
             " (warned every run).", Getter.switch),
        _job("ETL_SCHEMA_CHANGES", "auto", "auto: columns added at the source are added to the target, lossless"
             " widenings applied, and rows the target holds differently after a column change (a volatile default,"
             " a type change that converted values) sent again. fail: a target you made is never altered and no"
             " row is sent again; the run stops with, or logs, the statement to run.",
             partial(Getter.choice, allowed=("auto", "fail"))),
        _job("ETL_VERIFY_LOAD", "on", "on: before a batch is marked, count its rows in ClickHouse (the _etl_batch"
             " column) and compare with the rows sent. off for targets that drop or collapse rows by design (TTL,"
             " Replacing/Collapsing engines) — see docs/clickhouse.md, \"Load verification\".", Getter.switch),
        _job("ETL_LAG_COLUMN", "", "A timestamp column of the source rows (e.g. created_at): lag (metrics, status)"
             " is then the exact age of the oldest unprocessed row (rows where it is NULL are not counted). Empty,"
             " or NULL in every unprocessed row: the age of the oldest unfinished batch, or the time since a run"
             " last ended with nothing left to claim. When it is among the columns moved, each batch's"
             " commit-to-mark time is measured from it too (the time a row was last written, e.g. updated_at,"
             " measures what ETL_WAKE=notify buys)."),
        _job("ETL_TARGET_MODE", "append", "append: every version of a row is a row of its own (each carries"
             " _etl_version). latest: an auto-created target is a ReplacingMergeTree on the key versioned by"
             " _etl_version, so SELECT … FINAL gives the source's current rows (docs/clickhouse.md, \"Rows that"
             " change\").", partial(Getter.choice, allowed=("append", "latest"))),
        _job("ETL_DELETED_COLUMN", "", "With ETL_TARGET_MODE=latest: a boolean column of the source that marks a row"
             " deleted (a soft delete). Such a row becomes a deleted row in the target (_etl_deleted = 1), which FINAL"
             " leaves out; setting it back to false brings the row back.", Getter.raw),
        _job("ETL_WAKE", "off", "notify: a commit that inserts or updates source rows wakes the job within about a"
             " second (PostgreSQL LISTEN/NOTIFY; a statement trigger the service creates on the source), and the"
             " schedule stays as a safety net. off: the schedule alone (docs/operations.md, \"Near real time\").",
             partial(Getter.choice, allowed=("off", "notify"))),
        _job("ETL_WAKE_DELAY", "0.2", "With ETL_WAKE=notify: seconds a wake-up waits before the run starts, so a"
             " burst of commits becomes one batch (0: none).", partial(Getter.number, allow_zero=True)),
    )),
    Section("Several jobs", "", (
        Setting("ETL_JOBS_FILE", "", "A TOML file with one [jobs.NAME] table per job (see config/jobs.example.toml)."
                " When set, the ETL_* job variables above act as defaults for every job in the file."),
    )),
    Section("The service", "", (
        Setting("ETL_LEDGER_SCHEMA", "etl", "PostgreSQL schema for the ledger (batches, runs), created by the"
                " service.", Getter.identifier, attr="ledger_schema"),
        Setting("ETL_RETRY_ATTEMPTS", "3", "Attempts per run for transient errors (server unreachable), with"
                " exponential backoff.", Getter.whole, attr="retry_attempts"),
        Setting("ETL_RETRY_BACKOFF", "2", "Seconds before the first retry, doubled for each next one.",
                Getter.number, attr="retry_backoff"),
        Setting("ETL_MISFIRE_GRACE", "300", "A scheduled run that could not start for this many seconds is skipped.",
                Getter.number, attr="misfire_grace"),
        Setting("ETL_QUARANTINE_LIMIT", "1000", "Bad rows (a value that cannot be converted or does not fit the"
                " target, or that makes the transform raise) are set aside in the ledger's quarantine table, stay"
                " unprocessed, and are listed by `status`; `requeue` releases them. A run stops once more than"
                " this many are quarantined.", Getter.whole, attr="quarantine_limit"),
        Setting("ETL_METRICS_PORT", "0", "Prometheus metrics at http://ETL_METRICS_ADDRESS:ETL_METRICS_PORT/metrics"
                " (rows per step, batch and run durations, backlog, last success, readiness wait). 0 serves none.",
                partial(Getter.whole, allow_zero=True), attr="metrics_port"),
        Setting("ETL_METRICS_ADDRESS", "127.0.0.1", "The address the metrics endpoint listens on.",
                attr="metrics_address"),
        Setting("ETL_PROGRESS_SECONDS", "30", "A run that lasts longer than this many seconds logs a progress line"
                " this often: rows done of the backlog, rows/s, time left (0: none). `--once` on a terminal shows a"
                " bar instead.", partial(Getter.number, allow_zero=True), attr="progress_seconds"),
        Setting("ETL_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.",
                partial(Getter.choice, allowed=("DEBUG", "INFO", "WARNING", "ERROR")), attr="log_level"),
        Setting("ETL_LOG_FORMAT", "auto", "auto (journal under systemd, text on a terminal), text, journal or json."
                " journal: entries with fields (JOB=, BATCH=, STATUS=, ...) when stderr is journald's, else lines"
                " prefixed with their syslog priority (e.g. <6>).",
                partial(Getter.choice, allowed=("auto", "text", "json", "journal")), attr="log_format"),
    )),
    Section("Test hooks (never set these in production)", "Crash tests: a point is one of "
            f"{', '.join(faults.POINTS)}; n counts how often a run reached it (default 1).", (
        Setting("ETL_CRASH_AT", "", "SIGKILL the process the n-th time a run reaches a point: point[:n].", _fault,
                attr="crash_at", hidden=True),
        Setting("ETL_FAIL_AT", "", "Raise a transient error there instead, as an outage would: point[:n].", _fault,
                attr="fail_at", hidden=True),
    )),
)
DECLARED = {setting.variable: setting for section in SECTIONS for setting in section.settings}
JOB_SETTINGS = tuple(setting for setting in DECLARED.values() if setting.key)
SERVICE_SETTINGS = tuple(setting for setting in DECLARED.values() if setting.attr and not setting.key)


def parse_names(text: str) -> tuple[str, ...]:
    """`tenant_id, id` -> ("tenant_id", "id"); empty parts are dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


UserFunction = Callable[["pd.DataFrame"], "pd.DataFrame"]


@functools.cache
def load_user_function(spec: str, variable: str = "ETL_TRANSFORM") -> UserFunction:
    """Import `module:function`; ConfigError naming `variable` if it cannot be used."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(variable, f"{spec!r} is not of the form module:function",
                          "e.g. my_transforms:clean_orders (the module must be importable)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(variable, f"cannot import module {module_name!r}: {exc}",
                          "put it on PYTHONPATH or next to run_etl.sh") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(variable, f"module {module_name!r} has no function {func_name!r}")
    return func
