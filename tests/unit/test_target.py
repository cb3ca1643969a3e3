"""Target decisions on catalog facts: the deduplication guard, lossless widening, schema evolution, DDL text."""

from __future__ import annotations

import pytest

from etl_service.clickhouse.evolution import SchemaChangeError, create_ddl, evolve, holds
from etl_service.clickhouse.guard import CREATED_COMMENT, TargetInfo, check_dedup
from etl_service.errors import ConfigError
from etl_service.postgres.catalog import SourceShape
from etl_service.postgres.keys import Key, KeyColumn
from etl_service.postgres.typemap import map_column

SERVER = {"replicated_deduplication_window": 1000, "non_replicated_deduplication_window": 0}


def info(engine: str, full: str = "", comment: str = "", **columns: str) -> TargetInfo:
    return TargetInfo(engine, full or engine, comment, columns, SERVER)


@pytest.mark.parametrize(("engine", "full"), [
    ("MergeTree", "MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100, index_granularity = 8192"),
    ("ReplacingMergeTree", "ReplacingMergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 5"),
    ("ReplicatedMergeTree", "ReplicatedMergeTree('/t/{shard}', '{replica}') ORDER BY id"),  # server default 1000
    ("SharedMergeTree", "SharedMergeTree ORDER BY id SETTINGS replicated_deduplication_window = 10"),
])
def test_engines_that_drop_a_repeated_insert_pass(engine: str, full: str) -> None:
    assert check_dedup(info(engine, full), "`db`.`t`", True) is None


