"""The app's own migrations, applied to a test template after (or instead of) the unified schema.

An entry is one of:

- a directory: its ``*.sql`` files in the order of their numeric prefix (``NNN_name.sql``
  or the Supabase CLI's ``YYYYMMDDHHMMSS_name.sql``); files not ending in ``.sql``, hidden
  files and subdirectories are ignored, a ``.sql`` file without a numeric prefix is refused;
- one ``.sql`` file;
- ``package.module:function`` (or the function itself), called with a psycopg connection to
  the template database, inside a transaction committed when it returns.

Each file and each function runs in a transaction of its own, from a fresh session state
(``DISCARD ALL``: one file's ``SET`` does not leak into the next), and is recorded with its checksum in
``exai_schema.applied_app_migrations``. The checksum of a function covers the source of its
module and the files it declares with ``@cache_inputs(...)``, so a template cached by it
is rebuilt when any of them changes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from ..clock import SETTING as CLOCK_SETTING
from ..errors import MigrationError
from ..schema import LEDGER_SCHEMA, run_script

LEDGER_TABLE = "applied_app_migrations"
_NUMBERED = re.compile(r"^(?P<number>\d+)_.+\.sql$")
_TARGET = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_INPUTS_ATTRIBUTE = "__exai_cache_inputs__"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent

MigrationFunction = Callable[[psycopg.Connection[Any]], object]
F = TypeVar("F", bound=Callable[..., Any])


def cache_inputs(*paths: str | os.PathLike[str]) -> Callable[[F], F]:
    """Declare the files a migration function reads (e.g. Alembic's ``versions/``).

    A cached template is rebuilt when any of them changes. Relative paths resolve against
    pytest's rootdir, like the entries of ``exai_migrations``; a directory covers every file
    below it.
    """

    def declare(function: F) -> F:
        setattr(function, _INPUTS_ATTRIBUTE, tuple(os.fspath(path) for path in paths))
        return function

    return declare


@dataclass(frozen=True)
class SqlFile:
    """One SQL file; ``name`` (its path, relative to the rootdir when below it) is what errors and the ledger show."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class FunctionStep:
    """A migration function; ``checksum`` covers its module's source and its declared inputs."""

    name: str
    function: MigrationFunction
    checksum: str


AppMigration = SqlFile | FunctionStep
Entry = str | os.PathLike[str] | MigrationFunction


def check_entry(entry: str, rootdir: Path) -> None:
    """Raise ValueError for an entry that can never work (checked before anything starts)."""
    if _TARGET.match(entry):
        return
    path = _path(entry, rootdir)
    if not path.exists():
        raise ValueError(f"{entry}: no such file or directory (relative paths resolve against the rootdir {rootdir})")
    if path.is_file() and path.suffix != ".sql":
        raise ValueError(f"{entry}: a migration file must end in .sql (or be a directory, or package.module:function)")


def resolve(entries: Iterable[Entry], rootdir: Path) -> list[AppMigration]:
    """Every step the entries stand for, in order; reads the files and imports the functions now."""
    steps: list[AppMigration] = []
    for entry in entries:
        if callable(entry):
            steps.append(_function_step(entry, _name_of(entry), rootdir))
        elif isinstance(entry, str) and _TARGET.match(entry):
            steps.append(_function_step(_import(entry), entry, rootdir))
        else:
            steps.extend(_sql_files(_path(entry, rootdir), rootdir))
    names = [step.name for step in steps]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MigrationError(f"migrations listed more than once: {', '.join(repeated)}")
    return steps


def _path(entry: str | os.PathLike[str], rootdir: Path) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else rootdir / path


def _shown(path: Path, rootdir: Path) -> str:
    try:
        return path.relative_to(rootdir).as_posix()
    except ValueError:
        return str(path)


def _sql_files(path: Path, rootdir: Path) -> list[SqlFile]:
    if path.is_file():
        if path.suffix != ".sql":
            raise MigrationError(f"{_shown(path, rootdir)}: a migration file must end in .sql")
        return [SqlFile(_shown(path, rootdir), path.read_text(encoding="utf-8"))]
    if not path.is_dir():
        raise MigrationError(f"{_shown(path, rootdir)}: no such file or directory")
    numbered: dict[int, Path] = {}
    for child in path.iterdir():
        if child.name.startswith(".") or child.suffix != ".sql" or not child.is_file():
            continue  # README, .gitkeep, editor files, subdirectories: not migrations
        match = _NUMBERED.match(child.name)
        if match is None:
            raise MigrationError(
                f"{_shown(child, rootdir)}: a migration in a directory needs a numeric prefix that orders it "
                "(NNN_name.sql, or YYYYMMDDHHMMSS_name.sql as the Supabase CLI names them); rename it, "
                "or move it out and list it as an entry of its own"
            )
        number = int(match["number"])
        if number in numbered:
            raise MigrationError(
                f"{_shown(child, rootdir)} and {numbered[number].name} share the number {number}: "
                "the order between them would be a guess; renumber one"
            )
        numbered[number] = child
    if not numbered:
        raise MigrationError(f"{_shown(path, rootdir)}: no *.sql migration files in this directory")
    return [SqlFile(_shown(p, rootdir), p.read_text(encoding="utf-8")) for _, p in sorted(numbered.items())]


def _import(target: str) -> MigrationFunction:
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise MigrationError(
            f"{target}: cannot import {module_name} ({error}); it must be importable from the tests "
            "(installed, or on sys.path, e.g. with pytest's pythonpath ini option)"
        ) from None
    value: Any = module
    for part in attribute.split("."):
        value = getattr(value, part, None)
    if not callable(value):
        raise MigrationError(f"{target}: {module_name} has no function {attribute}")
    return value  # type: ignore[no-any-return]


def _name_of(function: MigrationFunction) -> str:
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', repr(function))}"


def _function_step(function: MigrationFunction, name: str, rootdir: Path) -> FunctionStep:
    digest = hashlib.sha256(name.encode())
    source = sys.modules.get(getattr(function, "__module__", "") or "")
    source_file = inspect.getsourcefile(source) if source is not None else None
    if source_file:
        digest.update(Path(source_file).read_bytes())
    for declared in getattr(function, _INPUTS_ATTRIBUTE, ()):
        path = _path(declared, rootdir)
        if not path.exists():
            raise MigrationError(f"{name}: declared cache input {declared} does not exist (looked at {path})")
        for file in _files_below(path):
            digest.update(_shown(file, rootdir).encode() + b"\0" + file.read_bytes())
    return FunctionStep(name, function, digest.hexdigest())


def _files_below(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # Hidden files (editor swap files, .DS_Store) and bytecode are not inputs.
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def apply_app_migrations(dsn: str, steps: Sequence[AppMigration], *, as_of: datetime | None = None) -> list[str]:
    """Apply the steps not recorded yet, in order; returns the names applied.

    ``as_of``: run them as if it were that instant (the unified schema's clock setting).
    """
    done: list[str] = []
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        _ensure_ledger(conn)
        applied: dict[str, str] = dict(
            conn.execute(sql.SQL("SELECT name, checksum FROM {}").format(_ledger())).fetchall()
        )
        for step in steps:
            if step.name in applied:
                if applied[step.name] != step.checksum:
                    raise MigrationError(
                        f"{step.name} was changed after it was applied (its checksum differs from the one in "
                        f"{LEDGER_SCHEMA}.{LEDGER_TABLE})"
                    )
                continue
            if conn.closed:  # a function may close the connection it was given
                conn = psycopg.connect(dsn, autocommit=True)
            # Each step starts from a fresh session, as if it ran alone: one file's SET (a
            # search_path, a role) does not leak into the next.
            conn.execute("DISCARD ALL")
            with conn.transaction():
                if as_of is not None:
                    # For this step's transaction only, as the unified schema's runner sets it.
                    conn.execute("SELECT set_config(%s, %s, true)", (CLOCK_SETTING, as_of.isoformat()))
                _run(conn, step)
                conn.execute(
                    sql.SQL("INSERT INTO {} (name, checksum) VALUES (%s, %s)").format(_ledger()),
                    (step.name, step.checksum),
                )
            done.append(step.name)
        return done
    finally:
        conn.close()


def _ledger() -> sql.Identifier:
    return sql.Identifier(LEDGER_SCHEMA, LEDGER_TABLE)


def _ensure_ledger(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(LEDGER_SCHEMA)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(_ledger())
        )


def _run(conn: psycopg.Connection[Any], step: AppMigration) -> None:
    if isinstance(step, SqlFile):
        run_script(conn, step.sql, step.name)
        return
    try:
        step.function(conn)
    except Exception as error:  # noqa: BLE001 (the user's code: any failure is reported, with its own frames)
        message = f"{step.name} raised {type(error).__name__} and was rolled back\n{_user_traceback(error)}"
        raise MigrationError(message) from None


def _user_traceback(error: BaseException) -> str:
    """The traceback from the user's function down: the frames of this package are left out."""
    summary = traceback.extract_tb(error.__traceback__)
    frames = [frame for frame in summary if not Path(frame.filename).resolve().is_relative_to(_PACKAGE_DIR)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines.extend(traceback.format_exception_only(type(error), error))
    return "".join(lines).rstrip()
