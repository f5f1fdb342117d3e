"""The template database with the schema, and a fresh clone of it for each test.

pytest-postgresql's DatabaseJanitor creates and drops them; our drop adds WITH (FORCE),
because a test that killed a client may leave backends connected.
"""

from __future__ import annotations

import itertools
import os
import secrets

from psycopg import sql
from pytest_postgresql.janitor import DatabaseJanitor

from .schema import apply_to_dsn
from .server.connection import PostgresServer


class ForcefulJanitor(DatabaseJanitor):
    """A DatabaseJanitor whose drop also ends any backend still connected."""

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

    def __init__(self, server: PostgresServer, *, prefix: str | None = None) -> None:
        self.server = server
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        self.prefix = prefix or "_".join(filter(None, ["exai", worker, secrets.token_hex(3)]))
        self.template = f"{self.prefix}_template"
        self._numbers = itertools.count(1)

    def _janitor(self, dbname: str, *, template: str | None = None, as_template: bool = False) -> ForcefulJanitor:
        return ForcefulJanitor(
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
        """Create the template and apply every migration to it, once per server."""
        janitor = self._janitor(self.template, as_template=True)
        janitor.init()
        try:
            apply_to_dsn(self.server.dsn(self.template))
        except BaseException:
            janitor.drop()
            raise

    def drop_template(self) -> None:
        self._janitor(self.template, as_template=True).drop()

    def create_clone(self) -> str:
        """A new database cloned from the template; returns its name."""
        name = f"{self.prefix}_{next(self._numbers)}"
        self._janitor(name, template=self.template).init()
        return name

    def drop(self, dbname: str) -> None:
        self._janitor(dbname).drop()
