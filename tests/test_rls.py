"""Row-level security, proven: the acting fixtures, and the full matrix of who may do what.

The matrix runs every operation as every actor against the real policies and compares
the outcome of each cell (succeeds / filtered to zero rows / raises) with the intended
one. A policy that grants more than intended changes a cell, which the last tests show.
"""

import uuid

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from psycopg.pq import TransactionStatus

from pytest_exai_sessions import as_role, as_service_role, as_user

ALICE = str(uuid.uuid5(uuid.NAMESPACE_URL, "alice"))
BOB = str(uuid.uuid5(uuid.NAMESPACE_URL, "bob"))

SUCCEEDS = "succeeds"
FILTERED = "filtered to 0 rows"
RAISES = "raises (row-level security)"

ACTORS = ("anon", "authenticated, own rows", "authenticated, others' rows", "service_role")
OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE")

# What the policies of sql/005 intend, for both tables: anon nothing, a signed-in user
# reads only its own rows and writes nothing, service_role everything.
EXPECTED = {
    "anon": {"SELECT": FILTERED, "INSERT": RAISES, "UPDATE": FILTERED, "DELETE": FILTERED},
    "authenticated, own rows": {"SELECT": SUCCEEDS, "INSERT": RAISES, "UPDATE": FILTERED, "DELETE": FILTERED},
    "authenticated, others' rows": {"SELECT": FILTERED, "INSERT": RAISES, "UPDATE": FILTERED, "DELETE": FILTERED},
    "service_role": {"SELECT": SUCCEEDS, "INSERT": SUCCEEDS, "UPDATE": SUCCEEDS, "DELETE": SUCCEEDS},
}

# Each statement targets the rows of one owner (%(owner)s); INSERT adds one row for them.
STATEMENTS = {
    "public.sessions": {
        "SELECT": "SELECT session_id FROM public.sessions WHERE user_id = %(owner)s",
        "INSERT": "INSERT INTO public.sessions (session_id, user_id) VALUES (%(key)s, %(owner)s)",
        "UPDATE": "UPDATE public.sessions SET request_count = request_count + 1 WHERE user_id = %(owner)s",
        "DELETE": "DELETE FROM public.sessions WHERE user_id = %(owner)s",
    },
    "unified.event_metric_events": {
        "SELECT": "SELECT id FROM unified.event_metric_events WHERE user_id = %(owner)s",
        "INSERT": "INSERT INTO unified.event_metric_events (event_type, event_category, source_system, user_id)"
        " VALUES (%(key)s, 'matrix', 'tests', %(owner)s)",
        "UPDATE": "UPDATE unified.event_metric_events SET retry_count = retry_count + 1 WHERE user_id = %(owner)s",
        "DELETE": "DELETE FROM unified.event_metric_events WHERE user_id = %(owner)s",
    },
}


def acting(conn, actor):
    """The acting block of ``actor`` and the owner whose rows it targets."""
    if actor == "anon":
        return as_role(conn, "anon"), ALICE
    if actor == "authenticated, own rows":
        return as_user(conn, ALICE), ALICE
    if actor == "authenticated, others' rows":
        return as_user(conn, ALICE), BOB
    return as_service_role(conn), ALICE


async def seed(conn):
    """One session and one event for each of Alice and Bob, written as the superuser."""
    for owner in (ALICE, BOB):
        await conn.execute(
            "INSERT INTO public.sessions (session_id, user_id) VALUES (%s, %s)", (f"session-of-{owner}", owner)
        )
        await conn.execute(
            "INSERT INTO unified.event_metric_events (event_type, event_category, source_system, user_id)"
            " VALUES ('seed', 'matrix', 'tests', %s)",
            (owner,),
        )


async def outcome(conn, actor, statement):
    """Run one cell in a transaction that is rolled back afterwards, and say what happened."""
    async with conn.transaction(force_rollback=True):
        block, owner = acting(conn, actor)
        try:
            async with block:
                cur = await conn.execute(statement, {"owner": owner, "key": f"new-{uuid.uuid4()}"})
                affected = len(await cur.fetchall()) if cur.description else cur.rowcount
        except psycopg.errors.InsufficientPrivilege as error:
            if "row-level security" in str(error):
                return RAISES
            return f"raises: {error}"
    return {1: SUCCEEDS, 0: FILTERED}.get(affected, f"{affected} rows")


