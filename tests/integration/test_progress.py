"""Progress of `--once`: lines with the figures when stderr is not a terminal, a bar on a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from loguru import logger

from etl_service.run.pipeline import Run
from etl_service.run.progress import Progress

from .conftest import World
from .helpers import REPO, clean_env, cli, slow_transform, write_env

LINE = re.compile(r"progress: ([\d,]+) of ([\d,]+) rows \((\d+)%\), [\d,]+ rows/s,"
                  r" (about (\d+ s|\d+ min|\d+ h \d+ min) left|time left unknown)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")


def test_rows_done_are_marked_plus_quarantined_of_the_rows_a_run_can_take(world: World,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"sevens_{world.ch_database}"
    (world.tmp / f"{module}.py").write_text("def clean(df):\n    if (df['id'] % 10 == 7).any():\n"
                                            "        raise ValueError('no sevens')\n    return df\n")
    monkeypatch.syspath_prepend(str(world.tmp))
    world.make_source(1000)
    settings = world.settings(transform=f"{module}:clean", batch_size="500", chunk_size="250")

    def run() -> Progress:
        progress = Progress(logger, 0)
        result = Run(settings, settings.jobs[0], threading.Event(), progress=progress).execute()
        assert result.rows_marked + result.rows_quarantined == progress.rows_done
        return progress

    first = run()
    assert (first.rows_total, first.rows_done, first.rows_loaded) == (1000, 1000, 900)
    world.add_rows(1001, 1100)  # 100 waiting, 10 of them bad; the 100 quarantined rows are not claimed again
    second = run()
    assert (second.rows_total, second.rows_done, second.rows_loaded) == (100, 100, 90)
    assert world.sql("SELECT count(*) FROM src WHERE NOT processed") == [(110,)]


def test_once_logs_progress_lines_out_of_the_backlog_and_draws_no_bar(world: World) -> None:
    world.make_source(4000)
    world.sql("UPDATE src SET processed = true WHERE id <= 500")  # not in the backlog: 3,500 rows
    chdb = world.tmp / "chdb"
    env = {"ETL_TRANSFORM": slow_transform(world, 0.08), "ETL_PROGRESS_SECONDS": "0.2"}
    run = cli("--once", "--env-file", str(write_env(world, chdb, ETL_LOG_FORMAT="json", **env)), path=world.tmp)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines()]
    progress = [line for line in lines if "rows_done" in line]
    assert len(progress) >= 3, run.stderr
    assert {(p["job"], p["level"], p["rows_total"]) for p in progress} == {("src", "INFO", 3500)}
    done = [p["rows_done"] for p in progress]
    assert done == sorted(done) and done[-1] <= 3500 and done[-1] % 1000 in (0, 500)  # whole batches
    for p in progress:
        match = LINE.fullmatch(p["message"])
        assert match, p["message"]
        assert (int(match[1].replace(",", "")), int(match[2].replace(",", "")), int(match[3])) == \
            (p["rows_done"], 3500, 100 * p["rows_done"] // 3500)
        assert p["rows_per_second"] >= 0 and (p["eta_seconds"] is None) == (p["rows_done"] == 0)
    assert any(p["rows_done"] for p in progress)
    summary = lines[-1]
    assert (summary["status"], summary["rows_marked"]) == ("ok", 3500)
    assert "\r" not in run.stderr  # not a terminal: no bar

    world.add_rows(4001, 6000)
    text = cli("--once", "--env-file", str(write_env(world, chdb, **env)), path=world.tmp)
    assert text.returncode == 0, text.stderr
    found = [LINE.search(line) for line in text.stderr.splitlines() if "progress:" in line]
    assert len(found) >= 2 and all(m and m[2] == "2,000" for m in found), text.stderr
    assert all("INFO    [job=src] progress: " in line for line in text.stderr.splitlines() if "progress:" in line)
    assert "status=ok batches=2 rows_loaded=2000 rows_marked=2000" in text.stderr
    assert "\r" not in text.stderr


def run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 120,
                      columns: int = 120) -> tuple[int, str]:
    """Run the program with a pseudo-terminal (120 columns) as its stdin, stdout and stderr; all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30 if columns else 0, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "etl_service", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=REPO, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                break
            if not data:
                break
            out += data
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode().replace("\r\n", "\n")  # the terminal turns "\n" into "\r\n"


def test_once_on_a_terminal_draws_a_bar_that_log_lines_do_not_garble(world: World) -> None:
    world.make_source(3000)
    env_file = write_env(world, world.tmp / "chdb", ETL_TRANSFORM=slow_transform(world, 0.1),
                         ETL_PROGRESS_SECONDS="0.2")
    env = {**clean_env(), "PYTHONPATH": str(world.tmp)}
    code, out = run_on_a_terminal(["--once", "--env-file", str(env_file)], env)
    plain = ANSI.sub("", out)
    assert code == 0, plain
    assert re.search(r"src: +\d+%\|.*\| [\d,]+/3,000 rows \[", plain), plain
    assert re.search(r"src: +[1-9]\d*%\|", plain), plain  # it moved
    assert re.search(r"[\d.]+k? rows/s", plain) and "loaded]" in plain
    assert "progress:" not in plain  # the bar, not lines
    screen = [line.split("\r")[-1] for line in plain.split("\n")]  # what stays: the last text after a \r
    assert screen[-1] == ""  # the bar is gone
    assert all(STAMP.match(line) for line in screen[:-1]), screen  # every line whole, from its first column
    assert re.search(r"INFO    \[job=src\] run finished: job=src status=ok batches=3 rows_loaded=3000"
                     r" rows_marked=3000", screen[-2]), screen[-2]


def test_a_terminal_without_a_width_gets_progress_lines(world: World) -> None:
    world.make_source(2000)
    env_file = write_env(world, world.tmp / "chdb", ETL_TRANSFORM=slow_transform(world, 0.1),
                         ETL_PROGRESS_SECONDS="0.2", ETL_BATCH_SIZE="500")
    env = {**clean_env(), "PYTHONPATH": str(world.tmp)}
    code, out = run_on_a_terminal(["--once", "--env-file", str(env_file)], env, columns=0)
    plain = ANSI.sub("", out)
    assert code == 0, plain
    assert "progress: " in plain and "/2,000 rows [" not in plain, plain  # lines, no bar with no room
