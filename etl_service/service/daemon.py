"""The long-running service: an APScheduler BackgroundScheduler firing each job on its cron.

The main thread only waits on the stop event (set by signal handlers), applies a reload when
SIGHUP asked for one, pings the systemd watchdog while the scheduler is healthy, and shuts the
scheduler down on the way out; the run in progress sees the stop event and ends at the next
chunk boundary.

Jobs with ETL_WAKE=notify are also woken by commits (wake.Listener). A job runs one run at a
time whatever started it (its `Gate`), and jobs on one source table take turns. A wake-up that
arrives while a job runs makes it run once more right after, however many arrive; one that
arrives while it is idle starts a run after ETL_WAKE_DELAY, gathering a burst of commits into
one batch.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent, JobSubmissionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from etl_service import logs
from etl_service.clickhouse import clients
from etl_service.errors import ConfigError, TransientError
from etl_service.run import metrics
from etl_service.run.pipeline import OUTCOMES, run_job
from etl_service.service import checks, systemd, wake
from etl_service.settings.model import JobConfig, Settings

# After a run of a woken job fails on a configuration error, wake-ups start no run for this long:
# every commit would otherwise fail one more run.
WAKE_PAUSE = 300.0


@dataclass
class Gate:
    """One run of a job at a time, and whether another was asked for while it ran."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    running: bool = False
    again: bool = False  # asked for while running: one more run right after
    pending: bool = False  # a woken run is scheduled and has not started yet
    cause: str = ""  # what asked for the run after this one (catch-up wins: it says something was missed)
    wakeups: int = 0  # notifications since the last run started
    quiet_until: float = 0.0  # a configuration error: wake-ups start no run before this (monotonic time)

    def ask(self, cause: str) -> None:
        self.again = True
        self.cause = "catch-up" if "catch-up" in (cause, self.cause) else cause

