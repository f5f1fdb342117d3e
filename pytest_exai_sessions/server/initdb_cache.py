"""The output of initdb, kept once per binaries, options and OS user: a new cluster is a copy of it.

initdb is most of a cold start, and what it writes depends only on the PostgreSQL binaries,
the options it is given, the OS user it runs as and the time zone it detects, never on a
project's schema. So a new cluster is a copy of a kept, never-started data directory (tens of
milliseconds on tmpfs) instead of a run of initdb (half a second or more). Every run still
gets a brand-new cluster of its own; no schema is kept here (that is ``--exai-reuse``).

The cache directory (one per user; by default ``<basedir>/exai-initdb-cache-<uid>``) holds:

- ``<key>/data.tar``: the data directory initdb wrote, as one archive: unpacking it is faster
  than copying a thousand files, and checking one file's size, mtime and inode is instant;
- ``<key>/ready.json``: the key, what it was built from, and that archive's size, mtime and inode;
- ``building-*``: an entry being built, renamed to ``<key>`` once complete (an atomic publish);
- ``lock``: ``flock``ed shared while an entry is copied, exclusively while one is built or removed.

An entry whose archive differs from its ``ready.json`` (missing, resized, rewritten) or does
not unpack is removed and built again, never used. The directory must be the user's own and writable by
nobody else: a cache others can write would hand them the next cluster.

``python -m pytest_exai_sessions.server.initdb_cache_command`` lists the entries (or clears them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ExaiSessionsError

CACHE_DIR_PREFIX = "exai-initdb-cache-"
INITDB_CACHE_DIR_ENV = "EXAI_SESSIONS_INITDB_CACHE_DIR"  # the plugin's option, and the command's default
BASEDIR_ENV = "EXAI_SESSIONS_PG_BASEDIR"  # the plugin's option, and the command's default
_FORMAT = 1  # bump when the layout of an entry changes
_BUILDING_PREFIX = "building-"
_READY = "ready.json"
_ARCHIVE = "data.tar"
_LOCK = "lock"
KEEP_ENTRIES = 4  # the most recently used entries kept; older ones are removed after a build

Provided = Literal["copied", "built"]


class InitdbCacheError(ExaiSessionsError):
    """The cache directory cannot be used safely; the message says why and how to do without it."""


def default_cache_dir(basedir: Path) -> Path:
    """The user's cache directory in the base directory the clusters go to: a copy never crosses filesystems."""
    return basedir / f"{CACHE_DIR_PREFIX}{os.geteuid()}"


def binary_identity(path: Path) -> list[Any]:
    """What changes when a binary is replaced (a package upgrade, a rebuild): its real path, size, mtime, inode."""
    real = path.resolve()
    info = real.stat()
    return [str(real), info.st_size, info.st_mtime_ns, info.st_ino]


def _detected_time_zone() -> list[Any]:
    """What initdb's time zone comes from: ``TZ``, else /etc/localtime (written into postgresql.conf)."""
    localtime = Path("/etc/localtime")
    try:
        target: list[Any] = [str(localtime.resolve()), localtime.stat().st_mtime_ns]
    except OSError:
        target = []
    return [os.environ.get("TZ"), *target]


