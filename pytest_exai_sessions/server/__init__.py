"""The temporary PostgreSQL server: finding binaries, dropping privileges, the cluster."""

from .binaries import PostgresNotFound, find_bindir
from .cluster import ServerStartError, TemporaryPostgres, default_basedir, server_os_user
from .connection import ExternalPostgres, PostgresServer, make_dsn

__all__ = [
    "ExternalPostgres",
    "PostgresNotFound",
    "PostgresServer",
    "ServerStartError",
    "TemporaryPostgres",
    "default_basedir",
    "find_bindir",
    "make_dsn",
    "server_os_user",
]
