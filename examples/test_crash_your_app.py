"""Crash testing your own app: SIGKILL it mid-flight and check every write it acknowledged.

The workload runs in a child process against the test's database. It reports each write to
the test only after the write's ``await`` returned; the harness kills the child with SIGKILL,
recovers in a new manager and checks the database against those acknowledgements.
"""

import pytest

from pytest_exai_sessions.testing.workload import WorkloadContext


class CartService:
    """A stand-in for application code: it keeps a shopping cart in the session's data."""

    def __init__(self, manager):
        self.manager = manager

    async def open_cart(self, user):
        return await self.manager.ensure(f"cart-{user}", user_id=user, data={"items": []})

    async def add_item(self, user, item):
        session = await self.manager.get(f"cart-{user}")
        items = [*session.data["items"], item]
        return await self.manager.update(f"cart-{user}", data={"items": items})


async def shopping(ctx: WorkloadContext):
    """The workload: module level, so the child process can import it by name."""
    carts = CartService(ctx.manager)
    users = [f"user-{n}" for n in range(5)]
    for user in users:
        await ctx.ensure(f"cart-{user}", user_id=user, data={"items": []})
    for step in range(1_000_000):
        user = users[step % len(users)]
        current = (await ctx.manager.get(f"cart-{user}")).data["items"]
        # Say what the operation sets, so a write in flight at the kill can be told from corruption.
        async with ctx.operation(f"cart-{user}", "add_item", expect={"data": {"items": [*current, step]}}) as op:
            op.acknowledge(await carts.add_item(user, step))
        if step == 60:
            await ctx.fault_point("after-sixty-items")


@pytest.mark.asyncio
@pytest.mark.parametrize("acks", [10, 37, 64])
async def test_the_cart_survives_a_kill_after_n_acknowledged_writes(crash_harness, acks):
    report = await crash_harness.run_and_kill(shopping, kill_after_acks=acks, max_concurrent_sessions=50)

    report.assert_ok()  # names every session whose acknowledged state did not come back
    assert report.acknowledged >= acks


@pytest.mark.asyncio
async def test_the_cart_survives_a_kill_at_a_named_point(crash_harness):
    report = await crash_harness.run_and_kill(shopping, kill_at="after-sixty-items")

    report.assert_ok()
    assert report.in_flight == 0 and report.acknowledged == 5 + 61
