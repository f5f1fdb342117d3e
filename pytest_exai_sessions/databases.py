"""The template database with the schema, and a fresh clone of it for each test.

pytest-postgresql's DatabaseJanitor creates and drops them. Ours adds WITH (FORCE) to the
drop, because a test that killed a client may leave backends connected, clones with
STRATEGY FILE_COPY where the server has it (PostgreSQL 15+: a copy of the files instead of
writing the whole template through the WAL), and runs on one kept connection instead of
connecting for every statement: together a per-test database costs about a third.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from pytest_postgresql.janitor import DatabaseJanitor

from .schema import Migration, apply_to_dsn
from .server.connection import PostgresServer


class ForcefulJanitor(DatabaseJanitor):
    """A DatabaseJanitor whose drop also ends any backend still connected.

    ``connection``: an autocommit connection to the maintenance database to run on, instead
    of a new one per call. ``file_copy``: clone with STRATEGY FILE_COPY.
    """

    def __init__(self, *, connection: psycopg.Connection[Any] | None = None, file_copy: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self._connection = connection
        self._file_copy = file_copy

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
        if self._file_copy and self.template_dbname:
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

    def __init__(self, server: PostgresServer, *, prefix: str | None = None, template: str | None = None) -> None:
        """``template``: a template database that already exists (a cached cluster's); kept, not dropped."""
        self.server = server
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        self.prefix = prefix or "_".join(filter(None, ["exai", worker, secrets.token_hex(3)]))
        self.template = template or f"{self.prefix}_template"
        self.template_exists = template is not None
        self._numbers = itertools.count(1)
        self._admin: psycopg.Connection[Any] | None = None

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
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def _janitor(self, dbname: str, *, template: str | None = None, as_template: bool = False) -> ForcefulJanitor:
        connection = self._connection()
        return ForcefulJanitor(
            connection=connection,
            file_copy=connection.info.server_version >= 150000,
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

    def create_template(self, migrations: list[Migration] | None = None) -> None:
        """Create the template and apply every migration to it, once per server (not if it exists)."""
        if self.template_exists:
            return
        janitor = self._janitor(self.template, as_template=True)
        janitor.init()
        try:
            apply_to_dsn(self.server.dsn(self.template), migrations)
        except BaseException:
            janitor.drop()
            raise

    def drop_template(self) -> None:
        if not self.template_exists:
            self._janitor(self.template, as_template=True).drop()
        self.close()

    def create_clone(self) -> str:
        """A new database cloned from the template; returns its name."""
        name = f"{self.prefix}_{next(self._numbers)}"
        self._janitor(name, template=self.template).init()
        return name

    def drop(self, dbname: str) -> None:
        self._janitor(dbname).drop()