def initdb_key(*, bindir: Path, arguments: Sequence[str], os_user: str, uid: int) -> str:
    """The key of what initdb writes: the binaries (path and identity), its arguments, the user, the zone.

    The identity (real path, size, mtime, inode of initdb and postgres) stands for the version
    too: another version is another binary. It costs a few stat calls, where asking the
    version costs running ``postgres --version``.
    """
    parts = {
        "format": _FORMAT,
        "bindir": str(bindir),
        "binaries": [binary_identity(bindir / name) for name in ("initdb", "postgres")],
        "arguments": list(arguments),
        "os_user": [os_user, uid],
        "time_zone": _detected_time_zone(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _identity(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ino]


@dataclass(frozen=True)
class Entry:
    """One kept data directory, as the cache command lists it."""

    key: str
    path: Path
    built_from: Mapping[str, Any]  # what the caller described it with: version, bindir, OS user
    size_bytes: int  # of the archive
    last_used: float  # epoch seconds


class InitdbCache:
    """Data directories as initdb wrote them, one per key, shared by every run and xdist worker of a user."""

    def __init__(self, directory: Path, *, keep: int = KEEP_ENTRIES) -> None:
        self.directory = directory
        self.keep = keep

    # the one thing a server asks of it

    def provide(
        self,
        key: str,
        target: Path,
        *,
        build: Callable[[Path], None],
        run_as: Mapping[str, Any] | None = None,
        description: Mapping[str, Any] | None = None,
    ) -> Provided:
        """Unpack the entry of ``key`` into ``target`` (a data directory to be); build the entry first if needed.

        ``build(datadir)`` runs initdb into ``datadir``, which does not exist yet. ``run_as``:
        the ``subprocess`` options (user, group) of the server's OS user, who runs initdb and
        owns what is unpacked. ``description`` is stored with the entry for listings.
        Returns whether an existing entry was unpacked or one was built now. An entry that
        does not unpack is built again. A build that fails raises its own error (or
        ``InitdbCacheError``) and publishes nothing; ``target`` is then absent. On the cache's
        filesystem a build moves initdb's output to ``target`` instead of unpacking the archive
        it just wrote; on another (a power-loss disk) it unpacks it.
        """
        if target.name != "data":
            raise ValueError(f"the data directory to create must be named 'data', got {target}")
        broken: list[int] | None = None
        with self._locked(exclusive=False):
            ready = self._valid_ready(key)
            if ready is not None:
                if self._unpack(key, target, run_as):
                    return "copied"
                broken = ready["archive"]
        with self._locked(exclusive=True):
            ready = self._valid_ready(key)
            # Another run may have built it while this one waited; not the one that just failed.
            if ready is not None and ready["archive"] != broken and self._unpack(key, target, run_as):
                return "copied"
            self._build(key, build, run_as or {}, description or {}, target)
            self._prune(keep_also=key)
            return "built"

    def discard(self, key: str) -> None:
        """Remove the entry of ``key`` (it unpacked and did not start): the next run builds it again."""
        with self._locked(exclusive=True):
            self._remove(self.directory / key)

    def has(self, key: str) -> bool:
        """Whether a valid entry of ``key`` is there (the next run unpacks it); creates nothing."""
        if not self.directory.is_dir():
            return False
        self._check_directory()
        return self._valid_ready(key) is not None

    # listing and clearing (the CLI)

    def entries(self) -> list[Entry]:
        """The complete entries, the most recently used first."""
        if not self.directory.is_dir():
            return []
        self._check_directory()
        found = []
        for path in self.directory.iterdir():
            if path.name.startswith(_BUILDING_PREFIX) or not path.is_dir():
                continue
            ready = self._valid_ready(path.name)
            if ready is None:
                continue
            last_used = (path / _READY).stat().st_mtime
            found.append(Entry(path.name, path, ready["built_from"], ready["archive"][0], last_used))
        return sorted(found, key=lambda entry: entry.last_used, reverse=True)

    def clear(self) -> int:
        """Remove every entry and the directory itself; returns how many complete entries there were."""
        if not self.directory.is_dir():
            return 0
        with self._locked(exclusive=True):
            removed = len(self.entries())
            for path in list(self.directory.iterdir()):
                if path.is_dir() and not path.is_symlink():
                    self._remove(path)
            (self.directory / _LOCK).unlink(missing_ok=True)  # runs waiting on it notice: see _locked
            with contextlib.suppress(OSError):  # something else in it: leave the directory
                self.directory.rmdir()
            return removed

    # inside

    def _check_directory(self) -> None:
        info = self.directory.lstat()
        problem = None
        if not self.directory.is_dir() or self.directory.is_symlink():
            problem = "is not a directory"
        elif info.st_uid != os.geteuid():
            problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
        elif info.st_mode & 0o022:
            problem = f"is writable by others (mode {info.st_mode & 0o777:o})"
        if problem is not None:
            raise InitdbCacheError(
                f"the initdb cache directory {self.directory} {problem}: a cluster copied from it could not be "
                "trusted. Choose another with --exai-initdb-cache-dir, or turn the cache off with "
                "--exai-no-initdb-cache."
            )

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o755)
            # The server's OS user unpacks from it (umask may have narrowed the mode).
            os.chmod(self.directory, 0o755)
        except FileExistsError:
            pass
        except OSError as error:
            raise InitdbCacheError(
                f"cannot create the initdb cache directory {self.directory}: {error}. Choose another with "
                "--exai-initdb-cache-dir, or turn the cache off with --exai-no-initdb-cache."
            ) from None
        self._check_directory()

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        import fcntl  # here: the plugin loads where there is none (a temporary server never runs there)

        while True:
            self._prepare_directory()
            fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                try:
                    same = os.fstat(fd).st_ino == (self.directory / _LOCK).stat().st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    yield
                    return
                # Cleared while this run waited: the lock it holds is of a removed file.
            finally:
                os.close(fd)

    def _valid_ready(self, key: str) -> dict[str, Any] | None:
        """The entry's ready.json when the entry is complete and its archive is the one it describes."""
        entry = self.directory / key
        try:
            ready = json.loads((entry / _READY).read_text())
            archive = _identity(entry / _ARCHIVE)
        except (OSError, ValueError):
            return None
        if not isinstance(ready, dict) or ready.get("format") != _FORMAT or ready.get("key") != key:
            return None
        if ready.get("archive") != archive or not isinstance(ready.get("built_from"), dict):
            return None
        return ready

    def _unpack(self, key: str, target: Path, run_as: Mapping[str, Any] | None) -> bool:
        """Unpack the entry's archive into ``target`` as the server's user; False (and no ``target``) if it fails."""
        if not _extract(self.directory / key / _ARCHIVE, target, run_as):
            return False
        with contextlib.suppress(OSError):  # only the order in which old entries are pruned depends on it
            os.utime(self.directory / key / _READY)
        return True

    def _build(
        self,
        key: str,
        build: Callable[[Path], None],
        run_as: Mapping[str, Any],
        description: Mapping[str, Any],
        target: Path,
    ) -> None:
        """Run initdb, archive its output as the entry, move the output itself to ``target`` (no unpacking)."""
        self._remove(self.directory / key)  # whatever is there is not valid
        for stale in self.directory.glob(f"{_BUILDING_PREFIX}*"):
            self._remove(stale)  # a build that died half-way (we hold the lock: none is running)
        building = Path(tempfile.mkdtemp(prefix=_BUILDING_PREFIX, dir=self.directory))
        try:
            if "user" in run_as:
                os.chown(building, run_as["user"], run_as["group"])  # initdb, as the server's user, writes in it
            build(building / "data")
            failure = _run([_tar(), "-c", "-f", _ARCHIVE, "data"], run_as, cwd=building)
            if failure is not None:
                raise InitdbCacheError(f"could not archive the initdb output in {building}: {failure}")
            try:
                (building / "data").rename(target)  # the same filesystem: a rename, no copy
            except OSError as error:
                # Another filesystem (a power-loss disk): unpack what was just archived.
                if error.errno != errno.EXDEV:
                    raise
                if not _extract(building / _ARCHIVE, target, run_as):
                    raise InitdbCacheError(f"could not unpack the initdb output of {building} into {target}") from None
            ready = {
                "format": _FORMAT,
                "key": key,
                "built_from": dict(description),
                "archive": _identity(building / _ARCHIVE),
            }
            (building / _READY).write_text(json.dumps(ready))
            building.rename(self.directory / key)  # complete or absent, never half-built
        finally:
            self._remove(building)

    def _prune(self, keep_also: str) -> None:
        """Remove the least recently used entries beyond ``keep`` (under the exclusive lock)."""
        entries = [entry for entry in self.entries() if entry.key != keep_also]
        for entry in entries[max(self.keep - 1, 0) :]:
            self._remove(entry.path)

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _extract(archive: Path, target: Path, run_as: Mapping[str, Any] | None) -> bool:
    """Unpack ``archive`` into ``target`` as the server's user; False (and no ``target``) if it fails."""
    # Its one member is the directory "data", with initdb's mode (0700) and files.
    command = [_tar(), "-x", "-p", "-f", str(archive), "-C", str(target.parent)]
    if _run(command, run_as, cwd=target.parent) is not None or not (target / "PG_VERSION").is_file():
        shutil.rmtree(target, ignore_errors=True)
        return False
    return True


def _tar() -> str:
    """tar by its path: the server's user may not be able to search this process's PATH (or it lacks tar)."""
    return shutil.which("tar") or shutil.which("tar", path=os.pathsep.join(("/usr/bin", "/bin"))) or "tar"


def _run(command: Sequence[str], run_as: Mapping[str, Any] | None, *, cwd: Path) -> str | None:
    """Run ``command``; None when it succeeded, else what went wrong."""
    try:
        result = subprocess.run(
            command, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, **(run_as or {})
        )
    except OSError as error:  # no tar
        return f"cannot run {command[0]}: {error}"
    return (
        None if result.returncode == 0 else f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}"
    )


def describe_entry(entry: Entry) -> str:
    """One line of the cache command's listing."""
    built = entry.built_from
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
    return (
        f"{entry.key}  PostgreSQL {built.get('version', '?')} ({built.get('bindir', '?')}) "
        f"as {built.get('os_user', '?')}, {entry.size_bytes / 1e6:.0f} MB, last used {used}"
    )
