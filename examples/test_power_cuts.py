"""Power loss: the database's disk loses what was not durable, and every acknowledged session must survive.

Runs on Linux as root with loop devices; elsewhere these tests skip, saying what is missing.
Try your production settings: ``pytest --exai-pg-setting synchronous_commit=off examples/test_power_cuts.py``.
"""

import pytest

from pytest_exai_sessions.testing.workloads import mixed_workload


@pytest.mark.asyncio
async def test_no_acknowledged_write_is_lost_when_the_power_goes(power_loss_harness):
    report = await power_loss_harness.run_and_cut_power(mixed_workload, cut_after_secs=1.0)

    report.assert_ok()  # every acknowledged write present exactly; those in flight whole or absent
    assert report.acknowledged > 0


@pytest.mark.asyncio
async def test_sessions_of_a_running_manager_survive_a_power_cut(power_loss_harness):
    manager = await power_loss_harness.new_manager(max_concurrent_sessions=500)
    for number in range(300):
        await manager.ensure(f"cart-{number}", data={"items": number})
    before = power_loss_harness.snapshot(manager)

    seconds = power_loss_harness.cut_power()  # the server comes back on what its disk kept

    assert seconds > 0
    for session_id, session in before.items():  # the same manager reconnects by itself
        assert await manager.get(session_id) == session
