"""Failover: the primary dies, a standby takes over, and the app goes on without a restart.

With synchronous replication every acknowledged session survives; a write whose outcome the
store cannot know raises ``CommitUncertain``, never a success. Needs PostgreSQL's
``pg_basebackup`` and ``pg_rewind`` beside its server (a system install has them); the
tests skip where they are missing.
"""

import pytest

from pytest_exai_sessions import CommitUncertain
from pytest_exai_sessions.testing.workloads import mixed_workload


@pytest.mark.asyncio
async def test_no_acknowledged_write_is_lost_through_three_failovers(failover_harness):
    report = await failover_harness.run_and_fail_over(
        mixed_workload,
        fail_over_after_acks=[10, 30, 50],  # each counted from the start; the old primary rejoins in between
        params={"keep_going": True, "steps": 30},  # the app lives on: it records errors and carries on
        max_concurrent_sessions=100,
    )

    report.assert_ok()  # acknowledged present, refused absent, uncertain whole or absent
    assert failover_harness.server.failovers == 3


@pytest.mark.asyncio
async def test_a_running_manager_follows_the_new_primary(failover_harness):
    manager = await failover_harness.new_manager()
    await manager.ensure("cart", data={"items": 3})

    failover_harness.fail_over()  # SIGKILL the primary, promote the standby

    assert (await manager.get("cart")).data == {"items": 3}  # same manager, new primary


@pytest.mark.asyncio
async def test_a_request_is_counted_once_across_an_uncertain_outcome(failover_harness):
    manager = await failover_harness.new_manager()
    await manager.ensure("cart")

    async def count(request_id):
        try:
            return await manager.update_activity("cart", 40, request_id=request_id)
        except CommitUncertain:
            return await manager.update_activity("cart", 40, request_id=request_id)  # the same id: counted once

    await count("req-1")
    await count("req-1")  # a retry of a request that was counted already

    assert (await manager.get("cart")).request_count == 1
