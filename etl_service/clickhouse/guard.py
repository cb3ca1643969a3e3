"""The target's guard: does it drop a repeated insert token, and in latest mode keep the newest version?

Read once per run that loads rows, before the first insert. Exactly-once rests on the target
dropping a repeated insert token: a Replicated*MergeTree with `replicated_deduplication_window` > 0,
or another MergeTree-family engine with `non_replicated_deduplication_window` > 0, does; anything
else is refused with the statement that fixes it, unless ETL_TARGET_DEDUP=off accepts
at-least-once. Pure decisions on catalog facts; the statements run through `target_table`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from etl_service.errors import ConfigError

CREATED_COMMENT = "etl-service: created from "  # the table comment of tables the service created


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
