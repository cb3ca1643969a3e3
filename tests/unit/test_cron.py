"""Crontab schedules: parsing, a year of fire times against croniter, the DST rules, errors, next-runs text."""

from __future__ import annotations

import pickle
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from croniter import croniter

from etl_service.settings.cron import CrontabTrigger, Schedule, format_next_runs, next_runs, parse

NY = ZoneInfo("America/New_York")


def fires(trigger: CrontabTrigger, start: datetime, end: datetime) -> list[str]:
    """Every fire time in [start, end) as local time with its UTC offset (which tells the two passes of a
    repeated hour apart), iterating get_next_fire_time as the scheduler does."""
    out = []
    fire = trigger.get_next_fire_time(None, start)
    while fire is not None and fire < end:
        out.append(f"{fire:%Y-%m-%d %H:%M:%S%z}")
        fire = trigger.get_next_fire_time(fire, fire)
    return out


def next_utc(trigger: CrontabTrigger, previous: datetime | None, now: datetime) -> datetime | None:
    """The next fire time in UTC: by PEP 495 a time in a repeated hour never equals one in another zone."""
    fire = trigger.get_next_fire_time(previous, now)
    return None if fire is None else fire.astimezone(UTC)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- parsing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expression", "field", "values"), [
    ("0 9 * * 1-5", "weekdays", (1, 2, 3, 4, 5)),
    ("0 9 * * 0", "weekdays", (0,)),
    ("0 9 * * 7", "weekdays", (0,)),
    ("0 9 * * 5-7", "weekdays", (0, 5, 6)),
    ("0 9 * * MON-fri", "weekdays", (1, 2, 3, 4, 5)),
    ("0 9 * * */2", "weekdays", (0, 2, 4, 6)),
    ("0 9 * jan-mar,OCT *", "months", (1, 2, 3, 10)),
    ("5/20 * * * *", "minutes", (5, 25, 45)),
    ("10-50/40 * * * *", "minutes", (10, 50)),
    ("*/15 * * * *", "minutes", (0, 15, 30, 45)),
    ("1,5-7,3 * * * *", "minutes", (1, 3, 5, 6, 7)),
    ("0 20/2 * * *", "hours", (20, 22)),
    ("0 0 */10 * *", "days", (1, 11, 21, 31)),
    ("*/20 * * * * *", "seconds", (0, 20, 40)),
    ("0 * * * *", "seconds", (0,)),
])
def test_fields_expand(expression: str, field: str, values: tuple[int, ...]) -> None:
    assert getattr(parse(expression), field) == values


@pytest.mark.parametrize(("expression", "day_or", "hour_star", "with_seconds"), [
    ("0 0 1 * mon", True, False, False),    # both day fields restricted: either matches
    ("0 0 */2 * mon", False, False, False),  # a field starting with `*` counts as unrestricted
    ("0 0 1 * *", False, False, False),
    ("0 */2 * * *", False, True, False),
    ("*/1 * * * * *", False, True, True),
])
def test_flags(expression: str, day_or: bool, hour_star: bool, with_seconds: bool) -> None:
    schedule = parse(expression)
    assert (schedule.day_or, schedule.hour_star, schedule.with_seconds) == (day_or, hour_star, with_seconds)


@pytest.mark.parametrize(("macro", "expression"), [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"), ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@hourly", "0 * * * *"), ("@DAILY", "0 0 * * *"),
])
def test_macros(macro: str, expression: str) -> None:
    assert parse(macro) == Schedule(**{**vars(parse(expression)), "expression": macro})


