"""Exactly once whatever the operator or the data does: every assumption the guarantee rests on is checked.

Each class has the case that broke it and a sibling: a key that is not unique, NULL keys, a
transform that breaks the key contract, a renamed job, values larger than a parse block, and
permanent errors (password, role, database, privileges) that must not be retried as outages.
"""

from __future__ import annotations

import hashlib
import sys
import time

import pytest
from loguru import logger

from etl_service.errors import ConfigError
from etl_service.run.pipeline import FAILED, IDLE, OK, WAITING, RunResult, run_job
from etl_service.service import admin, checks, report

from .conftest import World
from .helpers import REPO, clean_env, cli, running, stop, wait_for, write_env
from .test_pipeline import ch_summary


def target_count(world: World, table: str = "dst") -> int:
    found = world.ch_rows(f"SELECT count() FROM system.tables WHERE database = '{world.ch_database}'"
                          f" AND name = '{table}'")
    return int(world.ch_rows(f"SELECT count() FROM {world.target(table)}")[0][0]) if found[0][0] else 0


def processed(world: World) -> int:
    return int(world.sql("SELECT count(*) FROM src WHERE processed")[0][0])


def run_with_transform(world: World, name: str, code: str, **job: str) -> RunResult:
    """One run of the job with `code` (a module defining run(df)) as its transform."""
    module = f"tx_{name}_{world.ch_database}"
    (world.tmp / f"{module}.py").write_text(code)
    sys.path.insert(0, str(world.tmp))
    try:
        settings = world.settings(transform=f"{module}:run", **job)
        return run_job(settings, settings.jobs[0])
    finally:
        sys.path.remove(str(world.tmp))


# --- the key must be unique --------------------------------------------------------------------

@pytest.mark.parametrize(("index", "qualifying"), [
    ("", "the table has no PRIMARY KEY or UNIQUE index"),                     # repeated values
    ("CREATE UNIQUE INDEX ON src (id) WHERE NOT processed", "no PRIMARY KEY"),  # partial: not a key
    ("CREATE UNIQUE INDEX ON src (id, name)", "keys that qualify: id, name"),    # wider than the key
    ("CREATE UNIQUE INDEX ON src ((id * 1))", "no PRIMARY KEY"),                 # an expression
])
def test_a_key_that_is_not_unique_is_refused_before_anything_moves(world: World, index: str,
                                                                    qualifying: str) -> None:
    world.sql("CREATE TABLE src (id bigint, name text, processed boolean NOT NULL DEFAULT false)")
    world.sql("INSERT INTO src SELECT g % 10, 'r' || g, false FROM generate_series(1, 200) g" if not index else
              "INSERT INTO src SELECT g, 'r' || g, false FROM generate_series(1, 200) g")
    if index:
        world.sql(index)
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.permanent, result.rows_loaded) == (FAILED, True, 0)
    assert "ETL_SOURCE_KEY: id is not a unique key of" in result.message and qualifying in result.message
    assert (target_count(world), processed(world)) == (0, 0)
    lines: list[str] = []
    assert not checks.check(settings, lines.append)
    assert any(line.startswith("  FAIL ETL_SOURCE_KEY: id is not a unique key") for line in lines), lines


def test_once_exits_78_on_a_key_that_is_not_unique(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint, name text, processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g % 10, 'r', false FROM generate_series(1, 200) g")
    once = cli("--once", "--env-file", str(write_env(world, world.tmp / "chdb")))
    assert once.returncode == 78, once.stderr
    assert "configuration error: ETL_SOURCE_KEY: id is not a unique key" in once.stderr
    assert processed(world) == 0


def test_composite_key_of_a_partitioned_table_moves_every_row_once(world: World) -> None:
    world.sql("""
        CREATE TABLE src (id bigint, created_at date, amount int, processed boolean NOT NULL DEFAULT false,
                          PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
        CREATE TABLE src_2026_01 PARTITION OF src FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
        CREATE TABLE src_2026_02 PARTITION OF src FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
        -- the same id in both months: only the pair is unique
        INSERT INTO src SELECT g % 700, date '2026-01-01' + (g % 59), g, false FROM generate_series(1, 2100) g""")
    settings = world.settings(source_key="created_at, id", batch_size="500", chunk_size="200")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_loaded, result.rows_marked) == (OK, 2100, 2100)
    rows, pairs, total = world.ch_rows(f"SELECT count(), uniqExact(id, created_at), sum(amount)"
                                       f" FROM {world.target()}")[0]
    assert (rows, pairs, total) == (2100, 2100, 2100 * 2101 // 2)
    sorting = world.ch_rows(f"SELECT sorting_key FROM system.tables WHERE database = '{world.ch_database}'"
                            " AND name = 'dst'")
    assert sorting == [("id, created_at",)]  # the primary key's own column order
    world.sql("INSERT INTO src VALUES (5, '2026-02-20', 99999, false)")  # a new pair with an old id
    assert run_job(settings, settings.jobs[0]).rows_marked == 1
    assert world.ch_rows(f"SELECT sum(amount) FROM {world.target()} WHERE id = 5 AND created_at = '2026-02-20'") \
        == [(99999,)]


def test_composite_key_rows_are_quarantined_and_requeued_by_their_key(world: World) -> None:
    world.sql("CREATE TABLE src (tenant int, id int, qty int, processed boolean NOT NULL DEFAULT false,"
              " PRIMARY KEY (tenant, id)); INSERT INTO src SELECT g % 3, g, g, false FROM generate_series(1, 60) g")
    picky = ("def run(df):\n    if df['id'].isin([7, 44]).any():\n        raise ValueError('no 7 or 44')\n"
             "    return df\n")
    result = run_with_transform(world, "pick", picky, source_key="tenant, id")
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 58, 2)
    settings = world.settings(source_key="tenant, id")
    keys = sorted(r[0] for r in world.sql("SELECT key FROM etl.quarantine"))
    assert keys == ["[1, 7]", "[2, 44]"]
    out: list[str] = []
    assert admin.requeue(settings, list(settings.jobs), [" [1,7] "], out.append)  # spacing as typed
    assert out == ["job src: 1 row(s) released ([1, 7])"]
    assert not admin.requeue(settings, list(settings.jobs), ["[1, 8]"], out.append)
    assert out[-1] == "job src: not quarantined, nothing done: (tenant, id) = [1, 8]"
    assert [r[0] for r in world.sql("SELECT key FROM etl.quarantine")] == ["[2, 44]"]


