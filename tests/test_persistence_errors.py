"""A database error raises PersistenceError: it is never logged and swallowed.

Each test breaks the real database underneath a running manager (through a separate
connection, as an operator or an outage would) and checks that every operation that
needs the database raises, chains the driver's error, and leaves memory as it was.
"""

import asyncio
import os
import re
import signal
from datetime import timedelta

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pytest_exai_sessions import PersistenceError, SchemaMissing, SessionManager, SessionStore
from pytest_exai_sessions.models import utc_now


async def execute(dsn, query, params=None):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(query, params)


async def terminate_backends(dsn, application_name):
    await execute(
        dsn,
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    )


async def break_database(breakage, dsn, manager):
    if breakage == "table dropped":
        await execute(dsn, "DROP TABLE public.sessions")
    elif breakage == "table renamed":
        await execute(dsn, "ALTER TABLE public.sessions RENAME TO sessions_moved")
    elif breakage == "privileges revoked":
        await execute(dsn, "REVOKE ALL ON TABLE public.sessions FROM service_role")
    else:
        raise AssertionError(breakage)


async def repair_database(breakage, dsn):
    """Undo the breakage where it can be undone; False for a dropped table."""
    if breakage == "table renamed":
        await execute(dsn, "ALTER TABLE public.sessions_moved RENAME TO sessions")
    elif breakage == "privileges revoked":
        await execute(dsn, "GRANT ALL ON TABLE public.sessions TO service_role")
    return breakage != "table dropped"


OPERATIONS = {
    "ensure a new session": lambda m: m.ensure("newcomer"),
    "ensure a session only in the database": lambda m: m.ensure("outsider"),
    "get a session only in the database": lambda m: m.get("outsider"),
    "update": lambda m: m.update("alpha", data={"lost": True}),
    "update_activity": lambda m: m.update_activity("alpha", 5),
    "remove": lambda m: m.remove("alpha"),
    "cleanup_stale_sessions": lambda m: m.cleanup_stale_sessions(),
    "recover_all_sessions": lambda m: m.recover_all_sessions(),
}


async def run_request(manager):
    async with manager.request("alpha"):
        pass  # the request is counted on exit, which needs the database


OPERATIONS["request"] = run_request


@pytest.fixture(params=["table dropped", "table renamed", "privileges revoked"])
def breakage(request):
    return request.param


@pytest_asyncio.fixture
async def manager(exai_dsn, exai_direct_dsn, breakage):
    """A running manager with live sessions "alpha" and "beta", a timed-out one, and a row it has not loaded."""
    # Revoking privileges shows nothing to a superuser: connect as the API role an application uses, with a
    # startup option, which a pooler refuses; so that one goes to the server directly.
    if breakage == "privileges revoked":
        dsn = make_conninfo(exai_direct_dsn, options="-c role=service_role")
    else:
        dsn = exai_dsn
    async with SessionManager.connect(dsn) as manager:
        await manager.ensure("alpha", data={"step": 1})
        await manager.ensure("beta")
        await manager.ensure("stale")
        await manager.update("stale", expires_at=utc_now())  # timed out, waiting for cleanup
        await execute(exai_dsn, "INSERT INTO public.sessions (session_id) VALUES ('outsider')")
        yield manager


@pytest.mark.asyncio
@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_a_database_error_raises_and_changes_nothing(manager, exai_dsn, breakage, operation):
    before = manager.live_sessions()
    await break_database(breakage, exai_dsn, manager)

    with pytest.raises(PersistenceError, match="failed") as error:
        await operation(manager)

    assert isinstance(error.value.__cause__, psycopg.Error)  # the driver's error, chained
    if await repair_database(breakage, exai_dsn):
        assert manager.live_sessions() == before


@pytest.mark.asyncio
@pytest.mark.parametrize("breakage", ["connections terminated"])  # overrides the fixture's three breakages
@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_connections_the_server_closed_are_replaced_before_use(manager, exai_direct_dsn, operation):
    """A restart or pg_terminate_backend kills idle pooled connections; no call may fail on one."""
    # Straight to the server: through a pooler, this statement could run on one of the connections it ends.
    await terminate_backends(exai_direct_dsn, manager.store.application_name)

    await operation(manager)  # succeeds on a new connection

    assert await manager.get("beta") is not None


