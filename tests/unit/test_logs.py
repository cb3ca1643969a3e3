"""Log formats: journal entries with fields (native protocol), priorities, JSON for shippers, no secrets."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from etl_service import logs

SUMMARY = {"status": "ok", "batches": 2, "rows_loaded": 10, "rows_marked": 10, "rows_quarantined": 0, "seconds": 0.5}


@pytest.fixture(autouse=True)
def restore(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    logs.setup()


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capfd: pytest.CaptureFixture[str]) -> Iterator[socket.socket]:
    """A stand-in for journald: a datagram socket the sink is pointed at, and stderr named as its stream.

    (After capfd has replaced stderr: JOURNAL_STREAM names the stderr the test sees.)
    """
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(path))
        st = os.fstat(sys.stderr.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield sock


def decode(data: bytes) -> dict[str, str]:
    """One native-protocol entry: `KEY=value\\n`, or `KEY\\n`, a little-endian 64-bit size, the bytes, `\\n`."""
    fields: dict[str, str] = {}
    while data:
        end = data.index(b"\n")
        key, equals, value = data[:end].partition(b"=")
        if equals:
            data = data[end + 1:]
        else:
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            value, data = data[end + 9:end + 9 + size], data[end + 9 + size:]
            assert data[:1] == b"\n"
            data = data[1:]
        fields[key.decode()] = value.decode()
    return fields


def receive(sock: socket.socket) -> dict[str, str]:
    """The next entry, from the datagram or from the sealed memfd passed with an empty one."""
    data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(array.array("i").itemsize))
    if ancillary:
        assert data == b""
        fd = array.array("i", ancillary[0][2])[0]
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        with os.fdopen(fd, "rb") as memfd:
            data = os.pread(memfd.fileno(), 1 << 24, 0)  # the sender's offset is at the end
    return decode(data)


def test_journal_entries_carry_fields(journal: socket.socket, capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "auto")
    logger.bind(job="orders", batch=7).info("batch done")
    logger.bind(job="orders", summary=SUMMARY).warning("run finished: job=orders status=ok")
    logger.debug("not shown")
    batch, summary = receive(journal), receive(journal)
    assert batch["MESSAGE"] == "[job=orders batch=7] batch done"
    assert {k: batch[k] for k in ("PRIORITY", "JOB", "BATCH", "SYSLOG_IDENTIFIER")} == {
        "PRIORITY": "6", "JOB": "orders", "BATCH": "7", "SYSLOG_IDENTIFIER": "etl-service"}
    assert batch["CODE_FILE"] == __file__ and batch["CODE_FUNC"] == "test_journal_entries_carry_fields"
    assert int(batch["CODE_LINE"]) > 0 and "STATUS" not in batch
    assert summary["PRIORITY"] == "4" and "BATCH" not in summary
    assert {k: summary[k.upper()] for k in SUMMARY} == {k: str(v) for k, v in SUMMARY.items()}
    assert capfd.readouterr().err == ""  # nothing twice


def test_progress_lines_carry_their_figures_as_journal_fields(journal: socket.socket) -> None:
    logs.setup("INFO", "journal")
    figures = {"rows_done": 0, "rows_total": 500, "rows_per_second": 0.0, "eta_seconds": None}
    logger.bind(job="orders", progress=figures).info("progress: 0 of 500 rows (0%), 0 rows/s, time left unknown")
    entry = receive(journal)
    assert entry["MESSAGE"] == "[job=orders] progress: 0 of 500 rows (0%), 0 rows/s, time left unknown"
    assert {k: entry[k] for k in ("JOB", "ROWS_DONE", "ROWS_TOTAL", "ROWS_PER_SECOND")} == {
        "JOB": "orders", "ROWS_DONE": "0", "ROWS_TOTAL": "500", "ROWS_PER_SECOND": "0.0"}
    assert "ETA_SECONDS" not in entry  # not known yet: no field rather than "None"


def test_a_traceback_stays_in_one_entry(journal: socket.socket) -> None:
    logs.setup("INFO", "journal")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.bind(job="orders").exception("run failed")
    entry = receive(journal)
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("[job=orders] run failed\nTraceback (most recent call last):")
    assert entry["MESSAGE"].endswith("ValueError: boom")


def test_an_entry_too_big_for_a_datagram_goes_through_a_memfd(journal: socket.socket) -> None:
    logs.setup("INFO", "journal")
    big = "x" * (1 << 20)  # more than an AF_UNIX datagram may carry (EMSGSIZE)
    logger.bind(job="orders").info(big)
    entry = receive(journal)
    assert entry["MESSAGE"] == f"[job=orders] {big}" and entry["JOB"] == "orders"


def test_closing_waits_until_journald_has_read_the_last_entries(journal: socket.socket) -> None:
    # journald attributes an entry to the unit by looking the sender up when it reads the entry:
    # a process must not be gone by then (its last line says why it exits)
    logs.setup("INFO", "journal")
    logger.error("configuration error: …")
    entries: list[dict[str, str]] = []
    reader = threading.Timer(0.3, lambda: entries.append(receive(journal)))
    reader.start()
    t0 = time.monotonic()
    logger.remove()  # as at exit
    waited = time.monotonic() - t0
    reader.join()
    assert waited >= 0.25 and entries[0]["MESSAGE"] == "configuration error: …"


def test_a_record_too_big_for_journald_goes_to_stderr_whole(journal: socket.socket, monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(logs, "_JOURNAL_MAX_CHARS", 100)
    logs.setup("INFO", "journal")
    logger.bind(job="orders").error("y" * 200)
    logger.bind(job="orders").info("small")
    note, line = capfd.readouterr().err.splitlines()
    assert note.startswith("<4>a record of 213 characters is too big for one journal entry; such records go to stderr")
    assert line == "<3>[job=orders] " + "y" * 200
    assert receive(journal)["MESSAGE"] == "[job=orders] small"  # the next one goes to the journal again


def test_without_the_journal_socket_lines_go_to_stderr(journal: socket.socket, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "missing.sock"))
    logs.setup("INFO", "auto")
    logger.bind(job="orders").warning("careful")
    logger.bind(job="orders").info("still here")
    lines = capfd.readouterr().err.splitlines()
    assert lines[0].startswith(f"<4>the journal socket {tmp_path / 'missing.sock'} refused a record: ")
    assert lines[1:] == ["<4>[job=orders] careful", "<6>[job=orders] still here"]


def test_a_redirected_stderr_is_not_the_journal(journal: socket.socket, monkeypatch: pytest.MonkeyPatch,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")  # inherited, but stderr was redirected since
    logs.setup("INFO", "auto")
    logger.warning("careful")
    assert capfd.readouterr().err.endswith(" WARNING careful\n")  # the text format


def test_journal_lines_on_stderr_carry_syslog_priorities_and_context(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "journal")  # asked for, but stderr is not journald's: `<N>` prefixes
    logger.bind(job="orders", batch=7).info("batch done")
    logger.bind(job="orders").error("run failed")
    logger.debug("not shown")
    lines = capfd.readouterr().err.splitlines()
    assert lines == ["<6>[job=orders batch=7] batch done", "<3>[job=orders] run failed"]


def test_json_lines_are_flat_objects_with_stable_keys(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "json")
    logger.bind(job="orders", batch=7).info("hello")
    logger.bind(job="orders", summary=SUMMARY).info("run finished: …")
    first, second = (json.loads(line) for line in capfd.readouterr().err.splitlines())
    assert set(first) == {"ts", "level", "message", "job", "batch"}
    assert (first["message"], first["level"], first["job"], first["batch"]) == ("hello", "INFO", "orders", 7)
    assert {k: second[k] for k in SUMMARY} == SUMMARY and second["message"] == "run finished: …"


def test_text_lines_have_time_level_and_context(capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("INFO", "text")
    logger.bind(job="orders").info("hello <b>not markup</b>")
    line = capfd.readouterr().err
    assert "INFO    [job=orders] hello <b>not markup</b>" in line