# --- NULL keys: never claimed, counted in status; the run ends ----------------------------------

def test_rows_with_a_null_key_are_never_claimed_and_the_run_ends(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint UNIQUE, name text, processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g, 'r', false FROM generate_series(1, 300) g;"
              " INSERT INTO src VALUES (NULL, 'no key', false), (NULL, 'no key either', false)")
    settings = world.settings(batch_size="100", chunk_size="100")
    started = time.monotonic()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.batches, result.rows_marked) == (OK, 3, 300)
    assert time.monotonic() - started < 30
    assert world.sql("SELECT count(*) FROM etl.batches") == [(3,)]  # no empty batches recorded
    assert target_count(world) == 300
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed AND id IS NULL") == [(2,)]
    lines: list[str] = []
    report.status(settings, lines.append)
    assert "  cannot move: 2 row(s) with a NULL key (id); they are never claimed" in lines
    assert run_job(settings, settings.jobs[0]).status == IDLE


def test_a_composite_key_with_a_nullable_part_skips_only_rows_with_a_null(world: World) -> None:
    world.sql("CREATE TABLE src (a int, b int, processed boolean NOT NULL DEFAULT false);"
              " CREATE UNIQUE INDEX ON src (a, b) NULLS NOT DISTINCT;"
              " INSERT INTO src SELECT g, g, false FROM generate_series(1, 50) g;"
              " INSERT INTO src VALUES (51, NULL, false)")
    settings = world.settings(source_key="a, b")
    assert run_job(settings, settings.jobs[0]).rows_marked == 50
    assert target_count(world) == 50


# --- the transform's key contract ---------------------------------------------------------------

BREAKERS = {
    "drops_key": ("return df.drop(columns=['id'])", "returned no key column id (dropped or renamed)"),
    "renames_key": ("return df.rename(columns={'id': 'order_id'})", "returned no key column id"),
    "rekeys": ("df['id'] = df['id'] + 100000\n    return df", "which is not a key of the rows it was given"),
    "duplicates": ("import pandas as pd\n    return pd.concat([df, df.head(1)])", "more than once (duplicated rows)"),
    "nulls_key": ("df['id'] = df['id'].where(df['id'] != 5)\n    return df", "set a key (id) to NULL"),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_a_transform_that_breaks_the_key_fails_the_run_and_nothing_moves(world: World, case: str) -> None:
    body, words = BREAKERS[case]
    world.make_source(300)
    result = run_with_transform(world, case, f"def run(df):\n    {body}\n")
    assert result.status == FAILED and words in result.message
    assert f"transform tx_{case}_{world.ch_database}:run" in result.message
    assert (result.rows_loaded, result.rows_quarantined) == (0, 0)
    assert (processed(world), target_count(world)) == (0, 0)
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]


def test_a_transform_may_drop_rows_and_they_count_as_handled(world: World) -> None:
    world.make_source(300)
    result = run_with_transform(world, "drop", "def run(df):\n    return df[df['id'] % 2 == 0]\n")
    assert (result.status, result.rows_loaded, result.rows_marked) == (OK, 150, 300)
    assert world.ch_rows(f"SELECT count(), sum(id % 2) FROM {world.target()}") == [(150, 0)]


def test_a_run_that_can_mark_nothing_stops_instead_of_spinning(world: World) -> None:
    # A transform that touches its rows in PostgreSQL: every row changes between claim and mark.
    world.make_source(1000)
    result = run_with_transform(
        world, "touch", "import psycopg2\n"
        f"DSN = {world.pg_dsn!r}\n"
        "def run(df):\n"
        "    with psycopg2.connect(DSN) as c, c.cursor() as cur:\n"
        "        cur.execute('UPDATE src SET name = name WHERE id = ANY(%s)', (list(map(int, df['id'])),))\n"
        "    return df\n", batch_size="100", chunk_size="100")
    assert result.status == FAILED
    assert "3 batches in a row were claimed and none of their rows could be marked" in result.message
    # the 4th batch may be claimed while the 3rd is still being marked (marking overlaps the next batch)
    assert world.sql("SELECT count(*) FROM etl.batches")[0][0] in (3, 4)
    assert processed(world) == 0


# --- one source, one owner: a renamed job ------------------------------------------------------

def test_a_renamed_job_never_claims_the_old_names_keys_and_adopts_its_batch(world: World) -> None:
    world.make_source(2500)
    old = world.settings(job_name="orders", ready_query="SELECT 0", ready_timeout="0.2", ready_poll_interval="0.1")
    waiting = run_job(old, old.jobs[0])
    assert (waiting.status, waiting.rows_loaded) == (WAITING, 1000)  # batch 1 loaded, never ready
    new = world.settings(job_name="orders_v2")
    renamed = run_job(new, new.jobs[0])
    assert (renamed.status, renamed.rows_marked) == (OK, 1500)  # every row but the old batch's
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(2500, 2500)]
    lines: list[str] = []
    assert not report.status(new, lines.append)
    assert any("batch 1 of job 'orders' (not this job) holds 1000 key(s) of this source: loaded" in ln for ln in lines)
    out: list[str] = []
    assert not admin.release(new, new.jobs[0], 1, False, out.append)  # loaded: releasing would reload
    assert "would be loaded twice" in out[-1]
    assert admin.adopt(new, new.jobs[0], 1, out.append)
    finished = run_job(new, new.jobs[0])
    assert (finished.status, finished.rows_marked, finished.rows_loaded) == (OK, 1000, 0)
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(2500, 2500)]
    assert processed(world) == 2500


