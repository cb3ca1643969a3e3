"""The operator's story in a real systemd: install, start, journal, edit + restart, reload, kill -9,
a bad .env, stop — with rows moving the whole time and an exact end state.

Runs as root with systemd-nspawn (installed with apt-get when missing); skipped with the
reason otherwise. The rootfs and a wheelhouse are cached under ETL_TEST_CACHE.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from etl_service.postgres.embedded import postgres

from ..integration.helpers import wait_for
from . import nspawn

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
UNIT = "etl.service"
ENV = "/etc/etl-service/etl.env"


class Service:
    """The installed service inside a container, and the host PostgreSQL it reads."""

    def __init__(self, box: nspawn.Container, pg_uri: str) -> None:
        self.box = box
        self.pg_uri = pg_uri

    def sql(self, query: str) -> list[tuple[object, ...]]:
        with psycopg2.connect(self.pg_uri) as conn, conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else []

    def marked(self) -> int:
        return int(self.sql("SELECT count(*) FROM src WHERE processed")[0][0])

    def write_env(self, **settings: str) -> None:
        base = {"PG_DSN": self.pg_uri, "CLICK_DSN": "chdb:///var/lib/etl-service/chdb", "CLICK_DATABASE": "demo",
                "ETL_SOURCE_TABLE": "public.src", "ETL_TARGET_TABLE": "dst", "ETL_SCHEDULE": "*/2 * * * * *",
                "ETL_BATCH_SIZE": "500", "ETL_CHUNK_SIZE": "250", "ETL_RETRY_BACKOFF": "0.5"}
        text = "".join(f'{k}="{v}"\n' for k, v in {**base, **settings}.items())
        self.box.run("sh", "-c", f"cat > {ENV} <<'EOF'\n{text}EOF")

    def journal(self, *args: str) -> str:
        return self.box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", *args, check=False).stdout

    def chdb(self, query: str) -> list[list[object]]:
        code = ("import json, clickhouse_connect\n"
                "c = clickhouse_connect.get_client(dsn='chdb:///var/lib/etl-service/chdb')\n"
                f"print(json.dumps(c.query({query!r}).result_rows, default=str))")
        out = self.box.run("/opt/etl-service/venv/bin/python", "-c", code)
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    reason = nspawn.missing_tools()
    if reason:
        pytest.skip(reason)
    house = nspawn.wheelhouse(REPO)
    base = tmp_path_factory.mktemp("systemd")
    base.chmod(0o755)
    with postgres(base / "pgdata") as pg:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uri = pg.listen_tcp(port)
        with psycopg2.connect(uri) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), note text,"
                        " processed boolean NOT NULL DEFAULT false);"
                        "INSERT INTO src SELECT g, g * 0.5, 'n' || g, false FROM generate_series(1, 3000) g")
        with nspawn.booted({REPO: "/src", house: "/wheels"}, base / "nspawn.log") as box:
            installed = box.run("/src/deploy/install.sh", "--wheelhouse", "/wheels", "--embedded")
            assert "created /etc/etl-service/etl.env from .env.example" in installed.stdout
            assert "next: edit /etc/etl-service/etl.env, then: systemctl start etl.service" in installed.stdout
            assert box.show(UNIT, "ActiveState") == "inactive"  # not started on the example settings
            assert box.show(UNIT, "UnitFileState") == "enabled"
            yield Service(box, uri)


def test_unit_verifies_and_reports_its_exposure(service: Service) -> None:
    verify = service.box.run("systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}", check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = service.box.run("systemd-analyze", "security", "--no-pager", UNIT, check=False).stdout
    score = float(security.strip().splitlines()[-1].split("exposure level for etl.service:")[-1].split()[0])
    print(f"systemd-analyze security: {security.strip().splitlines()[-1]}")
    assert score <= 3.0


def test_start_is_ready_with_status_and_moves_rows(service: Service) -> None:
    service.write_env()
    service.box.run("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 was sent
    assert service.box.show(UNIT, "ActiveState") == "active"
    wait_for(lambda: service.marked() == 3000, 60, "the backlog to drain")
    wait_for(lambda: "last run:" in service.box.show(UNIT, "StatusText"), 20, "a STATUS= line")
    status = service.box.run("systemctl", "status", "--no-pager", UNIT, check=False).stdout
    assert "Status: \"last run: job=src status=" in status


def test_journal_has_summaries_and_priorities(service: Service) -> None:
    wait_for(lambda: "run finished: job=src status=ok" in service.journal(), 20, "a run summary")
    assert service.journal("-p", "err") .strip() == ""  # nothing has gone wrong yet
    service.sql("ALTER TABLE src RENAME TO src_away")
    try:
        wait_for(lambda: "status=failed" in service.journal("-p", "err"), 20, "an error line")
    finally:
        service.sql("ALTER TABLE src_away RENAME TO src")
    errors = service.journal("-p", "err")
    assert "does not exist in PostgreSQL" in errors
    assert "status=ok" not in errors and "status=idle" not in errors  # only errors at -p err


def journal_entries(service: Service, *args: str, unit: str = UNIT) -> list[dict[str, str]]:
    out = service.box.run("journalctl", "-u", unit, "--no-pager", "-o", "json", *args, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_journal_entries_carry_fields_to_filter_on(service: Service) -> None:
    entries = journal_entries(service, "JOB=src")
    summaries = [e for e in entries if "STATUS" in e]
    loaded = next(e for e in summaries if e["STATUS"] == "ok" and int(e["ROWS_LOADED"]) > 0)
    print("one journal entry (journalctl -u etl.service JOB=src -o json):")
    print(json.dumps(loaded, indent=1, sort_keys=True))
    assert loaded["_SYSTEMD_UNIT"] == UNIT and loaded["_TRANSPORT"] == "journal"
    assert loaded["SYSLOG_IDENTIFIER"] == "etl-service" and loaded["JOB"] == "src"
    assert loaded["PRIORITY"] == "6" and loaded["MESSAGE"].startswith("[job=src] run finished: job=src status=ok")
    assert loaded["CODE_FILE"].endswith("etl_service/run/pipeline.py") and loaded["CODE_FUNC"] == "execute"
    # the summaries' figures add up to what PostgreSQL shows (no rows were added since the start)
    assert sum(int(e["ROWS_MARKED"]) for e in summaries) == service.marked() == 3000
    assert sum(int(e["ROWS_LOADED"]) for e in summaries) == 3000
    assert all({"BATCHES", "ROWS_QUARANTINED", "SECONDS"} <= set(e) for e in summaries)
    batches = [e for e in entries if " done: " in e["MESSAGE"]]
    assert batches and all(e["MESSAGE"].startswith(f"[job=src batch={e['BATCH']}] batch {e['BATCH']} done: ")
                           for e in batches)
    assert journal_entries(service, "JOB=no-such-job") == []


def test_journal_filters_one_jobs_warnings(service: Service) -> None:
    shown = service.box.run("journalctl", "-u", UNIT, "--no-pager", "JOB=src", "-p", "warning", check=False).stdout
    print("journalctl -u etl.service JOB=src -p warning:")
    print(shown)
    warnings = journal_entries(service, "JOB=src", "-p", "warning")
    assert warnings and all(int(e["PRIORITY"]) <= 4 and e["JOB"] == "src" for e in warnings)
    failed = [e for e in warnings if e.get("STATUS") == "failed"]
    assert failed and "does not exist in PostgreSQL" in failed[0]["MESSAGE"]
    assert not [e for e in warnings if e.get("STATUS") in ("ok", "idle")]
    assert len(warnings) < len(journal_entries(service, "JOB=src"))


# The unit's settings that decide whether a record reaches journald's socket (and a memfd with it).
SANDBOX = ("User", "Group", "NoNewPrivileges", "ProtectSystem", "PrivateTmp", "PrivateDevices", "PrivateUsers",
           "ProtectProc", "ProcSubset", "RestrictAddressFamilies", "SystemCallFilter", "SystemCallArchitectures")


def test_an_entry_too_big_for_a_datagram_reaches_the_journal_from_the_sandbox(service: Service) -> None:
    unit = service.box.run("cat", f"/etc/systemd/system/{UNIT}").stdout
    properties = [line for line in unit.splitlines() if line.split("=")[0] in SANDBOX]
    code = ("from loguru import logger\nfrom etl_service import logs\nlogs.setup()\n"
            "logger.bind(job='bigline').warning('x' * 1000000)\n")
    service.box.run("systemd-run", "--unit=etl-bigline", "--wait", "--quiet",
                    *[arg for p in properties for arg in ("-p", p)], "/opt/etl-service/venv/bin/python", "-c", code)
    wait_for(lambda: bool(journal_entries(service, "JOB=bigline", "--all", unit="etl-bigline.service")), 20,
             "the big entry")
    (entry,) = journal_entries(service, "JOB=bigline", "--all", unit="etl-bigline.service")
    assert entry["MESSAGE"] == "[job=bigline] " + "x" * 1000000 and entry["PRIORITY"] == "4"


def test_edit_env_and_restart_picks_up_the_change(service: Service) -> None:
    service.write_env(ETL_TARGET_TABLE="dst2")
    service.box.run("systemctl", "restart", UNIT)
    service.sql("INSERT INTO src SELECT g, g, 'r', false FROM generate_series(3001, 3200) g")
    wait_for(lambda: service.marked() == 3200, 60, "rows after the restart")
    assert "created ClickHouse table demo.dst2" in service.journal()


def test_reload_applies_a_change_without_losing_a_batch(service: Service) -> None:
    service.sql("INSERT INTO src SELECT g, g, 'r', false FROM generate_series(3201, 6000) g")
    service.write_env(ETL_TARGET_TABLE="dst2", ETL_BATCH_SIZE="300")
    pid = service.box.show(UNIT, "MainPID")
    service.box.run("systemctl", "reload", UNIT)
    wait_for(lambda: "configuration reloaded" in service.journal(), 20, "the reload")
    assert service.box.show(UNIT, "MainPID") == pid  # same process
    wait_for(lambda: service.marked() == 6000, 90, "rows after the reload")
    service.write_env(ETL_TARGET_TABLE="dst2", ETL_SCHEDULE="not a cron")
    service.box.run("systemctl", "reload", UNIT)
    wait_for(lambda: "reload refused" in service.journal(), 20, "a refused reload")
    assert service.box.show(UNIT, "ActiveState") == "active"
    service.write_env(ETL_TARGET_TABLE="dst2", ETL_BATCH_SIZE="300")
    service.box.run("systemctl", "reload", UNIT)


def wait_told(service: Service, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_for, and on a time-out the service's last journal lines and its ledger in the message."""
    try:
        wait_for(condition, timeout, what)
    except AssertionError as exc:
        ledger = service.sql("SELECT batch_id, job, state, row_count, chunks_loaded, rows_loaded FROM etl.batches"
                             " WHERE state <> 'done'")
        raise AssertionError(f"{exc}; {service.marked()} marked; unfinished batches {ledger};"
                             f" journal:\n{service.journal('-n', '60')}") from None