class Daemon:
    """Schedules every configured job and runs until `stop` is set."""

    def __init__(self, settings: Settings, stop: threading.Event, reload: threading.Event,
                 read_settings: Callable[[Settings], Settings]) -> None:
        self.settings = settings
        self.stop = stop
        self.reload = reload
        self.read_settings = read_settings  # re-reads .env and the jobs file, given the current settings
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={
                # A late or overrunning run is merged into one, never stacked, never dropped
                # for being a second late (APScheduler 3's default grace is 1 s).
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": int(settings.misfire_grace),
            },
        )
        self.scheduler.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self._merged: Counter[str] = Counter()  # due runs merged into the one in progress, per job
        self._gates: dict[str, Gate] = {}
        # Jobs on one source table take turns here rather than one finding the other's lock and skipping
        # its run (a woken job would then wait for the next commit or the schedule).
        self._tables: dict[tuple[str, str], threading.Lock] = {}
        self._started: set[str] = set()  # jobs whose first run (at start) has begun
        self.listener: wake.Listener | None = None

    def serve(self) -> int:
        """Wait for both databases, schedule the jobs, and run until stopped. Returns the exit code."""
        if not checks.wait_until_reachable(self.settings, self.stop):
            return 0
        try:
            checks.preflight(self.settings)  # a wrong key, table or grant: ConfigError, exit 78
        except TransientError as exc:
            logger.warning("start-up checks skipped: {} (the runs retry and report)", exc)
        for job in self.settings.jobs:
            self._add(job)
        self.scheduler.start()
        for job in self.settings.jobs:
            logger.info("job {} scheduled on '{}' ({}): first run now, then on schedule", job.name, job.schedule,
                        job.timezone)
        self._listen()
        if self.settings.metrics_port:
            metrics.serve(self.settings.metrics_address, self.settings.metrics_port)
            logger.info("metrics at http://{}:{}/metrics", self.settings.metrics_address, self.settings.metrics_port)
        systemd.notify(f"READY=1\nSTATUS=scheduled {len(self.settings.jobs)} job(s); waiting for the first run")
        logger.info("etl-service ready: {} job(s), PostgreSQL {}, ClickHouse {}", len(self.settings.jobs),
                    self.settings.pg_display, self.settings.clickhouse.display)
        watchdog = systemd.watchdog_interval()
        try:
            while not self.stop.wait(min(watchdog or 1.0, 1.0)):
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload()
                if watchdog and self.scheduler.running:
                    systemd.notify("WATCHDOG=1")
        finally:
            systemd.notify("STOPPING=1")
            logger.info("stopping: waiting for the run in progress to reach a safe point")
            if self.listener is not None:
                self.listener.close()
            self.scheduler.shutdown(wait=True)
            logger.info("etl-service stopped")
        return 0

    def _reload(self) -> None:
        """Apply an edited .env / jobs file; a bad one is refused and the running one stays."""
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = self.read_settings(self.settings)
        except ConfigError as exc:
            logger.error("reload refused, the previous configuration keeps running: {}", exc)
            systemd.notify(f"READY=1\nSTATUS=reload refused: {exc}"[:500])
            return
        old_names = {job.name for job in self.settings.jobs}
        for name in old_names - {job.name for job in new.jobs}:
            self.scheduler.remove_job(name)
            logger.info("job {} removed", name)
        for job in new.jobs:
            if job.name in old_names:
                self.scheduler.modify_job(job.name, args=[job])
                self.scheduler.reschedule_job(job.name, trigger=job.trigger())
            else:
                self._add(job)
        self.settings = new
        for gate in self._gates.values():
            gate.quiet_until = 0.0  # a fixed setting is tried at the next wake-up
        self._listen()
        for job in new.jobs:  # commits made while no one listened (a job switched to notify, a restart)
            if job.wake == "notify" and job.name in self._started:
                self.wake(job.name, 0, "catch-up")
        clients.close_other_folders(new)  # a moved CLICK_DSN frees the old chDB folder at once
        logs.setup(new.log_level, new.log_format)
        logger.info("configuration reloaded: {} job(s): {}", len(new.jobs),
                    ", ".join(f"{j.name} on '{j.schedule}'" for j in new.jobs))
        systemd.notify(f"READY=1\nSTATUS=configuration reloaded; {len(new.jobs)} job(s)")

    def _add(self, job: JobConfig) -> None:
        # First run now: finish what a previous process left unfinished and catch up, rather than
        # waiting for the first cron time.
        metrics.declare(job.name, OUTCOMES)
        self.scheduler.add_job(self._run, trigger=job.trigger(), args=[job], id=job.name, name=job.name,
                               next_run_time=datetime.now(UTC))

    def _listen(self) -> None:
        """(Re)start the listener for the jobs with ETL_WAKE=notify (none: no listener)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        woken = [job for job in self.settings.jobs if job.wake == "notify"]
        if woken:
            self.listener = wake.Listener(self.settings, woken, self.wake, self.stop)
            self.listener.start()

    def wake(self, name: str, count: int, cause: str) -> None:
        """A commit (cause wake-up) or a reconnect (catch-up) asks for a run of job `name`: coalesced."""
        job = next((j for j in self.settings.jobs if j.name == name), None)
        if job is None:
            return
        metrics.WAKEUPS.labels(name).inc(count)
        gate = self._gates.setdefault(name, Gate())
        with gate.lock:
            gate.wakeups += count
            if time.monotonic() < gate.quiet_until:  # the last run found a configuration error
                return
            if gate.running:
                gate.ask(cause)
                return
            if gate.pending:
                return
            gate.pending = True
        self.scheduler.add_job(self._run, "date", args=[job, cause], id=f"{name} (woken)", name=f"{name} (woken)",
                               run_date=datetime.now(UTC) + timedelta(seconds=job.wake_delay),
                               misfire_grace_time=None, replace_existing=True)

    def _run(self, job: JobConfig, cause: str = "schedule") -> None:
        """One run of `job`, then one more for each time another was asked for meanwhile."""
        gate = self._gates.setdefault(job.name, Gate())
        with gate.lock:
            if cause != "schedule":
                gate.pending = False
            if gate.running:  # a woken run and a scheduled one met: one more run after this one
                gate.ask(cause)
                return
            gate.running = True
        if job.name not in self._started:  # the first run, at start (or when a reload added the job)
            self._started.add(job.name)
            cause = "start"
        try:
            while True:
                with gate.lock:
                    wakeups, gate.wakeups = gate.wakeups, 0
                job = next((j for j in self.settings.jobs if j.name == job.name), job)  # a reload may change it
                metrics.RUNS_STARTED.labels(job.name, cause).inc()
                with self._tables.setdefault(job.source_table, threading.Lock()):
                    result = run_job(self.settings, job, self.stop, cause=cause, wakeups=wakeups)
                merged = self._merged.pop(job.name, 0)
                if merged:
                    logger.bind(job=job.name).info("this run took {:.0f}s, longer than the schedule '{}': {} due"
                                                   " run(s) were merged into it", result.seconds, job.schedule, merged)
                systemd.notify(f"STATUS=last run: {result.line()}"[:500])
                if result.permanent and job.wake == "notify":
                    logger.bind(job=job.name).warning(
                        "wake-ups start no run of this job for {:.0f}s after a configuration error (the schedule"
                        " still runs it; fix the setting and reload)", WAKE_PAUSE)
                    with gate.lock:
                        gate.quiet_until = time.monotonic() + WAKE_PAUSE
                        gate.again = False
                with gate.lock:
                    if not gate.again or self.stop.is_set():
                        break
                    cause, gate.again, gate.cause = gate.cause, False, ""
                if job.wake == "notify" and self.stop.wait(job.wake_delay):
                    break
        finally:
            with gate.lock:
                gate.running = False

    def _on_event(self, event: JobSubmissionEvent | JobExecutionEvent) -> None:
        if isinstance(event, JobSubmissionEvent):  # EVENT_JOB_MAX_INSTANCES: one line when the run ends
            self._merged[event.job_id] += len(event.scheduled_run_times)
        else:
            logger.bind(job=event.job_id).warning(
                "run due at {} missed by more than ETL_MISFIRE_GRACE ({:.0f}s); the next one is on schedule",
                event.scheduled_run_time, self.settings.misfire_grace)
