"""The core through a real PgBouncer (server/pooler.py) in front of the run's PostgreSQL.

In transaction mode each transaction of a client connection may run on another server
connection: what a session keeps (prepared statements, session settings, session advisory
locks) is gone, or somebody else's, at the next transaction. In either mode a pooler can go
away and come back under a running app. Every count is also read over a direct connection.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pytest_exai_sessions import (
    DbClock,
    Event,
    EventStore,
    PersistenceError,
    SessionManager,
    SessionStore,
    cli,
    compat,
    load_migrations,
)
from pytest_exai_sessions.store import _fetch_query

SESSIONS = [f"session-{n:02d}" for n in range(50)]


@pytest.fixture
def direct_dsn(exai_pg_server, exai_dsn: str) -> str:
    """The test's database on a direct connection to the server, whatever exai_dsn goes through."""
    return exai_pg_server.dsn(conninfo_to_dict(exai_dsn)["dbname"])


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
@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_calls_fail_while_the_pooler_is_down_and_the_app_recovers_after_its_restart(
    exai_pgbouncer, direct_dsn, mode
):
    pooler = exai_pgbouncer(mode)
    acknowledged: Counter[str] = Counter()
    # A call waits a second for a connection, not five: the calls while it is down end sooner.
    async with SessionManager.connect(pooled(pooler, direct_dsn), store_options={"timeout": 1}) as manager:
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
    assert served == request_counts(direct_dsn) == acknowledged


@pytest.mark.asyncio
async def test_fifty_sessions_at_once_through_transaction_mode_with_default_options(exai_pgbouncer, direct_dsn):
    """The reproduction: psycopg prepared update_activity's statement on its 6th run and the
    next transaction ran on another server connection (DuplicatePreparedStatement,
    InvalidSqlStatementName)."""
    acknowledged: Counter[str] = Counter()
    async with SessionManager.connect(pooled(exai_pgbouncer("transaction"), direct_dsn)) as manager:
        for session_id in SESSIONS:
            await manager.ensure(session_id)
        for _ in range(10):
            assert await requests_at_once(manager, acknowledged) == []
    assert request_counts(direct_dsn) == acknowledged == dict.fromkeys(SESSIONS, 10)


@pytest.mark.asyncio
async def test_twenty_rounds_through_transaction_mode_survive_a_pooler_restart_and_a_new_manager(
    exai_pgbouncer, direct_dsn
):
    pooler = exai_pgbouncer("transaction")
    dsn = pooled(pooler, direct_dsn)
    acknowledged: Counter[str] = Counter()
    manager = await SessionManager.open(dsn)
    try:
        for session_id in SESSIONS:
            await manager.ensure(session_id)
        for _ in range(20):
            assert await requests_at_once(manager, acknowledged) == []
    finally:
        await manager.abandon()  # as a killed process: nothing closed cleanly
    pooler.restart()

    async with SessionManager.connect(dsn) as fresh:
        recovered = {session_id: (await fresh.get(session_id)).request_count for session_id in SESSIONS}
        assert await requests_at_once(fresh, acknowledged) == []

    assert recovered == dict.fromkeys(SESSIONS, 20)
    assert request_counts(direct_dsn) == acknowledged == dict.fromkeys(SESSIONS, 21)


def server_connections(dsn: str) -> int:
    """How many backends of ``dsn``'s database there are besides this check's own."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def prepared_statements(store: SessionStore) -> list[tuple[str, str, int]]:
    """Name, text and executions of each statement prepared on the backend of ``store``'s one connection."""
    async with store.database.connection("reading pg_prepared_statements") as conn:
        cursor = await conn.execute(
            "SELECT name, statement, generic_plans + custom_plans FROM pg_prepared_statements ORDER BY name",
            prepare=False,
        )
        return await cursor.fetchall()


ONE_CONNECTION = {"min_size": 1, "max_size": 1}


@pytest.mark.asyncio
async def test_prepared_statements_true_through_transaction_mode_fails_as_psycopg_does(exai_pgbouncer, direct_dsn):
    """``True`` is kept as asked, with no fallback: the second client's 6th run prepares
    ``_pg3_0`` on the one server connection, where the first client's ``_pg3_0`` already is."""
    dsn = pooled(exai_pgbouncer("transaction"), direct_dsn)
    async with (
        await SessionStore.open(dsn, prepared_statements=True, **ONE_CONNECTION) as first,
        await SessionStore.open(dsn, prepared_statements=True, **ONE_CONNECTION) as second,
    ):
        for _ in range(8):
            assert await first.fetch("nobody") is None
        for _ in range(5):
            assert await second.fetch("nobody") is None
        with pytest.raises(
            PersistenceError, match='DuplicatePreparedStatement: prepared statement "_pg3_0"'
        ) as failure:
            await second.fetch("nobody")
        assert isinstance(failure.value.__cause__, psycopg.errors.DuplicatePreparedStatement)
        # What made it deterministic: both clients' statements ran on one server connection.
        assert server_connections(direct_dsn) == 1


