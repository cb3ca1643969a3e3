"""Exactly once whatever the databases themselves do: readiness answers, session settings a role or
database imposes, triggers and row security on the source, narrower target types, NULL flags.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg2.extensions
import pytest

from etl_service.run.pipeline import FAILED, IDLE, OK, WAITING, run_job
from etl_service.service import admin, checks, report
from etl_service.settings.model import Settings
from etl_service.settings.reading import load

from .conftest import World
from .test_pipeline import ch_summary, marked


def flags_table(world: World) -> str:
    """A per-batch status table in ClickHouse: batch, status (a word), x (a number)."""
    world.backend.ch().command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    world.backend.ch().command(f"CREATE TABLE {world.target('flags')} (batch UInt64, status String, x Float64)"
                               " ENGINE = MergeTree ORDER BY batch")
    return world.target("flags")


# --- readiness answers are typed ---------------------------------------------------------------

@pytest.mark.parametrize(("query", "said"), [
    ("SELECT status FROM {flags} WHERE batch = {{batch_id:UInt64}}", "answers String (status)"),  # a word per batch
    ("SELECT status FROM {flags} WHERE batch = {{batch_id:UInt64}} -- the word", "answers String (status)"),
    ("SELECT 1 FORMAT JSON", "cannot parse it"),
    ("SELECT avg(x) FROM {flags} WHERE batch = 999", "answered NaN"),  # avg() over no rows
    ("SELECT [1, 2]", "answers Array(UInt8)"),
    ("SELECT toNullable(toLowCardinality(toString(1)))", "answers LowCardinality(Nullable(String))"),
])
def test_a_readiness_answer_that_is_not_yes_or_no_is_a_configuration_error(world: World, query: str,
                                                                            said: str) -> None:
    world.make_source(100)
    flags = flags_table(world)
    world.backend.ch().command(f"INSERT INTO {flags} VALUES (1, 'pending', 0)")
    settings = world.settings(ready_query=query.format(flags=flags), ready_timeout="1", ready_poll_interval="0.05")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True)
    assert "ETL_READY_QUERY" in result.message and said in result.message
    assert marked(world) == (0, 100)  # loaded, never marked: downstream work was never said to be done
    assert ch_summary(world) == (100, 100, 5050)
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any(line.startswith("  FAIL ETL_READY_QUERY") for line in lines), lines


def test_a_word_compared_in_the_query_waits_then_marks(world: World) -> None:
    world.make_source(100)
    flags = flags_table(world)
    world.backend.ch().command(f"INSERT INTO {flags} VALUES (1, 'pending', 0)")
    settings = world.settings(ready_query=f"SELECT max(status = 'done') FROM {flags} WHERE batch = {{batch_id:UInt64}}",
                              ready_timeout="0.3", ready_poll_interval="0.05")
    assert run_job(settings, settings.jobs[0]).status == WAITING
    assert marked(world) == (0, 100)
    world.backend.ch().command(f"INSERT INTO {flags} VALUES (1, 'done', 0)")
    done = run_job(settings, settings.jobs[0])
    assert (done.status, done.rows_loaded, done.rows_marked) == (OK, 0, 100)
    assert marked(world) == (100, 100) and ch_summary(world) == (100, 100, 5050)


# --- what a role or database sets for its sessions ---------------------------------------------

def test_a_database_interval_style_does_not_change_the_text_moved(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, span interval, processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src VALUES (1, '1 day 2 hours'), (2, '-3 minutes 4.5 seconds')")
    world.sql(f"ALTER DATABASE {world.ch_database} SET IntervalStyle = 'iso_8601'")
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == OK
    assert world.ch_rows(f"SELECT id, span FROM {world.target()} ORDER BY id") == \
        [(1, "1 day 02:00:00"), (2, "-00:02:55.5")]


def test_a_short_idle_session_timeout_does_not_cut_a_run_that_waits_for_readiness(world: World) -> None:
    world.make_source(100)
    world.sql(f"ALTER DATABASE {world.ch_database} SET idle_session_timeout = '300ms'")
    ready_at = time.time() + 1.5  # the run's connection sits idle for longer than the timeout
    settings = world.settings(ready_query=f"SELECT now64(3) > fromUnixTimestamp64Milli({int(ready_at * 1000)})",
                              ready_timeout="10", ready_poll_interval="0.1", retry_attempts="1")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 100), result.message
    assert marked(world) == (100, 100) and ch_summary(world) == (100, 100, 5050)


# --- a mark must stick -------------------------------------------------------------------------

DIRTY = """
CREATE FUNCTION dirty() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new IS DISTINCT FROM old THEN new.ts := now(); new.processed := false; END IF;
  RETURN new; END $$;
CREATE TRIGGER t_dirty BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION dirty();
"""
# an AFTER trigger that sets the flag back on every third row
UNDO = """
CREATE FUNCTION undo() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.processed AND NOT old.processed AND new.id % 3 = 0 THEN
    UPDATE src SET processed = false WHERE id = new.id; END IF;
  RETURN NULL; END $$;