def test_a_removed_jobs_claimed_batch_is_released_after_clickhouse_shows_none_of_it(world: World) -> None:
    world.make_source(1500)
    old = world.settings(job_name="orders", fail_at="mid_extract", retry_attempts="1")
    assert run_job(old, old.jobs[0]).status == FAILED  # batch 1 claimed, nothing loaded
    new = world.settings(job_name="orders_v2")
    assert run_job(new, new.jobs[0]).rows_marked == 500
    out: list[str] = []
    assert not admin.adopt(new, new.jobs[0], 99, out.append)
    assert "batch 99 is not an unfinished batch of another job" in out[-1]
    assert admin.release(new, new.jobs[0], 1, False, out.append), out
    assert run_job(new, new.jobs[0]).rows_marked == 1000
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(1500, 1500)]


def test_two_jobs_on_one_source_and_flag_are_a_configuration_error(world: World) -> None:
    jobs = world.tmp / "jobs.toml"
    jobs.write_text('[jobs.a]\nsource_table = "public.src"\n[jobs.b]\nsource_table = "src"\ntarget_table = "d2"\n')
    once = cli("--once", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_JOBS_FILE=str(jobs))))
    assert once.returncode == 78
    assert "jobs 'a' and 'b' both consume public.src through the flag column 'processed'" in once.stderr


# --- values of any size ------------------------------------------------------------------------

def test_values_larger_than_a_parse_block_arrive_intact(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, doc text, blob bytea,"
              " processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g, 'small ' || g, NULL, false FROM generate_series(1, 200) g;"
              " UPDATE src SET doc = repeat('x,\"y\n', 5 * 1024 * 1024) WHERE id = 50;"  # 25 MB of CSV-hostile text
              " UPDATE src SET blob = decode(repeat('ab', 9 * 1024 * 1024), 'hex') WHERE id = 150")  # 18 MB as hex
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 200, 0)
    doc_md5 = world.sql("SELECT md5(doc) FROM src WHERE id = 50")[0][0]
    blob_md5 = world.sql("SELECT md5(blob) FROM src WHERE id = 150")[0][0]
    got = world.ch_rows(f"SELECT length(doc), lower(hex(MD5(doc))) FROM {world.target()} WHERE id = 50")
    assert got == [(25 * 1024 * 1024, doc_md5)]
    got = world.ch_rows(f"SELECT length(blob), lower(hex(MD5(blob))) FROM {world.target()} WHERE id = 150")
    assert got == [(9 * 1024 * 1024, blob_md5)]
    assert hashlib.md5(b"small 7").hexdigest() == world.ch_rows(
        f"SELECT lower(hex(MD5(doc))) FROM {world.target()} WHERE id = 7")[0][0]



def test_chunks_end_by_bytes_and_a_resumed_batch_sends_the_same_chunks(world: World) -> None:
    # 2000 rows; ids 300-339 hold 200 kB of text each and id 1500 a 3 MB bytea (6 MB as hex):
    # by rows alone the batch is 2 chunks of 1000.
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, doc text, blob bytea, processed boolean NOT NULL"
              " DEFAULT false);"
              " INSERT INTO src SELECT g, 'small ' || g, NULL, false FROM generate_series(1, 2000) g;"
              " UPDATE src SET doc = repeat(md5(id::text), 6400) WHERE id BETWEEN 300 AND 339;"
              " UPDATE src SET blob = decode(repeat('cd', 3 * 1024 * 1024), 'hex') WHERE id = 1500")
    limit = 1024 * 1024
    settings = world.settings(batch_size="2000", chunk_size="1000", chunk_bytes="1MiB", fail_at="between_chunks:3")
    result = run_job(settings, settings.jobs[0])  # fails after the 3rd chunk once; the retry resumes
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 2000, 0)
    ends = world.sql("SELECT chunk_ends FROM etl.batches")[0][0]
    assert ends[-1] == 2000 and ends == sorted(ends) and 1000 in ends  # the row bound still holds
    sizes = dict(world.sql("SELECT id, 8 + coalesce(octet_length(doc), 0) + 2 * coalesce(octet_length(blob), 0) + 3"
                           " FROM src"))  # what the claim counts: the key's 8 bytes, texts, bytea as hex, separators
    first = 1
    for last in ends:
        chunk = sum(sizes[i] for i in range(first, last + 1))
        assert chunk <= limit + max(sizes[i] for i in range(first, last + 1)), (first, last, chunk)
        first = last + 1
    assert len(ends) >= 10  # 8 MB of text and 6 MB of hex in chunks of about 1 MB
    assert ch_summary(world) == (2000, 2000, 2001000)
    doc_md5 = world.sql("SELECT md5(string_agg(doc, '' ORDER BY id)) FROM src")[0][0]
    assert world.ch_rows(f"SELECT lower(hex(MD5(arrayStringConcat(groupArray(doc))))) FROM"
                         f" (SELECT doc FROM {world.target()} ORDER BY id)")[0][0] == doc_md5
    assert world.ch_rows(f"SELECT length(blob) FROM {world.target()} WHERE id = 1500") == [(3 * 1024 * 1024,)]


