"""Crash and recover: abandon a manager as a killed process would and prove nothing was lost."""

import pytest

from pytest_exai_sessions import SessionManager, assert_full_recovery


@pytest.mark.asyncio
async def test_every_session_survives_a_crash(session_manager_factory, crash_harness):
    manager = await session_manager_factory(max_concurrent_sessions=2000)
    for number in range(1500):
        await manager.ensure(
            f"session-{number}",
            user_id=f"user-{number % 37}",
            ip_address="203.0.113.7",
            data={"step": number, "tags": ["a", "b"], "ratio": number / 7},
            metadata={"client": "example"},
        )
    for number in range(0, 1500, 3):
        await manager.update_activity(f"session-{number}", request_duration_ms=number % 250)
    async with manager.request("session-1"):
        pass
    await manager.update("session-2", data={"step": "done"})
    before = crash_harness.snapshot(manager)

    recovered = await crash_harness.crash_and_restart(manager)

    assert len(before) == 1500
    assert_full_recovery(before, recovered)  # every session, every field


@pytest.mark.asyncio
async def test_the_original_in_memory_manager_loses_everything(crash_harness):
    """What the status report's manager did: without a store, a restart recovers nothing."""
    manager = SessionManager(None)
    await manager.ensure("doomed")

    restarted = await crash_harness.crash_and_restart(manager)

    assert await restarted.list_ids() == []
    with pytest.raises(AssertionError, match="missing after recovery: 'doomed'"):
        assert_full_recovery(manager, restarted)
