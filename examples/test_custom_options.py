"""Choosing manager options: per call with the factory, or for a whole module by overriding a fixture."""

import pytest
import pytest_asyncio

from pytest_exai_sessions import SessionLimitExceeded


@pytest_asyncio.fixture  # strict mode: async fixtures use pytest_asyncio.fixture
async def session_manager(session_manager_factory):
    # Overrides the plugin's fixture for this module only (pytest's usual override rules).
    return await session_manager_factory(session_timeout_secs=60, max_concurrent_sessions=3, cleanup_interval_secs=0)


@pytest.mark.asyncio
async def test_the_limit_applies(session_manager):
    for number in range(3):
        await session_manager.ensure(f"s{number}")
    with pytest.raises(SessionLimitExceeded, match="Maximum concurrent sessions"):
        await session_manager.ensure("one-too-many")


@pytest.mark.asyncio
async def test_idle_sessions_time_out(session_manager, exai_db_clock):
    await session_manager.ensure("idle")
    exai_db_clock.advance(seconds=61)  # the managers' clock and the database's: no waiting
    assert await session_manager.get("idle") is None
    assert await session_manager.cleanup_stale_sessions() == 1


@pytest.mark.asyncio
async def test_options_survive_a_restart(session_manager, crash_harness):
    await session_manager.ensure("kept")
    restarted = await crash_harness.crash_and_restart(session_manager, max_concurrent_sessions=10)
    assert restarted.options["max_concurrent_sessions"] == 10
    assert restarted.options["session_timeout_secs"] == 60
    assert await restarted.list_ids() == ["kept"]
