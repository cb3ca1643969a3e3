"""Command line: the daemon (`run`, the default; `--once`), `check`, `status`, `requeue`, `adopt`, `release`, `demo`.

Each command takes its own options (`etl-service COMMAND --help`); `--env-file` is global. As with the
flat command line this replaced, a command's options may also come before it (`etl-service --job X
requeue --key K`), and no command means `run` (`etl-service --once`). An option the command does not
take is bad usage, wherever it stands.

Exit codes: 0 success; 1 a run failed or a check found problems; 2 bad usage;
75 (EX_TEMPFAIL) `--once` left work for later (readiness deadline, lock held, stopped);
78 (EX_CONFIG) invalid configuration — systemd does not restart on it; 130 / 143 a second
SIGINT / SIGTERM ended the process at once (128 + the signal).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from loguru import logger

from etl_service import __version__, logs
from etl_service.clickhouse import clients
from etl_service.errors import ConfigError, TransientError
from etl_service.run.pipeline import FAILED, SUCCESS, run_job
from etl_service.service import admin, checks, report
from etl_service.settings.model import JobConfig, Settings
from etl_service.settings.reading import load

EX_FAILED, EX_TEMPFAIL, EX_CONFIG = 1, 75, 78

# How each command option parses; its value when not given is in DEFAULTS (see parse).
OPTIONS: dict[str, dict[str, Any]] = {
    "--once": {"action": "store_true"},
    "--job": {"metavar": "NAME"},
    "--key": {"action": "append", "metavar": "KEY"},
    "--batch": {"type": int, "metavar": "N"},
    "--json": {"action": "store_true"},
    "--force": {"action": "store_true"},
    "--rows": {"type": int},
    "--dir": {"metavar": "PATH"},
}
DEFAULTS: dict[str, Any] = {"env_file": None, "once": False, "job": None, "key": None, "batch": None,
                            "json": False, "force": False, "rows": 100_000, "dir": ".demo"}
BEFORE = "before_"  # where an option given before its command lands, until `parse` checks and merges it
JSON = "machine-readable output"
ONLY = "only this job (default: every job)"
BATCH = "the batch id `status` shows (required)"
BATCH_JOB = "the job that takes the batch's source (needed when there are several jobs)"
# Each command: what it does, and its options with their help.
COMMANDS: dict[str, tuple[str, dict[str, str]]] = {
    "run": ("the daemon (the default): the jobs on their schedules until SIGTERM/SIGINT; or one pass with --once",
            {"--once": "run each job now, drain its backlog, exit", "--job": "with --once: this job"}),
    "check": ("config, connectivity, keys, privileges, next run times", {"--json": JSON, "--job": ONLY}),
    "status": ("backlog, batches, quarantine, recent runs", {"--json": JSON, "--job": ONLY}),
    "requeue": ("release quarantined rows (all, or --key)",
                {"--job": "this job (default: every job)",
                 "--key": "only this key, as `status` shows it (repeat for several)"}),
    "adopt": ("take over an unfinished batch of a renamed or removed job", {"--batch": BATCH, "--job": BATCH_JOB}),
    "release": ("forget an unfinished batch of a renamed or removed job",
                {"--batch": BATCH, "--job": BATCH_JOB,
                 "--force": "even if rows of the batch may be in ClickHouse (they would load twice)"}),
    "demo": ("embedded demo", {"--rows": "rows to seed (default 100000)", "--dir": "working folder (default .demo)"}),
}


def build_parser() -> argparse.ArgumentParser:
    """Global options and one subparser per command.

    Nothing has a default here (a subparser's default would overwrite a value given before its command,
    `--job X requeue`); `parse` fills them in.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--env-file", metavar="PATH", help="settings file (default: ./.env if present)")
    common.add_argument("--version", action="version", version=f"etl-service {__version__}")
    parser = argparse.ArgumentParser(
        prog="etl-service", usage="%(prog)s [-h] [--env-file PATH] [--version] [COMMAND] [options]",
        parents=[common], argument_default=argparse.SUPPRESS,
        description="Move unprocessed PostgreSQL rows into a ClickHouse trigger table, exactly once.",
        epilog="Without a command the service runs its jobs on their schedules until SIGTERM/SIGINT: that is"
               " `run`, and `--once` alone is `run --once`. `COMMAND --help` lists the options of a command;"
               " they may also come before it.")
    for flag, spec in OPTIONS.items():  # a command's options before it: accepted, listed under the command
        parser.add_argument(flag, **spec, dest=BEFORE + flag[2:], help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", prog="etl-service")
    for name, (summary, options) in COMMANDS.items():
        command = commands.add_parser(name, parents=[common], argument_default=argparse.SUPPRESS,
                                      help=summary, description=summary)
        for flag, text in options.items():
            command.add_argument(flag, **OPTIONS[flag], help=text)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command ("run" if none) and every option, given or default; bad usage exits 2."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None) or "run"
    before = {dest.removeprefix(BEFORE): args.pop(dest) for dest in list(args) if dest.startswith(BEFORE)}
    foreign = [f"--{dest}" for dest in before if f"--{dest}" not in COMMANDS[command][1]]
    if foreign:  # after the command, its own parser refuses them
        parser.error(f"{command} does not take {', '.join(foreign)}")
    for dest, value in before.items():  # the same option after the command wins; --key adds up, as it always did
        args[dest] = value + args.get(dest, []) if isinstance(value, list) else args.get(dest, value)
    if command in ("adopt", "release") and "batch" not in args:
        parser.error(f"{command} needs --batch N (the batch id `status` shows)")
    return argparse.Namespace(**{**DEFAULTS, **args, "command": command})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load settings, dispatch. Returns the process exit code."""
    args = parse(argv)
    logs.setup()
    if args.command == "demo":
        from etl_service.service.demo import run_demo

        return run_demo(args.dir, args.rows)
    try:
        settings = load(args.env_file)
        jobs = [settings.job(args.job)] if args.job else list(settings.jobs)  # an unknown name exits 78
        logs.setup(settings.log_level, settings.log_format)
        code = HANDLERS[args.command](args, settings, jobs)
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
        clients.close_all()  # the chDB folder is free as soon as this process is done with it


def _run(args: argparse.Namespace, settings: Settings, jobs: list[JobConfig]) -> int:
    stop = threading.Event()
    install_signal_handlers(stop)
    if args.once:
        return _once(settings, jobs, stop)
    from etl_service.service.daemon import Daemon

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


def _check(args: argparse.Namespace, settings: Settings, jobs: list[JobConfig]) -> int:
    return 0 if checks.check(dataclasses.replace(settings, jobs=tuple(jobs)), as_json=args.json) else EX_FAILED


def _status(args: argparse.Namespace, settings: Settings, jobs: list[JobConfig]) -> int:
    return 0 if report.status(dataclasses.replace(settings, jobs=tuple(jobs)), as_json=args.json) else EX_FAILED


def _requeue(args: argparse.Namespace, settings: Settings, jobs: list[JobConfig]) -> int:
    return 0 if admin.requeue(settings, jobs, args.key) else EX_FAILED


def _adopt(args: argparse.Namespace, settings: Settings, jobs: list[JobConfig]) -> int:
    return 0 if admin.adopt(settings, _batch_job(args, jobs), args.batch) else EX_FAILED


def _release(args: argparse.Namespace, settings: Settings, jobs: list[JobConfig]) -> int:
    return 0 if admin.release(settings, _batch_job(args, jobs), args.batch, args.force) else EX_FAILED


def _batch_job(args: argparse.Namespace, jobs: list[JobConfig]) -> JobConfig:
    if len(jobs) > 1:
        raise ConfigError("--job", f"{args.command} needs --job NAME: which job takes the batch's source",
                          f"known jobs: {', '.join(j.name for j in jobs)}")
    return jobs[0]


Handler = Callable[[argparse.Namespace, Settings, list[JobConfig]], int]
HANDLERS: dict[str, Handler] = {"run": _run, "check": _check, "status": _status, "requeue": _requeue,
                                "adopt": _adopt, "release": _release}


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
