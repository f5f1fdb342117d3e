"""Closures that build fixtures, as pytest-postgresql's factories do.

The plugin's own ``exai_dsn``, ``exai_db_clock`` and ``session_manager`` are built by these;
a conftest makes more under other names with one line each::

    from pytest_exai_sessions.plugin import factories

    admin_manager = factories.session_manager(session_timeout_secs=60, max_concurrent_sessions=5)
    reporting_dsn = factories.database()
    reporting_clock = factories.db_clock(dsn="reporting_dsn")
    reporting_manager = factories.session_manager(dsn="reporting_dsn", clock="reporting_clock")

A fixture is named after the variable it is assigned to. Arguments that name fixtures
(``dsn``, ``clock``, ``databases``) are looked up when a test asks for the new fixture.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from ..manager import SessionManager
from ..testing.databases import TestDatabases
from ..testing.db_clock import DbClock
from .hooks import config_of

F = TypeVar("F", bound=Callable[..., Any])


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


def database(*, databases: str = "exai_databases") -> Any:
    """A function-scoped fixture: the DSN of a fresh clone of ``databases``' template, dropped after the test."""

    @_requesting(databases)
    def fixture(**fixtures: Any) -> Iterator[str]:
        """DSN of a fresh database with the unified schema for this test, dropped afterwards."""
        source: TestDatabases = fixtures[databases]
        dbname = source.create_clone()
        try:
            yield source.server.dsn(dbname)
        finally:
            source.release(dbname)

    return pytest.fixture(fixture)


def db_clock(*, dsn: str = "exai_dsn") -> Any:
    """A function-scoped fixture: the test clock of the database ``dsn`` names (and of managers given it).

    It starts where ``--exai-clock`` says, else at the real time.
    """

    @_requesting(dsn, "pytestconfig")
    def fixture(**fixtures: Any) -> DbClock:
        """This test's clock, of its managers and its database: set("2027-03-15"), advance(days=1), reset(), now()."""
        return DbClock(fixtures[dsn], start=config_of(fixtures["pytestconfig"]).clock)

    return pytest.fixture(fixture)


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
        manager = await manager_class.open(
            fixtures[dsn], **{"clock": fixtures[clock], **fixtures["exai_manager_options"], **options}
        )
        try:
            yield manager
        finally:
            await manager.aclose()

    return pytest_asyncio.fixture(fixture)
