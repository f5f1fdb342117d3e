"""What a test template holds: the unified schema (all of it, none, or up to a version), then the app's migrations.

``TemplateSchema`` is the declaration (from the options or a fixture factory); ``resolve``
reads every file and imports every function once, giving a ``ResolvedSchema`` whose ``key``
covers all of that content: templates are cached and told apart by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import MigrationError
from ..schema import Migration, apply_to_dsn, load_migrations
from .app_migrations import AppMigration, Entry, apply_app_migrations, resolve
from .db_clock import DbClock, has_db_clock


@dataclass(frozen=True)
class TemplateSchema:
    """``unified``: True for the whole unified schema, False for none, N for its migrations up to version N.

    ``app``: the app's migrations after it, in order (directories, ``.sql`` files, functions or
    ``"package.module:function"``).
    """

    unified: bool | int = True
    app: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.unified, bool) and (not isinstance(self.unified, int) or self.unified < 1):
            raise ValueError(f"unified_schema must be True, False or a migration version >= 1, got {self.unified!r}")
        if isinstance(self.app, (str, bytes)):
            raise ValueError("migrations must be a list of entries, not one string")

    def resolve(self, rootdir: Path) -> ResolvedSchema:
        return ResolvedSchema(tuple(_unified(self.unified)), tuple(resolve(self.app, rootdir)))


def _unified(unified: bool | int) -> list[Migration]:
    if unified is False:
        return []
    migrations = load_migrations()
    if unified is True:
        return migrations
    versions = [m.version for m in migrations]
    if unified not in versions:
        raise MigrationError(
            f"unified_schema={unified}: the unified schema has no migration {unified} (it has {versions[0]} to "
            f"{versions[-1]})"
        )
    return [m for m in migrations if m.version <= unified]


@dataclass(frozen=True)
class ResolvedSchema:
    unified: tuple[Migration, ...]
    app: tuple[AppMigration, ...]

    @property
    def key(self) -> str:
        """Changes when any migration's content (a function's module or declared inputs included) changes."""
        parts = {
            "unified": [(m.version, m.checksum) for m in self.unified],
            "app": [(step.name, step.checksum) for step in self.app],
        }
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def apply(self, dsn: str, *, as_of: datetime | None = None) -> None:
        """``as_of``: build as if it were that instant, for the app's migrations too.

        Where the unified clock is in the schema, it is frozen there for the app's
        migrations, so that connections they open themselves (Alembic's) read it as well.
        """
        if self.unified:
            apply_to_dsn(dsn, list(self.unified), as_of=as_of)
        if not self.app:
            return
        if as_of is not None and has_db_clock(dsn):
            DbClock(dsn, start=as_of).reset()
        apply_app_migrations(dsn, self.app, as_of=as_of)
