"""End server backends from outside, as the death of their client would."""

from __future__ import annotations

import time
from typing import Any

import psycopg


def terminate_backends(
    conn: psycopg.Connection[Any],
    *,
    application_name: str | None = None,
    database: str | None = None,
    timeout: float = 5.0,
) -> None:
    """Terminate the backends of one application name, or of one database, and wait until they are gone.

    ``conn`` is an autocommit connection of another client (its own backend is spared).
    Polled every millisecond rather than with ``pg_terminate_backend(pid, timeout)``, which
    the server re-checks only every 100 ms; terminated again each round, since a connection
    a pool was opening meanwhile shows up only later.
    """
    if (application_name is None) == (database is None):
        raise ValueError("give exactly one of application_name and database")
    column, value = ("application_name", application_name) if application_name is not None else ("datname", database)
    query = psycopg.sql.SQL(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {} = %s AND pid <> pg_backend_pid()"
    ).format(psycopg.sql.Identifier(column))
    deadline = time.monotonic() + timeout
    while conn.execute(query, (value,)).fetchone() is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backends of {column} {value!r} did not exit within {timeout:g}s")
        time.sleep(0.001)