def test_kill_9_restarts_and_the_ledger_resumes(service: Service) -> None:
    service.sql("INSERT INTO src SELECT g, g, 'r', false FROM generate_series(6001, 20000) g")
    restarts = int(service.box.show(UNIT, "NRestarts"))
    wait_for(lambda: service.marked() > 6300, 30, "the next drain to start")
    pid = service.box.show(UNIT, "MainPID")
    service.box.run("kill", "-9", pid)
    wait_for(lambda: int(service.box.show(UNIT, "NRestarts")) == restarts + 1
             and service.box.show(UNIT, "ActiveState") == "active", 60, "systemd to restart it")
    assert service.box.show(UNIT, "MainPID") != pid
    wait_told(service, lambda: service.marked() == 20000, 120, "the drain after the restart")


def test_bad_env_exits_78_without_a_restart_loop(service: Service) -> None:
    service.write_env(ETL_TARGET_TABLE="dst2", CLICK_PORT="9000", CLICK_DSN="")
    service.box.run("systemctl", "restart", UNIT, check=False)
    wait_for(lambda: service.box.show(UNIT, "ActiveState") == "failed", 30, "the unit to fail")
    restarts = service.box.show(UNIT, "NRestarts")
    time.sleep(7)  # longer than RestartSec
    assert service.box.show(UNIT, "ExecMainStatus") == "78"
    assert service.box.show(UNIT, "NRestarts") == restarts
    assert service.box.show(UNIT, "ActiveState") == "failed"
    assert "CLICK_PORT: port 9000 is ClickHouse's native TCP port" in service.journal("-p", "err")


