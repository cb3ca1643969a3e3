"""Command line: exit codes and messages, without servers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from etl_service import __version__
from etl_service.service import admin, checks, cli, daemon, report
from etl_service.service.cli import COMMANDS, EX_CONFIG, EX_FAILED, EX_TEMPFAIL, main, parse
from etl_service.settings.model import JobConfig, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith(("PG_", "CLICK_", "ETL_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray ./.env


def test_missing_required_variable_exits_78_naming_it(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["--once"]) == EX_CONFIG
    assert "ETL_SOURCE_TABLE: is required but not set" in capfd.readouterr().err


def test_unreadable_env_file_exits_78(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check", "--env-file", str(tmp_path / "nope.env")]) == EX_CONFIG
    assert "--env-file: cannot read" in capfd.readouterr().err


def test_native_port_exits_78_with_the_fix_and_no_password(capfd: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    env = tmp_path / "x.env"
    env.write_text("ETL_SOURCE_TABLE=orders\nCLICK_PORT=9000\nCLICK_PASSWORD=topsecret\nPG_PASSWORD=pgsecret\n")
    assert main(["--once", "--env-file", str(env)]) == EX_CONFIG
    err = capfd.readouterr().err
    assert "CLICK_PORT: port 9000 is ClickHouse's native TCP port" in err and "8123" in err
    assert "topsecret" not in err and "pgsecret" not in err


def test_dotenv_in_the_working_directory_is_read(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ETL_SOURCE_TABLE=orders\nETL_TIMEZONE=Nowhere/Land\n")
    assert main(["--once"]) == EX_CONFIG
    assert "ETL_TIMEZONE: unknown time zone 'Nowhere/Land'" in capfd.readouterr().err


def test_unknown_job_exits_78(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ETL_SOURCE_TABLE=orders\nCLICK_DSN=chdb:///tmp/x\n")
    assert main(["--once", "--job", "payments"]) == EX_CONFIG
    assert "no job named 'payments'" in capfd.readouterr().err


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_python_dash_m_reports_the_same_exit_code(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG_", "CLICK_", "ETL_"))}
    out = subprocess.run([sys.executable, "-m", "etl_service", "--once"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == EX_CONFIG
    assert "configuration error: ETL_SOURCE_TABLE" in out.stderr


# Every form the flat command line accepted, and the new ones: (argv, command, the fields that matter to it).
PARSED = [
    ([], "run", {"once": False, "job": None, "env_file": None}),
    (["--once"], "run", {"once": True, "job": None}),
    (["--once", "--job", "X"], "run", {"once": True, "job": "X"}),
    (["--env-file", "F", "--once"], "run", {"once": True, "env_file": "F"}),
    (["--once", "--env-file=F"], "run", {"once": True, "env_file": "F"}),
    (["--env-file", "F"], "run", {"once": False, "env_file": "F"}),
    (["run", "--once", "--job", "X"], "run", {"once": True, "job": "X"}),
    (["--job", "X", "run", "--once"], "run", {"once": True, "job": "X"}),
    (["check"], "check", {"json": False, "env_file": None}),
    (["check", "--json"], "check", {"json": True}),
    (["--json", "check"], "check", {"json": True}),
    (["--env-file", "F", "check"], "check", {"env_file": "F"}),
    (["check", "--env-file", "F"], "check", {"env_file": "F"}),
    (["--env-file", "A", "check", "--env-file", "B"], "check", {"env_file": "B"}),
    (["status", "--json", "--env-file", "F"], "status", {"json": True, "env_file": "F"}),
    (["requeue"], "requeue", {"job": None, "key": None}),
    (["--job", "X", "requeue", "--key", "K"], "requeue", {"job": "X", "key": ["K"]}),
    (["requeue", "--key", "A", "--key", "B", "--job", "X"], "requeue", {"job": "X", "key": ["A", "B"]}),
    (["--key", "A", "requeue", "--key", "B"], "requeue", {"key": ["A", "B"]}),
    (["--job", "X", "requeue", "--job", "Y"], "requeue", {"job": "Y"}),
    (["adopt", "--batch", "7", "--job", "X"], "adopt", {"batch": 7, "job": "X"}),
    (["--batch", "7", "adopt"], "adopt", {"batch": 7, "job": None}),
    (["release", "--batch", "7"], "release", {"batch": 7, "force": False}),
    (["--force", "release", "--batch", "7", "--job", "X"], "release", {"batch": 7, "job": "X", "force": True}),
    (["demo"], "demo", {"rows": 100_000, "dir": ".demo"}),
    (["demo", "--rows", "10", "--dir", "d"], "demo", {"rows": 10, "dir": "d"}),
    (["--rows", "10", "demo"], "demo", {"rows": 10, "dir": ".demo"}),
]


@pytest.mark.parametrize(("argv", "command", "fields"), PARSED, ids=[" ".join(a) or "(none)" for a, _, _ in PARSED])
def test_old_and_new_forms_parse_to_the_same_meaning(argv: list[str], command: str, fields: dict[str, object]) -> None:
    args = parse(argv)
    assert args.command == command
    assert {name: getattr(args, name) for name in fields} == fields


# (argv, what argparse says on stderr)
BAD_USAGE = [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["status", "--rows", "5"], "unrecognized arguments: --rows 5"),
    (["--rows", "5", "status"], "status does not take --rows"),
    (["check", "--once"], "unrecognized arguments: --once"),
    (["--once", "check"], "check does not take --once"),
    (["check", "--key", "X"], "unrecognized arguments: --key X"),
    (["--key", "K"], "run does not take --key"),
    (["--json", "--force", "demo"], "demo does not take --json, --force"),
    (["requeue", "--batch", "3"], "unrecognized arguments: --batch 3"),
    (["adopt"], "adopt needs --batch N"),
    (["release", "--job", "X", "--force"], "release needs --batch N"),
    (["adopt", "--batch", "seven"], "invalid int value: 'seven'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_USAGE, ids=[" ".join(a) for a, _ in BAD_USAGE])
def test_wrong_usage_exits_2_with_argparse_message(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, set[str]]:
    """What `argv --help` prints (unwrapped), and the options it lists."""
    with pytest.raises(SystemExit) as info:
        parse([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    return text, set(re.findall(r"^  (--[a-z-]+)", text, re.MULTILINE))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_help_lists_its_own_options_only(command: str, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    text, listed = help_text([command], capsys)
    summary, options = COMMANDS[command]
    assert listed == {"--env-file", "--version", *options}
    assert summary in text and all(f"{flag} " in text and line in text for flag, line in options.items())


def test_top_level_help_lists_commands_and_global_options(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    text, listed = help_text([], capsys)
    assert listed == {"--env-file", "--version"}
    assert all(f"    {command}  " in text and summary in text for command, (summary, _) in COMMANDS.items())


def test_version_before_or_after_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version"], ["status", "--version"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert capsys.readouterr().out == f"etl-service {__version__}\n"


JOBS = """
[jobs.orders]
source_table = "public.orders"
[jobs.payments]
source_table = "billing.payments"
"""


@pytest.fixture
def two_jobs(tmp_path: Path) -> Path:
    """An env file for two jobs (orders, payments); nothing connects to it in these tests."""
    (tmp_path / "jobs.toml").write_text(JOBS)
    env = tmp_path / "two.env"
    env.write_text(f"CLICK_DSN=chdb://{tmp_path}/chdb\nETL_JOBS_FILE={tmp_path}/jobs.toml\n")
    return env


class Work:
    """Stands in for what the commands do: records each call (jobs by name) and answers `ok`."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.ok = True

    def doing(self, name: str) -> Callable[..., bool]:
        def fake(_settings: Settings, *args: object, **kwargs: object) -> bool:
            named = [[getattr(j, "name", j) for j in a] if isinstance(a, list) else getattr(a, "name", a) for a in args]
            self.calls.append((name, *named, *kwargs.values()))
            return self.ok
        return fake


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Work:
    work = Work()
    for module, name in ((checks, "check"), (report, "status"), (admin, "requeue"), (admin, "adopt"),
                         (admin, "release")):
        monkeypatch.setattr(module, name, work.doing(name))
    return work


