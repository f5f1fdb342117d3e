"""The schema on a database that looks like Supabase's, migrated as its demoted ``postgres``.

``exai_supabase`` is a server of its own (superuser ``supabase_admin``); every test here
connects as ``postgres``, which is no superuser there, as on Supabase. The migrations must
apply (twice: the second time nothing), leave Supabase's ``auth`` exactly as it was, and the
row-level security matrix of test_rls must come out the same.
"""

import subprocess
import sys
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
import pytest_asyncio
from test_rls import EXPECTED, STATEMENTS, measure, seed

from pytest_exai_sessions import SessionManager, SessionStore, as_role, as_user, load_migrations
from pytest_exai_sessions.schema import apply_to_dsn
from pytest_exai_sessions.testing.db_clock import DbClock
from pytest_exai_sessions.testing.supabase import (
    AUTH_ADMIN,
    AUTH_FUNCTION_COMMENT,
    AUTH_FUNCTIONS,
    MEMBERSHIPS,
    ROLES,
    SUPABASE_ADMIN,
    make_supabase_like,
)

ALICE = str(uuid.uuid5(uuid.NAMESPACE_URL, "alice"))
# The instant the schema is migrated at and the clock starts from: never today's date.
DEFAULT_START = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)

ROLE_ATTRIBUTES = """
    SELECT rolname::text, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolbypassrls
      FROM pg_catalog.pg_roles WHERE rolname !~ '^pg_' ORDER BY rolname
"""
MEMBERS = """
    SELECT r.rolname::text, m.rolname::text
      FROM pg_catalog.pg_auth_members a
      JOIN pg_catalog.pg_roles r ON r.oid = a.roleid
      JOIN pg_catalog.pg_roles m ON m.oid = a.member
     ORDER BY 1, 2
"""
# Everything of auth a migration could replace or add: the schema (owner, ACL), every object
# in it by OID, and each function's owner, body, settings, ACL and comment.
AUTH_SCHEMA = """
    SELECT oid::bigint, nspowner::regrole::text, nspacl::text[] FROM pg_catalog.pg_namespace WHERE nspname = 'auth'
"""
AUTH_OBJECTS = """
    SELECT 'function', p.oid::bigint, p.oid::regprocedure::text, p.proowner::regrole::text, p.prosrc,
           p.proconfig::text[], p.proacl::text[], p.prosecdef, p.provolatile::text,
           obj_description(p.oid, 'pg_proc')
      FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'auth'::regnamespace
    UNION ALL
    SELECT 'relation', c.oid::bigint, c.relname::text, c.relowner::regrole::text, c.relkind::text,
           NULL, c.relacl::text[], NULL, NULL, NULL
      FROM pg_catalog.pg_class c WHERE c.relnamespace = 'auth'::regnamespace
    UNION ALL
    SELECT 'type', t.oid::bigint, t.typname::text, t.typowner::regrole::text, NULL, NULL, NULL, NULL, NULL, NULL
      FROM pg_catalog.pg_type t WHERE t.typnamespace = 'auth'::regnamespace
    ORDER BY 1, 3
"""


def snapshot(dsn):
    """What the migrations must leave alone: auth, and every role with its attributes and memberships."""
    with psycopg.connect(dsn) as conn:
        return {
            "auth schema": conn.execute(AUTH_SCHEMA).fetchall(),
            "auth objects": conn.execute(AUTH_OBJECTS).fetchall(),
            "roles": conn.execute(ROLE_ATTRIBUTES).fetchall(),
            "memberships": conn.execute(MEMBERS).fetchall(),
        }


@pytest.fixture(params=[False, True], ids=["no-data-api-defaults", "data-api-defaults"])
def supabase_db(exai_supabase, request):
    """A new Supabase-like database, not yet migrated, with or without the Data API's default privileges."""
    with exai_supabase.database(data_api_default_privileges=request.param) as dbname:
        yield dbname


@pytest.fixture
def start(exai_config):
    return exai_config.clock or DEFAULT_START