def test_chunks_end_exactly_where_rows_or_bytes_cross_a_limit(world: World) -> None:
    # 300 rows of 1 to 40,000 bytes in an irregular pattern; chunks of at most 7 rows or 64 KiB
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, doc text, n integer, processed boolean NOT NULL"
              " DEFAULT false); INSERT INTO src SELECT g, repeat('x', (g * 7919) % 40000 + 1), g, false"
              " FROM generate_series(1, 300) g")
    settings = world.settings(batch_size="300", chunk_size="7", chunk_bytes="64KiB")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 300)
    ends = world.sql("SELECT chunk_ends FROM etl.batches")[0][0]
    # The definition: row p ends a chunk when it is the last, when it is the 7th, 14th, ... row, or
    # when the bytes up to it and up to the next row lie on two sides of a multiple of 64 KiB.
    # Bytes: the key's 8, the text's length, the integer's 4 and a separator per column.
    sizes = [8 + (g * 7919) % 40000 + 1 + 4 + 3 for g in range(1, 301)]
    totals = [sum(sizes[:p]) for p in range(1, 301)]
    limit = 64 * 1024
    expected = [p for p in range(1, 301) if p == 300 or p % 7 == 0
                or (totals[p - 1] - 1) // limit != (totals[p] - 1) // limit]
    assert ends == expected
    assert ch_summary(world) == (300, 300, 45150)


def test_compressed_jsonb_and_arrays_count_their_full_size_in_chunks(world: World) -> None:
    # 40 jsonb values and 40 arrays of about 200 kB each that PostgreSQL compresses to a few kB
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, doc jsonb, tags text[], processed boolean NOT NULL"
              " DEFAULT false);"
              " INSERT INTO src SELECT g, jsonb_build_object('k', repeat('z', 200000)), NULL, false"
              " FROM generate_series(1, 40) g;"
              " INSERT INTO src SELECT g, NULL, array_fill('abcdefghij'::text, ARRAY[20000]), false"
              " FROM generate_series(41, 80) g")
    assert world.sql("SELECT max(pg_column_size(doc)) < 20000 FROM src")[0][0]  # compressed indeed
    settings = world.settings(chunk_bytes="1MiB")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 80)
    ends = world.sql("SELECT chunk_ends FROM etl.batches")[0][0]
    assert len(ends) >= 14, ends  # 16 MB of text in about 1 MiB chunks (counted compressed: one chunk)
    assert ch_summary(world) == (80, 80, 3240)

def test_chunk_bytes_must_be_a_size(world: World) -> None:
    for bad in ("0", "16 MBs", "-1", "lots"):
        with pytest.raises(ConfigError, match="ETL_CHUNK_BYTES: must be a size"):
            world.settings(chunk_bytes=bad)
    assert world.settings(chunk_bytes="64 kib").jobs[0].chunk_bytes == 64 * 1024

# --- permanent errors are configuration errors -------------------------------------------------

@pytest.fixture
def password_role(world: World) -> str:
    """A role that must log in with a password (scram), on the shared server: returns its name."""
    role = f"pw_{world.ch_database}"
    world.sql(f"CREATE ROLE {role} LOGIN PASSWORD 'right-secret'")
    hba = world.sql("SHOW hba_file")[0][0]
    with open(hba, encoding="utf-8") as f:
        original = f.read()
    with open(hba, "w", encoding="utf-8") as f:
        f.write(f"local all {role} scram-sha-256\nhost all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    world.sql("SELECT pg_reload_conf()")
    yield role
    with open(hba, "w", encoding="utf-8") as f:
        f.write(original)
    world.sql("SELECT pg_reload_conf()")


def test_wrong_password_exits_78_at_once_naming_the_variable(world: World, password_role: str) -> None:
    world.make_source(10)
    from psycopg2.extensions import make_dsn
    dsn = make_dsn(world.pg_dsn, user=password_role, password="wrong-secret")
    env_file = write_env(world, world.tmp / "chdb", PG_DSN=dsn)
    for args in (("--once",), ()):  # --once, and the daemon at start
        started = time.monotonic()
        proc = cli(*args, "--env-file", str(env_file), timeout=60)
        assert proc.returncode == 78, proc.stderr
        assert time.monotonic() - started < 20
        assert "PG_PASSWORD" in proc.stderr and "password authentication failed" in proc.stderr
        assert "wrong-secret" not in proc.stderr and "retrying" not in proc.stderr
    assert processed(world) == 0


def test_a_running_daemon_fails_runs_on_a_changed_password_without_a_retry_loop(world: World,
                                                                                password_role: str) -> None:
    world.make_source(10)
    world.sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {password_role}; GRANT CREATE ON DATABASE"
              f" {world.ch_database} TO {password_role}")
    from psycopg2.extensions import make_dsn
    dsn = make_dsn(world.pg_dsn, user=password_role, password="right-secret")
    log = world.tmp / "daemon.log"
    with running("--env-file", str(write_env(world, world.tmp / "chdb", PG_DSN=dsn, ETL_SCHEDULE="* * * * * *",
                                               ETL_RETRY_BACKOFF="0.2")), log=log) as daemon:
        wait_for(lambda: processed(world) == 10, 60, "the first run")
        world.sql(f"ALTER ROLE {password_role} PASSWORD 'rotated-secret'")
        wait_for(lambda: log.read_text().count("configuration error: PG_PASSWORD") >= 2, 30, "failed runs")
        assert daemon.poll() is None  # the daemon stays up, each scheduled run tries once
        assert stop(daemon) == 0
    text = log.read_text()
    assert "retrying" not in text and "rotated-secret" not in text and "right-secret" not in text


@pytest.mark.parametrize(("change", "variable", "words"), [
    ({"user": "nobody_here"}, "PG_USER", 'role "nobody_here" does not exist'),
    ({"dbname": "no_such_db"}, "PG_DATABASE", 'database "no_such_db" does not exist'),
])
def test_unknown_role_or_database_exits_78(world: World, change: dict[str, str], variable: str, words: str) -> None:
    from psycopg2.extensions import make_dsn
    proc = cli("--once", "--env-file", str(write_env(world, world.tmp / "chdb", PG_DSN=make_dsn(world.pg_dsn,
                                                                                               **change))))
    assert proc.returncode == 78, proc.stderr
    assert f"configuration error: {variable}: " in proc.stderr and words in proc.stderr


