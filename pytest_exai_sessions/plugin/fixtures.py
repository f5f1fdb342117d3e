"""The plugin's fixtures: thin wiring of the core, the server and the testing tools."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
import pytest_asyncio

from ..errors import ExaiSessionsError, MigrationError, SchemaMissing
from ..events import EventStore
from ..manager import SessionManager
from ..server import PostgresServer, ServerStartError, TemporaryPostgres, find_bindir, server_os_user
from ..server.database import database_of
from ..server.pooler import PgBouncer, PoolerNotFound, PoolerStartError, PoolMode, find_pgbouncer
from ..store import SessionStore
from ..testing.crash import CrashHarness
from ..testing.databases import TestDatabases
from ..testing.db_clock import DbClock
from ..testing.rls import ActingAs, as_role, as_service_role, as_user
from ..testing.supabase import SupabaseLikeServer
from . import factories
from .config import ExaiConfig
from .hooks import MANAGER_OPTIONS, MARKER, config_of
from .servers import ServerUnavailable, initdb_cache_of, server_kind, start_server
from .templates import Templates, fail_and_stop, main_schema, template_databases
from .timings import timings_of


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def exai_config(pytestconfig: pytest.Config) -> ExaiConfig:
    """The plugin's options as read from the command line, environment and ini file."""
    return config_of(pytestconfig)


@pytest.fixture(scope="session")
def exai_pg_server(exai_config: ExaiConfig, request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The running PostgreSQL server (host, port, user, version): temporary, or external with --exai-dsn."""
    failure: str | None = None
    broken: MigrationError | None = None
    started = time.perf_counter()
    try:
        server = start_server(exai_config)
        _record_server_phases(request.config, server, time.perf_counter() - started, exai_config)
    except ServerUnavailable as error:
        failure = str(error)
    except MigrationError as error:  # --exai-reuse builds the templates as it starts the server
        broken = error
    if broken is not None:
        fail_and_stop(request, broken)
    if failure is not None:
        _fail(failure)  # outside the except block: the report shows the reason, not a chain of tracebacks
    try:
        yield server
    finally:
        server.stop()


def _record_server_phases(config: pytest.Config, server: PostgresServer, seconds: float, exai: ExaiConfig) -> None:
    timings = timings_of(config)
    if not isinstance(server, TemporaryPostgres) or not server.setup_timings:
        timings.record("server", seconds, "external: --exai-dsn")
        return
    cluster, start = server.setup_timings["cluster"], server.setup_timings["start"]
    timings.record("cluster", cluster, server.cluster_source)
    timings.record("start", start)
    if server_kind(exai) == "cached":  # also the check of its cache (and a rebuild)
        timings.record("--exai-reuse cache", seconds - cluster - start)


@pytest.fixture(scope="session")
def exai_templates(
    exai_pg_server: PostgresServer, exai_config: ExaiConfig, pytestconfig: pytest.Config
) -> Iterator[Templates]:
    """The run's template databases, one per schema (the plugin's and each factory's), dropped at the end."""
    templates = Templates(
        exai_pg_server, exai_config, cached=server_kind(exai_config) == "cached", timings=timings_of(pytestconfig)
    )
    try:
        yield templates
    finally:
        templates.close()


@pytest.fixture(scope="session")
def exai_databases(exai_templates: Templates, exai_config: ExaiConfig, request: pytest.FixtureRequest) -> TestDatabases:
    """The template (the unified schema, then exai_migrations; built once) and the factory of per-test clones."""
    return template_databases(exai_templates, main_schema(exai_config), request)


@pytest.fixture(scope="session", autouse=True)
def _exai_template_before_any_test(request: pytest.FixtureRequest) -> None:
    """Build the plugin's template at the first test of a run whose tests need it, whichever test that is.

    So a migration that fails stops the run before any test runs, not after the tests that
    happened to come first. A server that cannot be had is left to the tests that need it.
    """
    if not any("exai_databases" in getattr(item, "fixturenames", ()) for item in request.session.items):
        return
    try:
        request.getfixturevalue("exai_databases")
    except pytest.fail.Exception:
        if request.session.shouldstop:
            raise  # the template's migrations failed: this is the run's one report of it
        # Otherwise the server is unavailable: each test that needs it fails with the reason.


def _start_pooler(server: PostgresServer, exai: ExaiConfig, mode: PoolMode, binary: Path) -> PgBouncer:
    """PgBouncer in ``mode`` in front of ``server``, as the server's OS user (PgBouncer refuses root too)."""
    if isinstance(server, TemporaryPostgres):
        os_user = server.os_user
    else:
        os_user = server_os_user(exai.pg_os_user) if os.geteuid() == 0 else None
    return PgBouncer(
        server, mode=mode, binary=binary, os_user=os_user, basedir=exai.pg_basedir, listen_tcp=exai.pg_tcp
    ).start()


@pytest.fixture(scope="session")
def exai_pooler(exai_config: ExaiConfig, request: pytest.FixtureRequest) -> Iterator[PgBouncer | None]:
    """With --exai-pooler: the run's PgBouncer (mode, dsn(dbname), pid) that every test DSN goes through; else None."""
    if exai_config.pooler is None:
        yield None  # the server is not even started for this
        return
    server: PostgresServer = request.getfixturevalue("exai_pg_server")
    failure: str | None = None
    try:
        with timings_of(request.config).measure("pooler", f"PgBouncer, {exai_config.pooler} mode"):
            pooler = _start_pooler(server, exai_config, exai_config.pooler, find_pgbouncer())
    except (PoolerNotFound, PoolerStartError, ServerStartError) as error:
        failure = f"--exai-pooler={exai_config.pooler}: {type(error).__name__}: {error}"
    if failure is not None:
        _fail(failure)  # outside the except block: the reason, not a chain of tracebacks
    try:
        yield pooler
    finally:
        pooler.stop()


@pytest.fixture(scope="session")
def exai_pgbouncer(
    exai_pg_server: PostgresServer, exai_config: ExaiConfig, exai_pooler: PgBouncer | None
) -> Iterator[Callable[[PoolMode], PgBouncer]]:
    """``exai_pgbouncer("transaction" | "session")``: a real PgBouncer in that mode in front of the run's server.

    The run's own (``exai_pooler``) when --exai-pooler names that mode; else started at the
    first call for a mode, shared by the run's tests, stopped at the end. Without a
    ``pgbouncer`` binary the test skips, saying how to install one.
    """
    started: dict[str, PgBouncer] = {}

    def start(mode: PoolMode) -> PgBouncer:
        if exai_pooler is not None and exai_pooler.mode == mode:
            return exai_pooler
        if mode not in started:
            try:
                binary = find_pgbouncer()
            except PoolerNotFound as error:
                _skip(str(error))
            started[mode] = _start_pooler(exai_pg_server, exai_config, mode, binary)
        return started[mode]

    try:
        yield start
    finally:
        for pooler in started.values():
            pooler.stop()


exai_dsn = factories.database()


@pytest.fixture
def exai_direct_dsn(exai_dsn: str) -> str:
    """DSN of this test's exai_dsn database straight to the server, past any pooler (LISTEN, advisory locks, admin).

    An ``exai_dsn`` overridden with a DSN of your own is taken as direct.
    """
    database = database_of(exai_dsn)
    return exai_dsn if database is None else database.direct_dsn


@pytest.fixture
def exai_manager_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Manager options from this test's @pytest.mark.exai_sessions(...) marks (closest wins), else {}."""
    options: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers(MARKER))):  # farthest first, so closer marks override
        if mark.args:
            _fail(f"@pytest.mark.{MARKER} takes keyword options only, got positional {mark.args!r}")
        unknown = sorted(set(mark.kwargs) - set(MANAGER_OPTIONS))
        if unknown:
            _fail(
                f"@pytest.mark.{MARKER} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(MANAGER_OPTIONS)}"
            )
        options.update(mark.kwargs)
    return options