@pytest.mark.parametrize(("expression", "message"), [
    ("0 9 * * 8", "day-of-week: 8 is out of range 0-7 (0 and 7 are Sunday)"),
    ("60 * * * *", "minute: 60 is out of range 0-59"),
    ("0 24 * * *", "hour: 24 is out of range 0-23"),
    ("0 0 0 * *", "day-of-month: 0 is out of range 1-31"),
    ("0 0 * 13 *", "month: 13 is out of range 1-12"),
    ("60 0 0 * * *", "second: 60 is out of range 0-59"),
    ("0 0 * * 5-1", "day-of-week: range '5-1' is reversed; allowed: 0-7 (0 and 7 are Sunday) or sun-sat"),
    ("0 0 * * fri-mon", "day-of-week: range 'fri-mon' is reversed; allowed: 0-7 (0 and 7 are Sunday) or sun-sat"),
    ("0 12-3 * * *", "hour: range '12-3' is reversed; allowed: 0-23"),
    ("*/0 * * * *", "minute: step 0 in '*/0' must be 1 or more"),
    ("0 0 1-31/0 * *", "day-of-month: step 0 in '1-31/0' must be 1 or more"),
    ("1,,2 * * * *", "minute: empty item or missing number in '1,,2'; allowed: 0-59"),
    ("0 1, * * *", "hour: empty item or missing number in '1,'; allowed: 0-23"),
    ("0 0 * * mon-",
     "day-of-week: empty item or missing number in 'mon-'; allowed: 0-7 (0 and 7 are Sunday) or sun-sat"),
    ("*/ * * * *", "minute: empty item or missing number in '*/'; allowed: 0-59"),
    ("0 0 * * sunday", "day-of-week: unknown name 'sunday'; allowed: 0-7 (0 and 7 are Sunday) or sun-sat"),
    ("0 0 * foo *", "month: unknown name 'foo'; allowed: 1-12 or jan-dec"),
    ("0 0 * * 1-5-7", "day-of-week: '5-7' is not a number; allowed: 0-7 (0 and 7 are Sunday) or sun-sat"),
    ("x * * * *", "minute: 'x' is not a number; allowed: 0-59"),
    ("*/x * * * *", "minute: 'x' is not a number; allowed: 0-59"),
    ("0 0 * jan/feb *", "month: 'feb' is not a number; allowed: 1-12 or jan-dec"),
    ("0 mon * * *", "hour: 'mon' is not a number; allowed: 0-23"),
    ("0 0 30 2 *", "day-of-month and month: '0 0 30 2 *' never fires (no such date within 5 years)"),
    ("0 0 31 4,6,9,11 *", "day-of-month and month: '0 0 31 4,6,9,11 *' never fires (no such date within 5 years)"),
    ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), got 4"),
    ("* * * * * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), got 7"),
    ("", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), got 0"),
    ("@reboot", "@reboot is not a schedule (the service already runs every job once at start)"),
    ("@fortnightly", "unknown macro '@fortnightly' (use one of @yearly, @annually, @monthly, @weekly, @daily, "
                     "@midnight, @hourly)"),
    ("@daily 5", "unknown macro '@daily 5' (use one of @yearly, @annually, @monthly, @weekly, @daily, "
                 "@midnight, @hourly)"),
])
def test_bad_expressions_name_the_problem(expression: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(expression)
    assert str(info.value) == message


def test_february_29_is_a_schedule() -> None:
    trigger = CrontabTrigger("0 0 29 2 *", UTC)
    assert fires(trigger, utc(2026, 1, 1), utc(2033, 1, 1)) == [
        "2028-02-29 00:00:00+0000", "2032-02-29 00:00:00+0000"]


# --- a year against croniter -----------------------------------------------------------------------------

# (expression, croniter options). croniter reads `*/10` in day-of-month as restricted and so ORs it with
# day-of-week; crontab(5) counts any field starting with `*` as unrestricted, hence day_or=False there.
EXPRESSIONS: list[tuple[str, dict[str, Any]]] = [
    ("0 9 * * 1-5", {}),
    ("30 8 * * 0", {}),
    ("30 8 * * 7", {}),
    ("15 10 * * MON,wed,Fri", {}),
    ("0 */6 * * sat,sun", {}),
    ("10-50/40 1,2 * * *", {}),
    ("0 12 1,15 * fri", {}),
    ("0 7 */10 * mon", {"day_or": False}),
    ("0 6 * jan-mar,oct 2-4", {}),
    ("45 */1 * * sun", {}),
    ("5/20 */5 1-7 * *", {}),
    ("@annually", {}),
    ("@monthly", {}),
    ("@weekly", {}),
    ("@daily", {}),
    ("15 30 1 * * sun", {"second_at_beginning": True}),
]
ZONES = ["UTC", "Europe/Moscow", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"]

# croniter differs from our DST rules on these days, all DST transition days, so they are left out of the
# comparison and checked here instead. croniter fires a fixed-time job in both passes of a repeated hour
# (we fire in the first only), and skips a time in a spring-forward gap when the hour field is `*`
# (we fire it once at the end of the gap, as for any other job).
TRANSITION_DAYS: dict[tuple[str, str], tuple[str, list[str]]] = {
    # New York goes back from 02:00 EDT to 01:00 EST: 01:10 and 01:50 happen twice.
    ("10-50/40 1,2 * * *", "America/New_York"): ("2026-11-01", [
        "01:10:00-0400", "01:50:00-0400", "02:10:00-0500", "02:50:00-0500"]),
    # Berlin goes back from 03:00 CEST to 02:00 CET: 02:10 and 02:50 happen twice.
    ("10-50/40 1,2 * * *", "Europe/Berlin"): ("2026-10-25", [
        "01:10:00+0200", "01:50:00+0200", "02:10:00+0200", "02:50:00+0200"]),
    # Lord Howe goes back half an hour, from 02:00 (+11) to 01:30 (+10:30): only 01:50 happens twice.
    ("10-50/40 1,2 * * *", "Australia/Lord_Howe"): ("2026-04-05", [
        "01:10:00+1100", "01:50:00+1100", "02:10:00+1030", "02:50:00+1030"]),
    ("15 30 1 * * sun", "America/New_York"): ("2026-11-01", ["01:30:15-0400"]),
    ("15 30 1 * * sun", "Australia/Lord_Howe"): ("2026-04-05", ["01:30:15+1100"]),
    # New York skips 02:00-03:00 EST->EDT and Berlin 02:00-03:00 CET->CEST: 02:45 fires at 03:00.
    ("45 */1 * * sun", "America/New_York"): ("2026-03-08", [
        "00:45:00-0500", "01:45:00-0500", "03:00:00-0400", *(f"{h:02}:45:00-0400" for h in range(3, 24))]),
    ("45 */1 * * sun", "Europe/Berlin"): ("2026-03-29", [
        "00:45:00+0100", "01:45:00+0100", "03:00:00+0200", *(f"{h:02}:45:00+0200" for h in range(3, 24))]),
}


def croniter_fires(expression: str, options: dict[str, Any], start: datetime, end: datetime) -> list[str]:
    # croniter returns times after its start; ours starts at `start` inclusive
    times = croniter(expression, start - timedelta(seconds=1), ret_type=datetime, **options)
    out = []
    while (fire := times.get_next(datetime)) < end:
        out.append(f"{fire:%Y-%m-%d %H:%M:%S%z}")
    return out


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize(("expression", "options"), EXPRESSIONS, ids=[e for e, _ in EXPRESSIONS])
def test_a_year_matches_croniter(expression: str, options: dict[str, Any], zone: str) -> None:
    tz = ZoneInfo(zone)
    start, end = datetime(2026, 1, 1, tzinfo=tz), datetime(2027, 1, 1, tzinfo=tz)
    ours = fires(CrontabTrigger(expression, tz), start, end)
    theirs = croniter_fires(expression, options, start, end)
    skip = TRANSITION_DAYS.get((expression, zone), ("-", []))[0]
    assert [t for t in ours if not t.startswith(skip)] == [t for t in theirs if not t.startswith(skip)]
    assert ours  # not an empty comparison


@pytest.mark.parametrize(("expression", "zone"), TRANSITION_DAYS)
def test_transition_days_croniter_reads_otherwise(expression: str, zone: str) -> None:
    day, expected = TRANSITION_DAYS[expression, zone]
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(day).replace(tzinfo=tz)
    assert start.utcoffset() != (start + timedelta(days=1)).utcoffset()  # a DST transition day indeed
    assert fires(CrontabTrigger(expression, tz), start, start + timedelta(days=1)) == [
        f"{day} {t}" for t in expected]


# --- daylight saving time --------------------------------------------------------------------------------

def test_time_in_the_gap_fires_once_at_the_end_of_the_gap() -> None:
    trigger = CrontabTrigger("30 2 * * *", "America/New_York")  # 2026-03-08 02:00 EST -> 03:00 EDT
    assert next_utc(trigger, None, utc(2026, 3, 8, 0)) == utc(2026, 3, 8, 7)
    assert fires(trigger, utc(2026, 3, 7), utc(2026, 3, 10)) == [
        "2026-03-07 02:30:00-0500", "2026-03-08 03:00:00-0400", "2026-03-09 02:30:00-0400"]


def test_several_times_in_one_gap_fire_once() -> None:
    trigger = CrontabTrigger("*/15 2 * * *", "America/New_York")
    assert fires(trigger, utc(2026, 3, 8, 6), utc(2026, 3, 9, 6, 20)) == [
        "2026-03-08 03:00:00-0400", "2026-03-09 02:00:00-0400", "2026-03-09 02:15:00-0400"]


def test_the_end_of_the_gap_itself_is_a_fire_time() -> None:
    trigger = CrontabTrigger("30 2 * * *", "America/New_York")
    assert next_utc(trigger, None, utc(2026, 3, 8, 7)) == utc(2026, 3, 8, 7)
    assert next_utc(trigger, utc(2026, 3, 8, 7), utc(2026, 3, 8, 7)) == utc(2026, 3, 9, 6, 30)


def test_fixed_time_in_the_repeated_hour_fires_once_in_the_first_pass() -> None:
    trigger = CrontabTrigger("30 1 * * *", "America/New_York")  # 2026-11-01 02:00 EDT -> 01:00 EST
    assert fires(trigger, utc(2026, 10, 31), utc(2026, 11, 3)) == [
        "2026-10-31 01:30:00-0400", "2026-11-01 01:30:00-0400", "2026-11-02 01:30:00-0500"]


def test_fixed_time_job_started_in_the_second_pass_waits_for_the_next_day() -> None:
    trigger = CrontabTrigger("30 1 * * *", "America/New_York")
    assert next_utc(trigger, None, utc(2026, 11, 1, 6, 10)) == utc(2026, 11, 2, 6, 30)  # now 01:10 EST


def test_wildcard_hour_keeps_its_rhythm_through_the_repeated_hour() -> None:
    trigger = CrontabTrigger("*/15 * * * *", "America/New_York")
    assert fires(trigger, utc(2026, 11, 1, 4, 45), utc(2026, 11, 1, 7, 1)) == [
        "2026-11-01 00:45:00-0400", "2026-11-01 01:00:00-0400", "2026-11-01 01:15:00-0400",
        "2026-11-01 01:30:00-0400", "2026-11-01 01:45:00-0400", "2026-11-01 01:00:00-0500",
        "2026-11-01 01:15:00-0500", "2026-11-01 01:30:00-0500", "2026-11-01 01:45:00-0500",
        "2026-11-01 02:00:00-0500"]
    assert next_utc(trigger, None, utc(2026, 11, 1, 6, 10)) == utc(2026, 11, 1, 6, 15)  # now 01:10 EST


def test_wildcard_hour_resumes_on_the_wall_clock_after_the_gap() -> None:
    every_15 = CrontabTrigger("*/15 * * * *", "America/New_York")
    assert fires(every_15, utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 20)) == [
        "2026-03-08 01:30:00-0500", "2026-03-08 01:45:00-0500", "2026-03-08 03:00:00-0400",
        "2026-03-08 03:15:00-0400"]
    # 02:30 does not exist: like any time in a gap it fires once, at 03:00
    at_30 = CrontabTrigger("30 * * * *", "America/New_York")
    assert fires(at_30, utc(2026, 3, 8, 6), utc(2026, 3, 8, 8)) == [
        "2026-03-08 01:30:00-0500", "2026-03-08 03:00:00-0400", "2026-03-08 03:30:00-0400"]


def test_lord_howe_half_hour_shifts() -> None:
    # 2026-04-05 02:00 (+11) -> 01:30 (+10:30); 2026-10-04 02:00 (+10:30) -> 02:30 (+11)
    every_15 = CrontabTrigger("*/15 * * * *", "Australia/Lord_Howe")
    assert fires(every_15, utc(2026, 4, 4, 14, 15), utc(2026, 4, 4, 15, 45)) == [
        "2026-04-05 01:15:00+1100", "2026-04-05 01:30:00+1100", "2026-04-05 01:45:00+1100",
        "2026-04-05 01:30:00+1030", "2026-04-05 01:45:00+1030", "2026-04-05 02:00:00+1030"]
    assert fires(CrontabTrigger("45 1 * * *", "Australia/Lord_Howe"), utc(2026, 4, 4), utc(2026, 4, 5, 12)) == [
        "2026-04-05 01:45:00+1100"]
    assert fires(CrontabTrigger("15 2 * * *", "Australia/Lord_Howe"), utc(2026, 10, 3), utc(2026, 10, 4)) == [
        "2026-10-04 02:30:00+1100"]
    assert fires(every_15, utc(2026, 10, 3, 14, 45), utc(2026, 10, 3, 15, 50)) == [
        "2026-10-04 01:15:00+1030", "2026-10-04 01:30:00+1030", "2026-10-04 01:45:00+1030",
        "2026-10-04 02:30:00+1100", "2026-10-04 02:45:00+1100"]


def test_a_skipped_day_fires_once_when_it_is_over() -> None:
    # Samoa skipped 2011-12-30 entirely, jumping from UTC-10 to UTC+14
    trigger = CrontabTrigger("0 9 * * *", "Pacific/Apia")
    assert fires(trigger, utc(2011, 12, 29), utc(2011, 12, 31)) == [
        "2011-12-29 09:00:00-1000", "2011-12-31 00:00:00+1400", "2011-12-31 09:00:00+1400"]


def test_seconds_schedule_through_the_repeated_hour() -> None:
    trigger = CrontabTrigger("*/20 59 1 * * *", "America/New_York")
    assert fires(trigger, utc(2026, 11, 1, 5), utc(2026, 11, 1, 8)) == [
        "2026-11-01 01:59:00-0400", "2026-11-01 01:59:20-0400", "2026-11-01 01:59:40-0400"]


def test_timing_of_get_next_fire_time() -> None:
    trigger = CrontabTrigger("* * * * * *", "America/New_York")
    for label, at in [("common case", utc(2026, 6, 1, 12)), ("near a transition", utc(2026, 11, 1, 5, 30))]:
        calls = 2000
        began = time.perf_counter()
        for _ in range(calls):
            trigger.get_next_fire_time(at, at)
        print(f"get_next_fire_time, every second, {label}: {(time.perf_counter() - began) / calls * 1e6:.0f} us/call")
    assert next_utc(trigger, utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 5, 30)) == utc(2026, 11, 1, 5, 30, 1)