# (argv after --env-file, the call the command made)
DISPATCHED = [
    (["check"], ("check", False)),
    (["check", "--json"], ("check", True)),
    (["status"], ("status", False)),
    (["status", "--json"], ("status", True)),
    (["requeue"], ("requeue", ["orders", "payments"], None)),
    (["--job", "payments", "requeue", "--key", "5", "--key", "6"], ("requeue", ["payments"], ["5", "6"])),
    (["adopt", "--batch", "7", "--job", "orders"], ("adopt", "orders", 7)),
    (["--batch", "8", "release", "--job", "payments"], ("release", "payments", 8, False)),
    (["release", "--batch", "9", "--job", "orders", "--force"], ("release", "orders", 9, True)),
]


@pytest.mark.parametrize(("argv", "call"), DISPATCHED, ids=[" ".join(a) for a, _ in DISPATCHED])
@pytest.mark.parametrize("ok", [True, False])
def test_each_command_does_its_work_and_exits_0_or_1(argv: list[str], call: tuple[object, ...], ok: bool,
                                                     two_jobs: Path, work: Work) -> None:
    work.ok = ok
    assert main(["--env-file", str(two_jobs), *argv]) == (0 if ok else EX_FAILED)
    assert work.calls == [call]


@pytest.mark.parametrize("command", ["adopt", "release"])
def test_adopt_and_release_need_a_job_when_there_are_several(command: str, two_jobs: Path, work: Work,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--batch", "7", "--env-file", str(two_jobs)]) == EX_CONFIG
    err = capfd.readouterr().err
    assert f"{command} needs --job NAME" in err and "known jobs: orders, payments" in err
    assert work.calls == []


def test_unknown_job_before_a_command_exits_78(two_jobs: Path, work: Work, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["--job", "refunds", "requeue", "--env-file", str(two_jobs)]) == EX_CONFIG
    assert "no job named 'refunds'" in capfd.readouterr().err
    assert work.calls == []


def test_once_runs_the_chosen_jobs(monkeypatch: pytest.MonkeyPatch, two_jobs: Path) -> None:
    passes: list[list[str]] = []

    def once(_settings: Settings, jobs: list[JobConfig], _stop: threading.Event) -> int:
        passes.append([job.name for job in jobs])
        return EX_TEMPFAIL

    monkeypatch.setattr(cli, "install_signal_handlers", lambda _stop: None)
    monkeypatch.setattr(cli, "_once", once)
    assert main(["--once", "--env-file", str(two_jobs)]) == EX_TEMPFAIL
    assert main(["--env-file", str(two_jobs), "--once", "--job", "payments"]) == EX_TEMPFAIL
    assert main(["run", "--job", "orders", "--once", "--env-file", str(two_jobs)]) == EX_TEMPFAIL
    assert passes == [["orders", "payments"], ["payments"], ["orders"]]


@pytest.mark.parametrize("argv", [[], ["run"]])
def test_no_command_is_the_daemon_and_sighup_rereads_the_same_file(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                                   two_jobs: Path) -> None:
    served: list[list[str]] = []

    class Daemon:
        def __init__(self, settings: Settings, _stop: threading.Event, _reload: threading.Event,
                     load: Callable[[Settings], Settings]) -> None:
            self.settings, self.load = settings, load

        def serve(self) -> int:
            served.append([job.name for job in self.settings.jobs])
            (two_jobs.parent / "jobs.toml").write_text(JOBS.replace("payments", "refunds"))
            served.append([job.name for job in self.load(self.settings).jobs])
            return 0

    monkeypatch.setattr(cli, "install_signal_handlers", lambda _stop: None)
    monkeypatch.setattr(daemon, "Daemon", Daemon)
    hup = signal.getsignal(signal.SIGHUP)
    try:
        assert main([*argv, "--env-file", str(two_jobs)]) == 0
    finally:
        signal.signal(signal.SIGHUP, hup)
    assert served == [["orders", "payments"], ["orders", "refunds"]]


@pytest.mark.parametrize(("module", "name"), [(checks, "check"), (report, "status")])
@pytest.mark.parametrize("where", ["before", "after"])
def test_check_and_status_take_one_job(module: object, name: str, where: str, two_jobs: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(module, name, lambda settings, **_: seen.append([j.name for j in settings.jobs]) or True)
    job = ["--job", "payments"]
    argv = [*job, name] if where == "before" else [name, *job]
    assert main(["--env-file", str(two_jobs), *argv]) == 0
    assert main(["--env-file", str(two_jobs), name]) == 0
    assert seen == [["payments"], ["orders", "payments"]]
    assert main(["--env-file", str(two_jobs), name, "--job", "nope"]) == EX_CONFIG
