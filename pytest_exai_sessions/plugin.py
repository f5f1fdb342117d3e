"""pytest plugin: options and fixtures. Thin: it wires the core and the server together."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import pytest
import pytest_asyncio

from .clock import DbClock
from .config import ExaiConfig, add_options, read_config
from .crash import CrashHarness
from .databases import TestDatabases
from .events import EventStore
from .manager import SessionManager
from .rls import ActingAs, as_role, as_service_role, as_user
from .server import ExternalPostgres, PostgresServer, TemporaryPostgres, find_bindir, server_os_user
from .store import SessionStore


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.fixture(scope="session")
def exai_config(pytestconfig: pytest.Config) -> ExaiConfig:
    """The plugin's options as read from the command line, environment and ini file."""
    return read_config(pytestconfig, dict(os.environ))


@pytest.fixture(scope="session")
def exai_pg_server(exai_config: ExaiConfig) -> Iterator[PostgresServer]:
    """The running PostgreSQL server (host, port, user, version): temporary, or external with --exai-dsn."""
    if exai_config.dsn:
        yield ExternalPostgres(exai_config.dsn)
        return
    server = TemporaryPostgres(
        find_bindir(exai_config.pg_bin),
        basedir=exai_config.pg_basedir,
        os_user=server_os_user(exai_config.pg_os_user),
        listen_tcp=exai_config.pg_tcp,
        port=exai_config.pg_port,
        settings=exai_config.pg_settings,
        startup_timeout=exai_config.pg_startup_timeout,
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def exai_databases(exai_pg_server: PostgresServer) -> Iterator[TestDatabases]:
    """The template database with the unified schema (built once) and the factory of per-test clones."""
    databases = TestDatabases(exai_pg_server)
    databases.create_template()
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
        exai_databases.drop(dbname)


@pytest_asyncio.fixture
async def session_store(exai_dsn: str) -> AsyncIterator[SessionStore]:
    """A SessionStore on this test's database."""
    async with await SessionStore.open(exai_dsn) as store:
        yield store


@pytest_asyncio.fixture
async def session_manager_factory(exai_dsn: str) -> AsyncIterator[Callable[..., Awaitable[SessionManager]]]:
    """``await session_manager_factory(**options)``: a started manager on this test's database."""
    harness = CrashHarness(exai_dsn)

    async def make(**options: Any) -> SessionManager:
        return await harness.new_manager(**options)

    try:
        yield make
    finally:
        await harness.aclose()


@pytest_asyncio.fixture
async def session_manager(
    session_manager_factory: Callable[..., Awaitable[SessionManager]],
) -> SessionManager:
    """A started, persistent SessionManager with default options on this test's database."""
    return await session_manager_factory()


def _skip(reason: str) -> NoReturn:
    pytest.skip(reason)


@pytest_asyncio.fixture
async def crash_harness(exai_dsn: str, exai_pg_server: PostgresServer) -> AsyncIterator[CrashHarness]:
    """Crash helpers: crash_and_restart(manager), snapshot(manager), crash/kill/restart_database()."""
    harness = CrashHarness(exai_dsn, exai_pg_server, unsupported=_skip)
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
def exai_db_clock(exai_dsn: str) -> DbClock:
    """This test's database clock: set("2027-03-15"), advance(days=1), reset(); connections opened later see it."""
    return DbClock(exai_dsn)


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