@pytest.fixture
def migrated_dsn(exai_supabase, supabase_db, start):
    """DSN (as postgres) of a Supabase-like database with the whole schema, migrated as postgres."""
    dsn = exai_supabase.dsn(supabase_db)
    apply_to_dsn(dsn, as_of=start)
    return dsn


# the bootstrap itself


def test_postgres_is_demoted_and_the_roles_are_as_documented(exai_supabase, supabase_db):
    with psycopg.connect(exai_supabase.dsn(supabase_db)) as conn:
        attributes = {row[0]: row[1:] for row in conn.execute(ROLE_ATTRIBUTES)}
        members = set(conn.execute(MEMBERS).fetchall())
        auth_owner = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'auth'").fetchone()
        db_owner = conn.execute(
            "SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        # As on Supabase, postgres cannot make itself superuser.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER ROLE postgres SUPERUSER")

    for role, expected in ROLES.items():
        login, inherit, createrole, createdb = expected.login, expected.inherit, expected.createrole, expected.createdb
        assert attributes[role] == (False, inherit, createrole, createdb, login, False, expected.bypassrls), role
    assert attributes["postgres"] == (False, True, True, True, True, False, True)
    assert attributes[SUPABASE_ADMIN][0] is True  # the only superuser
    assert [role for role, row in attributes.items() if row[0]] == [SUPABASE_ADMIN]
    for member, roles in MEMBERSHIPS.items():
        assert {(role, member) for role in roles} <= members
    assert auth_owner == (AUTH_ADMIN,)
    assert db_owner == (SUPABASE_ADMIN,)


def test_the_data_api_default_privileges_are_opt_in(exai_supabase):
    granted = {}
    for opt_in in (False, True):
        with (
            exai_supabase.database(data_api_default_privileges=opt_in) as dbname,
            psycopg.connect(exai_supabase.dsn(dbname)) as conn,
        ):
            conn.execute("CREATE TABLE public.notes (id int)")
            granted[opt_in] = conn.execute(
                "SELECT array_agg(has_table_privilege(r, 'public.notes', 'SELECT'))"
                " FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) AS r"
            ).fetchone()
    assert granted == {False: ([False] * 3,), True: ([True] * 3,)}


def test_auth_functions_read_per_claim_settings_first_then_the_claims_object(exai_supabase, supabase_db):
    other = str(uuid.uuid5(uuid.NAMESPACE_URL, "other"))
    with psycopg.connect(exai_supabase.dsn(supabase_db)) as conn:
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (f'{{"sub": "{ALICE}", "role": "anon"}}',))
        from_claims = conn.execute("SELECT auth.uid()::text, auth.role(), auth.jwt() ->> 'sub'").fetchone()
        conn.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", (other,))
        conn.execute("SELECT set_config('request.jwt.claim.role', 'authenticated', true)")
        per_claim = conn.execute("SELECT auth.uid()::text, auth.role()").fetchone()
        conn.commit()
        after = conn.execute("SELECT auth.uid(), auth.role(), auth.jwt()").fetchone()
        comments = conn.execute(
            "SELECT proname::text, obj_description(oid, 'pg_proc') FROM pg_proc"
            " WHERE pronamespace = 'auth'::regnamespace ORDER BY 1"
        ).fetchall()
    assert from_claims == (ALICE, "anon", ALICE)
    assert per_claim == (other, "authenticated")
    assert after == (None, None, None)  # '' once the transaction ended: NULL, not an error
    assert comments == [(name, AUTH_FUNCTION_COMMENT) for name in sorted(AUTH_FUNCTIONS)]


def test_the_bootstrap_is_idempotent_and_needs_a_superuser(exai_supabase, supabase_db):
    before = snapshot(exai_supabase.dsn(supabase_db))
    with psycopg.connect(exai_supabase.admin_dsn(supabase_db), autocommit=True) as conn:
        make_supabase_like(conn)
    assert snapshot(exai_supabase.dsn(supabase_db)) == before

    with psycopg.connect(exai_supabase.dsn(supabase_db), autocommit=True) as conn:
        with pytest.raises(ValueError, match="needs a superuser connection, and postgres is not one"):
            make_supabase_like(conn)
        with pytest.raises(TypeError, match="psycopg Connection"):
            make_supabase_like(exai_supabase.dsn(supabase_db))
    assert snapshot(exai_supabase.dsn(supabase_db)) == before


