"""An outcome the store cannot know is ``CommitUncertain``, never a success, and never a plain failure.

Under synchronous replication a COMMIT is committed locally first and then waits for a
standby. A cancelled wait (our own deadline, or anyone's pg_cancel_backend) ends with a
WARNING and an ordinary success; a terminated one with a lost connection. Either way the
row is on this server, but maybe on no standby: a failover may lose it. A server whose
``synchronous_standby_names`` names a standby that never comes makes every commit wait,
so these tests need no standby. What the store can know stays plain: a call refused before
anything was sent, or a statement the server rejected, did not take effect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from pg_leftovers import private_basedir
from psycopg import sql

from pytest_exai_sessions import CommitUncertain, PersistenceError, SessionManager, SessionNotFound
from pytest_exai_sessions.plugin.templates import main_schema
from pytest_exai_sessions.server import find_bindir, server_os_user
from pytest_exai_sessions.server.cluster import TemporaryPostgres
from pytest_exai_sessions.server.pooler import PgBouncer
from pytest_exai_sessions.testing.backends import terminate_backends
from pytest_exai_sessions.testing.crash.client import WorkloadContext
from pytest_exai_sessions.testing.crash.records import Completed, Record
from pytest_exai_sessions.testing.databases import TestDatabases

# The server waits for a standby that never connects, but only where a session asks it to:
# synchronous_commit is local for the server and "on" for the databases a test makes wait.
# (A commit waits only with max_wal_senders > 0, which needs wal_level replica.)
SYNC_REP = {
    "synchronous_standby_names": "nobody",
    "synchronous_commit": "local",
    "wal_level": "replica",
    "max_wal_senders": "2",
}
# Added to a DSN: a connection whose commits do not wait, to set a test up and read what is stored.
NO_WAIT = " options='-c synchronous_commit=local'"
# PoolOptions timeout: a call's answer deadline is twice that.
SHORT = 0.5


class SyncRepServer:
    """A server whose commits wait for a standby, in the databases ``waiting_database()`` makes."""

    def __init__(self, server: TemporaryPostgres, databases: TestDatabases) -> None:
        self.server = server
        self.databases = databases

    def database(self, *, waiting: bool) -> str:
        dbname = self.databases.create_clone()
        if waiting:
            self.admin(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(sql.Identifier(dbname)),
            )
        return dbname

    def admin(self, query: sql.Composable, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.server.dsn() + NO_WAIT, autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def stored(self, dbname: str, session_id: str) -> tuple[Any, ...] | None:
        """``(request_count, version)`` of the row as this server holds it, read without waiting."""
        with psycopg.connect(self.server.dsn(dbname) + NO_WAIT, autocommit=True) as conn:
            query = "SELECT request_count, version FROM public.sessions WHERE session_id = %s"
            return conn.execute(query, (session_id,)).fetchone()


@pytest.fixture(scope="module")
def sync_rep(exai_config) -> Iterator[SyncRepServer]:
    for basedir in private_basedir():
        server = TemporaryPostgres(
            find_bindir(exai_config.pg_bin), basedir=basedir, os_user=server_os_user(None), settings=SYNC_REP
        ).start()
        databases = TestDatabases(server, schema=main_schema(exai_config).resolve(exai_config.rootdir))
        try:
            databases.create_template()
            yield SyncRepServer(server, databases)
        finally:
            databases.disconnect()
            server.stop()


@pytest.fixture
def waiting_db(sync_rep: SyncRepServer) -> str:
    """A database of ``sync_rep`` where every commit waits for the standby that never comes."""
    return sync_rep.database(waiting=True)


@pytest_asyncio.fixture
async def seeded(sync_rep: SyncRepServer, waiting_db: str) -> AsyncIterator[str]:
    """The id of a live session in ``waiting_db``, created by a manager whose commits do not wait."""
    async with SessionManager.connect(sync_rep.server.dsn(waiting_db) + NO_WAIT, cleanup_interval_secs=0) as setup:
        await setup.ensure("waiting", data={"n": 1})
    yield "waiting"


async def end_the_wait(sync_rep: SyncRepServer, dbname: str, function: str) -> int:
    """``function`` (pg_cancel_backend or pg_terminate_backend) the backend of ``dbname`` waiting for the standby."""
    query = sql.SQL(
        "SELECT {}(pid) FROM pg_stat_activity WHERE datname = %s AND wait_event = 'SyncRep' AND pid <> pg_backend_pid()"
    ).format(sql.Identifier(function))
    async with await psycopg.AsyncConnection.connect(sync_rep.server.dsn() + NO_WAIT, autocommit=True) as conn:
        for _ in range(500):
            rows = await (await conn.execute(query, (dbname,))).fetchall()
            if rows:
                return len(rows)
            await asyncio.sleep(0.01)
    raise AssertionError(f"no backend of {dbname} waited for the synchronous standby")


async def update_while(manager: SessionManager, ending: Any) -> BaseException | None:
    """``manager.update_activity`` of the seeded session, with ``ending`` run beside it; what it raised."""
    results = await asyncio.gather(manager.update_activity("waiting", 5), ending, return_exceptions=True)
    if isinstance(results[1], BaseException):
        raise results[1]
    return results[0] if isinstance(results[0], BaseException) else None


# The bug this file was written for: a commit whose wait for the standby our own deadline
# cancelled was returned as acknowledged, although no standby may have it.


@pytest.mark.asyncio
async def test_a_wait_for_the_standby_cancelled_at_the_deadline_is_uncertain_though_committed_here(
    sync_rep, waiting_db, seeded
):
    options = {"timeout": SHORT}
    async with SessionManager.connect(
        sync_rep.server.dsn(waiting_db), store_options=options, cleanup_interval_secs=0
    ) as manager:
        with pytest.raises(CommitUncertain) as raised:
            await manager.update_activity(seeded, 5)

    assert "synchronous standby" in str(raised.value) and "failover" in str(raised.value)
    assert raised.value.action == f"recording a request of session {seeded!r}"
    # Success would have been a lie only a failover shows: the row is here, on no standby.
    assert sync_rep.stored(waiting_db, seeded) == (1, 2)


@pytest.mark.asyncio
async def test_a_wait_for_the_standby_cancelled_by_someone_else_is_uncertain(sync_rep, waiting_db, seeded):
    async with SessionManager.connect(sync_rep.server.dsn(waiting_db), cleanup_interval_secs=0) as manager:
        error = await update_while(manager, end_the_wait(sync_rep, waiting_db, "pg_cancel_backend"))
        assert isinstance(error, CommitUncertain), error
        assert sync_rep.stored(waiting_db, seeded) == (1, 2)
        # The connection is fine and the note of the warning was its statement's only.
        assert (await manager.get(seeded)).request_count == 1


@pytest.mark.asyncio
async def test_a_transaction_whose_commit_waited_is_uncertain_too(sync_rep, waiting_db, seeded):
    """merge_data runs its statement in a transaction: its COMMIT waits, and is cancelled."""
    async with SessionManager.connect(sync_rep.server.dsn(waiting_db), cleanup_interval_secs=0) as manager:
        merging = manager.merge_data(seeded, {"merged": True})
        results = await asyncio.gather(
            merging, end_the_wait(sync_rep, waiting_db, "pg_cancel_backend"), return_exceptions=True
        )
    assert isinstance(results[0], CommitUncertain), results
    assert sync_rep.stored(waiting_db, seeded) == (0, 2)


@pytest.mark.asyncio
async def test_a_wait_for_the_standby_cancelled_behind_pgbouncer_in_transaction_mode_is_uncertain(
    sync_rep, waiting_db, seeded, pgbouncer_binary, exai_config
):
    pooler = PgBouncer(sync_rep.server, mode="transaction", binary=pgbouncer_binary, os_user=server_os_user(None))
    pooler.basedir = sync_rep.server.basedir
    pooler.start()
    try:
        async with SessionManager.connect(pooler.dsn(waiting_db), cleanup_interval_secs=0) as manager:
            error = await update_while(manager, end_the_wait(sync_rep, waiting_db, "pg_cancel_backend"))
            assert isinstance(error, CommitUncertain), error
            assert sync_rep.stored(waiting_db, seeded) == (1, 2)
        # Our own deadline's cancel goes through the pooler, and the warning comes back through it.
        async with SessionManager.connect(
            pooler.dsn(waiting_db), store_options={"timeout": SHORT}, cleanup_interval_secs=0
        ) as manager:
            with pytest.raises(CommitUncertain):
                await manager.update_activity(seeded, 5)
        assert sync_rep.stored(waiting_db, seeded) == (2, 3)
    finally:
        pooler.stop()


@pytest.mark.asyncio
async def test_a_backend_terminated_during_the_wait_is_uncertain_and_the_next_call_reconnects(
    sync_rep, waiting_db, seeded
):
    async with SessionManager.connect(sync_rep.server.dsn(waiting_db), cleanup_interval_secs=0) as manager:
        error = await update_while(manager, end_the_wait(sync_rep, waiting_db, "pg_terminate_backend"))
        assert isinstance(error, CommitUncertain), error
        assert sync_rep.stored(waiting_db, seeded) == (1, 2)
        assert (await manager.get(seeded)).request_count == 1


# What the store can know stays a plain PersistenceError: it did not take effect.


@pytest.mark.asyncio
async def test_a_call_that_never_reached_the_server_is_a_plain_failure(sync_rep):
    dbname = sync_rep.database(waiting=False)
    ident = sql.Identifier(dbname)
    async with SessionManager.connect(
        sync_rep.server.dsn(dbname), store_options={"timeout": SHORT}, cleanup_interval_secs=0
    ) as manager:
        await manager.ensure("s")
        sync_rep.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident))
        end_backends(sync_rep, dbname)
        try:
            for _attempt in range(2):  # the pool's connection refused, then the reconnect's probe
                with pytest.raises(PersistenceError) as raised:
                    await manager.update_activity("s", 5)
                assert not isinstance(raised.value, CommitUncertain), raised.value
        finally:
            sync_rep.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident))
        assert (await manager.update_activity("s", 5)).request_count == 1


@pytest.mark.asyncio
async def test_a_read_only_server_is_a_plain_failure_and_the_next_call_finds_a_writable_one(sync_rep):
    """25006, as a standby (or a demoted primary) answers: nothing written; the next call starts afresh."""
    dbname = sync_rep.database(waiting=False)
    ident = sql.Identifier(dbname)
    async with SessionManager.connect(sync_rep.server.dsn(dbname), cleanup_interval_secs=0) as manager:
        await manager.ensure("s")
        old_pool = manager.store.database._pool
        sync_rep.admin(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(ident))
        end_backends(sync_rep, dbname)
        with pytest.raises(PersistenceError) as raised:
            await manager.update_activity("s", 5)
        assert not isinstance(raised.value, CommitUncertain)
        assert isinstance(raised.value.__cause__, psycopg.errors.ReadOnlySqlTransaction)
        # The "new primary": writable again; the pool's read-only connections must not be used.
        sync_rep.admin(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(ident))
        assert (await manager.update_activity("s", 5)).request_count == 1
        assert manager.store.database._pool is not old_pool


def end_backends(sync_rep, dbname):
    """Terminate every backend of ``dbname`` and wait until they are gone.

    Until then a pooled connection may still look alive to the store, which then sends a call
    on it: a call the server ends is uncertain, not the plain failure these tests are about.
    """
    with psycopg.connect(sync_rep.server.dsn() + NO_WAIT, autocommit=True) as admin:
        terminate_backends(admin, database=dbname)


# request_id: a retry after CommitUncertain counts the request once.


@pytest.mark.asyncio
async def test_a_request_retried_with_its_id_after_an_uncertain_outcome_is_counted_once(sync_rep, waiting_db, seeded):
    async with SessionManager.connect(
        sync_rep.server.dsn(waiting_db), store_options={"timeout": SHORT}, cleanup_interval_secs=0
    ) as manager:
        with pytest.raises(CommitUncertain):
            await manager.update_activity(seeded, 5, request_id="req-1")
    async with SessionManager.connect(sync_rep.server.dsn(waiting_db) + NO_WAIT, cleanup_interval_secs=0) as retry:
        session = await retry.update_activity(seeded, 5, request_id="req-1")
    assert session.request_count == 1
    assert sync_rep.stored(waiting_db, seeded) == (1, 3)


@pytest.mark.asyncio
async def test_the_same_request_id_counts_once_and_different_ones_each(persistence):
    manager = await persistence() if persistence is not None else SessionManager()
    await manager.ensure("s")

    first = await manager.update_activity("s", 10, request_id="a")
    again = await manager.update_activity("s", 10, request_id="a")
    other = await manager.update_activity("s", 10, request_id="b")
    plain = await manager.update_activity("s", 10)

    assert (first.request_count, again.request_count, other.request_count, plain.request_count) == (1, 1, 2, 3)
    assert (first.total_duration_ms, again.total_duration_ms, plain.total_duration_ms) == (10, 10, 30)
    # A retry that counted nothing still answers with the session as stored, and refreshes it.
    assert again.version == first.version + 1 and again.last_activity >= first.last_activity
    with pytest.raises(SessionNotFound):
        await manager.update_activity("unknown", 10, request_id="a")
    with pytest.raises(ValueError, match="request_id"):
        await manager.update_activity("s", 10, request_id="")


@pytest.mark.asyncio
async def test_a_request_id_is_remembered_for_the_last_32_requests(persistence):
    manager = await persistence() if persistence is not None else SessionManager()
    await manager.ensure("s")
    for n in range(33):
        await manager.update_activity("s", request_id=f"r{n}")

    assert (await manager.update_activity("s", request_id="r1")).request_count == 33  # still known
    assert (await manager.update_activity("s", request_id="r0")).request_count == 34  # forgotten: counted


@pytest.mark.asyncio
async def test_one_request_id_sent_by_two_replicas_at_once_counts_once(session_replicas):
    first, second = await session_replicas(2)
    await first.ensure("s")

    for n in range(20):
        await asyncio.gather(*(m.update_activity("s", 1, request_id=f"r{n}") for m in (first, second)))

    assert (await first.get("s")).request_count == 20


@pytest.mark.asyncio
async def test_a_batch_counts_each_request_id_once(persistence):
    manager = await persistence() if persistence is not None else SessionManager()
    await manager.ensure("s")
    await manager.ensure("t")
    await manager.update_activity("s", 1, request_id="a")

    batch = [("s", 1, "a"), ("s", 1, "b"), ("s", 1, "b"), ("t", 1, "a"), ("t", 1)]
    counted = await manager.update_activity_many(batch)

    # s: "a" was counted before, "b" comes twice: one more. t: "a" is new there, and one has no id.
    assert (counted["s"].request_count, counted["t"].request_count) == (2, 2)
    assert (counted["s"].total_duration_ms, counted["t"].total_duration_ms) == (2, 2)
    again = await manager.update_activity_many([("s", 1, "b"), ("t", 1, "a")])
    assert (again["s"].request_count, again["t"].request_count) == (2, 2)


# The crash client: a refusal the store is sure of is a fail; the rest stays uncertain.


class ListSink:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)

    async def wait_at_fault_point(self, name: str) -> None:
        return None

    def outcomes(self) -> list[tuple[str, str | None]]:
        return [(r.outcome, r.reason) for r in self.records if isinstance(r, Completed)]


class RaisingManager(SessionManager):
    """A manager whose writes raise ``error``: what the client makes of each kind."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(cleanup_interval_secs=0)
        self.error = error

    async def update_activity(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    async def remove(self, session_id: str) -> None:
        raise self.error


REFUSED = PersistenceError("recording a request failed: ReadOnlySqlTransaction: read-only")
UNKNOWN = CommitUncertain("recording a request", "the connection was lost")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "outcome"),
    [(REFUSED, ("fail", f"not_applied: {REFUSED}")), (UNKNOWN, ("uncertain", f"CommitUncertain: {UNKNOWN}"))],
    ids=["not applied", "commit uncertain"],
)
async def test_the_client_records_a_single_write_the_store_refused_as_failed(error, outcome):
    sink = ListSink()
    ctx = WorkloadContext(RaisingManager(error), sink, {}, "")
    for write in (ctx.update_activity("s", 1, request_id="r"), ctx.remove("s")):
        with pytest.raises(type(error)):
            await write
    assert sink.outcomes() == [outcome, outcome]


@pytest.mark.asyncio
async def test_an_applications_operation_is_failed_only_when_it_says_it_is_one_write():
    sink = ListSink()
    ctx = WorkloadContext(SessionManager(cleanup_interval_secs=0), sink, {}, "")
    for applied_only_on_success in (False, True):
        with pytest.raises(PersistenceError):
            async with ctx.operation("s", "mine", applied_only_on_success=applied_only_on_success):
                raise REFUSED
    with pytest.raises(CommitUncertain):
        async with ctx.operation("s", "mine", applied_only_on_success=True):
            raise UNKNOWN
    assert [outcome for outcome, _ in sink.outcomes()] == ["uncertain", "fail", "uncertain"]
