"""Logging: one loguru sink on stderr, shaped for a terminal, journald or a log shipper.

Under journald (JOURNAL_STREAM set) lines carry `<N>` priority prefixes and no timestamp of
our own, so `journalctl -p err` filters by level. `json` emits one flat JSON object per line
with stable keys: ts, level, message, job and batch when known, and on run summaries the
figures (`logger.bind(summary={...})`): status, batches, rows_loaded, rows_marked,
rows_quarantined, seconds. Context bound with `logger.bind(job=…, batch=…)` appears on every line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from loguru import logger

# syslog priorities for the `<N>` prefix journald understands.
_PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def _context(record: Any) -> str:
    extra = record["extra"]
    parts = [f"{k}={extra[k]}" for k in ("job", "batch") if k in extra]
    return f"[{' '.join(parts)}] " if parts else ""


def _journal_format(record: Any) -> str:
    record["extra"]["_ctx"] = _context(record)
    # "\<" : a literal "<" for loguru, whose format strings are colour markup otherwise
    return f"\\<{_PRIORITY.get(record['level'].name, 6)}>{{extra[_ctx]}}{{message}}\n{{exception}}"


def _text_format(record: Any) -> str:
    record["extra"]["_ctx"] = _context(record)
    return ("<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[_ctx]}</cyan>{message}\n{exception}")


def _json_sink(message: Any) -> None:
    """One flat object per line: what Vector, Loki or Elastic read without parsing text."""
    record = message.record
    extra = record["extra"]
    line: dict[str, Any] = {"ts": record["time"].isoformat(), "level": record["level"].name,
                            "message": record["message"]}
    line.update({k: extra[k] for k in ("job", "batch") if k in extra})
    line.update(extra.get("summary", {}))
    if record["exception"] is not None:
        line["exception"] = "".join(logging.Formatter().formatException(
            (record["exception"].type, record["exception"].value, record["exception"].traceback)))
    sys.stderr.write(json.dumps(line, default=str) + "\n")
    sys.stderr.flush()


class _FromLogging(logging.Handler):
    """Routes the standard library's log records (APScheduler, drivers) into our one sink."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname if record.levelname in _PRIORITY else record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Replace loguru's default sink with ours; call once at start (and again on reload)."""
    # APScheduler's own warnings (a skipped or missed run) are logged by the daemon in our words.
    logging.basicConfig(handlers=[_FromLogging()], level=logging.WARNING, force=True)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logger.remove()
    if fmt == "auto":
        fmt = "journal" if os.environ.get("JOURNAL_STREAM") else "text"
    if fmt == "json":
        logger.add(_json_sink, level=level, format="{message}", backtrace=False, diagnose=False)
    elif fmt == "journal":
        logger.add(sys.stderr, level=level, format=_journal_format, colorize=False, backtrace=False,
                   diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_text_format, backtrace=False, diagnose=False)