@pytest.mark.asyncio
async def test_the_automatic_option_prepares_nothing_through_transaction_mode(exai_pgbouncer, direct_dsn):
    dsn = pooled(exai_pgbouncer("transaction"), direct_dsn)
    async with (
        await SessionStore.open(dsn, **ONE_CONNECTION) as first,
        await SessionStore.open(dsn, **ONE_CONNECTION) as second,
    ):
        for _ in range(8):
            assert await first.fetch("nobody") is None
            assert await second.fetch("nobody") is None
        assert server_connections(direct_dsn) == 1
        assert await prepared_statements(first) == []  # read on that one server connection


@pytest.mark.asyncio
async def test_the_automatic_option_prepares_on_a_direct_connection(direct_dsn):
    async with await SessionStore.open(direct_dsn, **ONE_CONNECTION) as store:
        for _ in range(6):
            assert await store.fetch("nobody") is None
        statements = await prepared_statements(store)
    # Once prepared on the 6th run, and run prepared that time.
    assert statements == [("_pg3_0", _fetch_query().decode().replace("%(id)s", "$1"), 1)]


@pytest.mark.asyncio
async def test_prepared_statements_false_never_prepares_on_a_direct_connection(direct_dsn):
    async with await SessionStore.open(direct_dsn, prepared_statements=False, **ONE_CONNECTION) as store:
        for _ in range(20):
            assert await store.fetch("nobody") is None
        assert await prepared_statements(store) == []


@pytest.mark.asyncio
async def test_a_statement_name_taken_on_the_server_switches_preparing_off_and_runs_the_call_again(direct_dsn, caplog):
    """What a pooler that passes the server's pid on looks like: the automatic option cannot
    tell it from a direct connection, and ``_pg3_0`` is already prepared on the backend."""
    async with await SessionStore.open(direct_dsn, **ONE_CONNECTION) as store:
        async with store.database.connection("preparing a statement of another client") as conn:
            await conn.execute("PREPARE _pg3_0 AS SELECT 1", prepare=False)
            backend = conn.info.backend_pid
        with caplog.at_level(logging.WARNING, logger="pytest_exai_sessions.db"):
            for _ in range(10):
                assert await store.fetch("nobody") is None  # the 6th prepared, was refused, ran again
        assert await prepared_statements(store) == [("_pg3_0", "PREPARE _pg3_0 AS SELECT 1", 0)]
        assert "prepared statements switched off after DuplicatePreparedStatement" in caplog.text

        # A connection opened after the switch does not prepare either.
        with psycopg.connect(direct_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))
        for _ in range(10):
            assert await store.fetch("nobody") is None
        async with store.database.connection("reading the new backend") as conn:
            assert conn.info.backend_pid != backend
        assert await prepared_statements(store) == []


@pytest.mark.asyncio
async def test_a_failed_prepared_statement_stops_every_connection_of_the_database_from_using_its_own(direct_dsn):
    async with await SessionStore.open(direct_dsn, min_size=2, max_size=2) as store:
        database = store.database
        async with database.connection("one") as first, database.connection("two") as second:
            for _ in range(6):  # prepared on the second connection's backend
                await second.execute(_fetch_query(), {"id": "nobody"})
            await first.execute("PREPARE _pg3_0 AS SELECT 1", prepare=False)

        async with database.connection("holding the second") as second:
            for _ in range(6):  # all on the first connection: its 6th is refused, then run unprepared
                assert await store.fetch("nobody") is None
            used = await (await second.execute(EXECUTIONS, prepare=False)).fetchone()

        async with database.connection("holding the first"):
            for _ in range(6):  # all on the second connection, which no longer runs its _pg3_0
                assert await store.fetch("nobody") is None
            async with database.connection("the second") as second:
                assert await (await second.execute(EXECUTIONS, prepare=False)).fetchone() == used


EXECUTIONS = "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"


