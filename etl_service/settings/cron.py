"""Crontab(5) schedules as APScheduler 3 triggers: parse an expression, fire it in one time zone.

`CronTrigger.from_crontab` counts Monday as weekday 0, ANDs day-of-month with day-of-week, and fires a
time skipped by daylight saving an hour late and a repeated one twice. Here weekdays, the day rule and the
@macros are crontab(5)'s. A wall-clock time in a spring-forward gap fires once, at the first instant after
the gap, however many scheduled times the gap holds. In a fall-back hour a fixed-time job (hour field not
starting with `*`) fires once, in the first pass; one whose hour field starts with `*` fires in both passes.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import NamedTuple
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger

_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_SEARCH_DAYS = 5 * 366  # how far ahead a fire time is looked for; a schedule with none in that span is refused
_SECOND = timedelta(seconds=1)
# Half the window searched for a UTC-offset change. Since 1970 no zone has changed its offset twice within
# six days, and only Antarctica/Vostok (1994) has turned its clocks back by more than this; bigger jumps
# forward (Pacific/Apia skipped 2011-12-30) just take a few more steps.
_NEAR = timedelta(hours=3)


class _Field(NamedTuple):
    name: str
    low: int
    high: int
    bounds: str
    names: tuple[str, ...] = ()  # the name of `low`, `low + 1`, ...

    @property
    def allowed(self) -> str:
        return f"allowed: {self.bounds}" + (f" or {self.names[0]}-{self.names[-1]}" if self.names else "")


_FIELDS = (
    _Field("second", 0, 59, "0-59"),
    _Field("minute", 0, 59, "0-59"),
    _Field("hour", 0, 23, "0-23"),
    _Field("day-of-month", 1, 31, "1-31"),
    _Field("month", 1, 12, "1-12", tuple("jan feb mar apr may jun jul aug sep oct nov dec".split())),
    _Field("day-of-week", 0, 7, "0-7 (0 and 7 are Sunday)", tuple("sun mon tue wed thu fri sat".split())),
)


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: the sorted allowed values of each field and the flags crontab(5) semantics need."""

    expression: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 is Sunday
    day_or: bool  # both day fields restricted: a day matches if either does
    hour_star: bool  # hour field starts with `*`: fires in both passes of a repeated hour
    with_seconds: bool

    def matches_day(self, day: date) -> bool:
        """Whether `day` is a firing day (month, then the crontab(5) day-of-month/day-of-week rule)."""
        by_date, by_weekday = day.day in self.days, day.isoweekday() % 7 in self.weekdays
        return day.month in self.months and ((by_date or by_weekday) if self.day_or else (by_date and by_weekday))

    def next_wall(self, start: datetime) -> datetime | None:
        """The first matching wall-clock time at or after naive `start`, or None within _SEARCH_DAYS."""
        day, clock = start.date(), start.time()
        for _ in range(_SEARCH_DAYS):
            if self.matches_day(day) and (found := self._time_at_or_after(clock)) is not None:
                return datetime.combine(day, found)
            day, clock = day + timedelta(days=1), time()
        return None

    def _time_at_or_after(self, clock: time) -> time | None:
        # Only the first hour and minute tried can be partly used up; later ones start at their smallest value.
        for hour in self.hours[bisect_left(self.hours, clock.hour):]:
            for minute in self.minutes[bisect_left(self.minutes, clock.minute) if hour == clock.hour else 0:]:
                index = bisect_left(self.seconds, clock.second) if (hour, minute) == (clock.hour, clock.minute) else 0
                if index < len(self.seconds):
                    return time(hour, minute, self.seconds[index])
        return None


