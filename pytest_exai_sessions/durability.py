"""Durability: the server settings under which a write the store acknowledged can be lost.

An awaited write of the store means committed; whether committed means "survives a crash,
a power cut or a failover" is up to the server's settings. They are read as the store's own
connections see them (``current_setting`` and ``pg_settings.source``), so a value that
``ALTER ROLE ... SET``, ``ALTER DATABASE ... SET``, the client's ``PGOPTIONS`` or the
configuration file gives is judged where it applies and says where it comes from.

``read_settings`` reads through a store's pool, ``read_settings_now`` over one plain
connection; ``judge`` turns what they read into one ``Finding`` a setting, and ``describe``
into the lines ``exai-sessions check`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import psycopg

from .db import PoolOptions
from .errors import ExaiSessionsError
from .store import SessionStore

# In pg_stat_activity, the check's one connection says what it is.
APPLICATION_NAME = "exai-sessions-check"

_NAMES = (
    "fsync",
    "synchronous_commit",
    "wal_writer_delay",
    "full_page_writes",
    "wal_sync_method",
    "synchronous_standby_names",
)
# current_setting() gives the value with its unit (200ms), pg_settings where it comes from.
# version() names the platform, which decides whether wal_sync_method reaches the disk.
_READ = b"SELECT name, current_setting(name), source, version() FROM pg_catalog.pg_settings WHERE name = ANY(%(names)s)"
_READING = "reading the durability settings"


class SettingsUnreadable(ExaiSessionsError):
    """The server did not report a setting the check needs."""


@dataclass(frozen=True)
class Setting:
    """One setting as a connection sees it: its value and where that comes from (``pg_settings.source``)."""

    value: str
    source: str


@dataclass(frozen=True)
class ServerSettings:
    """What one connection read: which server, its ``version()``, and the settings by name."""

    server: str  # host:port/database as user
    version: str
    settings: Mapping[str, Setting]


@dataclass(frozen=True)
class Finding:
    """The verdict on one setting: whether an acknowledged write can be lost under it, and why."""

    setting: str
    value: str
    source: str
    loses: bool
    why: str


async def read_settings(dsn: str, **pool_options: Unpack[PoolOptions]) -> ServerSettings:
    """The settings as a ``SessionStore`` opened on ``dsn`` sees them, read through its own pool of one."""
    options: PoolOptions = {"application_name": APPLICATION_NAME, **pool_options, "min_size": 1, "max_size": 1}
    async with (
        await SessionStore.open(dsn, **options) as store,
        store.database.connection(_READING, writes=False) as conn,
    ):
        cursor = await conn.execute(_READ, {"names": list(_NAMES)})
        rows = await cursor.fetchall()
        return _server_settings(conn.info, rows)


def read_settings_now(dsn: str, *, connect_timeout: int = 5) -> ServerSettings:
    """``read_settings`` without an event loop, for callers that have none (pytest's report header).

    The store's pool is async only; this connection takes the keyword arguments the pool
    gives each of its connections (autocommit, connect_timeout, application_name), so the
    server applies the same role, database and client settings. It raises ``psycopg.Error``.
    """
    with psycopg.connect(
        dsn, autocommit=True, connect_timeout=connect_timeout, application_name=APPLICATION_NAME
    ) as conn:
        rows = conn.execute(_READ, {"names": list(_NAMES)}).fetchall()
        return _server_settings(conn.info, rows)


def _server_settings(info: psycopg.ConnectionInfo, rows: Sequence[Sequence[Any]]) -> ServerSettings:
    server = f"{info.host}:{info.port}/{info.dbname} as {info.user}"
    settings = {name: Setting(value, source) for name, value, source, _ in rows}
    missing = [name for name in _NAMES if name not in settings]
    if missing:
        raise SettingsUnreadable(f"{server} reports no {', '.join(missing)} in pg_settings: is it PostgreSQL?")
    return ServerSettings(server, rows[0][3], settings)


def judge(server: ServerSettings) -> list[Finding]:
    """One finding a setting that decides whether an acknowledged write survives; no I/O."""
    return [
        _fsync(server),
        _synchronous_commit(server),
        _full_page_writes(server),
        _wal_sync_method(server),
        _synchronous_standby_names(server),
    ]


def _finding(server: ServerSettings, name: str, *, loses: bool, why: str) -> Finding:
    setting = server.settings[name]
    return Finding(name, setting.value, setting.source, loses, why)


def _fsync(server: ServerSettings) -> Finding:
    if server.settings["fsync"].value == "off":
        why = (
            "PostgreSQL never waits for the OS to flush: "
            "a power cut or OS crash can lose any write, even corrupt the cluster"
        )
        return _finding(server, "fsync", loses=True, why=why)
    return _finding(server, "fsync", loses=False, why="writes are flushed to storage before they count as done")


def _synchronous_commit(server: ServerSettings) -> Finding:
    if server.settings["synchronous_commit"].value == "off":
        delay = server.settings["wal_writer_delay"].value
        # PostgreSQL's own crash loses them too: the WAL still in shared memory is gone.
        why = (
            "a commit is acknowledged before its WAL is flushed: a crash of PostgreSQL, the OS or the power "
            f"loses the last ones, up to 3 x wal_writer_delay={delay}"
        )
        return _finding(server, "synchronous_commit", loses=True, why=why)
    why = "a commit is acknowledged only once its WAL is flushed on this server"
    return _finding(server, "synchronous_commit", loses=False, why=why)


def _full_page_writes(server: ServerSettings) -> Finding:
    if server.settings["full_page_writes"].value == "off":
        why = (
            "a page torn by a power cut cannot be repaired from WAL (safe only on storage whose 8 kB writes are atomic)"
        )
        return _finding(server, "full_page_writes", loses=True, why=why)
    why = "a page torn by a power cut is restored from its full image in WAL"
    return _finding(server, "full_page_writes", loses=False, why=why)


def _wal_sync_method(server: ServerSettings) -> Finding:
    method = server.settings["wal_sync_method"].value
    platform = _platform(server.version)
    if "darwin" in platform.lower():
        # macOS's fsync() leaves the data in the drive's cache; only F_FULLFSYNC, which
        # fsync_writethrough uses, asks the drive to write it out.
        if method != "fsync_writethrough":
            why = (
                f"on macOS ({platform}) {method} does not flush the drive's cache: a power cut can lose "
                "acknowledged commits (set wal_sync_method = fsync_writethrough)"
            )
            return _finding(server, "wal_sync_method", loses=True, why=why)
        why = f"on macOS ({platform}) it flushes the drive's cache too (F_FULLFSYNC)"
        return _finding(server, "wal_sync_method", loses=False, why=why)
    why = f"it flushes the WAL to storage on this server's platform ({platform})"
    return _finding(server, "wal_sync_method", loses=False, why=why)


def _platform(version: str) -> str:
    """``x86_64-pc-linux-gnu`` of ``PostgreSQL 15.5 on x86_64-pc-linux-gnu, compiled by gcc ...``."""
    _, on, rest = version.partition(" on ")
    return rest.split(",", 1)[0].strip() if on else version


def _synchronous_standby_names(server: ServerSettings) -> Finding:
    name = "synchronous_standby_names"
    if not server.settings[name].value:
        why = "commits wait for no standby: if this server has standbys, a failover to one can lose acknowledged writes"
        return _finding(server, name, loses=False, why=why)
    commit = server.settings["synchronous_commit"]
    mode = f"synchronous_commit={commit.value} ({commit.source})"
    if commit.value == "remote_write":
        why = (
            f"with {mode} a standby has written a commit but not flushed it: "
            "a power cut of the standby, then a failover to it, loses it"
        )
        return _finding(server, name, loses=True, why=why)
    if commit.value in ("local", "off"):
        why = f"with {mode} commits wait for no standby: a failover loses the last acknowledged ones"
        return _finding(server, name, loses=True, why=why)
    why = f"with {mode} an acknowledged commit is flushed on the synchronous standby(s) too"
    return _finding(server, name, loses=False, why=why)


def losing(findings: Sequence[Finding]) -> list[Finding]:
    """The findings under which an acknowledged write can be lost."""
    return [finding for finding in findings if finding.loses]


def summarize(findings: Sequence[Finding]) -> str:
    """One phrase on all of them: which settings lose writes, with their values."""
    lost = losing(findings)
    if not lost:
        return "no setting loses acknowledged writes"
    settings = ", ".join(f"{finding.setting}={_shown(finding.value)}" for finding in lost)
    count = f"{len(lost)} setting{'s' if len(lost) != 1 else ''}"
    return f"{count} can lose acknowledged writes: {settings}"


def describe(server: str, findings: Sequence[Finding]) -> list[str]:
    """The lines of ``exai-sessions check``: a title, one line a setting, the summary."""
    lines = [f"durability of {server} as the store's connections see it:"]
    for finding in findings:
        verdict = "LOSES" if finding.loses else "ok"
        lines.append(f"{verdict:<5} {finding.setting}={_shown(finding.value)} ({finding.source}): {finding.why}")
    lines.append(summarize(findings))
    return lines


def _shown(value: str) -> str:
    # Quoted when empty or spaced, so that each line still splits into the same fields.
    return f"'{value}'" if not value or any(c.isspace() for c in value) else value