CREATE TRIGGER t_undo AFTER UPDATE ON src FOR EACH ROW EXECUTE FUNCTION undo();
"""
# a BEFORE trigger that silently skips a tenth of the rows
SKIP = """
CREATE FUNCTION skip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.id % 10 = 0 THEN RETURN NULL; END IF; RETURN new; END $$;
CREATE TRIGGER t_skip BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION skip();
"""
# a BEFORE trigger that sets the flag to NULL on every fifth row
TO_NULL = """
ALTER TABLE src ALTER COLUMN processed DROP NOT NULL;
CREATE FUNCTION to_null() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.id % 5 = 0 THEN new.processed := NULL; END IF; RETURN new; END $$;
CREATE TRIGGER t_null BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION to_null();
"""
# a BEFORE trigger that skips every seventh row from inside an exception block (a subtransaction)
SKIP_IN_BLOCK = """
CREATE FUNCTION guarded() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  BEGIN
    IF new.id % 7 = 0 THEN RAISE EXCEPTION 'no'; END IF;
  EXCEPTION WHEN others THEN RETURN NULL;
  END;
  RETURN new; END $$;
CREATE TRIGGER t_guard BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION guarded();
"""
FIXES = {"t_dirty": "DROP TRIGGER t_dirty ON src; CREATE TRIGGER t_dirty BEFORE UPDATE ON src FOR EACH ROW"
                    " WHEN (old.processed IS NOT DISTINCT FROM new.processed) EXECUTE FUNCTION dirty()",
         "t_undo": "DROP TRIGGER t_undo ON src", "t_skip": "DROP TRIGGER t_skip ON src",
         "t_null": "DROP TRIGGER t_null ON src", "t_guard": "DROP TRIGGER t_guard ON src"}

# Triggers whose work in the mark's transaction goes beyond the flag of the batch's rows.
BEYOND = {
    "t_undo": UNDO,
    # a statement trigger that sets the flag back on every fourth row it was fired for
    "t_stmt": """
CREATE FUNCTION stmt_reset() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  UPDATE src SET processed = false FROM newtab WHERE src.id = newtab.id AND newtab.id % 4 = 0 AND src.processed;
  RETURN NULL; END $$;
CREATE TRIGGER t_stmt AFTER UPDATE ON src REFERENCING NEW TABLE AS newtab
  FOR EACH STATEMENT WHEN (pg_trigger_depth() < 1) EXECUTE FUNCTION stmt_reset();
""",
    # a statement trigger that re-opens rows of an earlier batch
    "t_reopen": """
CREATE FUNCTION stmt_reopen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  UPDATE src SET processed = false FROM newtab WHERE src.id = newtab.id - 20 AND src.processed AND src.id % 2 = 0;
  RETURN NULL; END $$;
CREATE TRIGGER t_reopen AFTER UPDATE ON src REFERENCING NEW TABLE AS newtab
  FOR EACH STATEMENT WHEN (pg_trigger_depth() < 1) EXECUTE FUNCTION stmt_reopen();
""",
    # a deferred constraint trigger: it would fire at COMMIT
    "t_late": """
CREATE FUNCTION undo_late() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.processed AND NOT old.processed AND new.id % 3 = 0 THEN
    UPDATE src SET processed = false WHERE id = new.id; END IF;
  RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER t_late AFTER UPDATE ON src DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION undo_late();
""",
    # updates the row itself, then drops the mark
    "t_bounce": """
ALTER TABLE src ADD COLUMN touched timestamptz;
CREATE FUNCTION bounce() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.processed AND NOT old.processed AND new.id % 10 = 0 THEN
    UPDATE src SET touched = clock_timestamp() WHERE id = new.id;
    RETURN NULL;
  END IF;
  RETURN new; END $$;
CREATE TRIGGER t_bounce BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION bounce();
""",
    # marks child rows (never loaded) processed with their parent
    "t_cascade": """
ALTER TABLE src ADD COLUMN parent bigint;
UPDATE src SET parent = id - 30 WHERE id % 2 = 0 AND id > 30;
CREATE FUNCTION cascade_done() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.processed AND NOT old.processed THEN
    UPDATE src SET processed = true WHERE parent = new.id AND NOT processed; END IF;
  RETURN NULL; END $$;
CREATE TRIGGER t_cascade AFTER UPDATE OF processed ON src FOR EACH ROW
  WHEN (pg_trigger_depth() < 1) EXECUTE FUNCTION cascade_done();
""",
    # gives a marked row another key
    "t_rekey": """
CREATE FUNCTION rekey() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.processed AND NOT old.processed AND new.id % 10 = 0 THEN new.id := new.id + 1000000; END IF;
  RETURN new; END $$;