def parse(expression: str) -> Schedule:
    """Parse crontab(5) syntax: 5 fields, 6 with seconds first, or an @macro. Raises ValueError naming the field."""
    text = expression.strip()
    if text.lower() == "@reboot":
        raise ValueError("@reboot is not a schedule (the service already runs every job once at start)")
    if text.startswith("@") and text.lower() not in _MACROS:
        raise ValueError(f"unknown macro {text!r} (use one of {', '.join(_MACROS)})")
    words = _MACROS.get(text.lower(), text).split()
    if len(words) not in (5, 6):
        raise ValueError(f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), "
                         f"got {len(words)}")
    with_seconds = len(words) == 6
    words = words if with_seconds else ["0", *words]
    seconds, minutes, hours, days, months, weekdays = (_expand(f, w) for f, w in zip(_FIELDS, words, strict=True))
    schedule = Schedule(text, seconds, minutes, hours, days, months, tuple(sorted({d % 7 for d in weekdays})),
                        day_or=not words[3].startswith("*") and not words[5].startswith("*"),
                        hour_star=words[2].startswith("*"), with_seconds=with_seconds)
    # 2000 is a leap year, so five years from its start meet every month, day and weekday.
    if schedule.next_wall(datetime(2000, 1, 1)) is None:
        raise ValueError(f"day-of-month and month: {text!r} never fires (no such date within 5 years)")
    return schedule


def _expand(field: _Field, text: str) -> tuple[int, ...]:
    values: set[int] = set()
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = _number(field, step_text, text) if slash else 1
        if step == 0:
            raise ValueError(f"{field.name}: step 0 in {item!r} must be 1 or more")
        if span == "*":
            low, high = field.low, field.high
        else:
            first, dash, last = span.partition("-")
            low = _value(field, first, text)
            # `a/n` runs from a to the field's end, as Vixie cron and cronie read it
            high = _value(field, last, text) if dash else field.high if slash else low
            if high < low:
                raise ValueError(f"{field.name}: range {span!r} is reversed; {field.allowed}")
        values.update(range(low, high + 1, step))
    return tuple(sorted(values))


def _number(field: _Field, word: str, text: str) -> int:
    if not word:
        raise ValueError(f"{field.name}: empty item or missing number in {text!r}; {field.allowed}")
    if not (word.isascii() and word.isdigit()):
        raise ValueError(f"{field.name}: {word!r} is not a number; {field.allowed}")
    return int(word)


def _value(field: _Field, word: str, text: str) -> int:
    if word.lower() in field.names:
        return field.low + field.names.index(word.lower())
    if field.names and word.isalpha():
        raise ValueError(f"{field.name}: unknown name {word!r}; {field.allowed}")
    number = _number(field, word, text)
    if not field.low <= number <= field.high:
        raise ValueError(f"{field.name}: {number} is out of range {field.bounds}")
    return number


