"""Crash helpers: abandon a manager as a killed process would, then recover in a new one."""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg

from .manager import SessionManager
from .recovery import Snapshot, snapshot
from .store import SessionStore

M = TypeVar("M", bound=SessionManager)


class CrashHarness:
    """Builds managers on one database and crashes them; closes what it built on ``aclose()``."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._managers: list[SessionManager] = []

    async def new_manager(self, manager_class: type[M] = SessionManager, **options: Any) -> M:  # type: ignore[assignment]
        """A started manager with a store of its own on this database."""
        store = await SessionStore.open(self.dsn)
        return await self._start(manager_class(store, close_store=True, **options))

    async def crash_and_restart(self, manager: M, **option_overrides: Any) -> M:
        """Kill ``manager`` without a flush or a graceful close; recover in a new one.

        The new manager has the crashed one's class and options, updated by
        ``option_overrides``, and a new store on the same database.
        """
        await self.abandon(manager)
        options = {**manager.options, **option_overrides}
        if manager.store is None:
            # Nothing was persisted, so nothing can come back: that is the point to show.
            return await self._start(type(manager)(None, **options))
        store = await SessionStore.open(manager.store.conninfo, **manager.store.pool_options)
        return await self._start(type(manager)(store, close_store=True, **options))

    async def abandon(self, manager: SessionManager) -> None:
        """Drop the manager's connections from the server side, as the death of its process would."""
        if manager.store is not None:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as admin:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
                    (manager.store.application_name,),
                )
        await manager.abandon()

    def snapshot(self, manager: SessionManager) -> Snapshot:
        """The manager's sessions by id, to compare with ``assert_full_recovery`` after a crash."""
        return snapshot(manager)

    async def _start(self, manager: M) -> M:
        self._managers.append(manager)
        await manager.start()
        return manager

    async def aclose(self) -> None:
        managers, self._managers = self._managers, []
        for manager in managers:
            await manager.aclose()
