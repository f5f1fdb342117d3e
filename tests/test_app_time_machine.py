"""The README's recipe for an app that freezes time itself (here with time-machine).

The app's code reads Python's clock (``datetime.now``, ``time.time``); time-machine moves
that, ``exai_db_clock`` moves the managers and the database. The fixture moves both in one
step, so the app, its sessions and the database always agree.
"""

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pytest_exai_sessions import SessionManager

pytest.importorskip("time_machine")  # its pytest plugin gives the time_machine fixture


# The recipe, as the README gives it.
@pytest.fixture
def travel(exai_db_clock, time_machine):
    """``travel(when)``: move the app's frozen time and the sessions' and database's clock to ``when``."""

    def to(when):
        instant = exai_db_clock.set(when)
        time_machine.move_to(instant, tick=False)
        return instant

    return to


def app_deadline(hours):
    """What an app computes from Python's own clock."""
    return datetime.now(UTC) + timedelta(hours=hours)


@pytest.mark.asyncio
@pytest.mark.exai_sessions(session_timeout_secs=3 * 3600)  # expires_at ends it, not idleness
async def test_the_app_the_sessions_and_the_database_agree(travel, session_manager, exai_dsn, exai_db_clock):
    start = travel("2028-02-29T23:00:00Z")
    session = await session_manager.ensure("cart", expires_at=app_deadline(hours=2))
    with psycopg.connect(exai_dsn) as conn:
        database_now = conn.execute("SELECT unified.clock_now()").fetchone()[0]

    assert datetime.now(UTC) == session.created_at == database_now == start
    assert time.time() == start.timestamp()

    travel(exai_db_clock.now() + timedelta(hours=1, minutes=59))
    assert await session_manager.get("cart") is not None
    travel(exai_db_clock.now() + timedelta(minutes=1))  # 2028-03-01T01:00Z: the app's deadline
    assert await session_manager.get("cart") is None
    assert datetime.now(UTC) == datetime(2028, 3, 1, 1, tzinfo=UTC)


@pytest.mark.asyncio
async def test_a_manager_on_the_system_clock_follows_time_machine(exai_dsn, exai_db_clock, time_machine):
    """An app's own manager, built without a clock: it reads datetime.now, which time-machine moves."""
    time_machine.move_to(datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC), tick=False)
    exai_db_clock.set(datetime.now(UTC))  # the database follows the app's frozen time
    async with SessionManager.connect(exai_dsn) as manager:
        session = await manager.ensure("year-end")
        time_machine.shift(timedelta(hours=1, seconds=1))
        assert await manager.get("year-end") is None
    assert session.created_at == datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