async def _sessions_table_missing(store: SessionStore) -> SchemaMissing | None:
    try:
        await store.check()
    except SchemaMissing as error:
        return error
    return None


@pytest_asyncio.fixture
async def session_store(exai_dsn: str) -> AsyncIterator[SessionStore]:
    """A SessionStore on this test's database."""
    async with await SessionStore.open(exai_dsn) as store:
        missing = await _sessions_table_missing(store)
        if missing is not None:
            _fail(factories.no_sessions_table("session_store", missing))
        yield store


@pytest_asyncio.fixture
async def session_manager_factory(
    exai_dsn: str, exai_manager_options: dict[str, Any], exai_db_clock: DbClock
) -> AsyncIterator[Callable[..., Awaitable[SessionManager]]]:
    """``await session_manager_factory(**options)``: a started manager on this test's database (marker: defaults)."""
    managers: list[SessionManager] = []

    async def make(**options: Any) -> SessionManager:
        manager = await factories.open_manager(
            "session_manager_factory",
            exai_dsn,
            SessionManager,
            **{"clock": exai_db_clock, **exai_manager_options, **options},
        )
        managers.append(manager)
        return manager

    try:
        yield make
    finally:
        for manager in managers:
            await manager.aclose()


session_manager = factories.session_manager()


@pytest_asyncio.fixture
async def session_replicas(
    exai_dsn: str, exai_manager_options: dict[str, Any], exai_db_clock: DbClock
) -> AsyncIterator[Callable[..., Awaitable[list[SessionManager]]]]:
    """``await session_replicas(n, **options)``: n started managers on this test's database, as n replicas.

    Each has a connection pool of its own, as separate processes would; they share nothing
    but the database. Options as ``session_manager_factory``'s; all closed after the test.
    For replicas in child processes that can be killed, see ``crash_harness``.
    """
    managers: list[SessionManager] = []

    async def make(count: int, **options: Any) -> list[SessionManager]:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"session_replicas(count) needs a whole number >= 1, got {count!r}")
        replicas = []
        for _ in range(count):
            manager = await factories.open_manager(
                "session_replicas",
                exai_dsn,
                SessionManager,
                **{"clock": exai_db_clock, **exai_manager_options, **options},
            )
            managers.append(manager)
            replicas.append(manager)
        return replicas

    try:
        yield make
    finally:
        for manager in managers:
            await manager.aclose()


