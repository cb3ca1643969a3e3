"""The ClickHouse target for one attempt of a run: connect on first need, prepare the table, close.

Preparing means: create the trigger table from the source's types if it is missing, check that an
existing one drops a repeated insert (`guard.check_dedup`) and that the views reading it do too,
and bring its columns in step with the source (`evolution.evolve`). An idle run never connects.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from clickhouse_connect.driver.binding import quote_identifier
from psycopg2 import sql

from etl_service.clickhouse import clients, evolution, fit, guard, inserts, readback, target_table
from etl_service.errors import ConfigError, EtlError
from etl_service.ledger import resend
from etl_service.ledger.shapes import TargetShapes
from etl_service.postgres import catalog
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.typemap import Column
from etl_service.settings.model import JobConfig, Settings

_WARNED: set[str] = set()  # facts that stay true run after run: logged once per process


def _warn_once(log: Any, line: str) -> None:
    if line not in _WARNED:
        _WARNED.add(line)
        log.warning(line)


class TargetSession:
    """The job's ClickHouse client and what the target table looks like, for one attempt."""

    def __init__(self, settings: Settings, job: JobConfig, shapes: TargetShapes, log: Any) -> None:
        self.settings = settings
        self.job = job
        self.shapes = shapes
        self.log = log
        self.client: Any = None  # open once `connect` succeeded
        self.types: dict[str, str] = {}  # the target's column -> type, once prepared
        self.replicated = False  # a Replicated engine: a count may reach a replica still fetching parts
        self.ranges = fit.NARROW  # what the server's Date32 and DateTime64 hold, once prepared
        self.created = False  # this attempt made the target (a loaded batch must go again)
        self.done: list[str] = []  # what column changes did to the target and its rows, for status

    @property
    def has_batch_column(self) -> bool:
        """Whether rows carry their batch id (the load check counts by it)."""
        return target_table.BATCH_COLUMN in self.types

    @property
    def has_version_column(self) -> bool:
        """Whether rows carry their source version (`postgres.versioning.VERSION_COLUMN`)."""
        return target_table.VERSION_COLUMN in self.types

    def connect(self, shape: SourceShape) -> Any:
        """The client, connected and the target prepared on first need."""
        if self.client is None:
            client = clients.connect(self.settings, f"job:{self.job.name}")
            try:
                self._prepare(client, shape)
            except BaseException:
                clients.release(client)
                raise
            self.client = client
        return self.client

    def close(self) -> None:
        """Best effort: a broken connection must not mask the run's real outcome."""
        if self.client is not None:
            try:
                clients.release(self.client)
            except Exception as exc:
                self.log.debug("cleanup step failed: {}", exc)
            self.client = None
        self.created = False

    def _prepare(self, client: Any, shape: SourceShape) -> None:
        """Create the target, or check that it deduplicates and bring it in step with the source."""
        database, table = self.settings.clickhouse.database, self.job.target_table
        name = target_table.table_name(database, table)
        for line in inserts.check_insert_settings(client):  # a profile may have changed since the last run
            _warn_once(self.log, line)
        described = target_table.describe_target(client, database, table)
        if described is None:
            target_table.check_types(client, shape)
            target_table.create_target(client, database, table, shape, ".".join(self.job.source_table),
                                       self.settings.clickhouse.cluster, self.job.target_mode == "latest",
                                       bool(self.job.deleted_column))
            self.created = True
            self.log.info("created ClickHouse table {}.{} from the source column types", database, table)
            described = target_table.describe_target(client, database, table)
            if described is None:
                raise EtlError(f"{name} was created but ClickHouse does not list it")
        info, views = described
        if self.job.target_mode == "latest":
            guard.check_latest(info, name, bool(self.job.deleted_column),
                               ", ".join(f"`{c}` {t}" for c, t in info.columns.items()), shape.key_targets)
        accepted = guard.check_dedup(info, name, self.job.target_dedup)
        if accepted:
            self.log.warning(accepted)
        for line in target_table.doubling_views(client, views):
            _warn_once(self.log, line)
        version = target_table.VERSION_COLUMN
        if info.created_by_service and version not in info.columns:  # made before versions were kept
            target_table.run_statement(client, f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS `{version}` UInt64")
            self.log.info("added {} to {}.{}: rows loaded from now on carry their source version (older rows: 0)",
                          target_table.VERSION_COLUMN, database, table)
            described = target_table.describe_target(client, database, table)
            info = described[0] if described else info
        if not self.job.transform:  # a transform decides its own columns: ClickHouse checks them at insert
            info = self._evolve(client, info, views, shape, database, table)
        self._refuse_unchecked(shape, info, name)
        self.types = info.columns
        self.replicated = "Replicated" in info.engine
        self.ranges = readback.time_ranges(client)

    def _refuse_unchecked(self, shape: SourceShape, info: guard.TargetInfo, name: str) -> None:
        """What no value check can vouch for would fail every run: said once, up front, by column."""
        if self.job.transform:  # a transform's output types are checked value by value
            return
        problems = fit.refused([(t, c.pg_type, c.arrow_type) for c, t in zip(shape.columns, shape.targets,
                                                                               strict=True)], info.columns)
        if problems:
            raise ConfigError("ETL_TARGET_TABLE", f"{name}: " + "; ".join(problems))

    def _evolve(self, client: Any, info: guard.TargetInfo, views: Any, shape: SourceShape, database: str,
                table: str) -> guard.TargetInfo:
        cluster = self.settings.clickhouse.cluster
        on_cluster = f" ON CLUSTER {quote_identifier(cluster)}" if cluster else ""
        aligned = self.shapes.aligned(table)
        numbers = self.shapes.numbers(table) if aligned is not None else {}
        info, aligned = self._renamed(client, info, shape, numbers, aligned, database, table, on_cluster)
        # A column the source dropped and added again (another attnum under the name), or one the target had
        # before the source did: what the rows loaded before hold there is not what PostgreSQL shows. For those
        # and the columns new to the target, what the rows loaded before show is compared with PostgreSQL's.
        readded = frozenset(t for c, t in zip(shape.columns, shape.targets, strict=True) if t in info.columns and (
            (aligned is not None and t not in aligned) or numbers.get(t, c.number) != c.number))
        added = [c for c, t in zip(shape.columns, shape.targets, strict=True) if t not in info.columns or t in readded]
        conn = self.shapes.store.conn
        missing = catalog.missing_values(conn, self.job, added) if added else {}
        targets = dict(zip((c.name for c in shape.columns), shape.targets, strict=True))
        defaults = {targets[name]: text for name, (_, text) in missing.items() if text is not None}
        plan = evolution.evolve(info, shape, target_table.table_name(database, table), on_cluster,
                                self.job.schema_changes == "auto", aligned, defaults, readded)
        self._apply(client, plan, shape, database, table)
        if plan.statements:
            described = target_table.describe_target(client, database, table)
            if described:
                info = described[0]
        if plan.recreate:
            info = self._recreate(client, info, views, shape, database, table, plan.recreate)
        for column in added:
            if targets[column.name] in readded and not info.created_by_service:  # warned: what it holds is unknown
                continue
            self._look_back(column, targets[column.name], info, missing.get(column.name), shape, database, table)
        self._remember(shape, table, aligned, numbers)
        return info

    def _apply(self, client: Any, plan: evolution.Evolution, shape: SourceShape, database: str, table: str) -> None:
        """Run the plan's statements, log its warnings, and send again the rows of columns whose values the
        source converted."""
        for statement, change in zip(plan.statements, plan.changes, strict=True):
            target_table.run_statement(client, statement)
            self.log.info("schema change at the source: {} in {}.{}", change, database, table)
            self.done.append(change)
        for line in plan.warnings:
            _warn_once(self.log, line)
        for target, before, after in plan.rewritten:
            self._send_again(shape, sql.SQL("true"), f"column {target} changed from {before} to {after} at the source:"
                             " PostgreSQL converted its values (rounded, cut short) in every row, and the rows"
                             f" loaded before keep the old ones in {database}.{table}")

    def _remember(self, shape: SourceShape, table: str, aligned: dict[str, str] | None,
                  numbers: dict[str, int]) -> None:
        """Record the source shape the target is now in step with, and what this change did (for status)."""
        now = {t: c.number for c, t in zip(shape.columns, shape.targets, strict=True)}
        if aligned != evolution.source_types(shape) or numbers != now:
            self.shapes.record(table, evolution.source_types(shape), now)
        if self.done:
            self.shapes.note_change(table, "; ".join(self.done))
            self.done = []

    def _recreate(self, client: Any, info: guard.TargetInfo, views: Any, shape: SourceShape, database: str,
                  table: str, widen: list[tuple[str, str, evolution.SchemaChangeError]]) -> guard.TargetInfo:
        """Make the target again with its sort-key column widened (ClickHouse cannot change a sort-key
        column's type): a new table from the source's shape (plus the columns the source no longer has),
        every row copied, the two exchanged, the old one dropped. Only where nothing is lost or doubled by
        it: no view reads the table (a materialized view would not follow the exchange), one server (not
        ON CLUSTER), and no batch of the job is loaded but not marked (a retried insert of it would not be
        dropped by the new table, which has no record of the old one's inserts)."""
        name = target_table.table_name(database, table)
        error = widen[0][2]
        open_batches = self.shapes.store.run("look for batches loaded but not marked", sql.SQL(
            "SELECT count(*) FROM {s}.batches WHERE job = %s AND state <> 'done' AND chunks_loaded > 0").format(
            s=self.shapes.store.schema), (self.job.name,))[0][0]
        why = ("views read it" if views else "it is on a cluster" if self.settings.clickhouse.cluster or
               "Replicated" in info.engine else f"{open_batches} batch(es) wait to be marked" if open_batches else "")
        if why:
            raise evolution.SchemaChangeError(f"{error} (the service does it itself only when no view reads the"
                                              f" table, on one server, with no batch waiting to be marked: {why})")
        staging = f"{table}__etl_widen"
        staged = target_table.table_name(database, staging)
        target_table.run_statement(client, f"DROP TABLE IF EXISTS {staged}")
        target_table.create_target(client, database, staging, shape, ".".join(self.job.source_table), "",
                                   self.job.target_mode == "latest", bool(self.job.deleted_column))
        made = (target_table.describe_target(client, database, staging) or (info, None))[0]
        for column, kind in info.columns.items():  # what the source no longer has stays, as it does in place
            if column not in made.columns:
                target_table.run_statement(client, f"ALTER TABLE {staged} ADD COLUMN {evolution.quote(column)} {kind}")
        columns = ", ".join(evolution.quote(c) for c in info.columns)
        self.log.info("making {}.{} again with sort-key column {} {} (ClickHouse cannot change a sort-key column's"
                      " type): copying its rows", database, table, ", ".join(c for c, _, _ in widen),
                      ", ".join(k for _, k, _ in widen))
        target_table.run_statement(client, f"INSERT INTO {staged} ({columns}) SELECT {columns} FROM {name}")
        counts = [clients.query_rows(client, f"SELECT count() FROM {t}")[0][0] for t in (name, staged)]
        if counts[0] != counts[1]:
            raise evolution.SchemaChangeError(f"{error} (the copy made for it holds {counts[1]} rows, not"
                                              f" {counts[0]}: left as it was)")
        target_table.run_statement(client, f"EXCHANGE TABLES {name} AND {staged}")
        target_table.run_statement(client, f"DROP TABLE {staged}")
        self.log.info("schema change at the source: {}.{} made again with {}, {} rows copied", database, table,
                      ", ".join(f"{c} {k}" for c, k, _ in widen), counts[0])
        self.done.append(f"made again with {', '.join(f'{c} {k}' for c, k, _ in widen)}, {counts[0]} rows copied")
        described = target_table.describe_target(client, database, table)
        return described[0] if described else info

    def _renamed(self, client: Any, info: guard.TargetInfo, shape: SourceShape, numbers: dict[str, int],
                 aligned: dict[str, str] | None, database: str, table: str,
                 on_cluster: str) -> tuple[guard.TargetInfo, dict[str, str] | None]:
        """Rename the target's columns whose source column (same attnum) was renamed: the rows loaded before
        keep their values under the new name (not NULL in a new column). Sort-key columns, which ClickHouse
        cannot rename, and targets the service may not alter are left to `evolve`."""
        if not numbers or not (self.job.schema_changes == "auto" or info.created_by_service):
            return info, aligned
        by_number = {n: t for t, n in numbers.items()}
        name = target_table.table_name(database, table)
        renamed = []
        for column, target in zip(shape.columns, shape.targets, strict=True):
            old = by_number.get(column.number)
            if target in info.columns or target in shape.key_targets or not old or old == target \
                    or old not in info.columns or old in shape.targets or old.startswith("_etl_"):
                continue
            target_table.run_statement(client, f"ALTER TABLE {name}{on_cluster} RENAME COLUMN {evolution.quote(old)}"
                                               f" TO {evolution.quote(target)}")
            self.log.info("schema change at the source: column {} renamed to {} in {}.{} (its values kept)", old,
                          target, database, table)
            self.done.append(f"renamed column {old} to {target}")
            renamed.append((old, target))
        if not renamed:
            return info, aligned
        described = target_table.describe_target(client, database, table)
        aligned = dict(aligned or {})
        for old, new in renamed:
            if old in aligned:
                aligned[new] = aligned.pop(old)
        return (described[0] if described else info), aligned

    def _look_back(self, column: Column, target: str, info: guard.TargetInfo,
                   missing: tuple[str, str | None] | None, shape: SourceShape, database: str, table: str) -> None:
        """The rows loaded before `target` was added that show another value there than PostgreSQL has (a
        column added with a volatile default or by a table rewrite: its rows hold their own values; a default
        ClickHouse cannot be given exactly) are sent again; rows that hold the value the target shows are
        exact as they are."""
        ch_type = info.columns.get(target, "")
        shown = missing[0] if missing and missing[1] is not None and \
            not fit.first_misfit(pa.table({target: pa.array([missing[1]])}), {target: ch_type}) else None
        condition = catalog.differing(column, shown, fit.unwrap(ch_type)[1])
        held = ("NULL" if shown is None and fit.unwrap(ch_type)[1] else "the type's default" if shown is None
                else repr(shown))
        try:
            count = catalog.processed_where(self.shapes.store.conn, self.job, condition)
        except EtlError as exc:
            self.log.warning("could not compare the rows loaded before column {} was added with the source ({});"
                             " they show {} in {}.{}", target, exc, held, database, table)
            return
        if count:
            self._send_again(shape, condition, f"{'more than ' if count >= 100_000 else ''}{count} row(s) loaded"
                             f" before column {target} was added to {database}.{table} show {held} there, where"
                             " PostgreSQL has values of their own (a volatile default, a table rewrite, or a default"
                             " ClickHouse cannot be given exactly)")

    def _send_again(self, shape: SourceShape, condition: sql.Composable, why: str) -> None:
        """Set the flag of the processed rows meeting `condition` back to false (ETL_SCHEMA_CHANGES=auto), so
        that this run and the next load each again as a newer version of its row; with fail, say how."""
        conn = self.shapes.store.conn
        flag = sql.Identifier(self.job.processed_column).as_string(conn)
        source = sql.Identifier(*self.job.source_table).as_string(conn)
        statement = f"UPDATE {source} SET {flag} = false WHERE {flag} AND {condition.as_string(conn)}"
        if self.job.schema_changes != "auto":
            _warn_once(self.log, f"{why}; ETL_SCHEMA_CHANGES=fail: to send them again, {statement} (each loads as"
                                 " a newer version of its row)")
            return
        self.log.warning("{}: sending them again (their flag set back to false, a slice of {:,} at a time)", why,
                         resend.SLICE)
        done = resend.resend(self.shapes.store, shape.key, condition, f"{'.'.join(self.job.source_table)}", self.log)
        self.log.info("{:,} row(s) of {} set to be sent again: this run and the next load them as newer versions",
                      done, ".".join(self.job.source_table))
        self.done.append(f"{done:,} row(s) sent again ({why.split(':')[0] if ':' in why else why[:80]})")
