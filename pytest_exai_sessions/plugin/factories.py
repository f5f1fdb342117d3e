"""Closures that build fixtures, as pytest-postgresql's factories do.

The plugin's own ``exai_dsn``, ``exai_db_clock`` and ``session_manager`` are built by these;
a conftest makes more under other names with one line each::

    from pytest_exai_sessions.plugin import factories

    admin_manager = factories.session_manager(session_timeout_secs=60, max_concurrent_sessions=5)
    reporting_dsn = factories.database()
    reporting_clock = factories.db_clock(dsn="reporting_dsn")
    reporting_manager = factories.session_manager(dsn="reporting_dsn", clock="reporting_clock")
    at_008_dsn = factories.database(unified_schema=8, migrations=["tests/data/at_008.sql"])

A fixture is named after the variable it is assigned to. Arguments that name fixtures
(``dsn``, ``clock``, ``databases``) are looked up when a test asks for the new fixture.
With ``--exai-pooler`` every database fixture's DSN goes through the run's PgBouncer.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from ..errors import SchemaMissing
from ..manager import SessionManager
from ..server.database import DatabaseDsn, DatabaseUnderTest
from ..server.pooler import PgBouncer
from ..testing.app_migrations import Entry
from ..testing.databases import TestDatabases
from ..testing.db_clock import DbClock
from ..testing.template_schema import TemplateSchema
from .hooks import config_of
from .templates import DECLARED, template_databases
from .timings import timings_of

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=SessionManager)


def _requesting(*names: str) -> Callable[[F], F]:
    """Give a fixture function taking ``**fixtures`` the named fixtures as its arguments.

    pytest reads a fixture's dependencies from its signature; declared there (rather than
    looked up with ``request.getfixturevalue``) they are part of every test's fixture
    closure, ordered and visible in ``request.fixturenames`` like any other.
    """

    def declare(function: F) -> F:
        parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in dict.fromkeys(names)]
        function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return function

    return declare


def database(
    *,
    databases: str = "exai_databases",
    migrations: Sequence[Entry] | None = None,
    unified_schema: bool | int | None = None,
) -> Any:
    """A function-scoped fixture: the DSN of a fresh clone of a template, dropped after the test.

    By default the template is the plugin's (``exai_databases``, or the ``TestDatabases``
    fixture ``databases`` names). With ``migrations`` or ``unified_schema`` the fixture has a
    template of its own: the unified schema (``True``: all of it, ``False``: none, ``N``: up
    to migration N), then ``migrations`` in order (entries as in ``exai_migrations``:
    directories, ``.sql`` files, ``"package.module:function"`` or the function itself; relative
    paths resolve against the rootdir). Built once per run, cached by its own key with
    ``--exai-reuse``.
    """
    if migrations is None and unified_schema is None:
        return _clone_fixture(databases, lambda fixtures: fixtures[databases])
    if databases != "exai_databases":
        raise ValueError("factories.database: give either databases= or migrations=/unified_schema=, not both")
    schema = TemplateSchema(unified=True if unified_schema is None else unified_schema, app=tuple(migrations or ()))
    DECLARED.append(schema)  # noted now, at import: --exai-reuse builds it into the cached cluster
    return _clone_fixture(
        "exai_templates",
        lambda fixtures: template_databases(fixtures["exai_templates"], schema, fixtures["request"]),
        "request",
    )


def _clone_fixture(source: str, databases_of: Callable[[dict[str, Any]], TestDatabases], *more: str) -> Any:
    @_requesting(source, "exai_pooler", "pytestconfig", *more)
    def fixture(**fixtures: Any) -> Iterator[str]:
        """DSN of a fresh database cloned from its template for this test, dropped afterwards."""
        databases = databases_of(fixtures)
        with timings_of(fixtures["pytestconfig"]).measure("first clone"):
            dbname = databases.create_clone()
        try:
            yield dsn_of(databases, fixtures["exai_pooler"], dbname)
        finally:
            databases.release(dbname)

    return pytest.fixture(fixture)


def dsn_of(databases: TestDatabases, pooler: PgBouncer | None, dbname: str) -> DatabaseDsn:
    """What a test connects to: through the run's pooler when there is one in front of this server.

    The clone itself is made and dropped directly (``databases``): a pooler's idle server
    connection to the template would block ``CREATE DATABASE ... TEMPLATE``.
    """
    in_front = pooler if pooler is not None and pooler.server is databases.server else None
    return DatabaseDsn(DatabaseUnderTest(dbname, databases.server, in_front))


def db_clock(*, dsn: str = "exai_dsn") -> Any:
    """A function-scoped fixture: the test clock of the database ``dsn`` names (and of managers given it).

    It starts where ``--exai-clock`` says, else at the real time.
    """

    @_requesting(dsn, "pytestconfig")
    def fixture(**fixtures: Any) -> DbClock:
        """This test's clock, of its managers and its database: set("2027-03-15"), advance(days=1), reset(), now()."""
        return DbClock(fixtures[dsn], start=config_of(fixtures["pytestconfig"]).clock)

    return pytest.fixture(fixture)


async def open_manager(fixture: str, dsn: str, manager_class: type[M], **options: Any) -> M:
    """A started manager; a database without a usable public.sessions fails the test with one clear message."""
    missing: SchemaMissing | None = None
    try:
        return await manager_class.open(dsn, **options)
    except SchemaMissing as error:
        missing = error
    pytest.fail(no_sessions_table(fixture, missing), pytrace=False)


def no_sessions_table(fixture: str, error: SchemaMissing) -> str:
    return (
        f"{fixture} needs the table public.sessions of the unified schema, and this test's database has none "
        f"the store can use ({error.reason}). The template holds the unified schema unless exai_unified_schema "
        "is false (or a factory's unified_schema leaves it out): turn it on, or let your migrations create the table."
    )


def session_manager(
    *,
    dsn: str = "exai_dsn",
    clock: str = "exai_db_clock",
    manager_class: type[SessionManager] = SessionManager,
    **options: Any,
) -> Any:
    """A function-scoped async fixture: a started, persistent manager on ``dsn``, reading ``clock``.

    ``options`` are ``SessionManager``'s; a test's ``@pytest.mark.exai_sessions`` marks fill in
    those not given here. ``manager_class``: your own subclass. Closed after the test.
    """

    @_requesting(dsn, clock, "exai_manager_options")
    async def fixture(**fixtures: Any) -> AsyncIterator[SessionManager]:
        """A started, persistent SessionManager on this test's database (options from @pytest.mark.exai_sessions)."""
        manager = await open_manager(
            "session_manager",
            fixtures[dsn],
            manager_class,
            **{"clock": fixtures[clock], **fixtures["exai_manager_options"], **options},
        )
        try:
            yield manager
        finally:
            await manager.aclose()

    return pytest_asyncio.fixture(fixture)
