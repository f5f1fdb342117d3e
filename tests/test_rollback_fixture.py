"""exai_rollback_conn: a test's writes live in one transaction that is rolled back afterwards."""

import psycopg
import pytest


@pytest.mark.asyncio
@pytest.mark.parametrize("run", [1, 2])
async def test_writes_are_rolled_back_between_tests(exai_rollback_conn, run):
    # Both runs see an empty table: the other run's row was never committed.
    cur = await exai_rollback_conn.execute("SELECT count(*) FROM public.sessions")
    assert await cur.fetchone() == (0,)
    await exai_rollback_conn.execute("INSERT INTO public.sessions (session_id) VALUES (%s)", (f"run-{run}",))
    cur = await exai_rollback_conn.execute("SELECT session_id FROM public.sessions")
    assert await cur.fetchall() == [(f"run-{run}",)]


@pytest.mark.asyncio
async def test_another_connection_does_not_see_uncommitted_rows(exai_rollback_conn, exai_shared_dsn):
    await exai_rollback_conn.execute("INSERT INTO public.sessions (session_id) VALUES ('invisible')")
    with psycopg.connect(exai_shared_dsn) as other:
        assert other.execute("SELECT count(*) FROM public.sessions").fetchone() == (0,)
