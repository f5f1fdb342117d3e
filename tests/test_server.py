"""TemporaryPostgres and its helpers, with real server processes (no mocks).

Every server start costs about half a second, so each test that starts one checks
as much as it reasonably can of that one server.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pg_leftovers import Leftovers, descendants, private_basedir, read_proc, wait_until_gone

from pytest_exai_sessions.server import (
    PostgresNotFound,
    ServerStartError,
    TemporaryPostgres,
    cluster,
    default_basedir,
    find_bindir,
    server_os_user,
)

AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def bindir() -> Path:
    return find_bindir()


@pytest.fixture
def basedir() -> Iterator[Path]:
    """A directory of this test's own for clusters, so "nothing left" can be checked exactly."""
    yield from private_basedir()


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
    assert default_basedir(min_free_bytes=shutil.disk_usage(shm).free + 1) == Path(tempfile.gettempdir())


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
