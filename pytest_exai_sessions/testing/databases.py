"""The template database with the schema, and a fresh clone of it for each test.

pytest-postgresql's DatabaseJanitor creates and drops them. Ours adds WITH (FORCE) to the
drop, because a test that killed a client may leave backends connected, clones with
STRATEGY FILE_COPY where the server has it (PostgreSQL 15+: a copy of the files instead of
writing the whole template through the WAL), and runs on one kept connection instead of
connecting for every statement: together a per-test database costs about a third.

With ``ahead`` set, two threads of their own clone the next databases while the current
test runs and drop used ones after it: a test then takes a clone that is already there.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pytest_postgresql.janitor import DatabaseJanitor

from ..server.connection import PostgresServer
from .backends import terminate_backends
from .db_clock import DbClock, has_db_clock
from .template_schema import ResolvedSchema, TemplateSchema


class ForcefulJanitor(DatabaseJanitor):
    """A DatabaseJanitor whose drop also ends any backend still connected.

    ``connection``: an autocommit connection to the maintenance database to run on, instead
    of a new one per call. ``file_copy``: create with STRATEGY FILE_COPY.
    ``end_template_sessions``: end the connections to the template before cloning it, as
    DatabaseJanitor does (a clone fails while any is left). Off for clones made in the
    background: they run while a test does, which may itself be connected to the template.
    """

    def __init__(
        self,
        *,
        connection: psycopg.Connection[Any] | None = None,
        file_copy: bool = False,
        end_template_sessions: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._connection = connection
        self._file_copy = file_copy
        self._end_template_sessions = end_template_sessions

    def init(self) -> None:
        with self.cursor() as cur:
            if self.template_dbname and self._end_template_sessions:
                terminate_backends(cur.connection, database=self.template_dbname)
            cur.execute(self._build_create_database_sql())

    @contextmanager
    def cursor(self, dbname: str | None = None) -> Iterator[psycopg.Cursor[Any]]:
        if self._connection is None or dbname is not None:
            with super().cursor(dbname) as cur:
                yield cur
            return
        with self._connection.cursor() as cur:
            yield cur

    def _build_create_database_sql(self) -> sql.Composed:
        query = super()._build_create_database_sql()
        if self._file_copy:
            query += sql.SQL(" STRATEGY FILE_COPY")
        return query

    def drop(self) -> None:
        name = sql.Identifier(self.dbname)
        with self.cursor() as cur:
            if self.is_template():
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,))
                if cur.fetchone() is not None:
                    cur.execute(sql.SQL("ALTER DATABASE {} WITH is_template false").format(name))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


class TestDatabases:
    """Names, creates and drops the template and the per-test clones on one server.

    Names carry a random token (and the xdist worker id), so runs and workers sharing
    an external server never collide.
    """

    __test__ = False  # not a test class, whatever its name says to pytest

    def __init__(
        self,
        server: PostgresServer,
        *,
        prefix: str | None = None,
        template: str | None = None,
        schema: ResolvedSchema | None = None,
        ahead: int = 0,
        clock_start: datetime | None = None,
    ) -> None:
        """``template``: the template's name (default: one of the prefix's). If a database of that
        name exists already (a cached cluster's), it is used as it is and kept, never dropped.

        ``schema``: what ``create_template`` applies (default: the whole unified schema).

        ``ahead``: how many clones to keep ready in the background (0: clone and drop in the caller).
        ``clock_start``: the schema is applied as of this instant and every clone's clock starts
        frozen at it (None: the real time).
        """
        if ahead < 0:
            raise ValueError(f"ahead must be 0 or more, got {ahead}")
        self.server = server
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        self.prefix = prefix or "_".join(filter(None, ["exai", worker, secrets.token_hex(3)]))
        self.template = template or f"{self.prefix}_template"
        self.template_exists = False  # found existing by create_template: then kept
        self.schema = schema
        self.clock_start = clock_start
        self._numbers = itertools.count(1)
        self._admin: psycopg.Connection[Any] | None = None
        self._background = _Background(self, ahead) if ahead else None
        self._handed_out: set[str] = set()  # clones not dropped yet: dropped at close at the latest

    def _connection(self) -> psycopg.Connection[Any]:
        """The kept maintenance connection, opened again if the server went away (a crash test)."""
        if self._admin is not None and not self._admin.closed:
            try:
                self._admin.execute("")  # empty query: one cheap round trip proves it alive
                return self._admin
            except psycopg.OperationalError:
                self._admin.close()
        self._admin = psycopg.connect(self.server.dsn(), autocommit=True, connect_timeout=10)
        return self._admin

    def close(self) -> None:
        """Stop the background work, drop every clone not dropped yet, disconnect."""
        try:
            self._drop_leftovers()
        finally:
            self.disconnect()

    def disconnect(self) -> None:
        """Close the kept connection and drop nothing: for a server that goes with all its databases."""
        if self._background is not None:
            self._background.stop()
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def _janitor(
        self,
        dbname: str,
        *,
        template: str | None = None,
        as_template: bool = False,
        connection: psycopg.Connection[Any] | None = None,
        end_template_sessions: bool = True,
    ) -> ForcefulJanitor:
        connection = connection or self._connection()
        return ForcefulJanitor(
            connection=connection,
            file_copy=connection.info.server_version >= 150000,
            end_template_sessions=end_template_sessions,
            user=self.server.user,
            host=self.server.host,
            port=self.server.port,
            password=self.server.password,
            dbname=dbname,
            template_dbname=template,
            maintenance_dbname=self.server.dbname,
            as_template=as_template,
            connection_timeout=10,
        )

    def create_template(self) -> None:
        """Create the template and apply the schema to it, unless a database of its name exists.

        Then set the template's clock to ``clock_start``, which every clone inherits. An
        existing template (a cached one) gets it too: its clock is whatever the run that
        built it had. A template without the unified clock (no unified schema, or one older
        than it) keeps the real time.
        """
        template_dsn = self.server.dsn(self.template)
        found = self._connection().execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.template,))
        self.template_exists = found.fetchone() is not None
        if not self.template_exists:
            janitor = self._janitor(self.template, as_template=True)
            janitor.init()
            try:
                schema = self.schema or TemplateSchema().resolve(Path.cwd())
                schema.apply(template_dsn, as_of=self.clock_start)
            except BaseException:
                janitor.drop()
                raise
        if (self.template_exists or self.clock_start is not None) and has_db_clock(template_dsn):
            DbClock(template_dsn, start=self.clock_start).reset()

    def drop_template(self) -> None:
        try:
            self._drop_leftovers()
            if not self.template_exists:
                self._janitor(self.template, as_template=True).drop()
        finally:
            self.close()

    def create_clone(self) -> str:
        """A new database cloned from the template (one made ahead if there is); returns its name."""
        name = self._background.take() if self._background is not None else None
        if name is None:
            name = self.next_name()
            self._janitor(name, template=self.template).init()
        self._handed_out.add(name)
        if self._background is not None:
            self._background.start()  # the next clones, while this test runs
        return name

    def drop(self, dbname: str) -> None:
        """Drop a clone now, in the caller."""
        self._janitor(dbname).drop()
        self._handed_out.discard(dbname)

    def release(self, dbname: str) -> None:
        """Drop a clone that is no longer used: in the background when there is one, else now."""
        if self._background is not None and self._background.drop_later(dbname):
            self._handed_out.discard(dbname)
        else:
            self.drop(dbname)

    def _drop_leftovers(self) -> None:
        """Drop the clones still handed out, kept ready or waiting for their drop."""
        leftovers = self._background.stop() if self._background is not None else []
        failures: list[psycopg.Error] = []
        for name in [*leftovers, *sorted(self._handed_out)]:
            try:
                self.drop(name)
            except psycopg.Error as error:  # try the others too, then raise
                failures.append(error)
        if failures:
            raise failures[0]

    def next_name(self) -> str:
        return f"{self.prefix}_{next(self._numbers)}"  # count's next() is atomic: safe from any thread


class _Background:
    """Clones ahead and drops used clones on threads and connections of their own.

    Two threads, so that the server clones the next database while it drops the last one.
    Anything that fails here (a crash test may have killed the server) pauses the work
    until the next clone is taken and leaves it to the foreground, where a failure raises
    in the test that needs the database: nothing is lost or swallowed.
    """

    THREADS = 2
    MAX_PENDING_DROPS = 4  # beyond this the caller drops itself: tmpfs must not fill with old clones
    WAIT_FOR_CLONE_SECS = 30.0

    def __init__(self, databases: TestDatabases, ahead: int) -> None:
        self.databases = databases
        self.ahead = ahead
        self._state = threading.Condition()
        self._ready: deque[str] = deque()
        self._to_drop: deque[str] = deque()
        self._creating = 0
        self._paused = False
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def take(self) -> str | None:
        """A clone made ahead, waiting for one on its way; None if there is none (create it yourself).

        None at once before ``start``: the first clone is quicker made by the caller on its kept
        connection than by a thread that has yet to connect.
        """
        with self._state:
            self._paused = False  # a new test: worth trying again after a failure
            if not self._threads:
                return None
            self._state.wait_for(lambda: self._ready or not self._creating, timeout=self.WAIT_FOR_CLONE_SECS)
            name = self._ready.popleft() if self._ready else None
            self._state.notify_all()  # make the next one
            return name

    def drop_later(self, dbname: str) -> bool:
        """Queue a drop; False when too many wait already (the caller should drop it now)."""
        with self._state:
            if self._stopping or len(self._to_drop) >= self.MAX_PENDING_DROPS:
                return False
            self._to_drop.append(dbname)
            self._state.notify_all()
            return True

    def stop(self) -> list[str]:
        """End the threads; returns the clones they kept or had yet to drop, for the caller to drop."""
        with self._state:
            self._stopping = True
            self._state.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        with self._state:
            leftovers = [*self._ready, *self._to_drop]
            self._ready.clear()
            self._to_drop.clear()
        return leftovers

    def start(self) -> None:
        """Start the threads, if they are not running: they clone ahead from now on."""
        with self._state:
            if self._threads or self._stopping:
                return
            for number in range(self.THREADS):
                thread = threading.Thread(target=self._run, name=f"exai-sessions-clones-{number}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _next_job(self) -> tuple[str, str] | None:
        if self._stopping or self._paused:
            return None
        short = len(self._ready) + self._creating < self.ahead
        # The next test's clone first, unless old clones pile up.
        if short and len(self._to_drop) < self.MAX_PENDING_DROPS // 2:
            self._creating += 1
            return "create", self.databases.next_name()
        if self._to_drop:
            return "drop", self._to_drop.popleft()
        if short:
            self._creating += 1
            return "create", self.databases.next_name()
        return None

    def _run(self) -> None:
        connection: psycopg.Connection[Any] | None = None
        try:
            while True:
                with self._state:
                    job = None
                    while job is None and not self._stopping:
                        job = self._next_job()
                        if job is None:
                            self._state.wait()
                    if job is None:
                        return
                kind, name = job
                connection = None if connection is None or connection.closed else connection
                succeeded = False
                try:
                    connection = self._do(kind, name, connection)
                    succeeded = connection is not None
                finally:  # also if _do raised something unforeseen: no caller waits for this job for ever
                    with self._state:
                        if kind == "create":
                            self._creating -= 1
                        if not succeeded:
                            # A create may have committed before its connection died: drop that name too.
                            self._to_drop.appendleft(name)
                            self._paused = True
                        elif kind == "create":
                            self._ready.append(name)
                        self._state.notify_all()
        finally:
            if connection is not None:
                connection.close()

    def _do(self, kind: str, name: str, connection: psycopg.Connection[Any] | None) -> psycopg.Connection[Any] | None:
        """Run one job; returns the connection to go on with, None when the job failed."""
        try:
            if connection is None:
                connection = psycopg.connect(self.databases.server.dsn(), autocommit=True, connect_timeout=10)
            if kind == "create":
                # A test connected to the template keeps its connection; this clone then fails
                # (after PostgreSQL's 5 s wait) and the next test clones in its own setup.
                janitor = self.databases._janitor(
                    name, template=self.databases.template, connection=connection, end_template_sessions=False
                )
                janitor.init()
            else:
                self.databases._janitor(name, connection=connection).drop()
            return connection
        except (psycopg.Error, OSError):
            if connection is not None:
                connection.close()
            return None  # done again in the foreground, where its error raises
