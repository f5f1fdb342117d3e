"""Ready-made workloads: ``mixed_workload`` (``CrashHarness.run_and_kill``), ``replica_workload`` (``run_replicas``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Iterator
from typing import Any

from ...errors import ExaiSessionsError, SessionConflict, SessionNotFound
from .client import WorkloadContext


async def mixed_workload(ctx: WorkloadContext) -> None:
    """Create, count requests, update, run requests and remove, at random, until killed.

    params: ``sessions`` (ids to use, default 12), ``workers`` (concurrent tasks, each with its
    own ids, default 3), ``seed``, ``steps`` (per worker, default unbounded in practice),
    ``fault_points`` (announce ``before-<op>-<worker>-<step>`` before each write) and
    ``keep_going`` (an operation that raises is recorded, and the worker goes on after
    ``error_pause`` seconds, default 0.005: for a fault the application outlives, such as a
    failover).
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
    keep_going = bool(ctx.params.get("keep_going", False))
    error_pause = float(ctx.params.get("error_pause", 0.005))
    for step in range(steps):
        session_id = rng.choice(ids)
        if session_id not in live:
            operation = "ensure"
        else:
            operation = rng.choices(["update_activity", "update", "request", "remove"], weights=[5, 3, 2, 1])[0]
        if announce:
            await ctx.fault_point(f"before-{operation}-{worker}-{step}")
        try:
            await _mixed_step(ctx, operation, session_id, live=live, rng=rng, worker=worker, step=step)
        except ExaiSessionsError:
            if not keep_going:
                raise
            # Recorded already; a session whose removal failed stays ours to use.
            await asyncio.sleep(error_pause)  # not a hot loop while the database is away


async def _mixed_step(
    ctx: WorkloadContext, operation: str, session_id: str, *, live: set[str], rng: random.Random, worker: int, step: int
) -> None:
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


async def replica_workload(ctx: WorkloadContext) -> None:
    """One replica of ``CrashHarness.run_replicas``: every replica runs it at once on one database.

    The session ids have roles, so that the checker can decide every outcome:

    - ``counter-<n>``: ensure, then ``update_activity``, ``request`` and plain updates of
      ``metadata`` (no ``expected_version``), by every replica;
    - ``merge-<n>``: ``merge_data`` of keys unique to the write, ``r<replica>-<n>``;
    - ``cas-<n>``: read with ``get``, then append a unique write id to ``data["log"]`` with
      ``update(..., expected_version=<the version read>)``; a conflict is left as it is;
    - ``gone-<replica>-<worker>-<n>``: created by that replica's worker, read by everyone
      with ``get`` and ``request``, then removed by its owner.

    params: ``steps`` (per worker, default 40), ``workers`` (concurrent tasks, default 2),
    ``counters``/``merges``/``cas`` (how many sessions of each, default 2), ``gone`` (removal
    sessions per worker, default 3), ``replica_numbers`` (how many replicas the run numbers,
    for reading the others' removal sessions), ``seed``, ``prefix`` (put before every id: the
    sessions must not exist when the run starts, so a second run on one database needs another)
    and ``keep_going`` (as for ``mixed_workload``).
    """
    workers = int(ctx.params.get("workers", 2))
    seed = int(ctx.params.get("seed", 0))
    writes = itertools.count()  # one counter per replica: every key and write id is unique
    await asyncio.gather(
        *(
            _replica_worker(ctx, worker, random.Random(f"{seed}-{ctx.replica}-{worker}"), writes)
            for worker in range(workers)
        )
    )


async def _replica_worker(ctx: WorkloadContext, worker: int, rng: random.Random, writes: Iterator[int]) -> None:
    params = ctx.params
    prefix = str(params.get("prefix", ""))
    steps = int(params.get("steps", 40))
    counters = [f"{prefix}counter-{n}" for n in range(int(params.get("counters", 2)))]
    merges = [f"{prefix}merge-{n}" for n in range(int(params.get("merges", 2)))]
    logs = [f"{prefix}cas-{n}" for n in range(int(params.get("cas", 2)))]
    gone_per_worker = int(params.get("gone", 3))
    replica_numbers = max(int(params.get("replica_numbers", 1)), ctx.replica + 1)
    workers = int(params.get("workers", 2))
    keep_going = bool(params.get("keep_going", False))
    ensured: set[str] = set()
    own_gone: str | None = None  # this worker's removal session while it is live
    gone_made = 0
    seen_gone: set[str] = set()  # removal sessions of others this worker was served

    async def ensure_once(session_id: str, **attrs: Any) -> None:
        if session_id not in ensured:
            await ctx.ensure(session_id, **attrs)
            ensured.add(session_id)

    async def one_step() -> None:
        nonlocal own_gone, gone_made
        role = rng.choices(["counter", "merge", "cas", "gone"], weights=[4, 3, 3, 3])[0]
        write = f"r{ctx.replica}-{next(writes)}"
        if role == "counter":
            session_id = rng.choice(counters)
            await ensure_once(session_id)
            action = rng.choices(["update_activity", "request", "update"], weights=[5, 2, 2])[0]
            if action == "update_activity":
                await ctx.update_activity(session_id, rng.randint(0, 50))
            elif action == "request":
                async with ctx.request(session_id):
                    await asyncio.sleep(0)
            else:
                await ctx.update(session_id, metadata={"writer": write})
        elif role == "merge":
            session_id = rng.choice(merges)
            await ensure_once(session_id)
            await ctx.merge_data(session_id, {write: rng.randint(0, 1000)})
        elif role == "cas":
            session_id = rng.choice(logs)
            await ensure_once(session_id, data={"log": []})
            current = await ctx.get(session_id)
            if current is None:
                raise RuntimeError(f"{session_id} is never removed, yet get() served nothing")
            with contextlib.suppress(SessionConflict):
                await ctx.update(
                    session_id, data={"log": [*current.data["log"], write]}, expected_version=current.version
                )
        elif own_gone is None and gone_made < gone_per_worker and rng.random() < 0.5:
            own_gone = f"{prefix}gone-{ctx.replica}-{worker}-{gone_made}"
            gone_made += 1
            await ctx.ensure(own_gone, data={"owner": ctx.replica})
        elif own_gone is not None and rng.random() < 0.3:
            await ctx.remove(own_gone)
            own_gone = None
        else:
            # Anyone's removal session, live, removed or never made; one it was served
            # before half the time, so that reads after a removal are common.
            if seen_gone and rng.random() < 0.5:
                session_id = rng.choice(sorted(seen_gone))
            else:
                owner, owner_worker = rng.randrange(replica_numbers), rng.randrange(workers)
                session_id = f"{prefix}gone-{owner}-{owner_worker}-{rng.randrange(gone_per_worker)}"
            if rng.random() < 0.5:
                if await ctx.get(session_id) is not None:
                    seen_gone.add(session_id)
            else:
                with contextlib.suppress(SessionNotFound):
                    async with ctx.request(session_id):
                        seen_gone.add(session_id)
                        await asyncio.sleep(0)

    for _step in range(steps):
        try:
            await one_step()
        except ExaiSessionsError:
            if not keep_going:
                raise
            await asyncio.sleep(0.005)  # recorded already; not a hot loop while the database is away
