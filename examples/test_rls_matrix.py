"""Row-level security as a matrix: every role x every operation, each outcome stated.

Copy this file and adapt TABLES and EXPECTED to your own tables and policies. Each cell
runs in a transaction that is rolled back, acting through the plugin's fixtures
(``SET LOCAL ROLE`` plus the request's JWT claims, as PostgREST does), and is one of:

- "succeeds": the statement reached the target row,
- "filtered": it ran but row-level security hid every row (0 rows read or changed),
- "raises": it was refused (a write that violates a policy).

A policy that grants more than intended changes a cell, and the test fails saying which.
"""

import uuid

import psycopg
import pytest
import pytest_asyncio

ALICE = str(uuid.uuid5(uuid.NAMESPACE_URL, "alice"))  # auth.uid() is a uuid
BOB = str(uuid.uuid5(uuid.NAMESPACE_URL, "bob"))

TABLES = {
    "public.sessions": {
        "seed": "INSERT INTO public.sessions (session_id, user_id) VALUES (%(key)s, %(owner)s)",
        "SELECT": "SELECT 1 FROM public.sessions WHERE user_id = %(owner)s",
        "INSERT": "INSERT INTO public.sessions (session_id, user_id) VALUES (%(key)s, %(owner)s)",
        "UPDATE": "UPDATE public.sessions SET user_agent = 'changed' WHERE user_id = %(owner)s",
        "DELETE": "DELETE FROM public.sessions WHERE user_id = %(owner)s",
    },
    "unified.event_metric_events": {
        "seed": "INSERT INTO unified.event_metric_events (event_type, event_category, source_system, user_id)"
        " VALUES (%(key)s, 'example', 'rls', %(owner)s)",
        "SELECT": "SELECT 1 FROM unified.event_metric_events WHERE user_id = %(owner)s",
        "INSERT": "INSERT INTO unified.event_metric_events (event_type, event_category, source_system, user_id)"
        " VALUES (%(key)s, 'example', 'rls', %(owner)s)",
        "UPDATE": "UPDATE unified.event_metric_events SET status = 'failed' WHERE user_id = %(owner)s",
        "DELETE": "DELETE FROM unified.event_metric_events WHERE user_id = %(owner)s",
    },
}

#                    actor                          SELECT       INSERT     UPDATE       DELETE
EXPECTED = {
    "anon": ("filtered", "raises", "filtered", "filtered"),
    "authenticated, own rows": ("succeeds", "raises", "filtered", "filtered"),
    "authenticated, others' rows": ("filtered", "raises", "filtered", "filtered"),
    "service_role": ("succeeds", "succeeds", "succeeds", "succeeds"),
}
OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE")


@pytest_asyncio.fixture
async def conn(exai_dsn):
    """A connection to this test's database, with one row of Alice and one of Bob in each table."""
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True) as conn:
        for statements in TABLES.values():
            for owner in (ALICE, BOB):
                await conn.execute(statements["seed"], {"key": f"seed-{owner}", "owner": owner})
        yield conn


@pytest.fixture
def act_as(exai_as_user, exai_as_role, exai_as_service_role):
    """actor -> (the acting block for a connection, whose rows the statements target)."""
    return {
        "anon": lambda conn: (exai_as_role(conn, "anon"), ALICE),
        "authenticated, own rows": lambda conn: (exai_as_user(conn, ALICE), ALICE),
        "authenticated, others' rows": lambda conn: (exai_as_user(conn, ALICE), BOB),
        "service_role": lambda conn: (exai_as_service_role(conn), ALICE),
    }


async def outcome(conn, act_as, actor, statement):
    async with conn.transaction(force_rollback=True):  # every cell starts from the same rows
        block, owner = act_as[actor](conn)
        try:
            async with block:
                cur = await conn.execute(statement, {"owner": owner, "key": f"new-{uuid.uuid4()}"})
                count = len(await cur.fetchall()) if cur.description else cur.rowcount
        except psycopg.errors.InsufficientPrivilege:
            return "raises"
    return {0: "filtered", 1: "succeeds"}.get(count, f"{count} rows")


@pytest.mark.asyncio
@pytest.mark.parametrize("table", list(TABLES))
async def test_rls_matrix(conn, act_as, table):
    measured = {
        actor: tuple([await outcome(conn, act_as, actor, TABLES[table][op]) for op in OPERATIONS]) for actor in EXPECTED
    }
    assert measured == EXPECTED


@pytest.mark.asyncio
async def test_claims_reach_auth_functions(conn, exai_as_user):
    async with exai_as_user(conn, ALICE, claims={"email": "alice@example.com"}):
        cur = await conn.execute("SELECT auth.uid()::text, auth.role(), auth.jwt() ->> 'email'")
        inside = await cur.fetchone()
    cur = await conn.execute("SELECT auth.uid(), auth.role()")
    assert inside == (ALICE, "authenticated", "alice@example.com")
    assert await cur.fetchone() == (None, None)  # restored after the block