def test_missing_privileges_are_configuration_errors_and_check_names_them(world: World) -> None:
    world.make_source(10)
    role = f"ro_{world.ch_database}"
    world.sql(f"CREATE ROLE {role} LOGIN; GRANT SELECT ON src TO {role}")  # no UPDATE, no CREATE
    from psycopg2.extensions import make_dsn
    settings = world.settings()
    import dataclasses
    limited = dataclasses.replace(settings, pg_dsn=make_dsn(world.pg_dsn, user=role))
    result = run_job(limited, limited.jobs[0])
    assert (result.status, result.permanent) == (FAILED, True)
    assert "configuration error: PG_USER" in result.message and "permission denied" in result.message
    lines: list[str] = []
    assert not checks.check(limited, lines.append)
    failed = [line for line in lines if "FAIL PG_USER: lacks privileges" in line]
    assert failed and f'GRANT UPDATE ("processed") ON "public"."src" TO "{role}"' in failed[0]
    assert "GRANT SELECT" not in failed[0]
    assert processed(world) == 0


# --- rough edges an operator meets -------------------------------------------------------------

def test_status_into_a_closed_pipe_and_requeue_of_an_unknown_key(world: World) -> None:
    world.make_source(10)
    env_file = write_env(world, world.tmp / "chdb")
    assert cli("--once", "--env-file", str(env_file)).returncode == 0
    import subprocess
    piped = subprocess.run(f"{sys.executable} -m etl_service status --env-file {env_file} | true", shell=True,
                           capture_output=True, text=True, timeout=60, cwd=str(REPO), env=clean_env())
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
    requeue = cli("requeue", "--key", "5", "--env-file", str(env_file))
    assert requeue.returncode == 1
    assert "job src: not quarantined, nothing done: id = 5" in requeue.stdout
    bad_key = cli("requeue", "--key", "five", "--env-file", str(env_file))
    assert bad_key.returncode == 1 and "'five' is not a key of public.src (id; e.g. 42)" in bad_key.stdout


def test_requeue_leaves_a_row_of_an_unfinished_batch_quarantined_until_the_batch_is_marked(world: World) -> None:
    # Row 5 fails the transform and is quarantined; its batch is loaded and waits for readiness.
    # Released now, the mark would flag it although it never reached ClickHouse.
    world.make_source(20)
    fives = "def run(df):\n    if (df['id'] == 5).any():\n        raise ValueError('five')\n    return df\n"
    waiting = run_with_transform(world, "fives", fives, ready_query="SELECT 0", ready_timeout="0.2",
                                 ready_poll_interval="0.05")
    assert (waiting.status, waiting.rows_quarantined) == (WAITING, 1)
    settings = world.settings()
    out: list[str] = []
    assert not admin.requeue(settings, list(settings.jobs), ["5"], out.append)
    assert out[-1].startswith("job src: 1 row(s) stay quarantined until their batch is done") and \
        out[-1].endswith(": 5 (batch 1, loaded)"), out
    assert not admin.requeue(settings, list(settings.jobs), None, out.append)  # all rows: the same
    assert world.sql("SELECT key FROM etl.quarantine") == [("5",)]
    done = run_job(settings, settings.jobs[0])  # the batch is marked without row 5
    assert (done.status, done.rows_marked) == (OK, 19)
    assert world.sql("SELECT processed FROM src WHERE id = 5") == [(False,)]
    assert admin.requeue(settings, list(settings.jobs), ["5"], out.append)  # now it goes
    assert run_job(settings, settings.jobs[0]).rows_marked == 1
    assert ch_summary(world) == (20, 20, 210) and processed(world) == 20


def test_a_batch_resumed_after_a_quarantine_counts_its_quarantined_rows_once(world: World) -> None:
    # Rows 3 (chunk 1) and 33 (chunk 4, the last) fail the transform. A failure after the last
    # insert, before chunk 4 is recorded, makes the run retry: the retry resumes at chunk 4 and
    # meets row 33 again; row 3 it does not meet at all.
    world.make_source(40)
    code = "def run(df):\n    if df['id'].isin([3, 33]).any():\n        raise ValueError('bad')\n    return df\n"
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m).strip()), level="INFO", format="{message}")
    try:
        result = run_with_transform(world, "three33", code, chunk_size="10", fail_at="after_last_insert:1")
    finally:
        logger.remove(sink_id)
    assert (result.status, result.rows_quarantined, result.rows_marked) == (OK, 2, 38)
    done = [line for line in lines if line.startswith("batch 1 done")]
    assert len(done) == 1 and done[0].startswith("batch 1 done: 40 rows claimed, 38 marked processed,"
                                                 " 2 quarantined in "), done  # not "1 changed since claim"
    assert sum(1 for line in lines if line.startswith("row id=33 quarantined")) == 1
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(2,)]


def test_status_shows_a_subset_of_the_quarantine_with_how_many_more(world: World) -> None:
    world.make_source(80)
    sevens = "def run(df):\n    if (df['id'] % 10 == 7).any():\n        raise ValueError('no sevens')\n    return df\n"
    assert run_with_transform(world, "picky", sevens).rows_quarantined == 8
    settings = world.settings()
    lines: list[str] = []
    assert not report.status(settings, lines.append)  # rows are quarantined: needs attention
    assert "  quarantined rows: 8 (release with `requeue` after fixing them)" in lines
    assert sum(1 for line in lines if line.startswith("    id=")) == 5
    assert "    and 3 more" in lines


def test_a_transform_that_fails_every_row_logs_no_quarantine_lines(world: World) -> None:
    world.make_source(50)
    (world.tmp / "always_fails.py").write_text("def run(df):\n    raise ValueError('broken')\n")
    once = cli("--once", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_TRANSFORM="always_fails:run")),
               path=world.tmp)
    assert once.returncode == 1
    assert "nothing was quarantined" in once.stderr
    assert " quarantined: " not in once.stderr
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]


