"""The crash harness of a fixture whose database lies on a server of its own (power loss, failover)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import pytest

from ..errors import ExaiSessionsError
from ..server.database import DatabaseUnderTest
from ..testing.crash import CrashHarness
from ..testing.db_clock import DbClock


@asynccontextmanager
async def harness_on(
    make_database: Callable[[], DatabaseUnderTest],
    release: Callable[[DatabaseUnderTest], None],
    *,
    clock_start: datetime | None,
    what: str,
) -> AsyncIterator[CrashHarness]:
    """A CrashHarness, with the test's clock, on the database ``make_database()`` makes; ``release(database)`` after.

    For the harnesses on servers of their own (power loss, failover): one that does not start
    fails the test with the reason, ``what`` naming the server.
    """
    failure: str | None = None
    try:
        database = make_database()
    except ExaiSessionsError as error:
        failure = f"{what} did not start: {type(error).__name__}: {error}"
    if failure is not None:
        pytest.fail(failure, pytrace=False)  # outside the except block: the reason, not a chain
    harness = CrashHarness(database, clock=DbClock(database.dsn, start=clock_start))
    try:
        yield harness
    finally:
        try:
            await harness.aclose()
        finally:
            release(database)