CREATE TRIGGER t_rekey BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION rekey();
""",
    # writes a history row into the source itself
    "t_history": """
CREATE FUNCTION history() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF new.processed AND NOT old.processed THEN
    INSERT INTO src (id, amount, name) VALUES (new.id + 1000000, new.amount, 'history'); END IF;
  RETURN new; END $$;
CREATE TRIGGER t_history AFTER UPDATE ON src FOR EACH ROW WHEN (pg_trigger_depth() < 1) EXECUTE FUNCTION history();
""",
}


def loaded_once(world: World) -> tuple[int, int]:
    """(rows in the target, distinct ids): equal when no key was loaded twice."""
    rows, unique, _ = ch_summary(world)
    return rows, unique


def requeue(settings: Settings) -> list[str]:
    """What `requeue` says for every job."""
    lines: list[str] = []
    admin.requeue(settings, list(settings.jobs), None, lines.append)
    return lines


@pytest.mark.parametrize(("logic", "trigger", "kind", "set_aside"), [
    (DIRTY, "t_dirty", "set back to false", 1000),
    (TO_NULL, "t_null", "set back to false", 200),
    (SKIP, "t_skip", "not reached by the mark", 100),
    (SKIP_IN_BLOCK, "t_guard", "not reached by the mark", 142),
])
def test_a_mark_that_does_not_stick_stops_the_job_and_nothing_loads_twice(world: World, logic: str, trigger: str,
                                                                        kind: str, set_aside: int) -> None:
    world.make_source(1000)
    world.sql(logic)
    settings = world.settings(batch_size="1000")
    lines: list[str] = []
    checks.check(settings, lines.append)
    assert any(f"trigger {trigger}" in line and "can reset or refuse" in line for line in lines), lines
    first = run_job(settings, settings.jobs[0])
    assert first.status == FAILED and trigger in first.message and kind in first.message
    assert f"requeue --job {settings.jobs[0].name}" in first.message
    assert first.rows_marked == 1000 - set_aside
    assert loaded_once(world) == (1000, 1000)
    assert world.sql("SELECT count(*) FROM etl.quarantine WHERE kind <> 'failed'") == [(set_aside,)]
    lines.clear()
    assert not checks.check(settings, lines.append)  # the job is stopped: check says so
    assert any(line.startswith("  FAIL") and trigger in line and "requeue" in line for line in lines), lines
    for _ in range(2):  # later runs stop before loading anything
        again = run_job(settings, settings.jobs[0])
        assert again.status == FAILED and again.rows_loaded == 0 and trigger in again.message
    world.add_rows(1001, 1100)  # new rows wait too
    assert run_job(settings, settings.jobs[0]).rows_loaded == 0
    assert loaded_once(world) == (1000, 1000)
    world.sql(FIXES[trigger])
    said = requeue(settings)
    assert any(f"{set_aside} row(s) already in ClickHouse marked processed, not loaded again" in s for s in said), said
    done = run_job(settings, settings.jobs[0])
    assert (done.status, done.rows_loaded, done.rows_marked) == (OK, 100, 100)
    assert marked(world) == (1100, 1100)
    assert loaded_once(world) == (1100, 1100)


@pytest.mark.parametrize("trigger", sorted(BEYOND))
def test_a_mark_that_changes_more_than_the_flag_is_rolled_back_and_nothing_loads_twice(world: World,
                                                                                      trigger: str) -> None:
    world.make_source(60)
    world.sql(BEYOND[trigger])
    settings = world.settings(batch_size="20")
    lines: list[str] = []
    checks.check(settings, lines.append)
    assert any(f"trigger {trigger}" in line for line in lines), lines
    first = run_job(settings, settings.jobs[0])
    assert first.status == FAILED and trigger in first.message, first.message
    assert "did more than set processed" in first.message and "rolled back" in first.message
    assert "loaded again" in first.message and "requeue" not in first.message
    assert loaded_once(world)[0] == loaded_once(world)[1]
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]
    flagged = marked(world)[0]
    again = run_job(settings, settings.jobs[0])  # the loaded batch is marked again, never loaded again
    assert (again.status, again.rows_loaded) == (FAILED, 0) and trigger in again.message
    assert marked(world)[0] == flagged
    world.sql(f"DROP TRIGGER {trigger} ON src")
    done = run_job(settings, settings.jobs[0])
    assert done.status == OK, done.message
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]
    rows, unique = loaded_once(world)
    assert rows == unique and world.sql("SELECT count(*) FROM src") == [(unique,)]


def test_requeue_before_the_fix_keeps_the_rows_aside(world: World) -> None:
    world.make_source(200)
    world.sql(DIRTY)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == FAILED
    said = requeue(settings)
    assert any("200 row(s) already in ClickHouse still cannot be marked" in s for s in said), said
    assert world.sql("SELECT count(*) FROM etl.quarantine WHERE kind = 'reset'") == [(200,)]
    world.sql(FIXES["t_dirty"])
    requeue(settings)
    assert marked(world) == (200, 200) and loaded_once(world) == (200, 200)


def test_a_trigger_on_one_partition_only_is_found_and_nothing_loads_twice(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint, name text, ts timestamptz, processed boolean NOT NULL DEFAULT false,"
              " PRIMARY KEY (id)) PARTITION BY RANGE (id);"
              " CREATE TABLE src_a PARTITION OF src FOR VALUES FROM (0) TO (500);"
              " CREATE TABLE src_b PARTITION OF src FOR VALUES FROM (500) TO (10000);"
              " INSERT INTO src SELECT g, 'r' || g, now(), false FROM generate_series(1, 999) g")
    world.sql(DIRTY.replace("ON src FOR", "ON src_b FOR"))
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert result.status == FAILED and "t_dirty" in result.message and "src_b" in result.message
    assert result.rows_marked == 499
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(999, 999)]
    assert run_job(settings, settings.jobs[0]).rows_loaded == 0


def test_a_row_security_policy_narrower_for_update_stops_the_job(world: World) -> None:
    world.make_source(20)
    world.sql("CREATE ROLE etl_rls LOGIN; GRANT SELECT, UPDATE ON src TO etl_rls;"
              " GRANT CREATE, USAGE ON SCHEMA public TO etl_rls;"
              f" GRANT CREATE ON DATABASE {world.ch_database} TO etl_rls;"
              " ALTER TABLE src ENABLE ROW LEVEL SECURITY;"
              " CREATE POLICY p_read ON src FOR SELECT USING (true);"
              " CREATE POLICY p_write ON src FOR UPDATE USING (id <= 15)")
    try:
        settings = load(environ={**world.env(), "PG_DSN": psycopg2.extensions.make_dsn(world.pg_dsn, user="etl_rls")})
        result = run_job(settings, settings.jobs[0])
        assert result.status == FAILED and "p_write" in result.message and "not reached" in result.message
        assert result.rows_marked == 15
        assert loaded_once(world) == (20, 20)
        assert run_job(settings, settings.jobs[0]).rows_loaded == 0
        assert loaded_once(world) == (20, 20)
    finally:
        world.sql("DROP OWNED BY etl_rls; DROP ROLE etl_rls")


def test_one_row_whose_mark_raises_is_set_aside_and_the_rest_moves(world: World) -> None:
    world.make_source(1000)
    world.sql("""CREATE FUNCTION picky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   IF new.id = 777 THEN RAISE EXCEPTION 'row 777 may not be processed'; END IF; RETURN new; END $$;
                 CREATE TRIGGER t_picky BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION picky()""")
    settings = world.settings(batch_size="300")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 999)
    assert marked(world) == (999, 1000) and loaded_once(world) == (1000, 1000)
    assert world.sql("SELECT key, kind FROM etl.quarantine") == [("777", "unmarked")]
    again = run_job(settings, settings.jobs[0])  # not claimed again: it is in ClickHouse
    assert again.rows_loaded == 0 and loaded_once(world) == (1000, 1000)
    shown: list[str] = []
    report.status(settings, shown.append)
    assert any("777" in line and "refused the mark" in line for line in shown), shown
    world.sql("DROP TRIGGER t_picky ON src")
    said = requeue(settings)
    assert any("1 row(s) already in ClickHouse marked processed" in s for s in said), said
    assert marked(world) == (1000, 1000) and loaded_once(world) == (1000, 1000)


def test_a_mark_that_raises_for_every_row_leaves_the_batch_loaded_with_the_reason(world: World) -> None:
    world.make_source(100)
    world.sql("""CREATE FUNCTION never() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   RAISE EXCEPTION 'processing is closed'; END $$;
                 CREATE TRIGGER t_never BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION never()""")
    settings = world.settings()
    for _ in range(2):
        result = run_job(settings, settings.jobs[0])
        assert result.status == FAILED and "processing is closed" in result.message
        assert "the batch stays loaded" in result.message
    assert world.sql("SELECT state FROM etl.batches") == [("loaded",)]
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]
    assert loaded_once(world) == (100, 100)
    world.sql("DROP TRIGGER t_never ON src")
    done = run_job(settings, settings.jobs[0])
    assert (done.status, done.rows_loaded, done.rows_marked) == (OK, 0, 100)
    assert loaded_once(world) == (100, 100)


def test_requeue_before_the_fix_keeps_rows_the_mark_did_not_reach_aside(world: World) -> None:
    world.make_source(100)
    world.sql(SKIP)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == FAILED
    said = requeue(settings)
    assert any("10 row(s) already in ClickHouse still cannot be marked" in s for s in said), said
    assert world.sql("SELECT count(*) FROM etl.quarantine WHERE kind = 'refused'") == [(10,)]
    assert run_job(settings, settings.jobs[0]).rows_loaded == 0
    assert loaded_once(world) == (100, 100)
    world.sql(FIXES["t_skip"])
    said = requeue(settings)
    assert any("10 row(s) already in ClickHouse marked processed, not loaded again" in s for s in said), said
    assert marked(world) == (100, 100) and loaded_once(world) == (100, 100)


def test_rows_set_aside_under_an_old_job_name_are_not_loaded_under_the_new_one(world: World) -> None:
    world.make_source(50)
    world.sql(DIRTY)
    old = world.settings(job_name="orders")
    assert run_job(old, old.jobs[0]).status == FAILED
    new = world.settings(job_name="orders_v2")
    renamed = run_job(new, new.jobs[0])
    assert renamed.status == FAILED and renamed.rows_loaded == 0 and "t_dirty" in renamed.message
    shown: list[str] = []
    report.status(new, shown.append)
    assert any("50" in line and "quarantine" in line for line in shown), shown
    world.sql(FIXES["t_dirty"])
    said = requeue(new)
    assert any("50 row(s) already in ClickHouse marked processed" in s for s in said), said
    world.add_rows(51, 60)
    done = run_job(new, new.jobs[0])
    assert (done.status, done.rows_loaded) == (OK, 10)
    assert marked(world) == (60, 60) and loaded_once(world) == (60, 60)


def test_a_flag_set_to_null_by_a_trigger_then_to_false_by_the_operator_is_marked_not_loaded_again(
        world: World) -> None:
    world.make_source(100)
    world.sql(TO_NULL)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == FAILED
    assert world.sql("SELECT count(*) FROM etl.quarantine WHERE kind = 'reset'") == [(20,)]
    world.sql("UPDATE src SET processed = false WHERE processed IS NULL")  # what the NULL-flag note says to do
    world.sql(FIXES["t_null"])
    said = requeue(settings)
    assert any("20 row(s) already in ClickHouse marked processed, not loaded again" in s for s in said), said
    assert run_job(settings, settings.jobs[0]).rows_loaded == 0
    assert marked(world) == (100, 100) and loaded_once(world) == (100, 100)
    world.sql("UPDATE src SET processed = false, name = 'changed' WHERE id = 5")  # a real change loads again
    assert run_job(settings, settings.jobs[0]).rows_loaded == 1


@pytest.mark.parametrize("rule", ["CREATE RULE r_audit AS ON UPDATE TO src DO ALSO INSERT INTO audit VALUES (new.id)",
                                  "CREATE RULE r_keep AS ON UPDATE TO src WHERE old.id = 3 DO INSTEAD NOTHING"])
def test_a_rule_on_update_is_a_configuration_error_before_anything_moves(world: World, rule: str) -> None:
    world.make_source(30)
    world.sql(f"CREATE TABLE audit (id bigint); {rule}")
    settings = world.settings()
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    name = rule.split()[2]
    assert any(line.startswith("  FAIL ETL_SOURCE_TABLE") and f"rule {name}" in line for line in lines), lines
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent, result.rows_loaded) == (FAILED, True, 0)
    world.sql(f"DROP RULE {name} ON src")
    assert run_job(settings, settings.jobs[0]).rows_marked == 30
    assert loaded_once(world) == (30, 30)


# --- a NULL flag is neither processed nor hidden ----------------------------------------------

def test_rows_with_a_null_flag_do_not_move_and_are_counted_and_shown(world: World) -> None:
    world.make_source(100)
    world.sql("ALTER TABLE src ALTER COLUMN processed DROP NOT NULL, ALTER COLUMN processed DROP DEFAULT;"
              " INSERT INTO src (id, amount, name) SELECT g, g, 'late ' || g FROM generate_series(101, 130) g")
    settings = world.settings()
    lines: list[str] = []
    assert checks.check(settings, lines.append)
    assert any("cannot move: 30 row(s) with a NULL flag (processed)" in line for line in lines), lines
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 100)
    assert ch_summary(world) == (100, 100, 5050)  # a NULL flag is not false: those rows are not sent
    shown: list[str] = []
    report.status(settings, shown.append)
    assert any("cannot move: 30 row(s) with a NULL flag" in line and "SET DEFAULT false" in line
               for line in shown), shown
    world.sql("UPDATE src SET processed = false WHERE processed IS NULL")  # what the message says to do
    assert run_job(settings, settings.jobs[0]).rows_marked == 30
    assert ch_summary(world) == (130, 130, 130 * 131 // 2)
    shown.clear()
    report.status(settings, shown.append)
    assert not any("NULL flag" in line for line in shown)


# --- the ledger's schema -----------------------------------------------------------------------

@pytest.mark.parametrize(("table", "ddl", "why"), [
    ("batches", "CREATE TABLE etl.batches (id int, note text)", "it has no column batch_id"),
    ("runs", "CREATE TABLE etl.runs (id int, note text)", "it has no column run_id"),
    # the names the ledger's checks once looked for, in a table of someone else's
    ("batches", "CREATE TABLE etl.batches (batch_id bigint, job text, state text, keys text[], xmins text[])",
     "its column xmins is text[], not xid[]"),
    ("quarantine", "CREATE TABLE etl.quarantine (id serial PRIMARY KEY, key text, reason text)",
     "it has no column job"),
    ("runs", "CREATE VIEW etl.runs AS SELECT 1::bigint AS run_id, 'x'::text AS status", "it is not a table"),
])
def test_a_foreign_table_in_the_ledger_schema_is_a_configuration_error(world: World, table: str, ddl: str,
                                                                       why: str) -> None:
    world.make_source(10)
    world.sql(f"CREATE SCHEMA etl; {ddl}")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True)
    assert f"ETL_LEDGER_SCHEMA: etl.{table} exists but is not the service's ledger table ({why})" in result.message
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any("FAIL ETL_LEDGER_SCHEMA" in line for line in lines), lines
    assert marked(world) == (0, 10)
    other = world.settings(ledger_schema="etl_own")
    assert run_job(other, other.jobs[0]).rows_marked == 10


# --- values are stored as they are, or set aside ------------------------------------------------

def test_an_operator_made_narrower_target_stores_values_exactly_or_quarantines_them(world: World) -> None:
    world.sql("""CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(14,4), at timestamptz, f float8, d date,
                                   code text, processed boolean NOT NULL DEFAULT false);
                 INSERT INTO src SELECT g, g * 1.25, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 s',
                                        g * 0.5, date '2026-01-01' + g, 'c' || (g % 10)
                 FROM generate_series(1, 100) g;
                 UPDATE src SET amount = 1.2345 WHERE id = 11;            -- a digit Decimal(10,2) would drop
                 UPDATE src SET at = '2300-01-01 00:00:00+00' WHERE id = 22; -- past DateTime
                 UPDATE src SET at = '1899-12-31 00:00:00+00' WHERE id = 33; -- before DateTime
                 UPDATE src SET at = at + interval '5 microseconds' WHERE id = 44; -- finer than DateTime
                 UPDATE src SET f = 1e300 WHERE id = 55;                  -- past Float32
                 UPDATE src SET d = '2150-01-01' WHERE id = 66;           -- past Date
                 UPDATE src SET code = 'toolong' WHERE id = 77;           -- longer than FixedString(3)""")
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64, amount Decimal(10, 2), at DateTime('UTC'), f Float32,"
               " d Date, code FixedString(3), _etl_batch UInt64) ENGINE = MergeTree ORDER BY id"
               " SETTINGS non_replicated_deduplication_window = 1000")
    settings = world.settings(schema_changes="fail")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 93, 7), result.message
    reasons = dict(world.sql("SELECT key, reason FROM etl.quarantine"))
    assert sorted(int(k) for k in reasons) == [11, 22, 33, 44, 55, 66, 77]
    assert "more digits after the point than Decimal(10, 2)" in reasons["11"]
    assert "out of the range of DateTime('UTC')" in reasons["22"] and "out of the range" in reasons["33"]
    assert "more precise than DateTime('UTC')" in reasons["44"]
    assert "does not fit Float32" in reasons["55"] and "out of the range of Date" in reasons["66"]
    assert "FixedString(3)" in reasons["77"]
    stored = world.ch_rows(f"SELECT id, amount, toUnixTimestamp(at), f, d, code FROM {world.target()} ORDER BY id")
    source = world.sql("SELECT id, amount, extract(epoch FROM at)::bigint, f, d, code FROM src"
                       " WHERE id NOT IN (11, 22, 33, 44, 55, 66, 77) ORDER BY id")
    assert len(stored) == len(source) == 93
    for (i, amount, at, f, d, code), (j, s_amount, s_at, s_f, s_d, s_code) in zip(stored, source, strict=True):
        assert (i, amount, at, f, d, code.rstrip(b"\0").decode() if isinstance(code, bytes) else code.rstrip("\0")) \
            == (j, s_amount, s_at, s_f, s_d, s_code)


def test_a_policy_that_hides_rows_from_select_is_named_and_what_it_shows_moves_once(world: World) -> None:
    world.make_source(20)
    world.sql("CREATE ROLE etl_seen LOGIN; GRANT SELECT, UPDATE ON src TO etl_seen;"
              f" GRANT CREATE ON DATABASE {world.ch_database} TO etl_seen;"
              " ALTER TABLE src ENABLE ROW LEVEL SECURITY;"
              " CREATE POLICY p_tenant ON src FOR SELECT USING (id % 4 <> 0);"
              " CREATE POLICY p_all_update ON src FOR UPDATE USING (true)")
    try:
        settings = load(environ={**world.env(), "PG_DSN": psycopg2.extensions.make_dsn(world.pg_dsn, user="etl_seen")})
        lines: list[str] = []
        checks.check(settings, lines.append)
        assert any("policy p_tenant (FOR SELECT)" in line and "never move" in line for line in lines), lines
        assert run_job(settings, settings.jobs[0]).status == OK
        assert run_job(settings, settings.jobs[0]).status == IDLE  # the hidden rows are not seen, so not retried
        assert loaded_once(world) == (15, 15)
        assert marked(world) == (15, 20)
    finally:
        world.sql("DROP OWNED BY etl_seen; DROP ROLE etl_seen")


def test_dates_the_server_holds_arrive_as_they_are(world: World) -> None:
    """chDB 26.9's Date32 and DateTime64 hold 0001-01-01 .. 9999-12-31: nothing of that is set aside."""
    world.sql("""CREATE TABLE src (id bigint PRIMARY KEY, d date, ts timestamp,
                                   processed boolean NOT NULL DEFAULT false);
                 INSERT INTO src VALUES (1, '1850-06-01', '1850-06-01 12:00'), (2, '2500-01-01', '2500-01-01 00:00'),
                 (3, '2026-01-01', '2026-01-01 00:00:00.123456'), (4, '0001-01-01', '0001-01-01 00:00'),
                 (5, '9999-12-31', '9999-12-31 23:59:59.999999')""")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    if world.ch_rows("SELECT toInt32(toDate32('0001-01-01'))") != [(-719_162,)]:  # a server before the wider range
        assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 1, 4), result.message
        assert {key for key, reason in world.sql("SELECT key, reason FROM etl.quarantine")
                if "out of the range" in reason} == {"1", "2", "4", "5"}
        return
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 5, 0), result.message
    assert world.ch_rows(f"SELECT id, toString(d), toString(ts) FROM {world.target()} ORDER BY id") == [
        (1, "1850-06-01", "1850-06-01 12:00:00.000000"), (2, "2500-01-01", "2500-01-01 00:00:00.000000"),
        (3, "2026-01-01", "2026-01-01 00:00:00.123456"), (4, "0001-01-01", "0001-01-01 00:00:00.000000"),
        (5, "9999-12-31", "9999-12-31 23:59:59.999999")]