@pytest.mark.asyncio
async def test_inside_a_transaction_block_the_failed_statement_raises_and_writes_nothing(direct_dsn):
    async with SessionManager.connect(direct_dsn, store_options=ONE_CONNECTION) as manager:
        await manager.ensure("merged")
        for number in range(6):  # merge_data's transaction; its statement prepared on the 6th
            await manager.merge_data("merged", {f"key{number}": number})
        async with manager.store.database.connection("dropping the prepared statement") as conn:
            cursor = await conn.execute(
                "SELECT name FROM pg_prepared_statements WHERE statement LIKE %s", ("%session_data ||%",), prepare=False
            )
            (name,) = await cursor.fetchone()
            await conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(name)), prepare=False)

        with pytest.raises(PersistenceError, match="InvalidSqlStatementName") as failure:
            await manager.merge_data("merged", {"lost": True})
        assert isinstance(failure.value.__cause__, psycopg.errors.InvalidSqlStatementName)
        stored = await manager.merge_data("merged", {"kept": True})  # preparing is off now
        assert await prepared_statements(manager.store) == []
    assert stored.data == {**{f"key{n}": n for n in range(6)}, "kept": True}


@pytest.mark.asyncio
@pytest.mark.parametrize("value", ["yes", 1, 0, "auto"])
async def test_a_bad_prepared_statements_value_raises_before_connecting(value):
    nowhere = "host=/nonexistent-directory port=1 dbname=nothing connect_timeout=1"
    message = f"prepared_statements must be True, False or None \\(automatic\\), not {type(value).__name__}"
    with pytest.raises(TypeError, match=message):
        await SessionStore.open(nowhere, prepared_statements=value)
    with pytest.raises(TypeError, match=message):
        await EventStore.open(nowhere, prepared_statements=value)
    with pytest.raises(TypeError, match=message):
        await SessionManager.open(nowhere, store_options={"prepared_statements": value})


# The schema's objects, for "a second migrate changes nothing": relations, columns, indexes,
# functions with their bodies, policies and triggers outside the system schemas.
FINGERPRINT = """
SELECT md5(string_agg(item, E'\\n' ORDER BY item)) FROM (
    SELECT format('%s.%s %s', n.nspname, c.relname, c.relkind)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
    UNION ALL
    SELECT format('%s.%s.%s %s', table_schema, table_name, column_name, data_type)
      FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
    UNION ALL
    SELECT indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
    UNION ALL
    SELECT format('%s.%s(%s) %s', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), md5(p.prosrc))
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
    UNION ALL
    SELECT format('%s.%s %s %s', schemaname, tablename, policyname, qual) FROM pg_policies
    UNION ALL
    SELECT format('%s %s', tgrelid::regclass, tgname) FROM pg_trigger WHERE NOT tgisinternal
) AS objects(item)
"""


