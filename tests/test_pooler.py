"""PgBouncer as the kit runs it (server/pooler.py), with real PgBouncer and PostgreSQL processes.

Each test starts its own server in a private base directory, so "nothing is left" can be
checked exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from pg_leftovers import read_proc, wait_until_gone

from pytest_exai_sessions.plugin.config import ExaiConfig
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.cluster import OWNER_LOCK, sweep_stale_clusters
from pytest_exai_sessions.server.database import DatabaseDsn, DatabaseUnderTest
from pytest_exai_sessions.server.pooler import PgBouncer
from pytest_exai_sessions.testing.crash import CrashHarness

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def server(exai_config: ExaiConfig, basedir: Path, pgbouncer_binary: Path):
    with TemporaryPostgres(find_bindir(exai_config.pg_bin), basedir=basedir, os_user=server_os_user(None)) as server:
        yield server


def server_uid() -> int:
    return pwd.getpwnam("postgres").pw_uid if AS_ROOT else os.geteuid()


def through_a_pooler(conn: psycopg.Connection) -> bool:
    """PgBouncer hands the client a made-up backend key; a direct connection gets the backend's own pid."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return row is not None and row[0] != conn.info.backend_pid


def test_runs_as_the_server_user_on_a_private_socket_and_stop_leaves_nothing(server: TemporaryPostgres) -> None:
    pooler = PgBouncer(server, os_user=server_os_user(None), basedir=server.basedir).start()
    try:
        root = pooler.root
        assert root is not None and root.parent == server.basedir and root.name.startswith("exai-pg-pooler-")
        assert (root / OWNER_LOCK).read_text() == f"{os.getpid()}\n"
        assert root.stat().st_uid == server_uid() and root.stat().st_mode & 0o077 == 0
        assert pooler.host == str(root) and (root / f".s.PGSQL.{pooler.port}").exists()
        assert pooler.pid is not None and os.stat(f"/proc/{pooler.pid}").st_uid == server_uid()
        assert "pool_mode = transaction" in (root / "pgbouncer.ini").read_text()
        with psycopg.connect(pooler.dsn(), autocommit=True) as conn:
            assert through_a_pooler(conn)
            assert conn.execute("SELECT current_database(), current_user").fetchone() == ("postgres", "postgres")
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            assert not through_a_pooler(conn)
            conn.execute("CREATE DATABASE other")
        with psycopg.connect(pooler.dsn("other")) as conn:  # any database of the server, by its own name
            assert conn.execute("SELECT current_database()").fetchone() == ("other",)
        process = read_proc(pooler.pid)
        assert process is not None
    finally:
        pooler.stop()
    assert pooler.pid is None and pooler.root is None
    assert not root.exists()
    assert not wait_until_gone([process], timeout=0), "stop() returned while PgBouncer still ran"
    assert [p for p in server.basedir.iterdir()] == [server.root]


def test_restart_drops_every_client_and_serves_again_on_the_same_socket(server: TemporaryPostgres) -> None:
    with PgBouncer(server, mode="session", os_user=server_os_user(None), basedir=server.basedir) as pooler:
        dsn, first = pooler.dsn(), pooler.pid
        client = psycopg.connect(dsn, autocommit=True)
        try:
            client.execute("SELECT 1")
            pooler.restart()
            assert pooler.pid is not None and pooler.pid != first
            with pytest.raises(psycopg.OperationalError):
                client.execute("SELECT 1")
        finally:
            client.close()
        assert pooler.dsn() == dsn
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)


def test_tcp_listens_on_loopback_only(server: TemporaryPostgres) -> None:
    with PgBouncer(server, os_user=server_os_user(None), basedir=server.basedir, listen_tcp=True) as pooler:
        assert pooler.host == "127.0.0.1" and 15000 <= pooler.port < 32768
        with psycopg.connect(pooler.dsn(), autocommit=True) as conn:
            assert through_a_pooler(conn)
        port = pooler.port
        pooler.restart()
        assert pooler.port == port  # clients keep their DSN across a restart


def test_a_killed_owner_takes_pgbouncer_with_it_and_the_next_start_removes_its_directory(
    server: TemporaryPostgres,
) -> None:
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pytest_exai_sessions.server import ExternalPostgres, server_os_user\n"
        "from pytest_exai_sessions.server.pooler import PgBouncer\n"
        "pooler = PgBouncer(ExternalPostgres(sys.argv[1]), os_user=server_os_user(None), basedir=Path(sys.argv[2]))\n"
        "pooler.start()\n"
        "print(pooler.root, pooler.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, server.dsn(), str(server.basedir)], capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    root_text, pid_text = child.stdout.split()
    left = Path(root_text)
    assert left.is_dir()  # no teardown ran
    process = read_proc(int(pid_text))
    if process is not None and "pgbouncer" in " ".join(process.argv):
        assert not wait_until_gone([process]), "PgBouncer outlived the process that started it"
    assert sweep_stale_clusters(server.basedir) == [left]
    assert [p for p in server.basedir.iterdir()] == [server.root]


def test_a_bad_mode_is_refused_before_anything_starts(server: TemporaryPostgres) -> None:
    with pytest.raises(ValueError, match="pool mode must be one of transaction, session, got 'statement'"):
        PgBouncer(server, mode="statement")  # type: ignore[arg-type]
    assert [p for p in server.basedir.iterdir()] == [server.root]


def test_a_crash_harness_takes_the_pooler_and_the_direct_dsn_from_the_database_not_from_the_dsn(
    server: TemporaryPostgres,
) -> None:
    pooler = PgBouncer(server, os_user=server_os_user(None), basedir=server.basedir).start()
    try:
        pooled = DatabaseDsn(DatabaseUnderTest("shop", server, pooler))
        assert pooled == pooler.dsn("shop")  # a DSN like any other to psycopg
        harness = CrashHarness(pooled, server)
        assert harness.pooler is pooler
        assert harness.direct_dsn == server.dsn("shop")
        assert CrashHarness(DatabaseUnderTest("shop", server, pooler)).pooler is pooler
        # A plain DSN says nothing of a pooler, whatever it connects to.
        plain = CrashHarness(pooler.dsn("shop"), server)
        assert plain.pooler is None and plain.direct_dsn == pooler.dsn("shop")
        direct = CrashHarness(server.dsn("shop"), server)
        assert direct.pooler is None and direct.direct_dsn == server.dsn("shop")
    finally:
        pooler.stop()


def test_a_database_dsn_copies_as_itself_and_pickles_as_its_string(server: TemporaryPostgres) -> None:
    dsn = DatabaseDsn(DatabaseUnderTest("shop", server))
    assert copy.copy(dsn) is dsn and copy.deepcopy({"dsn": dsn})["dsn"] is dsn
    assert dataclasses.asdict(Holder(dsn)) == {"dsn": server.dsn("shop")}
    unpickled = pickle.loads(pickle.dumps(dsn))
    assert unpickled == dsn and type(unpickled) is str


@dataclasses.dataclass
class Holder:
    dsn: str
