"""Quick start: a throwaway PostgreSQL, the unified schema, and a persistent SessionManager.

Nothing to configure: installing pytest-exai-sessions registers the fixtures.
"""

import psycopg
import pytest


@pytest.mark.asyncio
async def test_sessions_are_written_through_to_postgres(session_manager, exai_dsn):
    session = await session_manager.ensure("user-42", user_id="42", data={"cart": ["apple"]})
    await session_manager.update_activity("user-42", request_duration_ms=15)

    # Every returned await is committed: another connection sees it at once.
    with psycopg.connect(exai_dsn) as conn:
        row = conn.execute(
            "SELECT user_id, session_data, request_count, total_duration_ms FROM public.sessions WHERE session_id = %s",
            (session.session_id,),
        ).fetchone()
    assert row == ("42", {"cart": ["apple"]}, 1, 15)


@pytest.mark.asyncio
async def test_each_test_gets_a_fresh_database(session_manager):
    # The session created by the test above does not exist here.
    assert await session_manager.get("user-42") is None
    assert await session_manager.list_ids() == []


def test_the_unified_schema_is_applied(exai_dsn):
    with psycopg.connect(exai_dsn) as conn:
        tables = conn.execute(
            "SELECT to_regclass('public.sessions') IS NOT NULL, to_regclass('unified.event_metric_events') IS NOT NULL"
        ).fetchone()
    assert tables == (True, True)