def schema_and_ledger(dsn: str) -> tuple[str, list[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fingerprint = conn.execute(FINGERPRINT).fetchone()
        ledger = conn.execute("SELECT * FROM exai_schema.applied_migrations ORDER BY version").fetchall()
    assert fingerprint is not None
    return fingerprint[0], ledger


def test_migrate_through_transaction_mode_applies_everything_once_and_status_reads_it(
    exai_pgbouncer, empty_dsn, capsys
):
    dsn = pooled(exai_pgbouncer("transaction"), empty_dsn)
    files = [migration.filename for migration in load_migrations()]

    assert cli.main(["status", "--dsn", dsn]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{name}: pending" for name in files]

    assert cli.main(["migrate", "--dsn", dsn]) == 0
    assert capsys.readouterr().out.splitlines() == [f"applied {name}" for name in files]
    before = schema_and_ledger(empty_dsn)
    assert [row[:3] for row in before[1]] == [(m.version, m.name, m.checksum) for m in load_migrations()]

    assert cli.main(["migrate", "--dsn", dsn]) == 0
    assert capsys.readouterr().out == "nothing to apply: the schema is up to date\n"
    assert schema_and_ledger(empty_dsn) == before

    assert cli.main(["status", "--dsn", dsn]) == 0
    status = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in status] == files
    assert all(": applied " in line for line in status)
    # Nothing of the runner's is left in force: no advisory lock, no clock setting.
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)


def test_two_migrate_runs_at_once_through_transaction_mode_both_succeed(exai_pgbouncer, empty_dsn):
    """The old runner's session lock did not hold through the pooler: the second runner's
    pg_advisory_lock could run on the server connection that held it (advisory locks are
    reentrant), so both created the ledger's schema; an unlock on another server connection
    left the lock held there, and the next run to land on one without it hung."""
    dsn = pooled(exai_pgbouncer("transaction"), empty_dsn)
    command = [sys.executable, "-m", "pytest_exai_sessions", "migrate", "--dsn", dsn]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    applied = [line for out, _ in outputs for line in out.splitlines() if line.startswith("applied ")]
    # Each file applied by one of the two, in order within each run.
    assert sorted(applied) == [f"applied {m.filename}" for m in load_migrations()]
    _, ledger = schema_and_ledger(empty_dsn)
    assert [row[:3] for row in ledger] == [(m.version, m.name, m.checksum) for m in load_migrations()]


# What else keeps no session state: the event store, the database clock, the RLS helpers, compat.

T0 = datetime(2027, 3, 15, 12, tzinfo=UTC)


@pytest.mark.asyncio
async def test_the_event_store_and_the_database_clock_through_transaction_mode(exai_pgbouncer, direct_dsn):
    dsn = pooled(exai_pgbouncer("transaction"), direct_dsn)
    clock = DbClock(dsn)
    clock.set(T0)  # unified.set_clock() through the pooler: clock_now()'s body, seen by every connection
    async with await EventStore.open(dsn) as events:
        recorded = await asyncio.gather(
            *(
                events.record(
                    Event(event_type="checkout", event_category="shop", source_system="api", session_id=f"s{n}")
                )
                for n in range(50)
            )
        )
        assert {event.event_timestamp for event in recorded} == {T0}  # the column default read the clock
        for number in range(10):  # one query text, run more often than psycopg prepares after
            assert [event.id for event in await events.query(session_id=f"s{number}")] == [recorded[number].id]
        assert await events.get(recorded[0].id) == recorded[0]
        await events.refresh_summaries()
        assert len(await events.recent_events()) == 50
        clock.advance(days=2)
        await events.refresh_summaries()
        assert await events.recent_events() == []  # the 24 hours before the moved clock
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT unified.clock_now()").fetchone() == (T0 + timedelta(days=2),)
        assert conn.execute("SELECT count(*) FROM unified.event_metric_events").fetchone() == (50,)


ALICE = str(uuid.uuid5(uuid.NAMESPACE_URL, "alice"))
BOB = str(uuid.uuid5(uuid.NAMESPACE_URL, "bob"))


@pytest.mark.asyncio
async def test_acting_as_users_on_pooled_connections_through_transaction_mode(
    exai_pgbouncer, direct_dsn, exai_as_user, exai_as_role
):
    """Two clients of the pooler take turns on its server connection. The acting blocks
    prepare nothing (psycopg's default would, on a 6th run), and their role and claims end
    with their transaction, so the server connection goes back to the pool as it came."""
    dsn = pooled(exai_pgbouncer("transaction"), direct_dsn)
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for owner in (ALICE, BOB):
            conn.execute("INSERT INTO public.sessions (session_id, user_id) VALUES (%s, %s)", (f"of-{owner}", owner))
        superuser = conn.execute("SELECT current_user").fetchone()
    reads = "SELECT session_id, auth.uid()::text, current_user FROM public.sessions"
    after = "SELECT current_user, coalesce(current_setting('request.jwt.claims', true), '')"
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as alice,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as bob,
    ):
        for _ in range(8):
            for conn, owner in ((alice, ALICE), (bob, BOB)):
                async with exai_as_user(conn, owner):
                    rows = await (await conn.execute(reads, prepare=False)).fetchall()
                    assert rows == [(f"of-{owner}", owner, "authenticated")]
                assert await (await conn.execute(after, prepare=False)).fetchone() == (*superuser, "")
        async with exai_as_role(alice, "anon"):
            assert await (await alice.execute("SELECT count(*) FROM public.sessions", prepare=False)).fetchone() == (0,)
        assert await (await bob.execute(after, prepare=False)).fetchone() == (*superuser, "")


@pytest.mark.asyncio
async def test_the_original_api_through_transaction_mode(exai_pgbouncer, direct_dsn):
    dsn = pooled(exai_pgbouncer("transaction"), direct_dsn)
    ids = [f"compat-{n:02d}" for n in range(20)]
    manager = compat.SessionManager(dsn=dsn)
    try:
        sessions = [await manager.ensure(session_id) for session_id in ids]
        for _ in range(8):
            await asyncio.gather(*(manager.update_activity(session_id, 2) for session_id in ids))
        assert [(s.request_count, s.total_duration_ms) for s in sessions] == [(8, 16)] * len(ids)
        assert await manager.list_ids() == ids
        await manager.remove(ids[0])
        assert await manager.cleanup_stale_sessions() == 0
        assert (await manager.get_session_metrics())["total_sessions"] == len(ids) - 1
    finally:
        await manager.aclose()

    restarted = compat.SessionManager(dsn=dsn)
    try:
        assert await restarted.recover_all_sessions() == len(ids) - 1  # connected and recovered on first use: none new
        assert (await restarted.get(ids[1])).request_count == 8
    finally:
        await restarted.aclose()
    assert request_counts(direct_dsn) == dict.fromkeys(ids[1:], 8)
