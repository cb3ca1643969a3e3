"""Settings: defaults, every bad value's message, env files, jobs files, secrets kept out of text."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from etl_service.errors import ConfigError
from etl_service.settings.reading import load, read_env, redact_pg_dsn

BASE = {"PG_DSN": "postgresql://etl:s3cret@db.example:5432/app", "CLICK_DSN": "chdb:///var/lib/etl/chdb",
        "ETL_SOURCE_TABLE": "public.orders"}


def bad(**changes: str) -> ConfigError:
    env = {**BASE, **changes}
    with pytest.raises(ConfigError) as info:
        load(environ={k: v for k, v in env.items() if v is not None})
    return info.value


def test_defaults_for_a_minimal_env() -> None:
    s = load(environ=BASE)
    job = s.jobs[0]
    assert (job.name, job.source_table, job.source_key, job.processed_column, job.target_table) == \
        ("orders", ("public", "orders"), ("id",), "processed", "orders")
    assert (job.schedule, job.timezone, job.batch_size, job.chunk_size) == ("*/5 * * * *", "UTC", 100000, 50000)
    assert (job.ready_query, job.ready_timeout, job.ready_poll_interval) == ("", 300.0, 5.0)
    assert s.clickhouse.kind == "chdb" and s.clickhouse.database == "default"
    assert s.ledger_schema == "etl"


def test_pg_parts_build_a_dsn_and_the_password_never_shows() -> None:
    env = {k: v for k, v in BASE.items() if k != "PG_DSN"}
    s = load(environ={**env, "PG_HOST": "pg1", "PG_PORT": "6432", "PG_USER": "etl", "PG_PASSWORD": "pw-123",
                      "PG_DATABASE": "shop"})
    assert "password=pw-123" in s.pg_dsn
    assert s.pg_display == "host=pg1 port=6432 dbname=shop user=etl"
    assert "pw-123" not in repr(s) and "s3cret" not in repr(load(environ=BASE))


def test_redact_handles_uris_and_garbage() -> None:
    assert redact_pg_dsn("postgresql://u:pw@h:1/d") == "host=h port=1 dbname=d user=u"
    assert redact_pg_dsn("not a dsn ===") == "<unparseable DSN>"
    tls = "postgresql://u:pw@h/d?sslmode=verify-full&sslrootcert=/etc/etl-service/pg-ca.pem&sslpassword=kp"
    assert redact_pg_dsn(tls) == "host=h dbname=d user=u sslmode=verify-full sslrootcert=/etc/etl-service/pg-ca.pem"


@pytest.mark.parametrize(("changes", "variable", "words"), [
    ({"ETL_SOURCE_TABLE": ""}, "ETL_SOURCE_TABLE", "is required"),
    ({"ETL_SCHEDULE": "every day"}, "ETL_SCHEDULE", "not a valid cron expression"),
    ({"ETL_SCHEDULE": "61 * * * *"}, "ETL_SCHEDULE", "not a valid cron expression"),
    ({"ETL_TIMEZONE": "Mars/Olympus"}, "ETL_TIMEZONE", "unknown time zone"),
    ({"ETL_BATCH_SIZE": "lots"}, "ETL_BATCH_SIZE", "must be a whole number"),
    ({"ETL_BATCH_SIZE": "0"}, "ETL_BATCH_SIZE", "greater than 0"),
    ({"ETL_BATCH_SIZE": "2147483648"}, "ETL_BATCH_SIZE", "must be at most 10000000"),
    ({"ETL_CHUNK_SIZE": "10000001"}, "ETL_CHUNK_SIZE", "must be at most 10000000"),
    ({"ETL_READY_TIMEOUT": "soon"}, "ETL_READY_TIMEOUT", "must be a number"),
    ({"ETL_TRANSFORM": "no_such_module_here:f"}, "ETL_TRANSFORM", "cannot import module"),
    ({"ETL_TRANSFORM": "json"}, "ETL_TRANSFORM", "module:function"),
    ({"ETL_TRANSFORM": "json:nope"}, "ETL_TRANSFORM", "has no function"),
    ({"PG_DSN": "host=db port"}, "PG_DSN", "not a valid libpq connection string"),
    ({"PG_DSN": "", "PG_PORT": "fivefourthreetwo"}, "PG_PORT", "must be a whole number"),
    ({"CLICK_DSN": "", "CLICK_PORT": "9000"}, "CLICK_PORT", "native TCP port"),
    ({"CLICK_DSN": "", "CLICK_PORT": "http"}, "CLICK_PORT", "must be a number"),
    ({"CLICK_DSN": "http://u:p@ch:9000/db"}, "CLICK_DSN", "use the HTTP interface port 8123"),
    ({"CLICK_DSN": "tcp://ch:8123"}, "CLICK_DSN", "must start with http://"),
    ({"CLICK_DSN": "chdb://relative/path"}, "CLICK_DSN", "must be absolute"),
    ({"ETL_LOG_LEVEL": "LOUD"}, "ETL_LOG_LEVEL", "use one of"),
    ({"ETL_SOURCE_KEY": "x" * 64}, "ETL_SOURCE_KEY", "not a usable identifier"),
    ({"ETL_JOBS_FILE": "/nonexistent/jobs.toml"}, "ETL_JOBS_FILE", "cannot read"),
    ({"PG_STATEMENT_TIMEOUT": "nan"}, "PG_STATEMENT_TIMEOUT", "must be a finite number"),
    ({"ETL_MAX_RUN_SECONDS": "inf"}, "ETL_MAX_RUN_SECONDS", "must be a finite number"),
    ({"ETL_PROGRESS_SECONDS": "NaN"}, "ETL_PROGRESS_SECONDS", "must be a finite number"),
    ({"ETL_CHUNK_BYTES": "99999999999999999999999"}, "ETL_CHUNK_BYTES", "at most 64GiB"),
    ({"ETL_CHUNK_BYTES": "8 MBs"}, "ETL_CHUNK_BYTES", "must be a size"),
])
def test_each_bad_value_names_its_variable(changes: dict[str, str], variable: str, words: str) -> None:
    err = bad(**changes)
    assert err.variable == variable
    assert words in str(err)
    assert "s3cret" not in str(err)


def test_native_port_error_suggests_8123() -> None:
    err = bad(CLICK_DSN="", CLICK_PORT="9000")
    assert "8123" in str(err)


def test_six_field_schedule_has_seconds_first() -> None:
    job = load(environ={**BASE, "ETL_SCHEDULE": "*/10 * * * * *", "ETL_TIMEZONE": "Europe/Berlin"}).jobs[0]
    trigger = job.trigger()
    start = datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)
    fire = trigger.get_next_fire_time(None, start)
    assert fire is not None and fire.astimezone(UTC) == datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)


def test_five_field_schedule_in_its_time_zone() -> None:
    job = load(environ={**BASE, "ETL_SCHEDULE": "30 2 * * *", "ETL_TIMEZONE": "Europe/Berlin"}).jobs[0]
    fire = job.trigger().get_next_fire_time(None, datetime(2026, 7, 1, 0, 0, tzinfo=UTC))
    assert fire is not None and fire.astimezone(UTC) == datetime(2026, 7, 1, 0, 30, tzinfo=UTC)  # CEST = UTC+2


def test_columns_select_and_rename() -> None:
    job = load(environ={**BASE, "ETL_COLUMNS": "id, amount:total ,created_at"}).jobs[0]
    assert job.columns == (("id", "id"), ("amount", "total"), ("created_at", "created_at"))


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "my.env"
    env_file.write_text("ETL_SOURCE_TABLE=sales.orders  # a comment\nETL_SCHEDULE=*/2 * * * *\n"
                        "ETL_BATCH_SIZE=10\n")
    merged, _ = read_env(str(env_file), {"ETL_BATCH_SIZE": "20"})
    assert (merged["ETL_SOURCE_TABLE"], merged["ETL_SCHEDULE"], merged["ETL_BATCH_SIZE"]) == \
        ("sales.orders", "*/2 * * * *", "20")


def test_unreadable_env_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_env(str(tmp_path / "missing.env"), {})
    assert info.value.variable == "--env-file"


def test_env_example_is_a_valid_configuration() -> None:
    example = Path(__file__).resolve().parents[2] / ".env.example"
    env, _ = read_env(str(example), {})
    settings = load(environ={**env, "CLICK_DSN": "chdb:///tmp/x"})
    assert settings.jobs[0].source_table == ("public", "orders")
    documented = {line.lstrip("#").split("=", 1)[0] for line in example.read_text().splitlines()
                  if re.match(r"#?[A-Z_]+=", line)}
    settings = Path(__file__).resolve().parents[2] / "etl_service" / "settings"
    source = "".join(path.read_text() for path in settings.glob("*.py"))
    read_in_code = set(re.findall(r'"((?:PG|CLICK|ETL)_[A-Z_]+)"', source))
    assert len(read_in_code) > 30
    assert read_in_code <= documented, f"undocumented: {sorted(read_in_code - documented)}"


def test_jobs_file_with_defaults_and_overrides(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[defaults]\nbatch_size = 5000\n\n[jobs.a]\nsource_table = "s.a"\n\n'
                    '[jobs.b]\nsource_table = "b"\nbatch_size = 7\nschedule = "0 * * * *"\n')
    s = load(environ={**BASE, "ETL_JOBS_FILE": str(jobs), "ETL_TIMEZONE": "Europe/Paris"})
    assert [(j.name, j.source_table, j.batch_size, j.schedule, j.timezone) for j in s.jobs] == [
        ("a", ("s", "a"), 5000, "*/5 * * * *", "Europe/Paris"),
        ("b", ("public", "b"), 7, "0 * * * *", "Europe/Paris")]
    assert s.job("b").chunk_size == 7  # never larger than the batch


def test_jobs_file_errors_name_the_job_and_key(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[jobs.a]\nsource_table = "a"\nscedule = "* * * * *"\n')
    err = bad(ETL_JOBS_FILE=str(jobs))
    assert "[jobs.a] scedule" in err.variable and "is not a job setting" in str(err)
    jobs.write_text('[jobs.a]\nsource_table = "a"\nschedule = "nope"\n')
    assert "[jobs.a] schedule" in bad(ETL_JOBS_FILE=str(jobs)).variable
    jobs.write_text("[jobs.a\n")
    assert "not valid TOML" in str(bad(ETL_JOBS_FILE=str(jobs)))


def test_unknown_job_name() -> None:
    with pytest.raises(ConfigError, match=r"no job named 'x'.*known jobs: orders"):
        load(environ=BASE).job("x")


def test_a_line_dotenv_cannot_parse_is_an_error_that_hides_the_value(tmp_path: Path) -> None:
    env_file = tmp_path / "broken.env"
    env_file.write_text("ETL_SOURCE_TABLE=orders\nPG_PASSWORD='it's-secret'\n")
    with pytest.raises(ConfigError) as info:
        read_env(str(env_file), {})
    assert info.value.variable == f"{env_file} line 2"
    assert "'PG_PASSWORD'" in str(info.value) and "secret" not in str(info.value)


def test_on_reload_the_edited_file_wins_over_values_it_put_in_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "etl.env"
    env_file.write_text("ETL_SOURCE_TABLE=orders\nETL_BATCH_SIZE=10\nCLICK_DSN=chdb:///tmp/x\n")
    # systemd's EnvironmentFile= put the file into the environment at start; ETL_CHUNK_SIZE came from elsewhere
    environ = {"ETL_SOURCE_TABLE": "orders", "ETL_BATCH_SIZE": "10", "CLICK_DSN": "chdb:///tmp/x",
               "ETL_CHUNK_SIZE": "5"}
    first = load(str(env_file), environ)
    assert (first.jobs[0].batch_size, first.jobs[0].chunk_size) == (10, 5)
    env_file.write_text("ETL_SOURCE_TABLE=orders\nETL_BATCH_SIZE=99\nCLICK_DSN=chdb:///tmp/x\nETL_CHUNK_SIZE=7\n")
    again = load(str(env_file), environ, previous=first)
    assert (again.jobs[0].batch_size, again.jobs[0].chunk_size) == (99, 5)  # the environment's own value wins


def test_schedules_mean_what_crontab_means() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from etl_service.settings.cron import next_runs

    job = load(environ={**BASE, "ETL_SCHEDULE": "0 9 * * 1-5", "ETL_TIMEZONE": "Europe/Moscow"}).jobs[0]
    monday = datetime(2026, 11, 23, 10, 0, tzinfo=ZoneInfo("Europe/Moscow"))
    runs = next_runs(job.trigger(), 5, monday)
    assert [f"{r:%a %d %H:%M}" for r in runs] == ["Tue 24 09:00", "Wed 25 09:00", "Thu 26 09:00", "Fri 27 09:00",
                                                  "Mon 30 09:00"]
    sunday = load(environ={**BASE, "ETL_SCHEDULE": "0 9 * * 7"}).jobs[0]
    assert f"{next_runs(sunday.trigger(), 1, monday)[0]:%a}" == "Sun"
    with pytest.raises(ConfigError) as err:
        load(environ={**BASE, "ETL_SCHEDULE": "0 9 * * 8"})
    assert err.value.variable == "ETL_SCHEDULE" and "day-of-week" in str(err.value)


def test_passwords_come_from_files_or_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "pg").write_text("pg-from-file\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "click_password").write_text("ch-from-credential\n")
    env = {**BASE, "PG_DSN": "postgresql://etl@db.example:5432/app", "PG_PASSWORD_FILE": str(tmp_path / "pg"),
           "CLICK_DSN": "https://etl@ch.example:8443/analytics", "CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    settings = load(environ=env)
    assert "password=pg-from-file" in settings.pg_dsn
    assert settings.clickhouse.client_kwargs["password"] == "ch-from-credential"
    assert "pg-from-file" not in repr(settings) and "ch-from-credential" not in repr(settings)
    assert load(environ={**env, "PG_PASSWORD": "explicit"}).pg_dsn.count("password=explicit") == 1
    with pytest.raises(ConfigError) as err:
        load(environ={**env, "PG_PASSWORD_FILE": str(tmp_path / "missing")})
    assert err.value.variable == "PG_PASSWORD_FILE" and "cannot read" in str(err.value)


def test_clickhouse_tls_with_a_private_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {**BASE, "CLICK_DSN": "https://etl:pw@ch.example:8443/analytics", "CLICK_CA_CERT": str(ca)}
    kwargs = load(environ=env).clickhouse.client_kwargs
    assert (kwargs["secure"], kwargs["verify"], kwargs["ca_cert"]) == (True, True, str(ca))
    assert load(environ={**env, "CLICK_VERIFY": "false"}).clickhouse.client_kwargs["verify"] is False
    with pytest.raises(ConfigError) as err:
        load(environ={**env, "CLICK_CA_CERT": str(tmp_path / "nope.pem")})
    assert err.value.variable == "CLICK_CA_CERT"


def test_a_chdb_target_without_the_embedded_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chdb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        load(environ=BASE)
    assert err.value.variable == "CLICK_DSN" and "pip install 'etl-service[embedded]'" in str(err.value)


def test_the_flag_cannot_also_be_the_deleted_column() -> None:
    error = bad(ETL_PROCESSED_COLUMN="is_deleted", ETL_DELETED_COLUMN="is_deleted", ETL_TARGET_MODE="latest")
    assert error.variable == "ETL_DELETED_COLUMN"
    assert "'is_deleted' is also ETL_PROCESSED_COLUMN" in str(error) and "ETL_COLUMNS" not in str(error)
