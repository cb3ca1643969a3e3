"""The ClickHouse target table: is it safe to load (does it drop a repeated insert), and does it match the source?

Read once per run that loads rows (two catalog queries), before the first insert:

- the deduplication guard: exactly-once rests on the target dropping a repeated insert token.
  A Replicated*MergeTree with `replicated_deduplication_window` > 0, or another MergeTree-family
  engine with `non_replicated_deduplication_window` > 0, does; anything else is refused with
  the statement that fixes it, unless ETL_TARGET_DEDUP=off accepts at-least-once;
- schema evolution: a column added at the source is added to the target, a column whose type
  widened is widened (when no value can be lost), anything else stops the run with the
  statement to run; a column dropped at the source keeps its default in the target.

Pure decisions on catalog facts; the statements run through `sink`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from etl_service.errors import ConfigError, SinkError
from etl_service.source import SourceShape

CREATED_COMMENT = "etl-service: created from "  # the table comment of tables the service created


class SchemaChangeError(SinkError):
    """The source changed in a way the target cannot follow by itself; the message has the statement to run."""


@dataclass(frozen=True)
class TargetInfo:
    """What the catalog says about the target table."""

    engine: str
    engine_full: str
    comment: str
    columns: dict[str, str]
    server_windows: dict[str, int] = field(default_factory=dict)  # merge_tree_settings defaults

    @property
    def created_by_service(self) -> bool:
        return self.comment.startswith(CREATED_COMMENT)

    def window(self, name: str) -> int:
        """A deduplication window: the table's own setting, else the server's default."""
        match = re.search(rf"\b{name}\s*=\s*(\d+)", self.engine_full)
        return int(match[1]) if match else self.server_windows.get(name, 0)


def dedup_problem(info: TargetInfo, table: str) -> str | None:
    """Why `table` would not drop a repeated insert token (with the fix), or None when it does."""
    engine = info.engine
    if engine.startswith(("Replicated", "Shared")) and engine.endswith("MergeTree"):
        if info.window("replicated_deduplication_window") > 0:
            return None
        return (f"{table} ({engine}) has replicated_deduplication_window = 0, so a retried insert would land twice:"
                f" run ALTER TABLE {table} MODIFY SETTING replicated_deduplication_window = 10000")
    if engine.endswith("MergeTree"):
        if info.window("non_replicated_deduplication_window") > 0:
            return None
        return (f"{table} ({engine}) does not drop a repeated insert (non_replicated_deduplication_window = 0), so"
                f" a retried insert would land twice: run ALTER TABLE {table} MODIFY SETTING"
                " non_replicated_deduplication_window = 10000")
    if engine == "Distributed":
        return (f"{table} is a Distributed table: a retried insert may go to another shard, where its token is"
                " unknown, and land twice. Point ETL_TARGET_TABLE at the shard's local Replicated*MergeTree table"
                " (docs/clickhouse.md, \"ClickHouse cluster\")")
    return (f"{table} uses the {engine} engine, which cannot drop a repeated insert: recreate it as MergeTree"
            " (… ENGINE = MergeTree ORDER BY <key> SETTINGS non_replicated_deduplication_window = 10000)")


def check_dedup(info: TargetInfo, table: str, dedup: bool) -> str | None:
    """ConfigError naming ETL_TARGET_DEDUP when the target would double a retried insert.

    With `dedup` off, returns the warning to log on every run instead.
    """
    problem = dedup_problem(info, table)
    if problem is None:
        return None
    if not dedup:
        return f"ETL_TARGET_DEDUP=off: at-least-once delivery, a retried insert may be doubled — {problem}"
    raise ConfigError("ETL_TARGET_DEDUP", problem,
                      "or accept at-least-once delivery with ETL_TARGET_DEDUP=off")


_INT = re.compile(r"^(U?)Int(\d+)$")
_DEC = re.compile(r"^Decimal\((\d+), ?(\d+)\)$")


def _unwrap(ch_type: str) -> tuple[str, bool]:
    if ch_type.startswith("Nullable(") and ch_type.endswith(")"):
        return ch_type[len("Nullable("):-1], True
    return ch_type, False


def holds(existing: str, wanted: str) -> bool:
    """Every value of ClickHouse type `wanted` fits unchanged in a column of type `existing`.

    Nullability is not compared: a non-Nullable column chosen by the operator stays so (a NULL
    sent to it is a bad row, quarantined with its reason).
    """
    have, want = _unwrap(existing)[0], _unwrap(wanted)[0]
    if have == want:
        return True
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


def _widened(existing: str, wanted: str) -> str:
    """`wanted`'s type with `existing`'s nullability."""
    inner = _unwrap(wanted)[0]
    return f"Nullable({inner})" if _unwrap(existing)[1] else inner


@dataclass
class Evolution:
    """What a run must do to the target before loading: statements to run, and warnings to log once."""

    statements: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # one line per change, for the log
    warnings: list[str] = field(default_factory=list)


def source_types(shape: SourceShape) -> dict[str, str]:
    """Target column -> source type: what `evolve` compares with the recorded alignment."""
    return {t: c.pg_type for c, t in zip(shape.columns, shape.targets, strict=True)}


def evolve(info: TargetInfo, shape: SourceShape, table: str, on_cluster: str, allow: bool,
           aligned: dict[str, str] | None = None) -> Evolution:
    """Statements that bring `table` in step with the source, or SchemaChangeError with the one to run by hand.

    `allow`: operator-made tables may be altered (ETL_SCHEMA_CHANGES=auto); tables the service
    created always are. `aligned`: the source types the target was last in step with; a column
    whose source type is unchanged since is left as it is (its ClickHouse type may be the
    operator's deliberate choice; values that do not fit it are bad rows). None: first sight.
    """
    plan = Evolution()
    alter = f"ALTER TABLE {table}{on_cluster}"
    keys = shape.key_targets
    for column, target in zip(shape.columns, shape.targets, strict=True):
        wanted = column.ch_column_type(is_key=target in keys)
        existing = info.columns.get(target)
        name = _quote(target)
        if existing is None:
            plan.statements.append(f"{alter} ADD COLUMN IF NOT EXISTS {name} {wanted}")
            plan.changes.append(f"added column {target} {wanted} (new at the source)")
        elif aligned is not None and aligned.get(target) != column.pg_type and not holds(existing, wanted):
            widened = _widened(existing, wanted)
            if target in keys:
                raise SchemaChangeError(
                    f"source column {column.name} is now {column.pg_type} ({wanted} in ClickHouse) but {table}.{target}"
                    f" is {existing}, and ClickHouse cannot change the type of a sort-key column: recreate the table"
                    f" with {name} {widened} (CREATE TABLE new … ; INSERT INTO new SELECT * FROM {table}; EXCHANGE"
                    " TABLES), then run again; nothing was loaded or marked")
            if not holds(wanted, existing):
                raise SchemaChangeError(
                    f"source column {column.name} is now {column.pg_type} ({wanted} in ClickHouse) but"
                    f" {table}.{target} is {existing}, and changing it could lose values: decide, then run {alter}"
                    f" MODIFY COLUMN {name} {widened} (or recreate the table); nothing was loaded or marked")
            plan.statements.append(f"{alter} MODIFY COLUMN {name} {widened}")
            plan.changes.append(f"widened column {target} from {existing} to {widened}")
    if plan.statements and not (allow or info.created_by_service):
        raise SchemaChangeError(
            f"the source changed and ETL_SCHEMA_CHANGES=fail keeps the service from altering {table}: run "
            + "; ".join(plan.statements) + " — nothing was loaded or marked")
    dropped = [c for c in info.columns if c not in shape.targets and not c.startswith("_etl_")]
    if dropped:
        plan.warnings.append(f"{table} has column(s) the source no longer has, or the job does not fill"
                             f" ({', '.join(dropped)}): new rows get their defaults there")
    return plan


BATCH_INDEX = "_etl_batch_minmax"
DELETED_COLUMN = "_etl_deleted"  # latest mode with a deleted column: 1 for a row deleted at the source


def sorting_key(engine_full: str) -> list[str]:
    """The columns of a MergeTree table's ORDER BY, from its engine_full (expressions stay as written)."""
    found = re.search(r"\bORDER BY (.+?)(?= PRIMARY KEY | SAMPLE BY | TTL | SETTINGS |$)", engine_full.replace("`", ""))
    if not found:
        return []
    text = found[1].strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return [part.strip() for part in text.split(",") if part.strip()]


def check_latest(info: TargetInfo, table: str, deleted: bool, columns: str, keys: tuple[str, ...]) -> None:
    """ConfigError naming ETL_TARGET_MODE unless `table` keeps the latest version of each key by _etl_version
    (and, with a deleted column, leaves deleted rows out of FINAL by _etl_deleted): a Replacing engine
    versioned so, sorted by exactly the key's columns (rows are folded by the sorting key: more columns
    keep two versions of a key, fewer fold different keys)."""
    engine_full = info.engine_full.replace("`", "")
    versioned = re.search(r"ReplacingMergeTree\((?:'[^']*',\s*'[^']*',\s*)?_etl_version(\s*,\s*(\w+))?\)",
                          engine_full)
    wanted = "_etl_version, _etl_deleted" if deleted else "_etl_version"
    order = ", ".join(keys) if len(keys) == 1 else f"({', '.join(keys)})"
    fix = (f"e.g. CREATE TABLE new_table ({columns}) ENGINE = ReplacingMergeTree({wanted}) ORDER BY {order};"
           f" INSERT INTO new_table SELECT * FROM {table}; EXCHANGE TABLES new_table AND {table}; or leave"
           " ETL_TARGET_MODE=append")
    if not versioned or (deleted and versioned[2] != DELETED_COLUMN):
        raise ConfigError("ETL_TARGET_MODE", f"{table} ({info.engine}) does not keep the latest version of each key"
                          f" by its source version ({wanted}): in latest mode FINAL would not give the source's current"
                          " rows", f"make it a ReplacingMergeTree({wanted}) ordered by the key, {fix}")
    sorted_by = sorting_key(info.engine_full)
    if set(sorted_by) != set(keys):
        raise ConfigError("ETL_TARGET_MODE", f"{table} is sorted by ({', '.join(sorted_by) or 'nothing'}), not by the"
                          f" key ({', '.join(keys)}): FINAL folds rows by the sorting key, so it would keep several"
                          " versions of a key or fold different keys into one",
                          f"make it sorted by the key, {fix}")


def create_ddl(table: str, shape: SourceShape, source: str, cluster: str = "", window: int = 10000,
               latest: bool = False, deleted: bool = False) -> str:
    """The CREATE TABLE for a new target: the source's columns, the batch column with a minmax
    skip index (load verification reads a few granules), sorted by the key, deduplicating.

    With `cluster`, the table is created ON CLUSTER as a ReplicatedMergeTree whose Keeper path
    and replica name come from the `{shard}`/`{replica}` macros: deduplication then happens in
    Keeper, across the shard's replicas.
    """
    keys = shape.key_targets
    cols = [f"{_quote(t)} {c.ch_column_type(is_key=(t in keys))}" for c, t in zip(shape.columns, shape.targets,
                                                                                     strict=True)]
    cols.append("`_etl_batch` UInt64")
    cols.append("`_etl_version` UInt64")  # the row's source version (see source.VERSION)
    if deleted:
        cols.append(f"`{DELETED_COLUMN}` UInt8")
    cols.append(f"INDEX {BATCH_INDEX} `_etl_batch` TYPE minmax GRANULARITY 1")
    order = _quote(keys[0]) if len(keys) == 1 else f"({', '.join(map(_quote, keys))})"
    kind = "ReplacingMergeTree" if latest else "MergeTree"
    versioned = ["`_etl_version`", f"`{DELETED_COLUMN}`"][:1 + deleted] if latest else []
    if cluster:
        engine = (f"Replicated{kind}('/clickhouse/tables/{{shard}}/{{database}}/{{table}}', '{{replica}}'"
                  + "".join(f", {v}" for v in versioned) + ")")
        setting = f"replicated_deduplication_window = {window}"
        where = f" ON CLUSTER {_quote(cluster)}"
    else:
        engine = kind + (f"({', '.join(versioned)})" if versioned else "")
        setting, where = f"non_replicated_deduplication_window = {window}", ""
    comment = (CREATED_COMMENT + source).replace("\\", "\\\\").replace("'", "\\'")
    return (f"CREATE TABLE IF NOT EXISTS {table}{where} ({', '.join(cols)}) ENGINE = {engine} ORDER BY {order}"
            f" SETTINGS {setting} COMMENT '{comment}'")


def _quote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
