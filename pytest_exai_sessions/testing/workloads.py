"""Ready-made workloads for ``CrashHarness.run_and_kill``: the store's own operations, mixed."""

from __future__ import annotations

import asyncio
import random

from .workload import WorkloadContext


async def mixed_workload(ctx: WorkloadContext) -> None:
    """Create, count requests, update, run requests and remove, at random, until killed.

    params: ``sessions`` (ids to use, default 12), ``workers`` (concurrent tasks, each with its
    own ids, default 3), ``seed``, ``steps`` (per worker, default unbounded in practice) and
    ``fault_points`` (announce ``before-<op>-<worker>-<step>`` before each write).
    """
    sessions = int(ctx.params.get("sessions", 12))
    workers = int(ctx.params.get("workers", 3))
    seed = int(ctx.params.get("seed", 0))
    ids = [f"mixed-{number}" for number in range(sessions)]
    await asyncio.gather(
        *(_worker(ctx, ids[index::workers], random.Random(seed + index), index) for index in range(workers))
    )


async def _worker(ctx: WorkloadContext, ids: list[str], rng: random.Random, worker: int) -> None:
    live: set[str] = set()
    steps = int(ctx.params.get("steps", 1_000_000))
    announce = bool(ctx.params.get("fault_points", False))
    for step in range(steps):
        session_id = rng.choice(ids)
        if session_id not in live:
            operation = "ensure"
        else:
            operation = rng.choices(["update_activity", "update", "request", "remove"], weights=[5, 3, 2, 1])[0]
        if announce:
            await ctx.fault_point(f"before-{operation}-{worker}-{step}")
        if operation == "ensure":
            await ctx.ensure(session_id, data={"step": step, "worker": worker}, user_id=f"user-{worker}")
            live.add(session_id)
        elif operation == "update_activity":
            await ctx.update_activity(session_id, rng.randint(0, 500))
        elif operation == "update":
            await ctx.update(session_id, data={"step": step, "ratio": rng.random()}, metadata={"by": worker})
        elif operation == "request":
            async with ctx.request(session_id):
                await asyncio.sleep(0)
        else:
            await ctx.remove(session_id)
            live.discard(session_id)