@pytest.mark.parametrize(("ch_type", "good", "bad"), [
    ("IPv4", "10.0.0.1", "10.0.0.1/8"),
    ("IPv6", "::1", "not-an-address"),
    ("Bool", "true", "maybe"),
    ("Enum8('a' = 1, 'b' = 2)", "a", "c"),
    ("UUID", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b4ef8bb6d6bb9bd380a11"),
])
def test_a_value_the_target_type_cannot_parse_is_quarantined_and_the_rest_moves(world: World, ch_type: str,
                                                                                 good: str, bad: str) -> None:
    world.sql(f"""CREATE TABLE src (id bigint PRIMARY KEY, v text, processed boolean NOT NULL DEFAULT false);
                  INSERT INTO src SELECT g, CASE WHEN g = 7 THEN '{bad}' ELSE '{good}' END, false
                  FROM generate_series(1, 20) g""")
    ch = world.backend.ch()
    ch.command(f"CREATE DATABASE IF NOT EXISTS `{world.ch_database}`")
    ch.command(f"CREATE TABLE {world.target()} (id Int64, v {ch_type}, _etl_batch UInt64, _etl_version UInt64)"
               " ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 1000")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 19, 1), result.message
    assert world.sql("SELECT key FROM etl.quarantine") == [("7",)]
    assert world.ch_rows(f"SELECT count(), countIf(id = 7) FROM {world.target()}") == [(19, 0)]