# --- the APScheduler contract ----------------------------------------------------------------------------

def test_next_fire_time_follows_the_previous_one_not_now() -> None:
    # As CronTrigger: the scheduler counts misfires from the fire times between previous and now.
    trigger = CrontabTrigger("*/5 * * * *", UTC)
    assert next_utc(trigger, utc(2026, 1, 1, 12), utc(2026, 1, 1, 12, 30)) == utc(2026, 1, 1, 12, 5)
    assert next_utc(trigger, None, utc(2026, 1, 1, 12, 30)) == utc(2026, 1, 1, 12, 30)


def test_fractional_seconds_round_up() -> None:
    trigger = CrontabTrigger("*/1 * * * * *", UTC)
    assert next_utc(trigger, None, datetime(2026, 1, 1, 12, 0, 0, 500, UTC)) == utc(2026, 1, 1, 12, 0, 1)
    assert next_utc(trigger, datetime(2026, 1, 1, 12, 0, 0, 500, UTC), utc(2026, 1, 1, 13)) == \
        utc(2026, 1, 1, 12, 0, 1)


def test_fire_times_are_in_the_job_zone() -> None:
    fire = CrontabTrigger("0 9 * * *", "Europe/Moscow").get_next_fire_time(None, utc(2026, 1, 1))
    assert (fire, fire.tzinfo if fire else None) == (utc(2026, 1, 1, 6), ZoneInfo("Europe/Moscow"))


