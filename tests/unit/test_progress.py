"""Progress of a run: periodic lines on a fake clock, a total that grows, ETA math, fields, the bar."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from etl_service import logs
from etl_service.run.progress import Figures, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def records() -> Iterator[list[Any]]:
    """The records logged meanwhile (INFO and up), as loguru hands them to a sink."""
    seen: list[Any] = []
    sink = logger.add(lambda message: seen.append(message.record), level="INFO", format="{message}")
    yield seen
    logger.remove(sink)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logs.route_terminal(None)
    logs.setup()


def test_a_line_every_interval_with_the_figures(records: list[Any]) -> None:
    clock = Clock()
    progress = Progress(logger.bind(job="orders"), 30, clock)
    progress.begin(1_000_000)
    for seconds, rows in ((10, 100_000), (29.9, 100_000), (31, 220_000), (45, 100_000), (61, 100_000)):
        clock.now = 1000 + seconds
        progress.done(rows)
        progress.loaded(rows)  # not done until marked: the line comes from done() before it
    lines = [(r["message"], r["extra"]["job"], r["extra"]["progress"]) for r in records]
    assert lines == [
        ("progress: 420,000 of 1,000,000 rows (42%), 13,548 rows/s, about 43 s left", "orders",
         {"rows_done": 420_000, "rows_total": 1_000_000, "rows_per_second": 13548.4, "eta_seconds": 42.8}),
        ("progress: 620,000 of 1,000,000 rows (62%), 10,164 rows/s, about 37 s left", "orders",
         {"rows_done": 620_000, "rows_total": 1_000_000, "rows_per_second": 10163.9, "eta_seconds": 37.4}),
    ]
    assert {r["level"].name for r in records} == {"INFO"}


def test_no_line_in_a_short_run_nor_with_interval_0(records: list[Any]) -> None:
    clock = Clock()
    short, off = Progress(logger, 30, clock), Progress(logger, 0, clock)
    for progress in (short, off):
        progress.begin(10)
    clock.now += 29
    short.done(10)
    clock.now += 3600
    off.done(10)
    assert records == []


def test_the_total_grows_with_rows_that_arrived_during_the_run(records: list[Any]) -> None:
    clock = Clock()
    progress = Progress(logger, 1, clock)
    progress.begin(100)
    clock.now += 2
    progress.done(150)  # 50 rows committed after the count were claimed too
    assert (progress.rows_done, progress.rows_total) == (150, 150)
    assert records[-1]["message"] == "progress: 150 of 150 rows (100%), 75 rows/s, about 0 s left"
    progress.begin(30)  # a retried attempt counts again what is left
    assert progress.rows_total == 180
    clock.now += 2
    progress.done(10)
    assert records[-1]["extra"]["progress"] == {"rows_done": 160, "rows_total": 180, "rows_per_second": 40.0,
                                                "eta_seconds": 0.5}


def test_eta_is_the_rows_left_at_the_average_rate() -> None:
    assert Figures(420_000, 1_000_000, 5.0).line() == \
        "progress: 420,000 of 1,000,000 rows (42%), 84,000 rows/s, about 7 s left"
    assert Figures(1_000, 61_000, 10.0).eta_seconds == 600.0
    assert Figures(1_000, 61_000, 10.0).line().endswith("100 rows/s, about 10 min left")
    assert Figures(1_000, 721_000, 10.0).line().endswith("about 2 h 0 min left")
    assert Figures(1_000, 800_000, 10.0).line().endswith("about 2 h 13 min left")
    assert Figures(999, 1_000, 1.0).line().startswith("progress: 999 of 1,000 rows (99%)")  # never 100% early
    nothing_yet = Figures(0, 500, 40.0)
    assert (nothing_yet.eta_seconds, nothing_yet.fields()["eta_seconds"]) == (None, None)
    assert nothing_yet.line() == "progress: 0 of 500 rows (0%), 0 rows/s, time left unknown"


def test_json_lines_carry_the_figures_as_fields(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "json")
    clock = Clock()
    progress = Progress(logger.bind(job="orders"), 30, clock)
    progress.begin(1_000)
    clock.now += 40
    progress.done(400)
    line = json.loads(capfd.readouterr().err)
    assert {k: line[k] for k in ("level", "job", "rows_done", "rows_total", "rows_per_second", "eta_seconds")} == {
        "level": "INFO", "job": "orders", "rows_done": 400, "rows_total": 1_000, "rows_per_second": 10.0,
        "eta_seconds": 60.0}
    assert line["message"] == "progress: 400 of 1,000 rows (40%), 10 rows/s, about 60 s left"


def test_counts_from_several_threads_add_up() -> None:
    progress = Progress(logger, 0, Clock())
    progress.begin(40_000)

    def work() -> None:
        for _ in range(10_000):
            progress.done(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (progress.rows_done, progress.rows_total) == (40_000, 40_000)


def test_the_bar_draws_on_the_terminal_takes_log_lines_through_it_and_goes(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "text")
    terminal = io.StringIO()
    progress = Progress(logger.bind(job="orders"), 0.001, Clock(), terminal, "orders")
    progress.begin(0)
    assert terminal.getvalue() == ""  # nothing to do: no bar
    progress.begin(1_000)
    progress.loaded(400)
    logger.bind(job="orders").info("batch 1 done")
    progress.done(400)
    progress.finish()
    drawn = terminal.getvalue()
    assert "orders:   0%|" in drawn and "0/1,000 rows" in drawn
    assert "[job=orders] batch 1 done\n" in drawn  # through the bar: cleared, line, bar again
    assert drawn.index("\r", drawn.index("batch 1 done")) > 0  # drawn again below the line
    assert drawn.endswith("\r") and drawn.rstrip("\r ").endswith("loaded]")  # cleared at the end
    logger.info("after the run")
    assert capfd.readouterr().err.endswith("INFO    after the run\n")  # straight to stderr again
    assert "progress:" not in drawn  # a bar, not progress lines
