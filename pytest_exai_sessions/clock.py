"""Clocks: where the manager and the database get "now" from.

A ``SessionManager`` reads the time from one injectable ``Clock``: ``SYSTEM_CLOCK`` (the
real time) in production, a ``ManualClock`` in a test (``testing.db_clock.DbClock`` is one
that moves a database along with it). A set clock is frozen: it reads the same instant
until it is moved again.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol, runtime_checkable

SETTING = "unified.clock"  # the session setting clock_now() reads first, on one connection
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now()`` returning an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real time. Reads ``datetime.now`` at each call, so tools that patch it (time-machine) reach it."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "<SystemClock>"


SYSTEM_CLOCK = SystemClock()


def parse_instant(value: datetime | date | str) -> datetime:
    """An aware UTC datetime from a datetime, a date (midnight UTC) or an ISO 8601 string.

    A string or datetime without a UTC offset is refused rather than guessed: the same
    wall-clock time means different instants in different time zones.
    """
    if isinstance(value, str):
        text = value.strip()
        if _DATE_ONLY.match(text):
            value = date.fromisoformat(text)
        else:
            try:
                value = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an ISO 8601 date or timestamp (e.g. '2027-03-15' or '2027-03-15T12:00:00+00:00')"
                ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{value.isoformat()} has no UTC offset; give one (e.g. +00:00 or Z) or pass a date")
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=UTC)
    raise TypeError(f"a clock time must be a datetime, a date or an ISO 8601 str, not {type(value).__name__}")


class ManualClock:
    """A clock a test moves: the real time until ``set()``, then frozen until moved again.

    ``start``: the instant it reads at first and returns to on ``reset()`` (None: the real time).
    Subclasses move other clocks in the same step by overriding ``_move``.
    """

    def __init__(self, start: datetime | date | str | None = None) -> None:
        self.start = None if start is None else parse_instant(start)
        self._value = self.start

    @property
    def value(self) -> datetime | None:
        """The instant the clock stands at, or None while it follows the real time."""
        return self._value

    def now(self) -> datetime:
        return self._value if self._value is not None else SYSTEM_CLOCK.now()

    def set(self, when: datetime | date | str) -> datetime:
        """Stop the clock at ``when``; return it in UTC."""
        instant = parse_instant(when)
        self._move(instant)
        self._value = instant
        return instant

    def advance(
        self,
        delta: timedelta | None = None,
        /,
        *,
        weeks: float = 0,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
    ) -> datetime:
        """Move the clock by ``delta`` (or the keyword amounts); from the real time if it was not set."""
        if delta is not None and not isinstance(delta, timedelta):
            raise TypeError(f"delta must be a timedelta, not {type(delta).__name__}")
        step = (delta or timedelta()) + timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
        return self.set(self.now() + step)

    def reset(self) -> None:
        """Back to ``start``: the real time unless the clock was built with a start instant."""
        self._move(self.start)
        self._value = self.start

    def _move(self, instant: datetime | None) -> None:
        """Called before the clock changes; raising leaves it where it was."""

    def _state(self) -> str:
        return self._value.isoformat() if self._value is not None else "real time"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self._state()}>"
