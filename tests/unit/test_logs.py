"""Log formats: journald priorities and context, JSON for shippers, and no secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from loguru import logger

from etl_service import logs


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    yield
    logs.setup()


def test_journal_lines_carry_syslog_priorities_and_context(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "journal")
    logger.bind(job="orders", batch=7).info("batch done")
    logger.bind(job="orders").error("run failed")
    logger.debug("not shown")
    lines = capfd.readouterr().err.splitlines()
    assert lines == ["<6>[job=orders batch=7] batch done", "<3>[job=orders] run failed"]


def test_auto_picks_the_journal_format_under_journald(capfd: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    logs.setup("INFO", "auto")
    logger.warning("careful")
    assert capfd.readouterr().err == "<4>careful\n"


def test_json_lines_are_flat_objects_with_stable_keys(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "json")
    logger.bind(job="orders", batch=7).info("hello")
    summary = {"status": "ok", "batches": 2, "rows_loaded": 10, "rows_marked": 10, "rows_quarantined": 0,
               "seconds": 0.5}
    logger.bind(job="orders", summary=summary).info("run finished: …")
    first, second = (json.loads(line) for line in capfd.readouterr().err.splitlines())
    assert set(first) == {"ts", "level", "message", "job", "batch"}
    assert (first["message"], first["level"], first["job"], first["batch"]) == ("hello", "INFO", "orders", 7)
    assert {k: second[k] for k in summary} == summary and second["message"] == "run finished: …"


def test_text_lines_have_time_level_and_context(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "text")
    logger.bind(job="orders").info("hello <b>not markup</b>")
    line = capfd.readouterr().err
    assert "INFO    [job=orders] hello <b>not markup</b>" in line