def _skip(reason: str) -> NoReturn:
    pytest.skip(reason)


@pytest_asyncio.fixture
async def crash_harness(
    exai_dsn: str, exai_pg_server: PostgresServer, exai_db_clock: DbClock
) -> AsyncIterator[CrashHarness]:
    """Crash helpers: crash_and_restart(manager), snapshot(manager), crash/kill/restart_database(), restart_pooler()."""
    async with await SessionStore.open(exai_dsn) as store:
        missing = await _sessions_table_missing(store)
    if missing is not None:
        _fail(factories.no_sessions_table("crash_harness", missing))
    harness = CrashHarness(exai_dsn, exai_pg_server, unsupported=_skip, clock=exai_db_clock)
    try:
        yield harness
    finally:
        await harness.aclose()


@pytest_asyncio.fixture
async def event_store(exai_dsn: str) -> AsyncIterator[EventStore]:
    """An EventStore (unified.event_metric_events and its views) on this test's database."""
    async with await EventStore.open(exai_dsn) as store:
        yield store


exai_db_clock = factories.db_clock()


@pytest.fixture
def exai_as_user() -> Callable[..., ActingAs]:
    """``async with exai_as_user(conn, user_id, claims={...}):`` act as that signed-in user (role authenticated)."""
    return as_user


@pytest.fixture
def exai_as_role() -> Callable[..., ActingAs]:
    """``async with exai_as_role(conn, "anon"):`` act as a database role with claims {"role": role}."""
    return as_role


@pytest.fixture
def exai_as_service_role() -> Callable[..., ActingAs]:
    """``async with exai_as_service_role(conn):`` act as service_role, which bypasses row-level security."""
    return as_service_role


@pytest.fixture(scope="session")
def exai_shared_dsn(exai_databases: TestDatabases, exai_pooler: PgBouncer | None) -> Iterator[str]:
    """DSN of one database with the schema shared by every test of the run (for exai_rollback_conn)."""
    dbname = exai_databases.create_clone()
    try:
        yield factories.dsn_of(exai_databases, exai_pooler, dbname)
    finally:
        exai_databases.drop(dbname)


@pytest_asyncio.fixture
async def exai_rollback_conn(
    exai_shared_dsn: str, exai_pooler: PgBouncer | None
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection inside a transaction rolled back after the test: no clone, no commit, one connection."""
    # Opt-in speed for tests that only read and write through this one connection: what they
    # write is never committed, so no other connection (no manager, no pool) can see it.
    # Behind a transaction pooler no statement is prepared: the server connection the
    # statement would be prepared on is someone else's once this transaction ends.
    behind_transaction_pooler = exai_pooler is not None and exai_pooler.mode == "transaction"
    prepare_threshold = None if behind_transaction_pooler else 5  # 5: psycopg's default
    async with await psycopg.AsyncConnection.connect(exai_shared_dsn, prepare_threshold=prepare_threshold) as conn:
        try:
            yield conn  # psycopg has opened a transaction with the first statement
        finally:
            await conn.rollback()


@pytest.fixture(scope="session")
def exai_supabase(exai_config: ExaiConfig) -> Iterator[SupabaseLikeServer]:
    """A server of its own that looks like Supabase's (demoted postgres, API roles, auth); skips without one.

    ``exai_supabase.dsn(dbname)`` connects as ``postgres``, ``exai_supabase.admin_dsn(dbname)`` as
    ``supabase_admin``; ``with exai_supabase.database() as dbname:`` a new database, dropped after.
    Not the run's server: its roles are cluster-wide, and demoting postgres there would break other tests.
    """
    failure: str | None = None
    try:
        supabase = SupabaseLikeServer(
            find_bindir(exai_config.pg_bin),
            basedir=exai_config.pg_basedir,
            os_user=server_os_user(exai_config.pg_os_user),
            listen_tcp=exai_config.pg_tcp,
            settings=exai_config.pg_settings,
            startup_timeout=exai_config.pg_startup_timeout,
            initdb_cache=initdb_cache_of(exai_config),
        ).start()
    except ExaiSessionsError as error:  # no binaries, no POSIX, no OS user to run them as, or the start failed
        failure = f"no Supabase-like server: {type(error).__name__}: {error}"
    if failure is not None:
        _skip(failure)  # outside the except block: the reason, not a chain of tracebacks
    try:
        yield supabase
    finally:
        supabase.stop()