class CrontabTrigger(BaseTrigger):
    """An APScheduler 3 trigger firing on a crontab(5) schedule in one time zone (DST rules: module docstring)."""

    def __init__(self, expression: str, timezone: str | tzinfo) -> None:
        self.schedule = parse(expression)
        self.timezone = ZoneInfo(timezone) if isinstance(timezone, str) else timezone

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        """The first fire time after `previous_fire_time`, or without one at or after `now`; None if none."""
        # As in CronTrigger the search starts just after previous (which the scheduler keeps <= now), as it counts
        # misfires from the times between. In UTC, because local-time arithmetic drops the fold of a repeated hour.
        start = now.astimezone(UTC) if previous_fire_time is None else \
            previous_fire_time.astimezone(UTC) + timedelta(microseconds=1)
        if start.microsecond:
            start = start.replace(microsecond=0) + _SECOND
        fire = self._fire_at_or_after(start)
        return None if fire is None else fire.astimezone(self.timezone)

    def _fire_at_or_after(self, at: datetime) -> datetime | None:
        limit = at + timedelta(days=_SEARCH_DAYS)
        while at < limit:
            if self._offset(at - _NEAR) == self._offset(at + _NEAR):
                # No offset change nearby: the next matching wall-clock time is the answer unless it is
                # itself skipped or repeated, and then only the stretch around that change needs a scan.
                wall = self.schedule.next_wall(_wall(at, self._offset(at)))
                if wall is None:
                    return None
                first, second = (self._offset(wall.replace(tzinfo=self.timezone, fold=fold)) for fold in (0, 1))
                if first == second:
                    return _instant(wall, first)
                at = max(at, _instant(wall, max(first, second)) - _NEAR)
            if (fire := self._scan(at, at + 2 * _NEAR)) is not None:
                return fire
            at += 2 * _NEAR
        return None

    def _scan(self, at: datetime, end: datetime) -> datetime | None:
        """The first fire time in [at, end), one stretch of constant UTC offset at a time."""
        # Start a little before `at`: whether the repeated hour we may be in has run once depends on it.
        start = at - _NEAR
        while start < end:
            offset = self._offset(start)
            stop = end
            if self._offset(end) != offset:
                low = start
                while stop - low > _SECOND:
                    middle = low + (stop - low) // _SECOND // 2 * _SECOND
                    low, stop = (middle, stop) if self._offset(middle) == offset else (low, middle)
            if (fire := self._first_in(start, stop, offset, at)) is not None:
                return fire
            start = stop
        return None

    def _first_in(self, start: datetime, stop: datetime, offset: timedelta, at: datetime) -> datetime | None:
        """The first fire time in [max(start, at), stop), a stretch with one UTC offset that begins at `start`."""
        before = self._offset(start - _SECOND)
        if before < offset and start >= at:
            # Clocks went forward at `start`: the skipped times, however many match, fire once, now.
            skipped = self.schedule.next_wall(_wall(start, before))
            if skipped is not None and skipped < _wall(start, offset):
                return start
        first = _wall(max(start, at), offset)
        if before > offset and not self.schedule.hour_star:
            # Clocks went back at `start`: a fixed-time job already ran in the first pass of the repeated hour.
            first = max(first, _wall(start, before))
        wall = self.schedule.next_wall(first)
        fire = None if wall is None else _instant(wall, offset)
        return fire if fire is not None and fire < stop else None

    def _offset(self, moment: datetime) -> timedelta:
        # astimezone() leaves a datetime already in the zone as it is, fold included; utcoffset() is None only
        # for naive datetimes
        return moment.astimezone(self.timezone).utcoffset() or timedelta(0)

    def __str__(self) -> str:
        return f"crontab[{self.schedule.expression}, {self.timezone}]"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ({self.schedule.expression!r}, timezone='{self.timezone}')>"


def _wall(instant: datetime, offset: timedelta) -> datetime:
    return (instant + offset).replace(tzinfo=None)


def _instant(wall: datetime, offset: timedelta) -> datetime:
    return (wall - offset).replace(tzinfo=UTC)


def next_runs(trigger_or_schedule: CrontabTrigger | Schedule, count: int = 3,
              now: datetime | None = None) -> list[datetime]:
    """The next `count` fire times from `now` (default: the clock) in the trigger's zone; a Schedule runs in UTC."""
    trigger = trigger_or_schedule
    if isinstance(trigger, Schedule):
        trigger = CrontabTrigger(trigger.expression, UTC)
    runs: list[datetime] = []
    now = now or datetime.now(UTC)
    while len(runs) < count and (fire := trigger.get_next_fire_time(runs[-1] if runs else None, now)) is not None:
        runs.append(fire)
    return runs


def format_next_runs(trigger_or_schedule: CrontabTrigger | Schedule, count: int = 3,
                     now: datetime | None = None) -> str:
    """`next runs: Mon 2026-11-23 09:00 MSK, ...` in the job's zone, with seconds for 6-field schedules."""
    schedule = trigger_or_schedule if isinstance(trigger_or_schedule, Schedule) else trigger_or_schedule.schedule
    pattern = "%a %Y-%m-%d %H:%M:%S %Z" if schedule.with_seconds else "%a %Y-%m-%d %H:%M %Z"
    runs = [f"{run:{pattern}}" for run in next_runs(trigger_or_schedule, count, now)]
    return "next runs: " + (", ".join(runs) or "none")
