"""Logging: one loguru sink, shaped for a terminal, journald or a log shipper.

When stderr is journald's (JOURNAL_STREAM names it), each record is sent as one journal entry
over journald's native protocol, with fields: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_*,
JOB and BATCH when known, on run summaries STATUS, BATCHES, ROWS_LOADED, ROWS_MARKED,
ROWS_QUARANTINED, SECONDS, and on progress lines ROWS_DONE, ROWS_TOTAL, ROWS_PER_SECOND,
ETA_SECONDS (a field whose value is None is left out) — so
`journalctl -u etl.service JOB=orders -p warning` works. If the journal's socket refuses a
record, it goes to stderr with a `<N>` priority prefix instead.
`json` emits one flat JSON object per line with the same fields in lower case and `ts`, `level`.
Context bound with `logger.bind(job=…, batch=…)` is on every line; run summaries carry their
figures as `logger.bind(summary={...})`, progress lines as `logger.bind(progress={...})`. While
`--once` draws a progress bar on the terminal, text lines are written through the bar
(`route_terminal`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, TextIO

from logging_journald import JournaldTransport
from loguru import logger

# syslog priorities: the journal's PRIORITY field, and the `<N>` prefix journald reads on stderr.
_PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
# Where journald listens for its native protocol (tests point this at a socket of their own).
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# journald drops an entry above 32 MiB from an unprivileged sender without a word; a record longer
# than this (≤ 16 MiB of UTF-8) goes to stderr whole instead (journald splits it into lines, keeps it).
_JOURNAL_MAX_CHARS = 4 * 1024 * 1024


def _context(record: Any) -> str:
    extra = record["extra"]
    parts = [f"{k}={extra[k]}" for k in ("job", "batch") if k in extra]
    return f"[{' '.join(parts)}] " if parts else ""


def _fields(record: Any) -> dict[str, Any]:
    """job and batch when known, and a summary's or progress line's figures: the JSON keys and journal fields."""
    extra = record["extra"]
    fields = {k: extra[k] for k in ("job", "batch") if k in extra}
    fields.update(extra.get("summary", {}))
    fields.update(extra.get("progress", {}))
    return fields


def _priority(record: Any) -> int:
    return _PRIORITY.get(record["level"].name, 6)


def _plain_format(record: Any) -> str:
    record["extra"]["_ctx"] = _context(record)
    return "{extra[_ctx]}{message}\n{exception}"


def _journal_format(record: Any) -> str:
    # "\<" : a literal "<" for loguru, whose format strings are colour markup otherwise
    return f"\\<{_priority(record)}>" + _plain_format(record)


def _text_format(record: Any) -> str:
    record["extra"]["_ctx"] = _context(record)
    return ("<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[_ctx]}</cyan>{message}\n{exception}")


def stderr_is_journal() -> bool:
    """True if stderr is the stream systemd connected to journald (not a redirection made since)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _JournalSink:
    """Each record as one journal entry with fields (native protocol); `<N>` lines on stderr if refused.

    Records too big for a datagram go through a sealed memfd (the protocol's way, done by
    logging-journald's transport); the socket is addressed on every send, so a restarted
    journald is picked up again.
    """

    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self._transport = JournaldTransport(socket_path=socket_path, connected=False)
        self._said_why = False

    def write(self, message: Any) -> None:
        record = message.record
        text = str(message).rstrip("\n")  # context, message and traceback: _plain_format
        if len(text) > _JOURNAL_MAX_CHARS:
            self._to_stderr(record, text, f"a record of {len(text)} characters is too big for one journal entry")
            return
        fields = [("MESSAGE", text), ("PRIORITY", _priority(record)), ("SYSLOG_IDENTIFIER", "etl-service"),
                  ("CODE_FILE", record["file"].path), ("CODE_LINE", record["line"]),
                  ("CODE_FUNC", record["function"])]
        fields += [(key.upper(), value) for key, value in _fields(record).items() if value is not None]
        try:
            self._transport.send(fields)
        except OSError as exc:
            self._to_stderr(record, text, f"the journal socket {self._path} refused a record: {exc}")

    def _to_stderr(self, record: Any, text: str, why: str) -> None:
        if not self._said_why:  # once: the next refused records just go the same way
            sys.stderr.write(f"<4>{why}; such records go to stderr instead (journal field matches such as"
                             " JOB= do not find them)\n")
            self._said_why = True
        sys.stderr.write(f"<{_priority(record)}>{text}\n")
        sys.stderr.flush()

    def stop(self) -> None:
        """Close the socket once journald has read what was sent (waiting a second at most).

        journald learns the sender's unit (what `journalctl -u` matches) from /proc/PID when it
        reads an entry, and an entry read after the process is gone has none (systemd issue
        #2913). The lines just before an exit (a configuration error, "stopped") need this.
        """
        sock = self._transport.socket
        deadline = time.monotonic() + 1.0
        while _unread(sock) and time.monotonic() < deadline:
            time.sleep(0.005)
        sock.close()