@pytest.mark.asyncio
async def test_a_failed_write_did_not_happen_and_the_next_one_works(session_manager, exai_dsn):
    await session_manager.ensure("s1")
    await execute(exai_dsn, "ALTER TABLE public.sessions RENAME TO sessions_moved")

    with pytest.raises(PersistenceError, match="UndefinedTable"):
        await session_manager.update_activity("s1", 100)

    await execute(exai_dsn, "ALTER TABLE public.sessions_moved RENAME TO sessions")
    session = await session_manager.update_activity("s1", 1)
    assert (session.request_count, session.total_duration_ms) == (1, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "operation",
    [
        lambda m: m.ensure("newcomer"),
        lambda m: m.update("alpha", data={"x": 1}),
        lambda m: m.update_activity("alpha"),
        lambda m: m.remove("alpha"),
    ],
    ids=["ensure", "update", "update_activity", "remove"],
)
async def test_a_write_the_database_refuses_raises(session_manager, exai_dsn, operation):
    await session_manager.ensure("alpha")
    await execute(
        exai_dsn,
        """
        CREATE FUNCTION public.refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'sessions are read-only during maintenance'; END $$;
        CREATE TRIGGER refuse_writes BEFORE INSERT OR UPDATE OR DELETE ON public.sessions
            FOR EACH ROW EXECUTE FUNCTION public.refuse_writes();
        """,
    )
    before = session_manager.live_sessions()

    with pytest.raises(PersistenceError, match="read-only during maintenance"):
        await operation(session_manager)

    assert session_manager.live_sessions() == before
    assert await session_manager.get("alpha") == before["alpha"]  # reading still works


@pytest.mark.asyncio
async def test_a_manager_cannot_start_on_a_broken_table(exai_dsn):
    await execute(exai_dsn, "DROP TABLE public.sessions")

    missing = r'relation "public\.sessions" does not exist\): apply the unified'
    with pytest.raises(SchemaMissing, match=missing) as caught:
        async with SessionManager.connect(exai_dsn):
            pass
    assert isinstance(caught.value, PersistenceError)


@pytest.mark.asyncio
async def test_a_manager_names_the_column_an_older_schema_lacks(exai_dsn):
    await execute(exai_dsn, "ALTER TABLE public.sessions DROP COLUMN version")

    with pytest.raises(SchemaMissing, match=r'column "version" does not exist'):
        async with SessionManager.connect(exai_dsn):
            pass


@pytest.mark.asyncio
async def test_a_row_the_model_refuses_stops_recovery_and_is_named(exai_dsn):
    # The table allows control characters in an id; the model does not.
    await execute(exai_dsn, "INSERT INTO public.sessions (session_id) VALUES ('good'), (E'bad\\x07id')")

    async with SessionManager.connect(exai_dsn) as manager:
        assert (await manager.get("good")).session_id == "good"  # a bad row elsewhere stops nothing else
        with pytest.raises(
            PersistenceError, match=r"session_id 'bad\\x07id' is not a valid session: .*control character"
        ):
            await manager.recover_all_sessions()


@pytest.mark.asyncio
async def test_periodic_cleanup_keeps_its_error_where_callers_can_see_it(session_manager_factory, exai_dsn):
    manager = await session_manager_factory(cleanup_interval_secs=0.05)
    await manager.ensure("stale")
    await manager.update("stale", expires_at=utc_now())
    await execute(exai_dsn, "DROP TABLE public.sessions")

    for _ in range(200):
        if manager.last_cleanup_error is not None:
            break
        await asyncio.sleep(0.01)

    assert isinstance(manager.last_cleanup_error, PersistenceError)


@pytest.mark.asyncio
async def test_an_outage_raises_within_the_timeout_and_says_why(exai_dsn, exai_pg_server, exai_pooler):
    dbname = conninfo_to_dict(exai_dsn)["dbname"]
    maintenance = exai_pg_server.dsn()  # past any pooler, which serves only the test databases
    store = await SessionStore.open(exai_dsn, timeout=0.5)
    async with SessionManager(store, close_store=True) as manager:
        await manager.ensure("s1")
        before = manager.live_sessions()
        await execute(maintenance, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            # Every connection to the database, not only the store's: a pooler keeps server connections of its own.
            await execute(
                maintenance,
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )

            # The first call finds its connection dead; later ones cannot get a new one.
            errors = []
            for _ in range(3):
                with pytest.raises(PersistenceError) as error:
                    await asyncio.wait_for(manager.update_activity("s1"), timeout=30)
                errors.append(str(error.value))
        finally:
            await execute(maintenance, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            if exai_pooler is not None:  # it refuses the database's clients until its next server login succeeds
                await asyncio.to_thread(exai_pooler.wait_until_ready, dbname)

        if exai_pooler is None:
            assert "is not currently accepting connections" in errors[-1]
        else:  # PgBouncer holds the login while it tries the server's; the store gives up at its timeout
            assert re.search(r"couldn't get a connection after 0\.50 sec|server login has been failing", errors[-1])
        assert manager.live_sessions() == before


@pytest.mark.asyncio
async def test_a_statement_the_database_does_not_answer_raises_within_the_deadline(exai_dsn):
    store = await SessionStore.open(exai_dsn, timeout=0.2)
    async with SessionManager(store, close_store=True) as manager:
        await manager.ensure("s1")
        before = manager.live_sessions()
        async with await psycopg.AsyncConnection.connect(exai_dsn) as blocker:
            # The server accepts the statement and then does not answer while this lock is held.
            await blocker.execute("LOCK TABLE public.sessions IN ACCESS EXCLUSIVE MODE")
            started = asyncio.get_running_loop().time()
            with pytest.raises(PersistenceError, match=r"did not answer within 0\.4s"):
                await asyncio.wait_for(manager.update_activity("s1"), timeout=30)
            waited = asyncio.get_running_loop().time() - started
            await blocker.rollback()

        assert waited < 5  # the deadline, plus the cancellation of the statement
        assert manager.live_sessions() == before
        assert (await manager.update_activity("s1")).request_count == 1  # the statement was cancelled


@pytest.mark.asyncio
@pytest.mark.parametrize("operation", ["update_activity", "recover_all_sessions"])
async def test_a_frozen_backend_cannot_hold_a_call_past_its_deadline(exai_dsn, exai_direct_dsn, operation):
    """A backend that neither answers nor ends its statement on a cancel (stopped, or cut off by the network)."""
    store = await SessionStore.open(exai_dsn, timeout=0.2, max_size=1)
    async with SessionManager(store, close_store=True) as manager:
        await manager.ensure("s1")
        dbname = conninfo_to_dict(exai_dsn)["dbname"]
        # Every backend of the database but this one's: behind a pooler, any may serve the next call.
        async with await psycopg.AsyncConnection.connect(exai_direct_dsn, autocommit=True) as admin:
            cursor = await admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)
            )
            frozen = [pid for (pid,) in await cursor.fetchall()]
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)  # backends of this run's own server
        try:
            # psycopg, cancelled, would wait 5 s for the cancel and 5 more for the statement (3.2: for ever).
            # Behind a pooler the pool may have to open a connection first, which waits for the pool's timeout.
            with pytest.raises(PersistenceError, match=r"did not answer within 0\.4s|connection after 0\.20 sec"):
                await asyncio.wait_for(
                    getattr(manager, operation)(*(["s1"] if operation == "update_activity" else [])), 4
                )
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)

        assert await manager.get("s1") is not None  # the pool serves again, on a new connection


