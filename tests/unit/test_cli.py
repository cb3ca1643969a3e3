"""Command line: exit codes and messages, without servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from etl_service.cli import EX_CONFIG, main


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
