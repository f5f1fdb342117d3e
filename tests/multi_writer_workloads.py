"""Broken managers for the multi-writer crash tests (importable by name from the child processes)."""

import asyncio

from pytest_exai_sessions import SessionManager


class ReadModifyWriteMergeManager(SessionManager):
    """Merges in Python: read the data, add the patch, write it all back. Concurrent merges lose keys."""

    async def merge_data(self, session_id, patch):
        current = await self.get(session_id)
        # A request's own work between the read and the write: the window where another
        # replica's merge gets lost, wide enough to be hit on a busy machine too.
        await asyncio.sleep(0.02)
        return await self.update(session_id, data={**(current.data if current else {}), **patch})


class StaleCacheManager(SessionManager):
    """Serves every session it has seen from a per-process cache, even after another replica removed it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache = {}

    async def get(self, session_id):
        cached = self._cache.get(session_id)
        if cached is not None:
            return cached
        session = await super().get(session_id)
        if session is not None:
            self._cache[session_id] = session
        return session


async def fails(ctx):
    await ctx.ensure(f"fails-{ctx.replica}")
    raise RuntimeError("the workload broke")


async def removal_handshake(ctx):
    """Replica 0 removes a session only after every other replica was served it; then they read it again.

    ``list_ids`` (it reads the database whatever ``get`` does) tells the readers when replica 0
    has been acknowledged the removal: it removes each reader's ``seen-<n>`` session only
    after that ``remove`` returned, so every second read starts after the removal's acknowledgement.
    """
    readers = int(ctx.params["replica_numbers"]) - 1
    if ctx.replica == 0:
        await ctx.ensure("gone-handshake")
        seen = {f"seen-{number}" for number in range(1, readers + 1)}
        while not seen <= set(await ctx.manager.list_ids()):
            await asyncio.sleep(0.01)
        await ctx.remove("gone-handshake")
        for session_id in sorted(seen):
            await ctx.remove(session_id)
        return
    while await ctx.get("gone-handshake") is None:
        await asyncio.sleep(0.01)
    await ctx.ensure(f"seen-{ctx.replica}")  # tells replica 0: served once
    while f"seen-{ctx.replica}" in await ctx.manager.list_ids():
        await asyncio.sleep(0.01)
    await ctx.get("gone-handshake")