async def measure(conn, table):
    return {actor: {op: await outcome(conn, actor, STATEMENTS[table][op]) for op in OPERATIONS} for actor in ACTORS}


@pytest_asyncio.fixture
async def aconn(exai_dsn):
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True) as conn:
        await seed(conn)
        yield conn


async def whoami(conn):
    cur = await conn.execute("SELECT current_user::text, auth.uid()::text, auth.role(), auth.jwt()")
    return await cur.fetchone()


# the matrix


@pytest.mark.asyncio
@pytest.mark.parametrize("table", list(STATEMENTS))
async def test_the_rls_matrix_is_exactly_as_intended(aconn, table):
    assert await measure(aconn, table) == EXPECTED


@pytest.mark.asyncio
async def test_a_policy_granting_more_than_intended_fails_the_matrix(aconn):
    """The matrix is sensitive: one stray permissive policy per table changes exactly its cells."""
    await aconn.execute("CREATE POLICY leak_sessions ON public.sessions FOR SELECT TO authenticated USING (true)")
    await aconn.execute(
        "CREATE POLICY leak_events ON unified.event_metric_events FOR ALL TO anon USING (true) WITH CHECK (true)"
    )

    sessions = await measure(aconn, "public.sessions")
    events = await measure(aconn, "unified.event_metric_events")

    def differences(measured):
        return {
            (actor, op): measured[actor][op]
            for actor in ACTORS
            for op in OPERATIONS
            if measured[actor][op] != EXPECTED[actor][op]
        }

    assert sessions != EXPECTED
    assert differences(sessions) == {("authenticated, others' rows", "SELECT"): SUCCEEDS}
    assert events != EXPECTED
    assert differences(events) == {("anon", op): SUCCEEDS for op in OPERATIONS}


@pytest.mark.asyncio
async def test_a_table_without_row_level_security_fails_the_matrix(aconn):
    await aconn.execute("ALTER TABLE public.sessions DISABLE ROW LEVEL SECURITY")
    measured = await measure(aconn, "public.sessions")
    assert measured != EXPECTED
    assert measured["anon"] == {op: SUCCEEDS for op in OPERATIONS}


# the acting blocks


@pytest.mark.asyncio
async def test_acting_as_a_user_sets_role_and_claims_and_restores_them(aconn):
    before = await whoami(aconn)
    async with as_user(aconn, ALICE, claims={"email": "alice@example.com", "app_metadata": {"plan": "pro"}}) as conn:
        assert conn is aconn
        user, uid, role, jwt = await whoami(aconn)
    after = await whoami(aconn)

    assert (user, uid, role) == ("authenticated", ALICE, "authenticated")
    assert jwt == {"sub": ALICE, "role": "authenticated", "email": "alice@example.com", "app_metadata": {"plan": "pro"}}
    assert before == after
    assert after[1:] == (None, None, None)
    assert after[0] not in ("anon", "authenticated", "service_role")
    assert aconn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (lambda c: as_role(c, "anon"), ("anon", None, "anon")),
        (lambda c: as_role(c, "authenticated"), ("authenticated", None, "authenticated")),
        (as_service_role, ("service_role", None, "service_role")),
    ],
)
async def test_acting_as_a_role(aconn, block, expected):
    async with block(aconn):
        user, uid, role, jwt = await whoami(aconn)
    assert (user, uid, role) == expected
    assert jwt == {"role": expected[0]}


@pytest.mark.asyncio
async def test_everything_is_restored_and_rolled_back_when_the_body_raises(aconn):
    before = await whoami(aconn)
    with pytest.raises(RuntimeError, match="boom"):
        async with as_service_role(aconn):
            await aconn.execute("DELETE FROM public.sessions")
            raise RuntimeError("boom")
    assert await whoami(aconn) == before
    cur = await aconn.execute("SELECT count(*) FROM public.sessions")
    assert await cur.fetchone() == (2,)
    assert aconn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.asyncio