def use_password_credential(service: Service) -> str:
    """A role that must log in with a password, the password only in the unit's credential file."""
    service.sql("CREATE ROLE etl_cred LOGIN SUPERUSER PASSWORD 'cred-secret'")
    hba = str(service.sql("SHOW hba_file")[0][0])
    original = Path(hba).read_text()
    Path(hba).write_text("host all etl_cred 127.0.0.1/32 scram-sha-256\n" + original)
    service.sql("SELECT pg_reload_conf()")
    service.box.run("sh", "-c", "printf 'cred-secret\\n' > /etc/etl-service/pg_password")
    return psycopg2.extensions.make_dsn(service.pg_uri, user="etl_cred")


def test_stop_is_a_clean_sigterm_exit_and_every_row_is_there_once(service: Service) -> None:
    # This last run reads PostgreSQL's password from the systemd credential, not from etl.env.
    service.write_env(ETL_TARGET_TABLE="dst2", PG_DSN=use_password_credential(service))
    service.box.run("systemctl", "reset-failed", UNIT)
    service.box.run("systemctl", "start", UNIT)
    service.sql("INSERT INTO src SELECT g, g, 'r', false FROM generate_series(20001, 21000) g")
    wait_told(service, lambda: service.marked() == 21000, 60, "the last rows")
    service.box.run("systemctl", "stop", UNIT)
    assert service.box.show(UNIT, "ExecMainStatus") == "0"
    assert service.box.show(UNIT, "Result") == "success"
    assert "etl-service stopped" in service.journal()
    rows = service.chdb("SELECT sum(n), sum(u) FROM (SELECT count() AS n, uniqExact(id) AS u FROM demo.dst"
                        " UNION ALL SELECT count(), uniqExact(id) FROM demo.dst2)")
    ids = service.chdb("SELECT uniqExact(id) FROM (SELECT id FROM demo.dst UNION ALL SELECT id FROM demo.dst2)")
    assert rows == [[21000, 21000]] and ids == [[21000]]
    assert service.sql("SELECT count(*) FROM etl.batches WHERE state <> 'done'") == [(0,)]
    assert service.sql("SELECT count(*) FROM etl.runs WHERE status = 'ok'")[0][0] > 0
    assert "cred-secret" not in service.journal() + service.box.run("cat", ENV).stdout