def _unread(sock: Any) -> int:
    """Bytes this datagram socket sent that the receiver has not read yet (SIOCOUTQ)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except OSError:
        return 0


def _json_sink(message: Any) -> None:
    """One flat object per line: what Vector, Loki or Elastic read without parsing text."""
    record = message.record
    line: dict[str, Any] = {"ts": record["time"].isoformat(), "level": record["level"].name,
                            "message": record["message"], **_fields(record)}
    if record["exception"] is not None:
        line["exception"] = "".join(logging.Formatter().formatException(
            (record["exception"].type, record["exception"].value, record["exception"].traceback)))
    sys.stderr.write(json.dumps(line, default=str) + "\n")
    sys.stderr.flush()


class _Terminal:
    """The text sink's stream: stderr, or while a progress bar is drawn there, the bar's writer.

    The writer clears the bar, writes the line and draws the bar again below it. stderr is looked
    up at each write, so a replaced `sys.stderr` (tests) is followed.
    """

    def __init__(self) -> None:
        self.through: Callable[[str], Any] | None = None
        self.text = False  # the text format is the one configured

    def write(self, text: str) -> None:
        (self.through or sys.stderr.write)(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:  # loguru colours the lines when this says so
        return sys.stderr.isatty()


_TERMINAL = _Terminal()


def terminal() -> TextIO | None:
    """stderr when text lines go to it and it is a terminal (where `--once` draws a progress bar), else None.

    A terminal that reports no width (a pty nobody sized) gets the periodic lines instead: a bar
    would have no room to draw in.
    """
    if not (_TERMINAL.text and sys.stderr.isatty()):
        return None
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return None
    return sys.stderr if columns >= 40 else None


def route_terminal(write: Callable[[str], Any] | None) -> None:
    """Write text lines through `write` (a progress bar's) from now on; None: straight to stderr again."""
    _TERMINAL.through = write


class _FromLogging(logging.Handler):
    """Routes the standard library's log records (APScheduler, drivers) into our one sink."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname if record.levelname in _PRIORITY else record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Replace loguru's default sink with ours; call once at start (and again on reload).

    `auto` is `journal` when stderr is journald's, else `text`. `journal` sends entries with
    fields to journald when stderr is journald's, and writes `<N>`-prefixed lines otherwise.
    """
    # APScheduler's own warnings (a skipped or missed run) are logged by the daemon in our words.
    logging.basicConfig(handlers=[_FromLogging()], level=logging.WARNING, force=True)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logger.remove()
    journal = stderr_is_journal()
    if fmt == "auto":
        fmt = "journal" if journal else "text"
    _TERMINAL.text = fmt == "text"
    if fmt == "json":
        logger.add(_json_sink, level=level, format="{message}", backtrace=False, diagnose=False)
    elif fmt == "journal" and journal:
        logger.add(_JournalSink(JOURNAL_SOCKET), level=level, format=_plain_format, colorize=False,
                   backtrace=False, diagnose=False)
    elif fmt == "journal":
        logger.add(sys.stderr, level=level, format=_journal_format, colorize=False, backtrace=False,
                   diagnose=False)
    else:
        logger.add(_TERMINAL, level=level, format=_text_format, backtrace=False, diagnose=False)