def test_a_broken_transform_quarantines_nothing_when_chunks_hold_fewer_than_ten_rows(world: World) -> None:
    # rows of about 1 kB, chunks of 4 KiB: 3 rows each; the transform reads a column that does not exist
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, doc text, processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g, repeat('d', 1000), false FROM generate_series(1, 60) g")
    typo = "def run(df):\n    df['total'] = df['amount'] * 2\n    return df\n"
    result = run_with_transform(world, "typo", typo, chunk_bytes="4KiB", quarantine_limit="20")
    assert result.status == FAILED and "nothing was quarantined" in result.message, result.message
    assert result.rows_quarantined == 0
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(0,)]
    assert world.sql("SELECT chunks_loaded, array_length(chunk_ends, 1) > 10 FROM etl.batches") == [(0, True)]
    settings = world.settings(chunk_bytes="4KiB")  # fixed: the same batch goes, every row of it
    assert (run_job(settings, settings.jobs[0]).rows_marked, processed(world)) == (60, 60)
    assert ch_summary(world) == (60, 60, 1830)


@pytest.mark.parametrize(("code", "job", "status", "marked", "left"), [
    # every row fails, in batches of 8 rows: ten rows in a row of whole chunks span two batches
    ("def run(df):\n    raise ValueError('broken')\n", {"batch_size": "8", "chunk_size": "4"}, FAILED, 0, 0),
    # rows fail from id 15 on: row 15 ends a chunk whose other rows went (it stays quarantined);
    # 16-20 end the first batch of 20, 21-25 start the second: ten in whole chunks
    ("def run(df):\n    if (df['id'] >= 15).any():\n        raise ValueError('broken from 15')\n    return df\n",
     {"batch_size": "20", "chunk_size": "5"}, FAILED, 14, 1),
    # ids 4-13 fail but only 6-10 is a whole chunk: taken for bad rows (a chunk that inserted a row
    # is never sent again), quarantined, and loaded after the fix with `requeue`
    ("def run(df):\n    if df['id'].between(4, 13).any():\n        raise ValueError('4 to 13')\n    return df\n",
     {"batch_size": "20", "chunk_size": "5"}, OK, 50, 10),
], ids=["small-batches", "across-a-batch-end", "not-whole-chunks"])
def test_a_broken_transform_is_caught_across_chunks_and_batches(world: World, code: str, job: dict[str, str],
                                                                status: str, marked: int, left: int) -> None:
    world.make_source(60)
    result = run_with_transform(world, f"brk{marked}", code, **job)
    assert result.status == status, result.line()
    if status == FAILED:
        assert "nothing was quarantined" in result.message if not left else \
            f"they were not quarantined ({left} other row(s) of this run were" in result.message, result.message
    assert (result.rows_quarantined, processed(world)) == (left, marked)
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(left,)]  # an earlier batch's rows released too
    fixed = world.settings(**job)
    assert run_job(fixed, fixed.jobs[0]).status in (OK, IDLE)  # idle: only quarantined rows were left
    assert admin.requeue(fixed, list(fixed.jobs), None, [].append)
    assert run_job(fixed, fixed.jobs[0]).status in (OK, IDLE)
    assert processed(world) == 60 and ch_summary(world) == (60, 60, 1830)


def test_bad_rows_among_small_chunks_are_still_quarantined_alone(world: World) -> None:
    world.sql("CREATE TABLE src (id bigint PRIMARY KEY, doc text, processed boolean NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g, repeat('d', 1000), false FROM generate_series(1, 60) g")
    # 9 bad rows in a row (three whole chunks), then good ones: bad rows, not a broken transform
    picky = "def run(df):\n    if (df['id'].between(4, 12)).any():\n        raise ValueError('bad')\n    return df\n"
    result = run_with_transform(world, "picky9", picky, chunk_bytes="4KiB")
    assert (result.status, result.rows_quarantined, result.rows_marked) == (OK, 9, 51)
    assert world.sql("SELECT count(*) FROM etl.quarantine") == [(9,)]


def test_check_and_status_while_the_daemon_holds_the_chdb_folder(world: World) -> None:
    world.make_source(20)
    chdb = world.tmp / "chdb"
    env_file = write_env(world, chdb, ETL_SCHEDULE="0 0 1 1 *")
    with running("--env-file", str(env_file), log=world.tmp / "daemon.log") as daemon:
        wait_for(lambda: processed(world) == 20, 60, "the first run")
        check = cli("check", "--env-file", str(env_file))
        status = cli("status", "--env-file", str(env_file))
        assert stop(daemon) == 0
    assert check.returncode == 0, check.stdout
    assert f"held by process {daemon.pid}" in check.stdout and "the ClickHouse part is not checked" in check.stdout
    assert "20 unprocessed row(s)" not in check.stdout and "0 unprocessed row(s)" in check.stdout
    assert "next runs: " in check.stdout
    assert "DB::Exception" not in check.stdout + check.stderr and "Code:" not in check.stdout
    assert status.returncode == 0 and "batches=1 loaded=20 marked=20" in status.stdout


def test_a_chdb_folder_that_cannot_be_created_is_a_configuration_error(world: World) -> None:
    world.make_source(5)
    blocker = world.tmp / "a-file"
    blocker.write_text("not a folder")
    once = cli("--once", "--env-file", str(write_env(world, blocker / "chdb")))
    assert once.returncode == 78, once.stderr
    assert f"CLICK_DSN: the chDB folder {blocker / 'chdb'} cannot be created" in once.stderr
    assert "in use" not in once.stderr


def test_status_and_metrics_say_how_far_behind_a_job_is(world: World) -> None:
    world.make_source(50)
    world.sql("UPDATE src SET ts = now() - CASE WHEN id = 7 THEN interval '2 hours' ELSE interval '1 minute' END")
    settings = world.settings(lag_column="ts", ready_query="SELECT 0", ready_timeout="0.1",
                              ready_poll_interval="0.05", batch_size="20", chunk_size="20")
    import dataclasses
    with_metrics = dataclasses.replace(settings, metrics_port=1)  # gauges are read after each run
    assert run_job(with_metrics, with_metrics.jobs[0]).status == WAITING  # batch 1 loaded, never ready
    from etl_service.run import metrics
    lag = metrics.LAG.labels("src")._value.get()
    assert 7190 < lag < 7300 and metrics.WAITING.labels("src")._value.get() == 1
    lines: list[str] = []
    report.status(settings, lines.append)
    backlog = next(line for line in lines if line.startswith("  backlog:"))
    assert backlog.startswith("  backlog: 50 unprocessed row(s); the oldest waits 2.0 h"), backlog
    assert any(line.endswith("(1 loaded, waiting for readiness)") for line in lines), lines
    assert "  last success: never" in lines
    wrong = world.settings(lag_column="name")  # text, not a timestamp
    result = run_job(wrong, wrong.jobs[0])
    assert result.permanent and "ETL_LAG_COLUMN" in result.message


