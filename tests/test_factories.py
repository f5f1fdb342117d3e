"""Fixture factories: more managers, databases and clocks under names of your own, one line each."""

import re

CONFTEST = """
from pytest_exai_sessions.plugin import factories

admin_manager = factories.session_manager(session_timeout_secs=60, max_concurrent_sessions=2)
reporting_dsn = factories.database()
reporting_clock = factories.db_clock(dsn="reporting_dsn")
reporting_manager = factories.session_manager(dsn="reporting_dsn", clock="reporting_clock")
"""

TESTS = """
import psycopg
import pytest

from pytest_exai_sessions import SessionLimitExceeded


@pytest.mark.asyncio
async def test_a_second_manager_with_other_options_on_the_same_database(session_manager, admin_manager):
    assert admin_manager.options["session_timeout_secs"] == 60
    assert session_manager.options["session_timeout_secs"] == 3600
    await admin_manager.ensure("a")
    await admin_manager.ensure("b")
    with pytest.raises(SessionLimitExceeded):
        await admin_manager.ensure("c")
    assert await session_manager.get("a") is not None  # one database


@pytest.mark.asyncio
@pytest.mark.exai_sessions(max_inflight=3, session_timeout_secs=10)
async def test_the_marker_fills_in_what_the_factory_leaves_open(admin_manager):
    assert admin_manager.options["max_inflight"] == 3
    assert admin_manager.options["session_timeout_secs"] == 60  # the factory's own wins


@pytest.mark.asyncio
async def test_another_database_with_a_clock_of_its_own(
    reporting_manager, reporting_dsn, reporting_clock, session_manager, exai_dsn, exai_db_clock
):
    assert reporting_dsn != exai_dsn
    reporting_clock.set("2027-03-15")
    created = await reporting_manager.ensure("r")
    assert created.created_at == reporting_clock.now()
    assert exai_db_clock.value is None  # the other clock did not move
    assert await session_manager.get("r") is None  # another database
    with psycopg.connect(reporting_dsn) as conn:
        assert conn.execute("SELECT count(*), min(created_at) FROM public.sessions").fetchone() == (
            1,
            reporting_clock.now(),
        )
"""


def test_factories_make_fixtures_under_other_names(pytester):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=3)

    listing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures").stdout.str()
    for name in ("admin_manager", "reporting_dsn", "reporting_clock", "reporting_manager"):
        # Listed under its own name (at the factory's line, as pytest-postgresql's are), described.
        assert re.search(rf"^{name} -- \S*factories\.py:\d+\n\s+(?!no docstring)\S", listing, re.MULTILINE), name
