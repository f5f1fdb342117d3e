import secrets
from pathlib import Path

import pytest
from pg_leftovers import private_basedir

from pytest_exai_sessions.server.pooler import PoolerNotFound, find_pgbouncer
from pytest_exai_sessions.testing.databases import ForcefulJanitor


@pytest.fixture
def empty_dsn(exai_pg_server):
    """DSN of a new database without the schema, for tests of the migration runner and CLI."""
    server = exai_pg_server
    janitor = ForcefulJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        password=server.password,
        dbname=f"exai_empty_{secrets.token_hex(4)}",
        maintenance_dbname=server.dbname,
    )
    janitor.init()
    try:
        yield server.dsn(janitor.dbname)
    finally:
        janitor.drop()


@pytest.fixture(params=["postgres", "memory"])
def persistence(request):
    """Run a test with both kinds of manager: the plugin's factory for "postgres", None for "memory"."""
    if request.param == "postgres":
        return request.getfixturevalue("session_manager_factory")
    return None


@pytest.fixture
def basedir():
    """A directory of this test's own for clusters, so "nothing left" can be checked exactly."""
    yield from private_basedir()


@pytest.fixture(scope="session")
def pgbouncer_binary() -> Path:
    """The pgbouncer binary the plugin would use; without one the test skips with the install hint."""
    try:
        return find_pgbouncer()
    except PoolerNotFound as error:
        pytest.skip(str(error))


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytest's own, with inner runs that leave out Hypothesis's pytest plugin and the outer run's clock.

    That plugin imports the whole of Hypothesis when a run ends, which costs an inner run
    about as long as starting its PostgreSQL; no inner run has a Hypothesis test. Pytester
    clears PYTEST_ADDOPTS when it is set up, so this is set afterwards.

    An inner run chooses its own clock (a test of ``--exai-clock`` sets it): the suite run
    at a date with EXAI_SESSIONS_CLOCK behaves as with the flag, which inner runs never see.
    """
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")
    monkeypatch.delenv("EXAI_SESSIONS_CLOCK", raising=False)
    return pytester
