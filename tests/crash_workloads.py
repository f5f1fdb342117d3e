"""Workloads the process crash tests run in a child process (importable by name from there)."""

import asyncio

from pytest_exai_sessions import SessionManager


async def counting_with_a_fault_point(ctx):
    """Ten sessions, then counted requests; announces 'halfway' after the fifth round."""
    for number in range(10):
        await ctx.ensure(f"c{number}", data={"n": number})
    for round_number in range(1_000_000):
        if round_number == 5:
            await ctx.fault_point("halfway")
        for number in range(10):
            await ctx.update_activity(f"c{number}", request_duration_ms=round_number)


async def finishes_quickly(ctx):
    await ctx.ensure("only")
    print("the workload is done")


async def application_operations(ctx):
    """An application's own write, recorded with what it sets."""
    await ctx.ensure("cart", data={"items": []})
    for number in range(1_000_000):
        items = list(range(number % 7))
        async with ctx.operation("cart", "set-items", expect={"data": {"items": items}}) as op:
            op.acknowledge(await ctx.manager.update("cart", data={"items": items}))
        await asyncio.sleep(0)


class ForgetfulManager(SessionManager):
    """What the status report's manager did: it reports a counted request it never wrote."""

    async def update_activity(self, session_id, request_duration_ms=None):
        session = await self.get(session_id)
        return session.model_copy(update={"request_count": session.request_count + 1, "version": session.version + 1})


async def counting(ctx):
    for number in range(5):
        await ctx.ensure(f"f{number}")
    while True:
        for number in range(5):
            await ctx.update_activity(f"f{number}")