# --- found by an adversarial operator ---------------------------------------------------------

def hold(world: World, **job: str) -> None:
    """One run that loads a batch and leaves it loaded (readiness never comes)."""
    settings = world.settings(ready_query="SELECT 0", ready_timeout="0.2", ready_poll_interval="0.05", **job)
    assert run_job(settings, settings.jobs[0]).status == WAITING


def test_two_consumers_with_their_own_flags_never_load_a_row_twice(world: World) -> None:
    world.sql("CREATE TABLE src (id int PRIMARY KEY, v text, p1 bool NOT NULL DEFAULT false,"
              " p2 bool NOT NULL DEFAULT false); INSERT INTO src SELECT g, 'v' || g FROM generate_series(1, 12) g")
    a = {"job_name": "ja", "processed_column": "p1", "target_table": "dst_a", "columns": "id, v"}
    b = {"job_name": "jb", "processed_column": "p2", "target_table": "dst_b", "columns": "id, v"}
    hold(world, **b)  # jb's batch holds every key, loaded, waiting
    first_a = world.settings(**a)
    assert run_job(first_a, first_a.jobs[0]).rows_marked == 0  # ja leaves jb's keys alone meanwhile
    second_b = world.settings(**b)
    assert run_job(second_b, second_b.jobs[0]).rows_marked == 12  # jb marks them: nothing looked changed
    assert run_job(first_a, first_a.jobs[0]).rows_marked == 12
    for table in ("dst_a", "dst_b"):
        assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target(table)}") == [(12, 12)]
    assert world.sql("SELECT count(*) FROM src WHERE p1 AND p2") == [(12,)]


def test_a_rewrite_or_truncate_between_load_and_mark_loses_no_row(world: World) -> None:
    world.make_source(8)
    hold(world)
    world.sql("UPDATE src SET name = 'NEW' WHERE id = 3")
    conn = world.pg()
    try:
        conn.cursor().execute("VACUUM FULL src")  # keeps xmins, new storage
    finally:
        conn.close()
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, world.sql("SELECT count(*) FROM src WHERE NOT processed")) == (OK, [(0,)])
    assert world.ch_rows(f"SELECT name FROM {world.target()} WHERE id = 3 ORDER BY _etl_batch") == \
        [("row 3",), ("NEW",)]  # the update after extraction arrives as the row's new version
    world.sql("INSERT INTO src SELECT g, g, 'second', now() FROM generate_series(100, 104) g")
    hold(world)
    world.sql("TRUNCATE src; INSERT INTO src SELECT g, g, 'third', now() FROM generate_series(100, 104) g")
    assert run_job(settings, settings.jobs[0]).status == OK
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]
    assert world.ch_rows(f"SELECT name, count() FROM {world.target()} WHERE id >= 100 GROUP BY name ORDER BY name") \
        == [("second", 5), ("third", 5)]  # the refill is loaded, not marked unseen


def test_a_type_rewrite_between_load_and_mark_loads_the_batch_again_and_says_why(world: World) -> None:
    # Loading twice is the lesser harm: an update made before the rewrite cannot be told apart.
    world.sql("CREATE TABLE src (id int PRIMARY KEY, n int, v text, processed bool NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g, g, 'old' FROM generate_series(1, 30) g")
    hold(world)
    world.sql("UPDATE src SET v = 'new' WHERE id <= 3")
    world.sql("ALTER TABLE src ALTER COLUMN n TYPE bigint")  # every row gets the rewrite's xmin
    settings = world.settings()
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        assert run_job(settings, settings.jobs[0]).status == OK
    finally:
        logger.remove(sink_id)
    assert any("was rewritten by ALTER … TYPE while batch 1 was in flight" in line for line in lines), lines
    assert world.ch_rows(f"SELECT countIf(v = 'new'), uniqExact(id) FROM {world.target()}") == [(3, 30)]
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]


def test_a_table_with_inheritance_children_is_refused(world: World) -> None:
    world.sql("CREATE TABLE src (id int PRIMARY KEY, v text, processed bool NOT NULL DEFAULT false);"
              " CREATE TABLE src_child () INHERITS (src); INSERT INTO src VALUES (1, 'parent');"
              " INSERT INTO src_child VALUES (1, 'child')")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert result.permanent and "has child tables by inheritance" in result.message
    assert world.sql("SELECT count(*) FROM src WHERE processed") == [(0,)]


def test_a_primary_key_reordered_while_a_batch_is_unfinished(world: World) -> None:
    world.sql("CREATE TABLE src (a int NOT NULL, b int NOT NULL, v text, processed bool NOT NULL DEFAULT false,"
              " CONSTRAINT src_pk PRIMARY KEY (a, b)); INSERT INTO src VALUES (1, 2, 'one-two'), (2, 1, 'two-one')")
    hold(world, source_key="a, b")
    world.sql("ALTER TABLE src DROP CONSTRAINT src_pk; ALTER TABLE src ADD CONSTRAINT src_pk PRIMARY KEY (b, a)")
    settings = world.settings(source_key="a, b")
    assert run_job(settings, settings.jobs[0]).status == OK
    assert world.ch_rows(f"SELECT a, b, v FROM {world.target()} ORDER BY a") == [(1, 2, "one-two"), (2, 1, "two-one")]
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(0,)]


def test_a_target_dropped_while_a_batch_waits_is_loaded_again(world: World) -> None:
    world.make_source(8)
    hold(world)
    world.backend.ch().command(f"DROP TABLE {world.target()}")
    settings = world.settings()
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 8)
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(8, 8)]