def test_requeue_sees_a_trigger_that_changes_the_key_and_marks_nothing(world: World) -> None:
    world.make_source(20)
    world.sql(TO_NULL)
    settings = world.settings()
    assert run_job(settings, settings.jobs[0]).status == FAILED  # ids 5, 10, 15, 20 set aside
    world.sql("""DROP TRIGGER t_null ON src;
                 CREATE FUNCTION rekey() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   IF new.processed AND old.processed IS NOT TRUE THEN new.id := new.id + 1000; END IF;
                   RETURN new; END $$;
                 CREATE TRIGGER t_rekey BEFORE UPDATE ON src FOR EACH ROW EXECUTE FUNCTION rekey()""")
    said = requeue(settings)
    assert any("changed the key of" in s and "t_rekey" in s for s in said), said
    assert world.sql("SELECT count(*) FROM src WHERE id > 1000") == [(0,)]
    assert world.sql("SELECT count(*) FROM etl.quarantine WHERE kind = 'reset'") == [(4,)]


def test_row_counters_turned_off_with_triggers_on_the_source_is_a_configuration_error(world: World) -> None:
    world.make_source(30)
    world.sql(BEYOND["t_reopen"])
    database = psycopg2.extensions.parse_dsn(world.pg_dsn)["dbname"]
    world.sql(f"ALTER DATABASE {database} SET track_counts = off")
    try:
        settings = world.settings()
        result = run_job(settings, settings.jobs[0])
        assert (result.status, result.permanent, result.rows_loaded) == (FAILED, True, 0), result.message
        assert "track_counts is off" in result.message
    finally:
        world.sql(f"ALTER DATABASE {database} RESET track_counts")


