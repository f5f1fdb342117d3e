"""The migration runner: applies ``sql/NNN_name.sql`` in order and records what it applied.

Each file runs in its own transaction together with its record, so a failing file
leaves the database as it was. Each of those transactions takes a transaction-level
advisory lock and reads the ledger again under it, so two processes migrating one database
at once (xdist workers, app replicas) both succeed, each file applied by one of them. The
runner keeps nothing in the session between its transactions (no session lock, no session
setting, no prepared statement), so it also works through a pooler in transaction mode.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from datetime import datetime
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from psycopg import sql

from .clock import SETTING as CLOCK_SETTING
from .errors import MigrationError
from .sql_script import Statement, split_statements

_FILE_NAME = re.compile(r"^(?P<version>\d{3,})_(?P<name>[a-z0-9_]+)\.sql$")
LEDGER_SCHEMA = "exai_schema"
LEDGER_TABLE = "applied_migrations"
# An arbitrary constant: every runner, in any process, takes the same lock.
_ADVISORY_LOCK_KEY = int.from_bytes(b"exai-mig", "big") >> 1  # shifted to fit a signed bigint


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    filename: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationStatus:
    migration: Migration
    applied_at: datetime | None


def migrations_dir() -> Traversable:
    """The ``sql/`` directory: inside the installed package, or at the top of a checkout."""
    packaged = importlib.resources.files("pytest_exai_sessions").joinpath("sql")
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    raise MigrationError(
        f"no sql/ directory found, neither in the installed package ({packaged}) nor in a checkout ({checkout}); "
        "reinstall pytest-exai-sessions"
    )


def load_migrations(directory: Traversable | Path | None = None) -> list[Migration]:
    """Every migration file in ``directory`` (default: the packaged ones), ordered by version."""
    directory = directory if directory is not None else migrations_dir()
    migrations: dict[int, Migration] = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: migration files must be named NNN_lower_snake_name.sql")
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(f"{entry.name} and {migrations[version].filename} share version {version}")
        migrations[version] = Migration(version, match["name"], entry.name, entry.read_text(encoding="utf-8"))
    if not migrations:
        raise MigrationError(f"no migration files in {directory}")
    return [migrations[v] for v in sorted(migrations)]


def latest_version(migrations: list[Migration] | None = None) -> int:
    return (migrations or load_migrations())[-1].version


def _ensure_ledger(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(LEDGER_SCHEMA)), prepare=False)
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(LEDGER_SCHEMA, LEDGER_TABLE)),
        prepare=False,
    )


def _applied(conn: psycopg.Connection) -> dict[int, tuple[str, str, datetime]]:
    # prepare=False on every statement of the runner: behind a pooler in transaction mode the
    # next transaction may run on a server connection that lacks psycopg's prepared statement.
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{LEDGER_SCHEMA}.{LEDGER_TABLE}",), prepare=False
    ).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT version, name, checksum, applied_at FROM {}").format(
            sql.Identifier(LEDGER_SCHEMA, LEDGER_TABLE)
        ),
        prepare=False,
    ).fetchall()
    return {version: (name, checksum, applied_at) for version, name, checksum, applied_at in rows}


def _check_unchanged(migrations: list[Migration], applied: dict[int, tuple[str, str, datetime]]) -> None:
    for migration in migrations:
        if migration.version in applied and applied[migration.version][1] != migration.checksum:
            raise MigrationError(
                f"{migration.filename} was changed after it was applied (checksum differs from the one recorded "
                f"in {LEDGER_SCHEMA}.{LEDGER_TABLE}); add a new migration instead of editing an applied one"
            )


def migration_status(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> list[MigrationStatus]:
    """Each migration with the time it was applied, or None when it is pending."""
    migrations = migrations or load_migrations()
    applied = _applied(conn)
    _check_unchanged(migrations, applied)
    return [MigrationStatus(m, applied[m.version][2] if m.version in applied else None) for m in migrations]


def apply_migrations(
    conn: psycopg.Connection, migrations: list[Migration] | None = None, *, as_of: datetime | None = None
) -> list[Migration]:
    """Apply every pending migration in order; return those applied (empty when up to date).

    ``as_of``: apply them as if it were that instant (an aware datetime), e.g. to create the
    initial partitions around a test clock's month; set in each file's transaction only.
    """
    migrations = migrations or load_migrations()
    if as_of is not None and (as_of.tzinfo is None or as_of.utcoffset() is None):
        raise ValueError(f"as_of must be timezone-aware, got {as_of.isoformat()}")
    if not conn.autocommit:
        conn.rollback()
        conn.autocommit = True
    with conn.transaction():
        _serialise(conn, None)
        _ensure_ledger(conn)
    # What is pending as seen now; each file is checked again under the lock before it runs.
    pending = _pending(conn, migrations)
    return [migration for migration in pending if _apply_one(conn, migration, migrations, as_of)]


def _pending(conn: psycopg.Connection, migrations: list[Migration]) -> list[Migration]:
    applied = _applied(conn)
    _check_unchanged(migrations, applied)
    return [migration for migration in migrations if migration.version not in applied]


def _serialise(conn: psycopg.Connection, as_of: datetime | None) -> None:
    """Begin one of the runner's transactions: the runners take turns, and the clock is set.

    Locks, settings and snapshots of the transaction only: behind a pooler in transaction
    mode the next transaction may run on another server connection. Read committed, so that
    what the previous holder of the lock committed is seen by the statements after the lock.
    """
    conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", prepare=False)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_KEY,), prepare=False)
    if as_of is not None:
        # The setting, not the table of migration 008: that table may not exist yet.
        conn.execute("SELECT set_config(%s, %s, true)", (CLOCK_SETTING, as_of.isoformat()), prepare=False)


def _apply_one(
    conn: psycopg.Connection, migration: Migration, migrations: list[Migration], as_of: datetime | None
) -> bool:
    """Apply ``migration`` unless another runner did while this one waited; True when this one did."""
    with conn.transaction():
        _serialise(conn, as_of)
        if migration not in _pending(conn, migrations):
            return False
        run_script(conn, migration.sql, migration.filename)
        conn.execute(
            sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(
                sql.Identifier(LEDGER_SCHEMA, LEDGER_TABLE)
            ),
            (migration.version, migration.name, migration.checksum),
            prepare=False,
        )
    return True


def run_script(conn: psycopg.Connection[Any], script: str, filename: str) -> None:
    """Run a migration file inside the caller's transaction; a failure names its statement and line.

    The file goes to the server as one query, one round trip however many statements it holds.
    When it fails, it is rolled back to before the file and run again statement by statement, as
    psql runs it, to find the statement that fails and its line. Transaction control is refused:
    the caller's transaction is the file's.
    """
    statements = split_statements(script)
    for statement in statements:
        first_word = statement.text.split(None, 1)[0].rstrip(";").upper()
        if first_word in _TRANSACTION_CONTROL:
            raise MigrationError(
                f"{filename}, line {statement.line}: {first_word} is not allowed in a migration: each file "
                "runs in a transaction of its own, committed after its last statement"
            )
    if not statements:
        return
    try:
        with conn.transaction():  # a savepoint, so that the file can be run again to locate a failure
            conn.execute(script.encode(), prepare=False)  # bytes, no parameters: sent as it is, in one query
    except psycopg.Error as error:
        _locate_failure(conn, statements, filename, error)


def _locate_failure(
    conn: psycopg.Connection[Any], statements: list[Statement], filename: str, error: psycopg.Error
) -> NoReturn:
    """Run the failed file again, statement by statement and rolled back, and raise what fails."""
    with conn.transaction(force_rollback=True):
        for statement in statements:
            try:
                conn.execute(statement.text.encode(), prepare=False)
            except psycopg.Error as again:
                raise MigrationError(_explain(filename, statement, again)) from again
    # Whatever failed depends on running as one query (a lock or a deadlock, current_query()).
    raise MigrationError(
        f"{filename}: {error.diag.message_primary or error}\n"
        f"  it failed as one query but not statement by statement, so no line can be named\n"
        f"  {filename} ran in one transaction and was rolled back"
    ) from error


_TRANSACTION_CONTROL = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"})


def _explain(filename: str, statement: Statement, error: psycopg.Error) -> str:
    """The failure as an editor wants it: file, line, statement, then PostgreSQL's own words."""
    diag = error.diag
    first_line = statement.text.splitlines()[0].strip()
    lines = [f"{filename}, line {statement.line}: {first_line}", f"  error:  {diag.message_primary or error}"]
    if diag.statement_position:
        line = statement.line_at(int(diag.statement_position))
        if line != statement.line:
            text = statement.text.splitlines()[line - statement.line].strip()
            lines.append(f"  at line {line}: {text}")
    for label, value in (("detail", diag.message_detail), ("hint", diag.message_hint), ("where", diag.context)):
        if value:
            lines.append(f"  {label}: {value.strip()}")
    lines.append(f"  {filename} ran in one transaction and was rolled back")
    return "\n".join(lines)


def apply_to_dsn(
    dsn: str, migrations: list[Migration] | None = None, *, as_of: datetime | None = None
) -> list[Migration]:
    """Connect to ``dsn``, apply pending migrations (default: the packaged ones), disconnect."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return apply_migrations(conn, migrations, as_of=as_of)
