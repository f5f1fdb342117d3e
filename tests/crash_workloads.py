"""Workloads the process crash tests run in a child process (importable by name from there)."""

import asyncio
import contextlib
import os

from pytest_exai_sessions import CommitUncertain, PersistenceError, SessionConflict, SessionManager


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


async def refusals_between_writes(ctx):
    """A refused compare-and-set (a ``fail``) before each one that succeeds (``ok``)."""
    version = (await ctx.ensure("cas")).version
    for number in range(1_000_000):
        with contextlib.suppress(SessionConflict):
            await ctx.update("cas", data={"n": number}, expected_version=version + 1000)
        version = (await ctx.update("cas", data={"n": number}, expected_version=version)).version


async def writes_outside_the_history(ctx):
    """Writes a session without recording it: the checker must find a row nothing explains."""
    await ctx.ensure("seen")
    await ctx.manager.ensure("ghost")
    while True:
        await ctx.update_activity("seen")


class AnswerLostManager(SessionManager):
    """Every update takes effect, then raises as if its answer was lost on the way."""

    async def update(self, session_id, **changes):
        await super().update(session_id, **changes)
        raise CommitUncertain(f"updating session {session_id!r}", "the answer was lost on the way")


async def updates_whose_answer_is_lost(ctx):
    await ctx.ensure("lost-answers")
    for number in range(1_000_000):
        if number == 5:
            await ctx.fault_point("five")
        with contextlib.suppress(PersistenceError):
            await ctx.update("lost-answers", data={"n": number})


async def refusals_between_writes_per_replica(ctx):
    """``refusals_between_writes`` on a session of each replica's own, for ``params["steps"]`` rounds."""
    session_id = f"cas-{ctx.replica}"
    version = (await ctx.ensure(session_id)).version
    for number in range(int(ctx.params["steps"])):
        with contextlib.suppress(SessionConflict):
            await ctx.update(session_id, data={"n": number}, expected_version=version + 1000)
        version = (await ctx.update(session_id, data={"n": number}, expected_version=version)).version


async def large_writes_through_errors(ctx):
    """Sessions rewritten with large data, fast: WAL that outruns a stalled standby's socket. Goes on through errors."""
    sessions = int(ctx.params.get("sessions", 8))
    size = int(ctx.params.get("blob_bytes", 8192))
    for step in range(int(ctx.params.get("steps", 300))):
        blob = os.urandom(size // 2).hex()  # random: TOAST would compress a repeated one to nothing
        session_id = f"large-{step % sessions}"
        with contextlib.suppress(PersistenceError):
            if step < sessions:
                await ctx.ensure(session_id, data={"step": step, "blob": blob})
            else:
                await ctx.update(session_id, data={"step": step, "blob": blob})