@pytest.mark.parametrize(("engine", "full", "fix"), [
    ("MergeTree", "MergeTree ORDER BY id SETTINGS index_granularity = 8192",
     "ALTER TABLE `db`.`t` MODIFY SETTING non_replicated_deduplication_window = 10000"),
    ("SummingMergeTree", "SummingMergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 0",
     "ALTER TABLE `db`.`t` MODIFY SETTING non_replicated_deduplication_window = 10000"),
    ("ReplicatedMergeTree", "ReplicatedMergeTree ORDER BY id SETTINGS replicated_deduplication_window = 0",
     "ALTER TABLE `db`.`t` MODIFY SETTING replicated_deduplication_window = 10000"),
    ("Memory", "Memory", "recreate it as MergeTree"),
    ("Log", "Log", "recreate it as MergeTree"),
    ("Null", "Null", "recreate it as MergeTree"),
    ("Buffer", "Buffer(db, t2, 1, 10, 100, 10000, 1000000, 10000000, 100000000)", "recreate it as MergeTree"),
    ("Distributed", "Distributed(c, db, t_local, rand())", "Point ETL_TARGET_TABLE at the shard's local"),
])
def test_targets_that_would_double_a_retry_are_refused_with_the_fix(engine: str, full: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_dedup(info(engine, full), "`db`.`t`", True)
    assert err.value.variable == "ETL_TARGET_DEDUP" and fix in str(err.value)
    warning = check_dedup(info(engine, full), "`db`.`t`", False)
    assert warning is not None and warning.startswith("ETL_TARGET_DEDUP=off: at-least-once delivery") and fix in warning


@pytest.mark.parametrize(("existing", "wanted", "fits"), [
    ("Int32", "Int16", True), ("Int16", "Int32", False), ("Int64", "Int64", True), ("UInt32", "Int16", False),
    ("Nullable(Int64)", "Int32", True), ("Int64", "Nullable(Int32)", True), ("Int16", "Nullable(Int32)", False),
    ("Decimal(12, 2)", "Decimal(10, 2)", True), ("Decimal(10, 2)", "Decimal(12, 2)", False),
    ("Decimal(12, 4)", "Decimal(10, 2)", True), ("Decimal(12, 2)", "Decimal(12, 4)", False),
    ("Float64", "Float32", True), ("Float32", "Float64", False), ("String", "Int32", False),
    ("Decimal(20, 0)", "Int64", True), ("Decimal(10, 0)", "Int64", False),
    ("Array(Nullable(Int64))", "Array(Nullable(Int32))", True),
    ("Array(Nullable(Int32))", "Array(Nullable(Int64))", False),
    ("Array(Array(Nullable(Int32)))", "Array(Nullable(Int32))", False),
])
def test_holds_is_true_only_when_no_value_can_be_lost(existing: str, wanted: str, fits: bool) -> None:
    assert holds(existing, wanted) is fits


def shape(*columns: tuple[str, str, str, bool]) -> SourceShape:
    """(name, typname, pg type, nullable) columns; the first is the key."""
    cols = tuple(map_column(n, t, p, nullable, "N", None) for n, t, p, nullable in columns)
    return SourceShape(Key((KeyColumn(columns[0][0], columns[0][2], False),)), cols, tuple(c[0] for c in columns))


SOURCE = shape(("id", "int8", "bigint", False), ("qty", "int8", "bigint", True), ("note", "text", "text", True))


def test_evolution_adds_new_columns_and_widens_lossless_changes() -> None:
    existing = info("MergeTree", comment=CREATED_COMMENT + "public.src", id="Int64", qty="Nullable(Int32)",
                    gone="String", _etl_batch="UInt64")
    before = {"id": "bigint", "qty": "integer"}  # qty was integer when the target was last aligned
    plan = evolve(existing, SOURCE, "`db`.`t`", "", allow=False, aligned=before)  # a table the service made
    assert plan.statements == ["ALTER TABLE `db`.`t` MODIFY COLUMN `qty` Nullable(Int64)",
                               "ALTER TABLE `db`.`t` ADD COLUMN IF NOT EXISTS `note` Nullable(String)"]
    assert plan.changes == ["widened column qty from Nullable(Int32) to Nullable(Int64)",
                            "added column note Nullable(String) (new at the source)"]
    assert plan.warnings == ["`db`.`t` has column(s) the source no longer has, or the job does not fill (gone):"
                             " new rows get their defaults there"]
    on_cluster = evolve(existing, SOURCE, "`db`.`t`", " ON CLUSTER `c`", allow=True, aligned=before)
    assert on_cluster.statements[1] == \
        "ALTER TABLE `db`.`t` ON CLUSTER `c` ADD COLUMN IF NOT EXISTS `note` Nullable(String)"


def test_evolution_of_an_operator_table_in_fail_mode_gives_the_statements() -> None:
    existing = info("MergeTree", id="Int64", qty="Nullable(Int64)")
    with pytest.raises(SchemaChangeError) as err:
        evolve(existing, SOURCE, "`db`.`t`", "", allow=False)
    assert "ETL_SCHEMA_CHANGES=fail" in str(err.value)
    assert "ALTER TABLE `db`.`t` ADD COLUMN IF NOT EXISTS `note` Nullable(String)" in str(err.value)
    assert evolve(existing, SOURCE, "`db`.`t`", "", allow=True).statements  # auto: it follows


@pytest.mark.parametrize(("column", "existing"), [("qty", "Nullable(String)"), ("id", "Int32")])
def test_changes_that_could_lose_values_stop_the_run(column: str, existing: str) -> None:
    columns = {"id": "Int64", "qty": "Nullable(Int64)", "note": "Nullable(String)", column: existing}
    changed = {"id": "integer", "qty": "integer", "note": "text"}
    with pytest.raises(SchemaChangeError) as err:
        evolve(info("MergeTree", **columns), SOURCE, "`db`.`t`", "", allow=True, aligned=changed)
    if column == "id":  # ClickHouse cannot change a sort-key column's type
        assert "recreate the table with `id` Int64" in str(err.value)
    else:
        assert f"run ALTER TABLE `db`.`t` MODIFY COLUMN `{column}` Nullable(Int64)" in str(err.value)


def test_a_type_unchanged_at_the_source_is_left_as_the_operator_chose_it() -> None:
    narrow = info("MergeTree", id="Int64", qty="Int8", note="UUID")  # deliberate choices
    aligned = {"id": "bigint", "qty": "bigint", "note": "text"}
    assert evolve(narrow, SOURCE, "`db`.`t`", "", allow=True, aligned=aligned).statements == []
    assert evolve(narrow, SOURCE, "`db`.`t`", "", allow=True, aligned=None).statements == []  # first sight


def test_create_ddl_single_node_and_cluster() -> None:
    composite = SourceShape(Key((KeyColumn("tenant", "integer", False), KeyColumn("id", "bigint", False))),
                            (*SOURCE.columns[:1], map_column("tenant", "int4", "integer", False, "N", None)),
                            ("id", "tenant"))
    assert create_ddl("`db`.`t`", composite, "public.src") == (
        "CREATE TABLE IF NOT EXISTS `db`.`t` (`id` Int64, `tenant` Int32, `_etl_batch` UInt64, `_etl_version` UInt64,"
        " INDEX _etl_batch_minmax `_etl_batch` TYPE minmax GRANULARITY 1) ENGINE = MergeTree ORDER BY (`tenant`, `id`)"
        " SETTINGS non_replicated_deduplication_window = 10000 COMMENT 'etl-service: created from public.src'")
    assert create_ddl("`db`.`t`", SOURCE, "public.o'brien", cluster="main") == (
        "CREATE TABLE IF NOT EXISTS `db`.`t` ON CLUSTER `main` (`id` Int64, `qty` Nullable(Int64),"
        " `note` Nullable(String), `_etl_batch` UInt64, `_etl_version` UInt64,"
        " INDEX _etl_batch_minmax `_etl_batch` TYPE minmax GRANULARITY 1)"
        " ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}') ORDER BY `id`"
        " SETTINGS replicated_deduplication_window = 10000 COMMENT 'etl-service: created from public.o\\'brien'")


def test_a_widened_key_of_a_table_the_service_made_is_planned_as_a_table_made_again() -> None:
    made = info("MergeTree", "", CREATED_COMMENT + "public.src", id="Int32", qty="Nullable(Int64)",
                note="Nullable(String)")
    plan = evolve(made, SOURCE, "`db`.`t`", "", allow=True, aligned={"id": "integer", "qty": "bigint", "note": "text"})
    assert [(column, kind) for column, kind, _ in plan.recreate] == [("id", "Int64")]
    assert plan.statements == []
    narrowed = info("MergeTree", "", CREATED_COMMENT + "public.src", id="Int128", qty="Nullable(Int64)",
                    note="Nullable(String)")  # Int128 holds the new Int64: no change at all
    assert evolve(narrowed, SOURCE, "`db`.`t`", "", allow=True, aligned={"id": "numeric"}).recreate == []