async def test_a_database_error_in_the_body_raises_and_the_connection_stays_usable(aconn):
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with as_user(aconn, ALICE):
            await aconn.execute("INSERT INTO public.sessions (session_id, user_id) VALUES ('x', %s)", (ALICE,))
    assert (await whoami(aconn))[1:] == (None, None, None)
    assert aconn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.asyncio
async def test_a_successful_block_commits_its_writes(aconn, exai_dsn):
    async with as_service_role(aconn):
        await aconn.execute("INSERT INTO public.sessions (session_id) VALUES ('written-as-service-role')")
    async with await psycopg.AsyncConnection.connect(exai_dsn) as other:
        cur = await other.execute("SELECT count(*) FROM public.sessions WHERE session_id = 'written-as-service-role'")
        assert await cur.fetchone() == (1,)


@pytest.mark.asyncio
async def test_inside_a_transaction_the_block_is_a_savepoint_and_restores_on_success(aconn):
    async with aconn.transaction(force_rollback=True):
        outer = await whoami(aconn)
        async with as_service_role(aconn):
            assert (await whoami(aconn))[0] == "service_role"
            # Nested blocks restore the enclosing identity, not the session's.
            async with as_user(aconn, BOB):
                assert (await whoami(aconn))[:2] == ("authenticated", BOB)
            assert (await whoami(aconn))[0] == "service_role"
            assert (await whoami(aconn))[3] == {"role": "service_role"}
        # Still inside the outer transaction, where SET LOCAL would otherwise have lasted.
        assert aconn.info.transaction_status == TransactionStatus.INTRANS
        assert await whoami(aconn) == outer


@pytest.mark.asyncio
async def test_inside_a_transaction_a_failing_block_rolls_back_to_its_savepoint(aconn):
    async with aconn.transaction(force_rollback=True):
        await aconn.execute("INSERT INTO public.sessions (session_id) VALUES ('kept')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with as_role(aconn, "anon"):
                await aconn.execute("INSERT INTO public.sessions (session_id) VALUES ('refused')")
        cur = await aconn.execute("SELECT array_agg(session_id ORDER BY session_id) FROM public.sessions")
        assert (await cur.fetchone())[0] == sorted(["kept", f"session-of-{ALICE}", f"session-of-{BOB}"])
        assert (await whoami(aconn))[1:] == (None, None, None)


@pytest.mark.asyncio
async def test_legacy_per_claim_settings_do_not_override_the_block(aconn):
    """auth.uid() prefers request.jwt.claim.sub when set; the block blanks it."""
    await aconn.execute("SELECT set_config('request.jwt.claim.sub', %s, false)", (BOB,))
    async with as_user(aconn, ALICE):
        assert (await whoami(aconn))[1] == ALICE
    assert (await whoami(aconn))[1] == BOB


def test_a_synchronous_connection_works_the_same(exai_dsn, exai_pg_server):
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.sessions (session_id, user_id) VALUES ('a', %s), ('b', %s)", (ALICE, BOB))
        with as_user(conn, ALICE) as acting_conn:
            assert acting_conn is conn
            visible = conn.execute("SELECT session_id FROM public.sessions").fetchall()
        with pytest.raises(psycopg.errors.DivisionByZero), as_role(conn, "anon"):
            conn.execute("SELECT 1 / 0 FROM public.sessions")
        with pytest.raises(ValueError, match="boom"), as_role(conn, "anon"):
            raise ValueError("boom")
        assert conn.execute("SELECT current_user::text, auth.uid()").fetchone() == (exai_pg_server.user, None)
        assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (2,)
    assert visible == [("a",)]


def test_a_non_autocommit_connection_works_too(exai_dsn, exai_pg_server):
    with psycopg.connect(exai_dsn) as conn:
        conn.execute("INSERT INTO public.sessions (session_id, user_id) VALUES ('a', %s)", (ALICE,))
        # An implicit transaction is open now: the block is a savepoint inside it.
        with as_role(conn, "anon"):
            assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (0,)
        assert conn.execute("SELECT current_user::text, count(*) FROM public.sessions").fetchone() == (
            exai_pg_server.user,
            1,
        )


# bad input: a clear error, and nothing sent to the server


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: as_user(c, "alice"), ValueError, "user_id must be a UUID"),
        (lambda c: as_user(c, None), ValueError, "user_id must be a UUID"),
        (lambda c: as_user(c, ALICE, claims={"sub": BOB}), ValueError, r"claims\['sub'\]"),
        (lambda c: as_user(c, ALICE, claims={"role": "service_role"}), ValueError, r"claims\['role'\]"),
        (lambda c: as_role(c, "anon", claims={"sub": "not-a-uuid"}), ValueError, "UUID"),
        (lambda c: as_role(c, "anon", claims={"tags": {1, 2}}), ValueError, "not JSON"),
        (lambda c: as_role(c, "anon", claims={"x": float("nan")}), ValueError, "not valid JSON"),
        (lambda c: as_role(c, "anon", claims=[("role", "x")]), TypeError, "mapping"),
        (lambda c: as_role(c, ""), ValueError, "non-empty"),
        (lambda c: as_role(c, "a" * 64), ValueError, "longer than 63 bytes"),
        (lambda c: as_role(c, 42), TypeError, "must be a str"),
        (lambda c: as_role("not a connection", "anon"), TypeError, "psycopg Connection"),
    ],
)
def test_bad_input_raises_before_anything_is_sent(exai_dsn, call, error, message):
    with psycopg.connect(exai_dsn) as conn:
        with pytest.raises(error, match=message):
            call(conn)
        # Not even a BEGIN was sent.
        assert conn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.asyncio
