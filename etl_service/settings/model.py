"""The settings objects: one job (`JobConfig`) and the whole service (`Settings`), frozen.

Their attributes are filled from the declarations in `declared.SECTIONS` by `reading.load`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from etl_service.errors import ConfigError
from etl_service.settings.clickhouse_target import ClickHouseTarget
from etl_service.settings.cron import CrontabTrigger


# The settings objects: their attributes are filled from the declarations in SECTIONS.
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
    chunk_bytes: int
    ready_query: str
    ready_timeout: float
    ready_poll_interval: float
    transform: str
    post_pg_sql: str
    post_ch_sql: str
    max_run_seconds: float
    target_dedup: bool
    schema_changes: str
    verify_load: bool
    lag_column: str
    target_mode: str = "append"
    deleted_column: str = ""
    wake: str = "off"
    wake_delay: float = 0.2

    def trigger(self) -> CrontabTrigger:
        """The APScheduler trigger for this job's schedule (validated at load): crontab(5) semantics."""
        return CrontabTrigger(self.schedule, self.timezone)


@dataclass(frozen=True)
class Settings:
    """Everything the service needs, validated. `repr` never shows a password."""

    pg_dsn: str = field(repr=False)
    pg_display: str
    clickhouse: ClickHouseTarget
    jobs: tuple[JobConfig, ...]
    ledger_schema: str
    pg_statement_timeout: float
    ch_query_timeout: float
    retry_attempts: int
    retry_backoff: float
    misfire_grace: float
    log_level: str
    log_format: str
    quarantine_limit: int
    progress_seconds: float  # 0: no progress lines
    metrics_port: int  # 0: no metrics endpoint
    metrics_address: str
    crash_at: tuple[str, int] | None  # test hooks, see faults.py
    fail_at: tuple[str, int] | None
    env_file_values: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def job(self, name: str) -> JobConfig:
        """The job called `name`, or a ConfigError listing the known names."""
        for job in self.jobs:
            if job.name == name:
                return job
        known = ", ".join(j.name for j in self.jobs)
        raise ConfigError("--job", f"no job named {name!r}", f"known jobs: {known}")
