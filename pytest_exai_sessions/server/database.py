"""One database a test uses, as the plugin made it: its name, its server, and its pooler if any."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .connection import PostgresServer

if TYPE_CHECKING:
    from .pooler import PgBouncer


@dataclass(frozen=True)
class DatabaseUnderTest:
    """A database of the run: what a test connects to, and what lies behind that.

    ``dsn`` goes through ``pooler`` when there is one; ``direct_dsn`` is the same database
    straight to ``server``, for what must not go through a pooler (ending backends, LISTEN).
    """

    name: str
    server: PostgresServer
    pooler: PgBouncer | None = None

    @property
    def dsn(self) -> str:
        return self.pooler.dsn(self.name) if self.pooler is not None else self.direct_dsn

    @property
    def direct_dsn(self) -> str:
        return self.server.dsn(self.name)


class DatabaseDsn(str):
    """The DSN a database fixture hands a test: a plain string that also knows its ``database``.

    Tools given one (``CrashHarness``, ``run_crash_machine``, ``DbClock``) take the server,
    the pooler and the name from it instead of working them out from the string.
    """

    database: DatabaseUnderTest

    def __new__(cls, database: DatabaseUnderTest) -> DatabaseDsn:
        dsn = super().__new__(cls, database.dsn)
        dsn.database = database
        return dsn

    # Immutable, as a str is: a copy is itself, and the running server and pooler it knows
    # stay in this process (pickled, it is the plain string).
    def __copy__(self) -> DatabaseDsn:
        return self

    def __deepcopy__(self, memo: object) -> DatabaseDsn:
        return self

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return str, (str(self),)


def database_of(dsn: str) -> DatabaseUnderTest | None:
    """The database a fixture's DSN names; None for a DSN from anywhere else."""
    return dsn.database if isinstance(dsn, DatabaseDsn) else None