def test_install_again_is_an_upgrade_that_keeps_the_settings(service: Service) -> None:
    before = service.box.run("cat", ENV).stdout
    again = service.box.run("/src/deploy/install.sh", "--wheelhouse", "/wheels", "--embedded")
    assert "kept the existing /etc/etl-service/etl.env" in again.stdout
    assert service.box.run("cat", ENV).stdout == before
    assert service.box.run("stat", "-c", "%a %U", ENV).stdout.strip() == "600 etl-service"
    assert service.box.show(UNIT, "ActiveState") == "active"  # restarted on the new install
    service.box.run("systemctl", "stop", UNIT)


def test_uninstall_keeps_settings_and_data_unless_purged(service: Service) -> None:
    removed = service.box.run("/src/deploy/uninstall.sh")
    assert "kept /etc/etl-service and /var/lib/etl-service" in removed.stdout
    assert service.box.run("test", "-e", "/etc/systemd/system/etl.service", check=False).returncode == 1
    assert service.box.run("test", "-e", "/opt/etl-service", check=False).returncode == 1
    assert service.box.run("test", "-e", ENV, check=False).returncode == 0
    assert service.box.run("test", "-d", "/var/lib/etl-service/chdb", check=False).returncode == 0
    purged = service.box.run("/src/deploy/uninstall.sh", "--purge")
    assert "purged" in purged.stdout
    assert service.box.run("test", "-e", "/etc/etl-service", check=False).returncode == 1
