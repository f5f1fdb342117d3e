"""Connection facts of a server, temporary or external: the one place DSNs are built."""

from __future__ import annotations

from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql.executors.noop import NoopExecutor


def make_dsn(*, host: str, port: int | str, user: str, dbname: str, password: str | None = None, **extra: Any) -> str:
    return make_conninfo(host=host, port=str(port), user=user, dbname=dbname, password=password, **extra)


class PostgresServer(Protocol):
    """What fixtures need to know of the server: where it is and who to connect as."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str | None: ...
    @property
    def dbname(self) -> str: ...  # the maintenance database that databases are created from
    @property
    def version(self) -> str: ...
    @property
    def external(self) -> bool: ...

    def dsn(self, dbname: str | None = None) -> str: ...

    def stop(self) -> None: ...  # what the run started, it ends; an external server is left running


class ExternalPostgres:
    """A server somebody else runs, described by a DSN (CI services, a Supabase project)."""

    external = True

    def __init__(self, dsn: str) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as error:
            raise ValueError(f"--exai-dsn is not a valid PostgreSQL DSN: {error}") from None
        self.host = str(params.pop("host", None) or "localhost")
        self.port = int(params.pop("port", None) or 5432)
        self.user = str(params.pop("user", None) or "postgres")
        password = params.pop("password", None)
        self.password = None if password is None else str(password)
        self.dbname = str(params.pop("dbname", None) or "postgres")
        self._extra = {k: v for k, v in params.items() if v is not None}
        # pytest-postgresql's executor for existing servers knows how to read the version.
        self._executor = NoopExecutor(
            host=self.host,
            port=self.port,
            user=self.user,
            options=str(self._extra.get("options", "")),
            dbname=self.dbname,
            password=self.password,
            maintenance_dbname=self.dbname,
        )
        try:
            self.version = str(self._executor.version)
        except psycopg.OperationalError as error:
            raise ConnectionError(f"cannot connect to the external server {self.describe()}: {error}") from None

    def dsn(self, dbname: str | None = None) -> str:
        return make_dsn(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=dbname or self.dbname,
            password=self.password,
            **self._extra,
        )

    def stop(self) -> None:
        """Nothing to stop: the server is not ours."""

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    def __repr__(self) -> str:
        return f"<ExternalPostgres {self.describe()} version={getattr(self, 'version', '?')}>"
