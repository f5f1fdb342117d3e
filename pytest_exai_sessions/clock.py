"""The database's clock: move ``unified.clock_now()`` of one database instead of waiting.

Everything in the schema that needs the current time (partition creation, retention, the
materialized views' windows, timestamp defaults, the ``updated_at`` triggers) reads
``unified.clock_now()``, which returns the ``unified.clock`` setting when it holds a
timestamp and ``now()`` otherwise. ``DbClock`` sets it for a whole database
(``ALTER DATABASE ... SET unified.clock``): every connection opened afterwards sees it.
A connection that is already open keeps the value it started with; ``apply()`` brings it
up to date. The clock is frozen: it reads the same instant until it is moved again.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg import sql

from .errors import PersistenceError

SETTING = "unified.clock"
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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


def _setting_text(instant: datetime | None) -> str:
    # ISO 8601 with an explicit offset parses the same under any DateStyle and TimeZone;
    # '' is what clock_now() treats as "no clock set" (a RESET setting reads back as '').
    return "" if instant is None else instant.isoformat()


class DbClock:
    """The clock of the database ``dsn`` names: ``set()``, ``advance()``, ``reset()``, ``now()``.

    Setting a placeholder such as ``unified.clock`` for a database takes a superuser on
    PostgreSQL 15+ (the plugin's temporary server connects as one). Where that is not
    possible, ``apply(conn)`` sets it on one connection only.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._value: datetime | None = None
        self._dbname: str | None = None

    @property
    def value(self) -> datetime | None:
        """The instant this clock was last set to, or None when it follows the real time."""
        return self._value

    def _connect(self) -> psycopg.Connection[Any]:
        # Client-side binding: ALTER DATABASE ... SET takes no server-side parameters, so the
        # value is still passed as a parameter and quoted by psycopg as a literal.
        return psycopg.connect(self.dsn, autocommit=True, cursor_factory=psycopg.ClientCursor)

    def _alter_database(self, instant: datetime | None) -> None:
        with self._connect() as conn:
            row = conn.execute("SELECT current_database()").fetchone()
            assert row is not None
            self._dbname = row[0]
            database = sql.Identifier(row[0])
            try:
                if instant is None:
                    conn.execute(sql.SQL("ALTER DATABASE {} RESET unified.clock").format(database))
                else:
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} SET unified.clock = %s").format(database), (_setting_text(instant),)
                    )
            except psycopg.errors.InsufficientPrivilege as error:
                raise PersistenceError(
                    f"cannot set {SETTING} for database {row[0]!r}: {error}; setting it for a database takes a "
                    "superuser (or GRANT SET ON PARAMETER unified.clock); without one, use apply(conn) on each "
                    "connection"
                ) from error

    def set(self, when: datetime | date | str) -> datetime:
        """Stop the database's clock at ``when`` for every connection opened from now on; return it in UTC."""
        instant = parse_instant(when)
        self._alter_database(instant)
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
        """Let the database's clock follow the real time again (for connections opened from now on)."""
        self._alter_database(None)
        self._value = None

    def now(self) -> datetime:
        """``unified.clock_now()`` as a new connection to the database sees it, in UTC."""
        with self._connect() as conn:
            row = conn.execute("SELECT unified.clock_now()").fetchone()
        assert row is not None
        return parse_instant(row[0])

    def apply(self, conn: psycopg.Connection[Any]) -> None:
        """Give an already open connection this clock's current value (session level)."""
        conn.execute("SELECT set_config(%s, %s, false)", (SETTING, _setting_text(self._value)))

    async def apply_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """``apply()`` for an async connection."""
        await conn.execute("SELECT set_config(%s, %s, false)", (SETTING, _setting_text(self._value)))

    def __repr__(self) -> str:
        state = self._value.isoformat() if self._value is not None else "real time"
        return f"<DbClock {self._dbname or self.dsn!r}: {state}>"
