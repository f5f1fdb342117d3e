"""The run's power-loss servers: one per set of settings, each with the run's template, a fresh database per test.

A server starts when a test first asks for its settings and serves the run's later tests
with the same settings. A cut can leave a server that durability settings did not protect
(``fsync=off``, ``full_page_writes=off``) with a catalog nothing vouches for, or none that
starts at all: after such a test the server goes, and the next test gets a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from ..server.database import DatabaseUnderTest
from ..server.power_loss import PowerLossPostgres
from .databases import TestDatabases
from .template_schema import ResolvedSchema

Settings = Mapping[str, str]
_PROTECTING = ("fsync", "full_page_writes")  # off, and a cut may leave the catalog broken
_OFF = {"off", "false", "no", "0"}  # as PostgreSQL spells a boolean's off (any case)


@dataclass
class _Running:
    server: PowerLossPostgres
    databases: TestDatabases


class PowerLossServers:
    """Power-loss servers by settings, each built with ``schema`` in a template; ``close()`` stops them all."""

    def __init__(
        self,
        make_server: Callable[[Settings], PowerLossPostgres],
        schema: ResolvedSchema,
        *,
        clock_start: datetime | None = None,
    ) -> None:
        """``make_server(settings)``: a power-loss server, not started, running with those settings."""
        self._make_server = make_server
        self._schema = schema
        self._clock_start = clock_start
        self._running: dict[frozenset[tuple[str, str]], _Running] = {}

    def database(self, settings: Settings) -> DatabaseUnderTest:
        """A new database cloned from the template, on the server of ``settings`` (started now if need be)."""
        running = self._server_of(settings)
        running.server.cut_at = None
        return DatabaseUnderTest(running.databases.create_clone(), running.server, None)

    def release(self, database: DatabaseUnderTest) -> None:
        """Drop the test's database; or, if a cut left its server unprotected or down, stop that server."""
        key = next(key for key, running in self._running.items() if running.server is database.server)
        running = self._running[key]
        settings = running.server.settings
        unprotected = any(settings.get(name, "on").strip().lower() in _OFF for name in _PROTECTING)
        if running.server.pid is None or (running.server.cut_at is not None and unprotected):
            del self._running[key]
            self._stop(running)
            return
        running.databases.release(database.name)

    def _server_of(self, settings: Settings) -> _Running:
        key = frozenset(settings.items())
        if key not in self._running:
            server = self._make_server(settings).start()
            databases = TestDatabases(server, schema=self._schema, clock_start=self._clock_start)
            try:
                databases.create_template()
                server.sync()  # the template is the base of every test: durable whatever the settings
            except BaseException:
                self._stop(_Running(server, databases))
                raise
            self._running[key] = _Running(server, databases)
        return self._running[key]

    @staticmethod
    def _stop(running: _Running) -> None:
        # Its databases go with it: nothing to drop, and a server a cut broke could not.
        running.databases.disconnect()
        running.server.stop()

    def close(self) -> None:
        running, self._running = list(self._running.values()), {}
        for one in running:
            self._stop(one)
