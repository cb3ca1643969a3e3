"""The target's columns from the source's: the CREATE of a new target, and the ALTERs that keep it in step.

A column added at the source is added to the target, a column whose type widened is widened
(when no value can be lost), anything else stops the run with the statement to run; a column
dropped at the source keeps its default in the target. Pure decisions on catalog facts; the
statements run through `target_table`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

from etl_service.clickhouse import fit
from etl_service.clickhouse.guard import CREATED_COMMENT, DELETED_COLUMN, TargetInfo
from etl_service.errors import SinkError
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.typemap import Column


class SchemaChangeError(SinkError):
    """The source changed in a way the target cannot follow by itself; the message has the statement to run."""


_INT = re.compile(r"^(U?)Int(\d+)$")
_DEC = re.compile(r"^Decimal\((\d+), ?(\d+)\)$")


def unwrap_nullable(ch_type: str) -> tuple[str, bool]:
    if ch_type.startswith("Nullable(") and ch_type.endswith(")"):
        return ch_type[len("Nullable("):-1], True
    return ch_type, False


def holds(existing: str, wanted: str) -> bool:
    """Every value of ClickHouse type `wanted` fits unchanged in a column of type `existing`.

    Nullability is not compared: a non-Nullable column chosen by the operator stays so (a NULL
    sent to it is a bad row, quarantined with its reason).
    """
    have, want = unwrap_nullable(existing)[0], unwrap_nullable(wanted)[0]
    if have == want:
        return True
    if have.startswith("Array(") and want.startswith("Array("):  # element by element
        return holds(have[len("Array("):-1], want[len("Array("):-1])
    ints = _INT.match(have), _INT.match(want)
    if ints[0] and ints[1]:
        (h_unsigned, h_bits), (w_unsigned, w_bits) = ints[0].groups(), ints[1].groups()
        if h_unsigned and not w_unsigned:
            return False
        return int(h_bits) > int(w_bits) or (int(h_bits) == int(w_bits) and h_unsigned == w_unsigned)
    decs = _DEC.match(have), _DEC.match(want)
    if decs[0] and decs[1]:
        (hp, hs), (wp, ws) = (tuple(map(int, m.groups())) for m in decs)  # type: ignore[union-attr]
        return hs >= ws and hp - hs >= wp - ws
    if ints[1] and decs[0]:
        precision, scale = map(int, decs[0].groups())
        return precision - scale >= len(str(2 ** (int(ints[1][2]) - 1)))
    return (have, want) in {("Float64", "Float32"), ("Date32", "Date"), ("String", "FixedString")}


_TYPMOD = re.compile(r"^([a-z ]+?)(?:\((\d+)(?:,(-?\d+))?\))?( with(?:out)? time zone)?$")
_INTEGERS = ("smallint", "integer", "bigint")


def keeps_values(before: str, after: str) -> bool:
    """Whether a column's type change at the source (format_type, before and after) left every value as it
    was: PostgreSQL converts values when a type narrows (varchar(50) -> varchar(5) USING left(…), numeric(12,3)
    -> numeric(11,2) rounds, timestamptz -> timestamptz(0) rounds, numeric -> integer rounds), which no row's
    version shows; it refuses a widening that would not fit."""
    if before == after:
        return True
    if before.endswith("[]") and after.endswith("[]"):
        return keeps_values(before[:-2], after[:-2])
    if before in _INTEGERS and (after in _INTEGERS or after == "numeric"):
        return True
    if before == "real" and after == "double precision":
        return True
    old, new = _TYPMOD.match(before), _TYPMOD.match(after)
    if not old or not new or old[4] != new[4]:
        return False
    return _modifiers_keep(old, new)


def _modifiers_keep(before: re.Match[str], after: re.Match[str]) -> bool:
    """Within one type, whether the new modifiers (length, precision, scale) hold every value of the old."""
    (kind, size, scale), (kind2, size2, scale2) = before.group(1, 2, 3), after.group(1, 2, 3)
    if kind in ("character varying", "text") and kind2 in ("character varying", "text"):
        return size2 is None or (size is not None and int(size2) >= int(size))
    if kind == kind2 == "numeric":
        if size2 is None:
            return True
        if size is None:
            return False
        digits, places = int(size) - int(scale or 0), int(scale or 0)
        return int(scale2 or 0) >= places and int(size2) - int(scale2 or 0) >= digits
    if kind == kind2 and kind in ("timestamp", "time", "interval"):
        return int(size2 if size2 is not None else 6) >= int(size if size is not None else 6)
    return False


def _add(alter: str, name: str, target: str, wanted: str, default: str | None) -> tuple[str, str]:
    """The ADD COLUMN of a column new at the source (with the value the rows that predate it hold, as its
    DEFAULT, when there is one ClickHouse takes exactly), and its line for the log."""
    if default is not None and not fit.first_misfit(pa.table({target: pa.array([default])}), {target: wanted}):
        literal = "'" + default.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return (f"{alter} ADD COLUMN IF NOT EXISTS {name} {wanted} DEFAULT CAST({literal} AS {wanted})",
                f"added column {target} {wanted} (new at the source), the rows loaded before showing"
                f" {default[:40]!r}, the value PostgreSQL gives them")
    return f"{alter} ADD COLUMN IF NOT EXISTS {name} {wanted}", f"added column {target} {wanted} (new at the source)"


def _widened(existing: str, wanted: str) -> str:
    """`wanted`'s type with `existing`'s nullability."""
    inner = unwrap_nullable(wanted)[0]
    return f"Nullable({inner})" if unwrap_nullable(existing)[1] else inner


@dataclass
class Evolution:
    """What a run must do to the target before loading: statements to run, and warnings to log once."""

    statements: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # one line per change, for the log
    warnings: list[str] = field(default_factory=list)
    # (target column, source type before, after) for a type change that may have changed stored values
    rewritten: list[tuple[str, str, str]] = field(default_factory=list)
    # a sort-key column that widened in a table the service made: (column, its new type, the error to raise
    # if the table cannot be made again here)
    recreate: list[tuple[str, str, SchemaChangeError]] = field(default_factory=list)


def source_types(shape: SourceShape) -> dict[str, str]:
    """Target column -> source type: what `evolve` compares with the recorded alignment."""
    return {t: c.pg_type for c, t in zip(shape.columns, shape.targets, strict=True)}


def evolve(info: TargetInfo, shape: SourceShape, table: str, on_cluster: str, allow: bool,
           aligned: dict[str, str] | None = None, defaults: dict[str, str] | None = None,
           readded: frozenset[str] = frozenset()) -> Evolution:
    """Statements that bring `table` in step with the source, or SchemaChangeError with the one to run by hand.

    `allow`: operator-made tables may be altered (ETL_SCHEMA_CHANGES=auto); tables the service
    created always are. `aligned`: the source types the target was last in step with; a column
    whose source type is unchanged since is left as it is (its ClickHouse type may be the
    operator's deliberate choice; values that do not fit it are bad rows). None: first sight.
    `defaults`: target column -> the value the source's rows that predate the column hold (a constant
    default given when it was added, as text ClickHouse reads): an added column gets it as its DEFAULT,
    which the rows already loaded then show, as PostgreSQL does.
    `readded`: target columns that exist but were not source columns when the target was last in step
    (dropped at the source and added again, or made ahead by the operator): the rows loaded before hold
    old values or the type's default there, where PostgreSQL shows the new column's. A target the
    service made gets the column made again; for one the operator made, the statements are a warning.
    """
    plan = Evolution()
    alter = f"ALTER TABLE {table}{on_cluster}"
    keys = shape.key_targets
    for column, target in zip(shape.columns, shape.targets, strict=True):
        _column(plan, info, column, target, table, alter, target in keys, aligned, (defaults or {}).get(target),
                target in readded)
    if plan.statements and not (allow or info.created_by_service):
        raise SchemaChangeError(
            f"the source changed and ETL_SCHEMA_CHANGES=fail keeps the service from altering {table}: run "
            + "; ".join(plan.statements) + " — nothing was loaded or marked")
    dropped = [c for c in info.columns if c not in shape.targets and not c.startswith("_etl_")]
    if dropped:
        plan.warnings.append(f"{table} has column(s) the source no longer has, or the job does not fill"
                             f" ({', '.join(dropped)}): new rows get their defaults there")
    return plan


def _column(plan: Evolution, info: TargetInfo, column: Column, target: str, table: str, alter: str, key: bool,
            aligned: dict[str, str] | None, default: str | None, readded: bool) -> None:
    """`evolve` for one source column."""
    wanted = column.ch_column_type(is_key=key)
    existing = info.columns.get(target)
    name = quote(target)
    if readded and existing is not None and not key:
        drop = f"{alter} DROP COLUMN IF EXISTS {name}"
        if not info.created_by_service:
            plan.warnings.append(
                f"{table}.{target} was made before the source had column {column.name} (or the source dropped"
                f" and added it again): the rows loaded before show what {table} holds there, not what"
                f" PostgreSQL shows; to make them show it: {drop}; {_add(alter, name, target, wanted, default)[0]}")
            return
        plan.statements.append(drop)
        plan.changes.append(f"dropped column {target}: the source dropped it and added it again")
        existing = None
    if existing is None:
        statement, change = _add(alter, name, target, wanted, default)
        plan.statements.append(statement)
        plan.changes.append(change)
        return
    before = aligned.get(target) if aligned is not None else None
    if before is None or before == column.pg_type:
        return
    if not keeps_values(before, column.pg_type):
        plan.rewritten.append((target, before, column.pg_type))
    if holds(existing, wanted):
        return
    widened = _widened(existing, wanted)
    if key:
        error = SchemaChangeError(
            f"source column {column.name} is now {column.pg_type} ({wanted} in ClickHouse) but {table}.{target}"
            f" is {existing}, and ClickHouse cannot change the type of a sort-key column: recreate the table"
            f" with {name} {widened} (CREATE TABLE new … ; INSERT INTO new SELECT * FROM {table}; EXCHANGE"
            " TABLES), then run again; nothing was loaded or marked")
        if not (info.created_by_service and holds(wanted, existing)):
            raise error
        plan.recreate.append((target, widened, error))
        return
    if not holds(wanted, existing):
        raise SchemaChangeError(
            f"source column {column.name} is now {column.pg_type} ({wanted} in ClickHouse) but"
            f" {table}.{target} is {existing}, and changing it could lose values: decide, then run {alter}"
            f" MODIFY COLUMN {name} {widened} (or recreate the table); nothing was loaded or marked")
    plan.statements.append(f"{alter} MODIFY COLUMN {name} {widened}")
    plan.changes.append(f"widened column {target} from {existing} to {widened}")


BATCH_INDEX = "_etl_batch_minmax"


def create_ddl(table: str, shape: SourceShape, source: str, cluster: str = "", window: int = 10000,
               latest: bool = False, deleted: bool = False) -> str:
    """The CREATE TABLE for a new target: the source's columns, the batch column with a minmax
    skip index (load verification reads a few granules), sorted by the key, deduplicating.

    With `cluster`, the table is created ON CLUSTER as a ReplicatedMergeTree whose Keeper path
    and replica name come from the `{shard}`/`{replica}` macros: deduplication then happens in
    Keeper, across the shard's replicas.
    """
    keys = shape.key_targets
    cols = [f"{quote(t)} {c.ch_column_type(is_key=(t in keys))}" for c, t in zip(shape.columns, shape.targets,
                                                                                     strict=True)]
    cols.append("`_etl_batch` UInt64")
    cols.append("`_etl_version` UInt64")  # the row's source version (see postgres.versioning)
    if deleted:
        cols.append(f"`{DELETED_COLUMN}` UInt8")
    cols.append(f"INDEX {BATCH_INDEX} `_etl_batch` TYPE minmax GRANULARITY 1")
    order = quote(keys[0]) if len(keys) == 1 else f"({', '.join(map(quote, keys))})"
    kind = "ReplacingMergeTree" if latest else "MergeTree"
    versioned = ["`_etl_version`", f"`{DELETED_COLUMN}`"][:1 + deleted] if latest else []
    if cluster:
        engine = (f"Replicated{kind}('/clickhouse/tables/{{shard}}/{{database}}/{{table}}', '{{replica}}'"
                  + "".join(f", {v}" for v in versioned) + ")")
        setting = f"replicated_deduplication_window = {window}"
        where = f" ON CLUSTER {quote(cluster)}"
    else:
        engine = kind + (f"({', '.join(versioned)})" if versioned else "")
        setting, where = f"non_replicated_deduplication_window = {window}", ""
    comment = (CREATED_COMMENT + source).replace("\\", "\\\\").replace("'", "\\'")
    return (f"CREATE TABLE IF NOT EXISTS {table}{where} ({', '.join(cols)}) ENGINE = {engine} ORDER BY {order}"
            f" SETTINGS {setting} COMMENT '{comment}'")


def quote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