TWO_JOBS = ('[jobs.a]\nsource_table = "src"\nprocessed_column = "pa"\ntarget_table = "dst_a"\ncolumns = "id, v"\n\n'
            '[jobs.b]\nsource_table = "src"\nprocessed_column = "pb"\ntarget_table = "dst_b"\ncolumns = "id, v"\n')


@pytest.mark.parametrize("trigger", [
    # a dirty-row trigger for both consumers, with the WHEN the advice gives job a
    """CREATE FUNCTION dirty() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
         IF new IS DISTINCT FROM old THEN new.pa := false; new.pb := false; END IF; RETURN new; END $$;
       CREATE TRIGGER t_two BEFORE UPDATE ON src FOR EACH ROW WHEN (old.pa IS NOT DISTINCT FROM new.pa)
         EXECUTE FUNCTION dirty()""",
    # b's mark tells a to send the row again, leaving b's own flag alone
    """CREATE FUNCTION redo_a() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN new.pa := false; RETURN new; END $$;
       CREATE TRIGGER t_two BEFORE UPDATE OF pb ON src FOR EACH ROW WHEN (new.pb AND NOT old.pb)
         EXECUTE FUNCTION redo_a()""",
])
def test_a_mark_that_sets_another_jobs_flag_back_is_rolled_back(world: World, trigger: str) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, v text, pa boolean NOT NULL DEFAULT false,"
              " pb boolean NOT NULL DEFAULT false); INSERT INTO src SELECT g, 'v' || g, false, false"
              f" FROM generate_series(1, 50) g; {trigger}")
    jobs = world.tmp / "jobs.toml"
    jobs.write_text(TWO_JOBS)
    settings = load(environ={**world.env(), "ETL_JOBS_FILE": str(jobs)})
    a, b = settings.jobs
    assert run_job(settings, a).rows_marked == 50
    second = run_job(settings, b)
    assert second.status == FAILED and "another job's flag (pa)" in second.message, second.message
    assert world.sql("SELECT count(*) FILTER (WHERE pa), count(*) FILTER (WHERE pb) FROM src") == [(50, 0)]
    assert run_job(settings, a).rows_loaded == 0  # a's rows stay marked: nothing to load again
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target('dst_a')}") == [(50, 50)]
    world.sql("DROP TRIGGER t_two ON src")
    assert run_job(settings, b).rows_marked == 50
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target('dst_b')}") == [(50, 50)]


