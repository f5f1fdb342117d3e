"""What PostgreSQL runs leave behind: processes and cluster directories, read from Linux /proc.

Other people may run their own servers on this machine at the same time, so nothing
here asserts that the machine is clean: it compares what was there before with what
is there after, and attributes what is new to this process where it can.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pytest_exai_sessions.server import default_basedir
from pytest_exai_sessions.server.cluster import OWNER_LOCK
from pytest_exai_sessions.server.initdb_cache import CACHE_DIR_PREFIX
from pytest_exai_sessions.testing.databases import TestDatabases

CLUSTER_PREFIX = "exai-pg-"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks after boot: with the pid it names one process for good
    argv: tuple[str, ...]

    @property
    def is_postmaster(self) -> bool:
        # Backends rewrite their title ("postgres: checkpointer"); only the postmaster keeps -D.
        return bool(self.argv) and os.path.basename(self.argv[0]) == "postgres" and "-D" in self.argv

    def mentions(self, path: Path) -> bool:
        return any(str(path) in arg for arg in self.argv)


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    argv = tuple(part.decode(errors="replace") for part in cmdline.split(b"\0") if part)
    return Proc(pid=pid, ppid=int(fields[1]), state=fields[0], start=int(fields[19]), argv=argv)


def processes() -> dict[int, Proc]:
    found: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (proc := read_proc(int(entry.name))) is not None:
            found[proc.pid] = proc
    return found


def is_running(proc: Proc) -> bool:
    """The very same process (not a reused pid) still exists and is not a zombie."""
    now = read_proc(proc.pid)
    return now is not None and now.start == proc.start and now.state != "Z"


def wait_until_gone(procs: list[Proc], timeout: float = 10.0) -> list[Proc]:
    """Wait for the processes to end; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (running := [p for p in procs if is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return running


def descendants(pid: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    table = processes() if table is None else table
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def cluster_dirs(basedir: Path | None = None) -> set[Path]:
    basedir = basedir or default_basedir()
    return {p for p in basedir.glob(CLUSTER_PREFIX + "*") if p.is_dir()}


class Leftovers:
    """A snapshot of cluster directories and postmasters, to diff after a run.

    ``new_dirs`` leaves out directories that a process outside this process's tree
    is using right now: those are other people's servers starting up in parallel.
    """

    def __init__(self, basedir: Path | None = None) -> None:
        self.basedir = basedir
        self.dirs = cluster_dirs(basedir)
        self.postmasters = {(p.pid, p.start) for p in processes().values() if p.is_postmaster}

    def new_postmasters(self, *, mine_or_under: Sequence[Path] = ()) -> list[Proc]:
        """New postmasters still running that this process started (also through a child
        process), or whose data directory lies under one of ``mine_or_under``."""
        table = processes()
        mine = {p.pid for p in descendants(os.getpid(), table)}
        return [
            p
            for p in table.values()
            if p.is_postmaster
            and (p.pid, p.start) not in self.postmasters
            and (p.pid in mine or any(p.mentions(path) for path in mine_or_under))
        ]

    def new_dirs(self) -> set[Path]:
        table = processes()
        mine = {p.pid for p in descendants(os.getpid(), table)} | {os.getpid()}
        foreign = [p for p in table.values() if p.pid not in mine]
        return {
            d
            for d in cluster_dirs(self.basedir) - self.dirs
            if not any(p.mentions(d) for p in foreign) and not _owned_by_another_live_process(d, mine)
        }

    def assert_clean(self, *, roots: Sequence[Path] = ()) -> None:
        """Nothing new is left, and in particular none of ``roots`` (clusters a run reported)."""
        for root in roots:
            assert not root.exists(), f"cluster directory {root} was left behind"
        postmasters = wait_until_gone(self.new_postmasters(mine_or_under=list(roots)))
        assert not postmasters, f"postmasters left running: {postmasters}"
        dirs = self.new_dirs()
        assert not dirs, f"cluster directories left behind: {sorted(dirs)}"


def _owned_by_another_live_process(root: Path, mine: set[int], wait: float = 2.0) -> bool:
    """The directory's ``owner.lock`` is held by a live process outside ``mine``: another run's cluster.

    A cluster directory gets its lock file right after it is created; one seen in between
    is given ``wait`` seconds to show it.
    """
    deadline = time.monotonic() + wait
    while True:
        lock = root / OWNER_LOCK
        pending = list(root.glob(f".{OWNER_LOCK}.*"))
        if lock.exists() or pending:
            break
        if not root.exists():
            return True  # gone by itself: not a leftover
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    try:
        owner = int((lock if lock.exists() else pending[0]).read_text().split()[0])
        fd = os.open(lock if lock.exists() else pending[0], os.O_RDONLY)
    except (OSError, ValueError, IndexError):
        return not root.exists()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return owner not in mine  # held: by its live owner
    finally:
        os.close(fd)
    return False  # nobody holds it: whoever made it is dead, and it was left behind


def private_basedir() -> Iterator[Path]:
    """Generator for a fixture: a directory for the clusters of one test, removed with what is left in it.

    On tmpfs when there is one. Its name does not start with the cluster prefix, so it is not
    mistaken for a cluster; it is world-traversable because the server runs as another user.
    """
    path = Path(tempfile.mkdtemp(prefix="exai-test-", dir=default_basedir()))
    path.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def left_in(basedir: Path) -> list[Path]:
    """What is in ``basedir`` besides the initdb cache, which runs keep there on purpose."""
    return sorted(path for path in basedir.iterdir() if not path.name.startswith(CACHE_DIR_PREFIX))


def database_names(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}


def own_databases(databases: TestDatabases) -> set[str]:
    """The databases on the server that ``databases`` made: its template and clones."""
    return {name for name in database_names(databases.server.dsn()) if name.startswith(f"{databases.prefix}_")}


def databases_besides(outer: TestDatabases) -> set[str]:
    """The databases on ``outer``'s server, less ``outer``'s own.

    The outer run clones ahead and drops used clones in the background, so its own
    databases come and go while a test compares the server before and after an inner run.
    """
    return database_names(outer.server.dsn()) - own_databases(outer)
