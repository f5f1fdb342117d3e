"""The sweep of what a killed run left also ends what still runs from its directories, and nothing else.

Seen: a run killed during the frozen-backend tests left a SIGSTOPped backend of its dead
postmaster. The next run swept the data directory, and the backend stayed, stopped for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pg_leftovers import Proc, is_running, read_proc, wait_until_gone

from pytest_exai_sessions.plugin.config import ExaiConfig
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.cluster import OWNER_LOCK, sweep_stale_clusters

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")

# A run that stops one backend of its server, as a frozen-backend test does, and is then killed.
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
import psycopg
from pytest_exai_sessions.server import TemporaryPostgres, server_os_user

server = TemporaryPostgres(Path(sys.argv[1]), basedir=Path(sys.argv[2]), os_user=server_os_user(None))
server.start()
conn = psycopg.connect(server.dsn(), autocommit=True)
backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
os.kill(backend, signal.SIGSTOP)
print(server.root, server.pid, backend, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def bindir(exai_config: ExaiConfig) -> Path:
    return find_bindir(exai_config.pg_bin)


def stopped(proc: Proc, timeout: float = 10.0) -> bool:
    """It is stopped (state T), or gets so within ``timeout``: a SIGSTOP is delivered when it next runs."""
    deadline = time.monotonic() + timeout
    while (now := read_proc(proc.pid)) is not None and now.start == proc.start and time.monotonic() < deadline:
        if now.state == "T":
            return True
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def killed_at_the_end(procs: list[Proc]) -> Iterator[None]:
    """Whatever the test finds, none of these outlives it (a stopped backend would stay for ever)."""
    try:
        yield
    finally:
        for proc in procs:
            if is_running(proc):
                os.kill(proc.pid, signal.SIGKILL)
        wait_until_gone(procs)


def test_the_sweep_ends_the_stopped_backend_of_a_killed_run_and_spares_a_live_server(
    bindir: Path, basedir: Path
) -> None:
    with TemporaryPostgres(bindir, basedir=basedir, os_user=server_os_user(None)) as live:
        live_conn = psycopg.connect(live.dsn(), autocommit=True)
        live_backend = read_proc(live_conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        live_postmaster = read_proc(live.pid) if live.pid is not None else None
        assert live_backend is not None and live_postmaster is not None

        run = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, str(bindir), str(basedir)], capture_output=True, text=True
        )
        assert run.returncode == -signal.SIGKILL, run.stderr
        root_text, postmaster_pid, backend_pid = run.stdout.split()
        left = Path(root_text)
        backend = read_proc(int(backend_pid))
        assert backend is not None
        with killed_at_the_end([backend]), live_conn:
            postmaster = read_proc(int(postmaster_pid))
            if postmaster is not None:
                assert not wait_until_gone([postmaster]), "the postmaster outlived the run that started it"
            # The leftover is real: the directory stays, and its backend, stopped, outlived its postmaster.
            assert left.is_dir() and (left / OWNER_LOCK).exists()
            assert stopped(backend), "the killed run's backend is not stopped"

            assert sweep_stale_clusters(basedir) == [left]

            assert not left.exists()
            assert not is_running(backend), "the sweep left the stopped backend of the swept directory running"
            # The live server's directory is no leftover: its processes run on, untouched.
            assert live.root is not None and live.root.is_dir()
            assert is_running(live_postmaster) and is_running(live_backend)
            assert live_conn.execute("SELECT 1").fetchone() == (1,)
    assert list(basedir.iterdir()) == []


def test_the_sweep_ends_only_processes_that_run_inside_a_stale_directory(basedir: Path) -> None:
    def directory(name: str) -> Path:
        path = basedir / f"exai-pg-{name}"
        (path / "data").mkdir(parents=True)
        (path / OWNER_LOCK).write_text("0\n")
        return path

    def sleeper(*arguments: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *arguments], cwd=cwd)

    stale = directory("stale")
    live = directory("live")
    live_lock = os.open(live / OWNER_LOCK, os.O_RDONLY)
    fcntl.flock(live_lock, fcntl.LOCK_EX)  # its owner, this process, is alive
    sleepers = {
        "working in it": sleeper(cwd=stale / "data"),
        "naming a path in it": sleeper(str(stale / "data" / "postgresql.conf")),
        "naming it as an option's value": sleeper(f"--pgdata={stale / 'data'}"),
        "naming a directory that only starts alike": sleeper(f"{stale}-other"),
        "working in a live directory": sleeper(cwd=live / "data"),
    }
    procs = {what: read_proc(process.pid) for what, process in sleepers.items()}
    assert all(proc is not None for proc in procs.values())
    try:
        with killed_at_the_end([proc for proc in procs.values() if proc is not None]):
            assert sweep_stale_clusters(basedir) == [stale]
            running = {what for what, proc in procs.items() if proc is not None and is_running(proc)}
            assert running == {"naming a directory that only starts alike", "working in a live directory"}
            assert not stale.exists() and live.is_dir()
    finally:
        os.close(live_lock)
        for process in sleepers.values():
            process.kill()
            process.wait()
