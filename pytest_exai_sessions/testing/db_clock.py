"""``DbClock``: a test clock that moves one database along with the managers.

Every "now" of the schema (partition creation, retention, the materialized views' windows,
timestamp defaults, the ``updated_at`` triggers) reads ``unified.clock_now()``, whose body
``unified.set_clock()`` rewrites to return the frozen instant. Each connection sees the new
body from its next transaction, so moving the clock reaches open connections and pools at
once.
"""

from __future__ import annotations

from datetime import date, datetime

import psycopg

from ..clock import ManualClock
from ..errors import PersistenceError
from ..server.database import database_of


class DbClock(ManualClock):
    """A ``ManualClock`` that moves the database ``dsn`` names with it.

    Moving it calls ``unified.set_clock()``, which rewrites the body of
    ``unified.clock_now()``: every connection to that database, open or new, reads the new
    time from its next transaction. That takes the role that applied the schema (the owner
    of ``clock_now()``, with CREATE on ``unified``); other roles get a ``PersistenceError``.
    """

    def __init__(self, dsn: str, *, start: datetime | date | str | None = None) -> None:
        super().__init__(start)
        self.dsn = dsn

    def _move(self, instant: datetime | None) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("SELECT unified.set_clock(%s)", (instant,))
        except psycopg.errors.InsufficientPrivilege as error:
            reason = error.diag.message_primary
            raise PersistenceError(
                f"cannot move the clock of {_database(self.dsn)}: {reason}; moving it takes the role that applied "
                "the schema (the owner of unified.clock_now(), with CREATE on the schema unified)"
            ) from error
        except psycopg.Error as error:
            raise PersistenceError(f"moving the clock of {_database(self.dsn)} failed: {error}") from error

    def __repr__(self) -> str:
        return f"<DbClock {_database(self.dsn)}: {self._state()}>"


def has_db_clock(dsn: str) -> bool:
    """Whether the database has ``unified.set_clock()`` (not before migration 008, nor without the unified schema)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute("SELECT to_regprocedure('unified.set_clock(timestamptz)') IS NOT NULL").fetchone()
    return bool(found and found[0])


def _database(dsn: str) -> str:
    known = database_of(dsn)
    if known is not None:
        return f"database {known.name!r}"
    # A DSN of the user's own: its name is only in the string.
    try:
        name = psycopg.conninfo.conninfo_to_dict(dsn).get("dbname")
    except psycopg.ProgrammingError:
        name = None
    return f"database {name!r}" if name else "the database"
