"""Command line: the daemon (default), `--once`, `check`, `status` and `demo`; exit codes.

Exit codes: 0 success; 1 a run failed or a check found problems; 2 bad usage;
75 (EX_TEMPFAIL) `--once` left work for later (readiness deadline, lock held, stopped);
78 (EX_CONFIG) invalid configuration — systemd does not restart on it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from loguru import logger

from etl_service import __version__, admin, checks, clickhouse, logs, report
from etl_service.config import JobConfig, Settings, load
from etl_service.errors import ConfigError, TransientError
from etl_service.pipeline import FAILED, SUCCESS, run_job

EX_FAILED, EX_TEMPFAIL, EX_CONFIG = 1, 75, 78


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etl-service",
        description="Move unprocessed PostgreSQL rows into a ClickHouse trigger table, exactly once.",
        epilog="Without a command the service runs its jobs on their schedules until SIGTERM/SIGINT.")
    parser.add_argument("command", nargs="?", default="run",
                        choices=["run", "check", "status", "requeue", "adopt", "release", "demo"],
                        help="run (default): the daemon, or one pass with --once; check: config, connectivity,"
                             " keys, privileges, next run times; status: backlog, batches, quarantine, recent runs;"
                             " requeue: release quarantined rows (all, or --key); adopt / release --batch N: take"
                             " over, or forget, an unfinished batch of a renamed or removed job; demo: embedded demo")
    parser.add_argument("--once", action="store_true", help="run each job now, drain its backlog, exit")
    parser.add_argument("--job", metavar="NAME", help="with --once, requeue, adopt, release: this job")
    parser.add_argument("--key", action="append", metavar="KEY",
                        help="requeue: only this key, as `status` shows it (repeat for several)")
    parser.add_argument("--batch", type=int, metavar="N", help="adopt / release: the batch id `status` shows")
    parser.add_argument("--json", action="store_true", help="check, status: machine-readable output")
    parser.add_argument("--force", action="store_true",
                        help="release: even if rows of the batch may be in ClickHouse (they would load twice)")
    parser.add_argument("--env-file", metavar="PATH", help="settings file (default: ./.env if present)")
    parser.add_argument("--rows", type=int, default=100_000, help="demo: rows to seed (default 100000)")
    parser.add_argument("--dir", metavar="PATH", default=".demo", help="demo: working folder (default .demo)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load settings, dispatch. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("adopt", "release") and args.batch is None:
        parser.error(f"{args.command} needs --batch N (the batch id `status` shows)")
    logs.setup()
    if args.command == "demo":
        from etl_service.demo import run_demo

        return run_demo(args.dir, args.rows)
    try:
        settings = load(args.env_file)
        if args.job:
            settings.job(args.job)
        code = _dispatch(args, settings)
        sys.stdout.flush()  # inside the try: a reader that left (`status | head`) is not an error
        return code
    except ConfigError as exc:
        logger.error("configuration error: {}", exc)
        return EX_CONFIG
    except BrokenPipeError:
        # `status | head`: the reader left; say nothing more (and nothing at exit either).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        clickhouse.close_all()  # the chDB folder is free as soon as this process is done with it


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    logs.setup(settings.log_level, settings.log_format)
    jobs = [settings.job(args.job)] if args.job else list(settings.jobs)
    if args.command == "check":
        return 0 if checks.check(settings, as_json=args.json) else EX_FAILED
    if args.command == "status":
        return 0 if report.status(settings, as_json=args.json) else EX_FAILED
    if args.command == "requeue":
        return 0 if admin.requeue(settings, jobs, args.key) else EX_FAILED
    if args.command in ("adopt", "release"):
        if len(jobs) > 1:
            raise ConfigError("--job", f"{args.command} needs --job NAME: which job takes the batch's source",
                              f"known jobs: {', '.join(j.name for j in jobs)}")
        if args.command == "adopt":
            return 0 if admin.adopt(settings, jobs[0], args.batch) else EX_FAILED
        return 0 if admin.release(settings, jobs[0], args.batch, args.force) else EX_FAILED
    stop = threading.Event()
    install_signal_handlers(stop)
    if args.once:
        return _once(settings, jobs, stop)
    from etl_service.daemon import Daemon

    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload.set())
    return Daemon(settings, stop, reload, lambda current: load(args.env_file, previous=current)).serve()


def _once(settings: Settings, jobs: list[JobConfig], stop: threading.Event) -> int:
    try:
        checks.preflight(settings)  # a wrong key, table or grant exits 78 before anything is loaded
    except TransientError:
        pass  # an outage: the runs retry it with backoff and report it
    results = [run_job(settings, job, stop, terminal=logs.terminal()) for job in jobs]
    if any(r.permanent for r in results):
        return EX_CONFIG
    if any(r.status == FAILED for r in results):
        return EX_FAILED
    return 0 if all(r.status in SUCCESS for r in results) else EX_TEMPFAIL


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT ask for a graceful stop; a second one exits at once (the ledger stays consistent)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
