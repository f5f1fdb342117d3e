"""The temporary PostgreSQL server: finding binaries, dropping privileges, the cluster; PgBouncer in front of it."""

from .binaries import PostgresNotFound, find_bindir
from .cluster import ServerStartError, TemporaryPostgres, default_basedir, server_os_user
from .connection import ExternalPostgres, PostgresServer, make_dsn
from .initdb_cache import InitdbCache, InitdbCacheError, default_cache_dir
from .pooler import PgBouncer, PoolerNotFound, PoolerStartError, PoolMode, find_pgbouncer

__all__ = [
    "ExternalPostgres",
    "InitdbCache",
    "InitdbCacheError",
    "PgBouncer",
    "PoolMode",
    "PoolerNotFound",
    "PoolerStartError",
    "PostgresNotFound",
    "PostgresServer",
    "ServerStartError",
    "TemporaryPostgres",
    "default_basedir",
    "default_cache_dir",
    "find_bindir",
    "find_pgbouncer",
    "make_dsn",
    "server_os_user",
]
