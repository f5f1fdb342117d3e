"""Crash helpers: abandon a manager as a killed process would, then recover in a new one."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any, Literal, NoReturn, TypeVar

import psycopg

from .errors import ExaiSessionsError
from .manager import SessionManager
from .recovery import Snapshot, snapshot
from .server.cluster import TemporaryPostgres
from .server.connection import PostgresServer
from .store import SessionStore

M = TypeVar("M", bound=SessionManager)

# SIGKILL: the server dies mid-write, as in a power cut of the database host (the OS page
# cache survives here, which is what synchronous_commit relies on). SIGQUIT: PostgreSQL's
# immediate shutdown, no checkpoint, crash recovery at the next start.
DATABASE_CRASH_SIGNALS = {"kill": signal.SIGKILL, "immediate": signal.SIGQUIT}


class DatabaseCrashUnsupported(ExaiSessionsError):
    """Only a server the plugin started can be killed and restarted."""


def _refuse(reason: str) -> NoReturn:
    raise DatabaseCrashUnsupported(reason)


class CrashHarness:
    """Builds managers on one database and crashes them; closes what it built on ``aclose()``.

    With ``server`` (a TemporaryPostgres) it can also crash the database itself.
    ``unsupported`` is called with a reason when a database crash is asked of a server it
    cannot restart (the pytest fixture passes ``pytest.skip``).
    """

    def __init__(
        self,
        dsn: str,
        server: PostgresServer | None = None,
        *,
        unsupported: Callable[[str], NoReturn] = _refuse,
    ) -> None:
        self.dsn = dsn
        self.server = server
        self._unsupported = unsupported
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

    # the database

    def _own_server(self) -> TemporaryPostgres:
        if not isinstance(self.server, TemporaryPostgres):
            what = "an external server (--exai-dsn)" if self.server is not None else "no known server"
            self._unsupported(f"database crash helpers need the plugin's temporary server, not {what}")
        return self.server

    def kill_database(self, mode: Literal["kill", "immediate"] = "kill") -> None:
        """Stop the postmaster abruptly and leave it down: SIGKILL, or an immediate shutdown.

        Until ``restart_database()`` every database call of a manager raises PersistenceError.
        """
        self._own_server().kill(DATABASE_CRASH_SIGNALS[mode])

    def restart_database(self) -> float:
        """Start the postmaster again on the same data directory and port; return the seconds it took.

        Blocks the event loop for that time on purpose: the postmaster must be started from
        the main thread, since it is set to die with the thread that started it.
        """
        server = self._own_server()
        started = time.monotonic()
        server.restart()
        return time.monotonic() - started

    def crash_database(self, mode: Literal["kill", "immediate"] = "kill") -> float:
        """Kill the database and start it again at once; return the seconds until it accepts connections."""
        self.kill_database(mode)
        return self.restart_database()

    # comparing

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