async def test_the_wrong_kind_of_with_is_refused(aconn, exai_dsn):
    with pytest.raises(TypeError, match="use 'async with'"), as_role(aconn, "anon"):
        pass
    with psycopg.connect(exai_dsn) as conn:
        with pytest.raises(TypeError, match="use 'with'"):
            async with as_role(conn, "anon"):
                pass
        block = as_role(conn, "anon")
        with block:
            pass
        with pytest.raises(RuntimeError, match="only once"), block:
            pass


@pytest.mark.asyncio
async def test_an_unknown_role_is_a_database_error(aconn, exai_pg_server):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match='role "nobody" does not exist'):
        async with as_role(aconn, "nobody"):
            pass
    assert aconn.info.transaction_status == TransactionStatus.IDLE
    assert (await whoami(aconn))[0] == exai_pg_server.user


# the fixtures


@pytest.mark.asyncio
async def test_the_fixtures_are_the_acting_functions(aconn, exai_as_user, exai_as_role, exai_as_service_role):
    async with exai_as_user(aconn, ALICE):
        cur = await aconn.execute("SELECT session_id FROM public.sessions")
        mine = await cur.fetchall()
    async with exai_as_role(aconn, "anon"):
        cur = await aconn.execute("SELECT count(*) FROM public.sessions")
        anon = await cur.fetchone()
    async with exai_as_service_role(aconn):
        cur = await aconn.execute("SELECT count(*) FROM public.sessions")
        service = await cur.fetchone()
    assert mine == [(f"session-of-{ALICE}",)]
    assert anon == (0,)
    assert service == (2,)


@pytest.mark.asyncio
async def test_jsonb_claims_reach_policies_through_auth_jwt(aconn):
    """A policy reading a custom claim sees what the block put there."""
    await aconn.execute(
        "CREATE POLICY sessions_admins_read_all ON public.sessions FOR SELECT TO authenticated"
        " USING ((SELECT auth.jwt() -> 'app_metadata' ->> 'admin') = 'true')"
    )
    async with as_user(aconn, ALICE, claims={"app_metadata": {"admin": True}}):
        cur = await aconn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", "sessions")))
        admin_sees = await cur.fetchone()
    async with as_user(aconn, ALICE, claims={"app_metadata": {}}):
        cur = await aconn.execute("SELECT count(*) FROM public.sessions")
        plain_sees = await cur.fetchone()
    assert admin_sees == (2,)
    assert plain_sees == (1,)