def test_text_and_pickle() -> None:
    trigger = CrontabTrigger("0 9 * * 1-5", "Europe/Moscow")
    assert (str(trigger), repr(trigger)) == (
        "crontab[0 9 * * 1-5, Europe/Moscow]", "<CrontabTrigger ('0 9 * * 1-5', timezone='Europe/Moscow')>")
    copy = pickle.loads(pickle.dumps(trigger))  # job stores other than memory pickle their triggers
    assert next_utc(copy, None, utc(2026, 1, 1)) == utc(2026, 1, 1, 6)


def test_background_scheduler_accepts_the_trigger() -> None:
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start(paused=True)  # paused: jobs get their next run time but nothing runs
    try:
        scheduler.add_job(print, trigger=CrontabTrigger("0 0 1 1 *", "Europe/Moscow"), id="yearly")
        jobs = scheduler.get_jobs()
        moscow = ZoneInfo("Europe/Moscow")
        next_new_year = datetime(datetime.now(moscow).year + 1, 1, 1, tzinfo=moscow)
        assert [(job.id, job.next_run_time) for job in jobs] == [("yearly", next_new_year)]
    finally:
        scheduler.shutdown(wait=False)


# --- next runs -------------------------------------------------------------------------------------------

def test_format_next_runs() -> None:
    now = utc(2026, 11, 22, 12)
    assert format_next_runs(CrontabTrigger("0 9 * * *", "Europe/Moscow"), now=now) == \
        "next runs: Mon 2026-11-23 09:00 MSK, Tue 2026-11-24 09:00 MSK, Wed 2026-11-25 09:00 MSK"
    assert format_next_runs(parse("*/1 * * * * *"), count=2, now=now) == \
        "next runs: Sun 2026-11-22 12:00:00 UTC, Sun 2026-11-22 12:00:01 UTC"
    assert format_next_runs(CrontabTrigger("30 1 * * *", NY), count=2, now=utc(2026, 10, 31, 12)) == \
        "next runs: Sun 2026-11-01 01:30 EDT, Mon 2026-11-02 01:30 EST"


def test_next_runs() -> None:
    assert next_runs(CrontabTrigger("0 0 1 * *", "Asia/Kolkata"), count=2, now=utc(2026, 1, 15)) == [
        datetime(2026, 2, 1, tzinfo=ZoneInfo("Asia/Kolkata")), datetime(2026, 3, 1, tzinfo=ZoneInfo("Asia/Kolkata"))]
    assert next_runs(parse("@yearly"), count=1, now=utc(2026, 1, 15)) == [utc(2027, 1, 1)]
    assert [run.date() for run in next_runs(parse("0 0 * * 0"), now=utc(2026, 1, 1))] == [
        date(2026, 1, 4), date(2026, 1, 11), date(2026, 1, 18)]