def test_the_bootstrap_refuses_a_server_whose_bootstrap_superuser_is_postgres(exai_pg_server):
    with psycopg.connect(exai_pg_server.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, oid = 10 FROM pg_roles WHERE rolname = 'postgres'").fetchone()
        if row != (True, True) or exai_pg_server.user != "postgres":
            pytest.skip("the run's server was not initdb'd with postgres")
        roles_before = conn.execute(ROLE_ATTRIBUTES).fetchall()
        with pytest.raises(ValueError, match="bootstrap superuser, which PostgreSQL refuses to demote"):
            make_supabase_like(conn)
        assert conn.execute(ROLE_ATTRIBUTES).fetchall() == roles_before


# the migrations, as the demoted postgres


def test_migrations_apply_as_postgres_twice_and_replace_nothing_of_auth(exai_supabase, supabase_db, start):
    dsn = exai_supabase.dsn(supabase_db)
    before = snapshot(dsn)

    first = apply_to_dsn(dsn, as_of=start)
    after_first = snapshot(dsn)
    second = apply_to_dsn(dsn, as_of=start)

    assert [m.filename for m in first] == [m.filename for m in load_migrations()]
    assert second == []
    assert after_first == before
    assert snapshot(dsn) == before
    with psycopg.connect(dsn) as conn:
        owners = conn.execute(
            "SELECT DISTINCT nspowner::regrole::text FROM pg_namespace WHERE nspname IN ('unified', 'exai_schema')"
        ).fetchall()
        ledger = conn.execute("SELECT count(*) FROM exai_schema.applied_migrations").fetchone()
    assert owners == [("postgres",)]
    assert ledger == (len(load_migrations()),)


def test_the_cli_migrates_as_postgres_twice_and_replaces_nothing_of_auth(exai_supabase, supabase_db):
    dsn = exai_supabase.dsn(supabase_db)
    before = snapshot(dsn)

    def migrate():
        return subprocess.run(
            [sys.executable, "-m", "pytest_exai_sessions", "migrate", "--dsn", dsn],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    first, second = migrate(), migrate()
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"applied {m.filename}" for m in load_migrations()]
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "nothing to apply: the schema is up to date"
    assert snapshot(dsn) == before


@pytest.mark.asyncio
async def test_sessions_round_trip_as_postgres(migrated_dsn, start):
    async with await SessionStore.open(migrated_dsn) as store:
        await store.check()
    clock = DbClock(migrated_dsn, start=start)  # moving it takes the owner of clock_now(): postgres
    clock.set(start)
    manager = await SessionManager.open(migrated_dsn, clock=clock)
    try:
        session = await manager.ensure(user_id=ALICE, data={"cart": [1, 2]})
        loaded = await manager.get(session.session_id)
    finally:
        await manager.aclose()
    assert loaded is not None
    assert (loaded.user_id, loaded.data, loaded.created_at) == (ALICE, {"cart": [1, 2]}, start)
    with psycopg.connect(migrated_dsn) as conn:
        with as_user(conn, ALICE):
            mine = conn.execute("SELECT count(*) FROM public.sessions").fetchone()
        with as_role(conn, "anon"):
            anon = conn.execute("SELECT count(*) FROM public.sessions").fetchone()
    assert (mine, anon) == ((1,), (0,))


# the RLS matrix of test_rls, on Supabase's roles and auth functions


@pytest_asyncio.fixture
async def supabase_conn(migrated_dsn):
    async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as conn:
        await seed(conn)
        yield conn


@pytest.mark.asyncio
@pytest.mark.parametrize("table", list(STATEMENTS))
async def test_the_rls_matrix_holds_on_a_supabase_like_database(supabase_conn, table):
    cur = await supabase_conn.execute("SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user")
    assert await cur.fetchone() == ("postgres", False)
    assert await measure(supabase_conn, table) == EXPECTED