def test_a_transform_keeps_nan_apart_from_null(world: World) -> None:
    world.sql("CREATE TABLE src (id float8 PRIMARY KEY, f float8, g float8 NOT NULL,"
              " processed bool NOT NULL DEFAULT false);"
              " INSERT INTO src VALUES (1, 'NaN', 1), (2, NULL, 'NaN'), ('NaN', 3, 3)")
    result = run_with_transform(world, "ident", "def run(df):\n    return df\n")
    assert (result.status, result.rows_marked, result.rows_quarantined) == (OK, 3, 0)
    rows = world.ch_rows(f"SELECT toString(id), toString(f), toString(g) FROM {world.target()} ORDER BY id")
    assert sorted(rows, key=str) == sorted([("1", "nan", "1"), ("2", None, "nan"), ("nan", "3", "3")], key=str)


def test_consumers_of_one_table_must_share_the_key(world: World) -> None:
    world.sql("CREATE TABLE src (id int PRIMARY KEY, code text UNIQUE NOT NULL, p1 bool NOT NULL DEFAULT false,"
              " p2 bool NOT NULL DEFAULT false); INSERT INTO src SELECT g, 'c' || g FROM generate_series(1, 10) g")
    hold(world, job_name="ja", processed_column="p1", target_table="dst_a", columns="id, code")
    other = world.settings(job_name="jb", processed_column="p2", target_table="dst_b", source_key="code",
                           columns="id, code")
    result = run_job(other, other.jobs[0])
    assert result.permanent and "give every job on a table the same ETL_SOURCE_KEY" in result.message
    jobs = world.tmp / "jobs.toml"
    jobs.write_text('[jobs.ja]\nsource_table = "src"\nprocessed_column = "p1"\n'
                    '[jobs.jb]\nsource_table = "src"\nprocessed_column = "p2"\nsource_key = "code"\n')
    once = cli("--once", "--env-file", str(write_env(world, world.tmp / "chdb", ETL_JOBS_FILE=str(jobs))))
    assert once.returncode == 78 and "with different keys" in once.stderr


def test_a_removed_second_consumers_batch_is_shown_and_can_be_forced_out(world: World) -> None:
    world.sql("CREATE TABLE src (id int PRIMARY KEY, p1 bool NOT NULL DEFAULT false, p2 bool NOT NULL DEFAULT false);"
              " INSERT INTO src SELECT g FROM generate_series(1, 30) g")
    hold(world, job_name="jb", processed_column="p2", target_table="dst_b", columns="id", batch_size="10")
    ja = world.settings(job_name="ja", processed_column="p1", target_table="dst_a", columns="id")
    assert run_job(ja, ja.jobs[0]).rows_marked == 20
    lines: list[str] = []
    report.status(ja, lines.append)
    assert any("batch 1 of job 'jb' (flag p2, loaded) holds 10 key(s)" in line for line in lines), lines
    out: list[str] = []
    assert not admin.release(ja, ja.jobs[0], 1, False, out.append)
    assert "belongs to job 'jb', which consumes the flag p2" in out[-1]
    assert admin.release(ja, ja.jobs[0], 1, True, out.append)
    assert run_job(ja, ja.jobs[0]).rows_marked == 10
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target('dst_a')}") == [(30, 30)]


def test_a_job_name_reused_on_another_table_does_not_resume_the_old_tables_batch(world: World) -> None:
    world.make_source(10)
    hold(world, job_name="jb")
    world.sql("CREATE TABLE other (id int PRIMARY KEY, processed bool NOT NULL DEFAULT false);"
              " INSERT INTO other SELECT g FROM generate_series(101, 110) g")
    reused = world.settings(job_name="jb", source_table="public.other", target_table="dst_other")
    assert run_job(reused, reused.jobs[0]).rows_marked == 10
    assert world.sql("SELECT state FROM etl.batches WHERE batch_id = 1") == [("loaded",)]  # src's, untouched
    back = world.settings(job_name="jb")
    assert run_job(back, back.jobs[0]).rows_marked == 10
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(10, 10)]


def test_a_dropped_target_is_loaded_again_even_without_verification(world: World) -> None:
    world.make_source(8)
    hold(world, verify_load="off")
    world.backend.ch().command(f"DROP TABLE {world.target()}")
    settings = world.settings(verify_load="off")
    assert run_job(settings, settings.jobs[0]).rows_marked == 8
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(8, 8)]


def test_a_half_loaded_batch_whose_target_was_dropped_is_loaded_whole(world: World) -> None:
    world.make_source(20)
    env = write_env(world, world.tmp / "chdb", ETL_BATCH_SIZE="10", ETL_CHUNK_SIZE="5", ETL_VERIFY_LOAD="off",
                    ETL_CRASH_AT="between_chunks")
    assert cli("--once", "--env-file", str(env)).returncode == -9  # killed after chunk 1 of batch 1
    from .helpers import chdb_query
    chdb_query(world.tmp / "chdb", f"DROP TABLE `{world.ch_database}`.dst")
    env = write_env(world, world.tmp / "chdb", ETL_BATCH_SIZE="10", ETL_CHUNK_SIZE="5", ETL_VERIFY_LOAD="off")
    once = cli("--once", "--env-file", str(env))
    assert once.returncode == 0 and "the target table was missing" in once.stderr
    assert chdb_query(world.tmp / "chdb", f"SELECT count(), uniqExact(id) FROM `{world.ch_database}`.dst") == \
        [[20, 20]]
    assert processed(world) == 20


def test_a_source_table_renamed_while_a_batch_waits_resumes_that_batch(world: World) -> None:
    world.make_source(20)
    hold(world, job_name="orders", batch_size="10")
    world.sql("ALTER TABLE src RENAME TO src_renamed")
    settings = world.settings(job_name="orders", source_table="public.src_renamed")
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 20)
    assert world.ch_rows(f"SELECT count(), uniqExact(id) FROM {world.target()}") == [(20, 20)]