@pytest.mark.asyncio
async def test_a_streams_consumer_has_all_the_time_it_takes_and_may_stop_early(exai_dsn):
    """The deadline bounds each round trip of a stream; while the consumer has the rows, it stands still."""
    store = await SessionStore.open(exai_dsn, timeout=0.1)  # 0.2 s per round trip
    async with SessionManager(store, close_store=True) as manager:
        for number in range(3):
            await manager.ensure(f"s{number}")
        now = (await manager.get("s2")).last_activity  # the sessions' own time, not the wall clock's
        seen = []
        async for session in store.iter_live(now=now, stale_before=now - timedelta(hours=1), batch_size=1):
            seen.append(session.session_id)
            if len(seen) == 1:
                # Longer than the deadline, the second to end a cancelled statement and the backstop together.
                await asyncio.sleep(2)
            if len(seen) == 2:
                break  # the cursor is closed and the transaction ended under a deadline again

        assert len(set(seen)) == 2 and set(seen) <= {"s0", "s1", "s2"}
        assert len(await manager.recover_all_sessions()) == 3  # the connection went back to the pool clean


def unreachable(tmp_path, exai_dsn, exai_pooler):
    """DSNs that cannot connect, each with what the error must say about why."""
    dbname = conninfo_to_dict(exai_dsn)["dbname"]
    # PgBouncer checks the user itself, against its auth file, with words of its own.
    no_role = "no such user" if exai_pooler is not None else 'role "no_such_role" does not exist'
    return {
        "no server in the socket directory": (
            make_conninfo(host=str(tmp_path), port="5432", user="postgres"),
            "No such file or directory",
        ),
        "nothing listening on the port": (
            "host=127.0.0.1 port=1 user=postgres dbname=postgres",
            "Connection refused",
        ),
        "database does not exist": (
            make_conninfo(exai_dsn, dbname=f"{dbname}_missing"),
            f'database "{dbname}_missing" does not exist',
        ),
        "role does not exist": (
            make_conninfo(exai_dsn, user="no_such_role", password="s3cret-pw"),
            no_role,
        ),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "where",
    [
        "no server in the socket directory",
        "nothing listening on the port",
        "database does not exist",
        "role does not exist",
    ],
)
async def test_a_store_that_cannot_connect_raises_within_its_timeout(tmp_path, exai_dsn, exai_pooler, where):
    dsn, reason = unreachable(tmp_path, exai_dsn, exai_pooler)[where]

    # wait_for only turns a hang into a failure; the store itself gives up after `timeout`.
    with pytest.raises(PersistenceError, match=r"connecting to .* failed") as error:
        await asyncio.wait_for(SessionStore.open(dsn, timeout=0.5, connect_timeout=1), timeout=30)

    assert reason in str(error.value)  # says why, not only that the pool timed out
    assert "s3cret-pw" not in str(error.value)  # the DSN in the message has no password


@pytest.mark.asyncio
async def test_connect_raises_when_the_database_cannot_be_reached(tmp_path):
    dsn = make_conninfo(host=str(tmp_path), port="5432", user="postgres")

    with pytest.raises(PersistenceError):
        async with SessionManager.connect(dsn, store_options={"timeout": 0.5}):
            pytest.fail("connect() must not yield a manager without a database")
