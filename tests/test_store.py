"""SessionStore's statements as PostgreSQL plans them, on a table without statistics yet."""

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pytest_exai_sessions.models import utc_now
from pytest_exai_sessions.store import _fetch_live_query, _record_request_query, _record_requests_query, _update_query

SESSIONS = 2000

STATEMENTS = {
    "record_request": (_record_request_query(), {"duration_ms": 5}),
    "fetch_live": (_fetch_live_query(), {}),
    "update": (_update_query(["data"], compare_version=False), {"set_data": Jsonb({"x": 1})}),
}


def indexes_used(plan):
    """The names of the indexes a JSON plan (of EXPLAIN) reads, with how many rows each scan returned."""
    found = []
    if "Index Name" in plan:
        found.append((plan["Index Name"], plan["Actual Rows"]))
    for child in plan.get("Plans", []):
        found.extend(indexes_used(child))
    return found


@pytest.mark.asyncio
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("statement", STATEMENTS, ids=STATEMENTS)
async def test_a_single_session_statement_reads_only_its_row(exai_dsn, statement, plan_cache_mode):
    """Through the session_id index, whatever the planner knows: not by reading every live session."""
    query, params = STATEMENTS[statement]
    now = utc_now()
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO public.sessions (session_id) SELECT 's' || n FROM generate_series(1, %s) AS n", (SESSIONS,)
        )
        await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")  # applies to prepared statements
        explain = b"EXPLAIN (ANALYZE, FORMAT JSON) " + (query if isinstance(query, bytes) else query.as_bytes(conn))
        params = {**params, "id": "s7", "now": now, "stale_before": now.replace(year=2000)}
        cur = await conn.execute(explain, params, prepare=True)
        plan = (await cur.fetchone())[0][0]["Plan"]

    assert indexes_used(plan) == [("sessions_session_id_key", 1)]


@pytest.mark.asyncio
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_batch_reads_only_its_rows(exai_dsn, plan_cache_mode):
    """update_activity_many's statement: the batch's rows through the session_id index, no other.

    On a table this size; on a small one the planner rightly prefers reading it whole.
    """
    ids = [f"s{n}" for n in range(1, 51)]
    now = utc_now()
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO public.sessions (session_id) SELECT 's' || n FROM generate_series(1, %s) AS n", (20_000,)
        )
        await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        params = {
            "ids": ids,
            "counts": [1] * len(ids),
            "durations": [5] * len(ids),
            "now": now,
            "stale_before": now.replace(year=2000),
        }
        cur = await conn.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + _record_requests_query(), params, prepare=True)
        plan = (await cur.fetchone())[0][0]["Plan"]

    assert indexes_used(plan) == [("sessions_session_id_key", len(ids))]
