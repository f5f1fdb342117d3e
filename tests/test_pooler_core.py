"""The core through a real PgBouncer (server/pooler.py) in front of the run's PostgreSQL.

In transaction mode each transaction of a client connection may run on another server
connection: what a session keeps (prepared statements, session settings, session advisory
locks) is gone, or somebody else's, at the next transaction. In either mode a pooler can go
away and come back under a running app. Every count is also read over a direct connection.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pytest_exai_sessions import PersistenceError, SessionManager

SESSIONS = [f"session-{n:02d}" for n in range(50)]


def pooled(pooler, dsn: str) -> str:
    """The DSN of ``dsn``'s database through ``pooler``."""
    return pooler.dsn(conninfo_to_dict(dsn)["dbname"])


def request_counts(dsn: str) -> dict[str, int]:
    """Every session's request_count, read over ``dsn`` (a direct connection)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return dict(conn.execute("SELECT session_id, request_count FROM public.sessions").fetchall())


async def requests_at_once(manager: SessionManager, acknowledged: Counter[str]) -> list[BaseException]:
    """One ``update_activity`` per session, all at once; counts the acknowledged ones, returns the failures."""

    async def one(session_id: str) -> None:
        await manager.update_activity(session_id, 1)
        acknowledged[session_id] += 1

    results = await asyncio.gather(*(one(s) for s in SESSIONS), return_exceptions=True)
    return [result for result in results if result is not None]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["session"])
async def test_calls_fail_while_the_pooler_is_down_and_the_app_recovers_after_its_restart(
    exai_pgbouncer, exai_dsn, mode
):
    pooler = exai_pgbouncer(mode)
    acknowledged: Counter[str] = Counter()
    # A call waits a second for a connection, not five: the calls while it is down end sooner.
    async with SessionManager.connect(pooled(pooler, exai_dsn), store_options={"timeout": 1}) as manager:
        for session_id in SESSIONS:
            await manager.ensure(session_id)
        for _ in range(3):
            assert await requests_at_once(manager, acknowledged) == []

        pooler.restart()  # while the app is idle: every connection of its pool is dead
        assert await requests_at_once(manager, acknowledged) == []

        pooler.kill()
        failures = await requests_at_once(manager, acknowledged)
        assert len(failures) == len(SESSIONS)
        assert all(isinstance(failure, PersistenceError) for failure in failures), failures
        with pytest.raises(PersistenceError):
            await manager.get(SESSIONS[0])

        pooler.restart()  # the app itself is not restarted: its pool is replaced
        for _ in range(3):
            assert await requests_at_once(manager, acknowledged) == []
        served = {session_id: (await manager.get(session_id)).request_count for session_id in SESSIONS}

    assert acknowledged == dict.fromkeys(SESSIONS, 7)
    assert served == request_counts(exai_dsn) == acknowledged