def test_rows_row_security_hides_between_load_and_mark_are_not_loaded_again(world: World,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from etl_service.ledger import mark as mark_module

    world.make_source(30)
    database = psycopg2.extensions.parse_dsn(world.pg_dsn)["dbname"]
    world.sql("CREATE ROLE etl_hid LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO etl_hid;"
              f" GRANT CREATE, USAGE ON SCHEMA public TO etl_hid; GRANT CREATE ON DATABASE {database} TO etl_hid;"
              " CREATE TABLE hide (id bigint PRIMARY KEY); GRANT SELECT ON hide TO etl_hid;"
              " ALTER TABLE src ENABLE ROW LEVEL SECURITY;"
              " CREATE POLICY p ON src FOR ALL USING (NOT EXISTS (SELECT 1 FROM hide h WHERE h.id = src.id))")
    original = mark_module.Mark.run

    def hidden_at_the_mark(self: Any, batch: Any, shape: Any, before_commit: Any) -> Any:
        world.sql("INSERT INTO hide SELECT g FROM generate_series(1, 5) g ON CONFLICT DO NOTHING")
        return original(self, batch, shape, before_commit)

    try:
        settings = load(environ={**world.env(), "PG_DSN": psycopg2.extensions.make_dsn(world.pg_dsn, user="etl_hid")})
        monkeypatch.setattr(mark_module.Mark, "run", hidden_at_the_mark)
        first = run_job(settings, settings.jobs[0])
        monkeypatch.setattr(mark_module.Mark, "run", original)
        assert (first.status, first.rows_marked) == (OK, 25), first.message
        world.sql("DELETE FROM hide")
        again = run_job(settings, settings.jobs[0])
        assert again.rows_loaded == 0, again.message  # seen again: in ClickHouse already
        assert loaded_once(world) == (30, 30)
        said = requeue(settings)
        assert any("5 row(s) already in ClickHouse marked processed" in s for s in said), said
        assert marked(world) == (30, 30) and loaded_once(world) == (30, 30)
    finally:
        world.sql("DROP OWNED BY etl_hid CASCADE; DROP ROLE etl_hid")
