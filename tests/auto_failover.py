"""A pg_auto_failover formation for one test: a monitor and two keepers, all children of this process.

The monitor is told to notice a dead node within about a second (its defaults take 20 s
and more), so that one failover fits in a test; everything else is pg_auto_failover's own:
it decides, promotes and rewires by itself. Used by the slow test of a real failover manager.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pytest_exai_sessions.server.cluster import CLUSTER_PREFIX
from pytest_exai_sessions.server.connection import make_dsn
from pytest_exai_sessions.server.process import ChildServer, OsUser
from pytest_exai_sessions.server.procfs import kill_and_wait, running_inside

PG_AUTOCTL = "pg_autoctl"
# Milliseconds: a node is unhealthy once a check failed once and a second passed.
FAST_HEALTH_CHECKS = {
    "health_check_period": "500",
    "health_check_timeout": "500",
    "health_check_max_retries": "1",
    "health_check_retry_delay": "200",
    "node_considered_unhealthy_timeout": "1000",
    "primary_demote_timeout": "1000",
    "startup_grace_period": "1000",
}
_WRITABLE = ("primary", "wait_primary")


def pg_autoctl() -> str | None:
    return shutil.which(PG_AUTOCTL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Formation:
    """A monitor and two nodes on 127.0.0.1, run by ``pg_autoctl`` as ``os_user`` in a private directory."""

    def __init__(self, bindir: Path, basedir: Path, os_user: OsUser | None) -> None:
        self.bindir = bindir
        self.basedir = basedir
        self.os_user = os_user
        self._directory = ChildServer("formation", log_name="formation.log", os_user=os_user, failure=RuntimeError)
        self.ports = {name: _free_port() for name in ("monitor", "node1", "node2")}
        self._keepers: list[subprocess.Popen[bytes]] = []

    @property
    def root(self) -> Path:
        return self._directory.directory

    def dsn(self, dbname: str = "postgres") -> str:
        """Both nodes, as production names them: the primary is whichever takes writes."""
        return make_dsn(
            host="127.0.0.1,127.0.0.1",
            port=f"{self.ports['node1']},{self.ports['node2']}",
            user="postgres",
            dbname=dbname,
            target_session_attrs="read-write",
            connect_timeout="2",
        )

    def node_dsn(self, name: str, dbname: str = "postgres") -> str:
        return make_dsn(host="127.0.0.1", port=self.ports[name], user="postgres", dbname=dbname)

    # lifecycle

    def start(self, timeout: float = 60.0) -> Formation:
        self._directory.create_directory(self.basedir, prefix=f"{CLUSTER_PREFIX}autofailover-")
        try:
            self._create_monitor()
            self._keep("monitor", "run", "--pgdata", str(self.root / "monitor"))
            self._wait(lambda: self._monitor_query("SELECT 1"), timeout, "the monitor to accept connections")
            for name, value in FAST_HEALTH_CHECKS.items():
                self._monitor_query(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(f"pgautofailover.{name}"), sql.Literal(value)
                    )
                )
            self._monitor_query("SELECT pg_reload_conf()")
            self._initdb("node1")
            self._keep("node1", *self._create_node("node1"))
            self._wait(lambda: self.states().get("node1") == ("single", "single"), timeout, "node1 to run alone")
            self._keep("node2", *self._create_node("node2"))
            expected = {"node1": ("primary", "primary"), "node2": ("secondary", "secondary")}
            self._wait(lambda: self.states() == expected, timeout, "a primary and a secondary")
        except BaseException:
            self.stop()
            raise
        return self

    def _create_node(self, name: str) -> list[str]:
        return [
            "create", "postgres", *self._node_options(name),
            "--listen", "127.0.0.1",
            "--monitor", self.monitor_uri,
            "--name", name,
            "--run",
        ]  # fmt: skip

    @property
    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.ports['monitor']}/pg_auto_failover?sslmode=disable"

    def _node_options(self, name: str) -> list[str]:
        return [
            "--pgdata", str(self.root / name),
            "--pgport", str(self.ports[name]),
            "--hostname", "127.0.0.1",
            "--auth", "trust",
            "--no-ssl",
            "--pgctl", str(self.bindir / "pg_ctl"),
        ]  # fmt: skip

    def _create_monitor(self) -> None:
        """``pg_autoctl create monitor``, with the settings of ``_set_local_settings`` (it has no --listen)."""
        with open(self.root / "monitor.log", "ab") as log:
            subprocess.run(
                [PG_AUTOCTL, "create", "monitor", *self._node_options("monitor")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                check=True,
                **self._directory.run_as(),
            )
        self._set_local_settings("monitor")

    def _initdb(self, name: str) -> None:
        """A data directory of our own for the first node, which pg_autoctl then takes as it is."""
        with open(self.root / f"{name}.log", "ab") as log:
            subprocess.run(
                [str(self.bindir / "initdb"), "--pgdata", str(self.root / name), "--username", "postgres",
                 "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True, **self._directory.run_as(),
            )  # fmt: skip
        self._set_local_settings(name)

    def _set_local_settings(self, name: str) -> None:
        """127.0.0.1 only, and dynamic shared memory in the data directory: a killed node leaves no
        segment in /dev/shm. The standby's base backup copies them."""
        with open(self.root / name / "postgresql.auto.conf", "a") as conf:
            conf.write("listen_addresses = '127.0.0.1'\ndynamic_shared_memory_type = 'mmap'\n")

    def _environment(self) -> dict[str, str]:
        # Its configuration and state files go to the private directory, not the user's home.
        return {
            **os.environ,
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_DATA_HOME": str(self.root / "share"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
        }

    def _keep(self, name: str, *command: str) -> None:
        """``pg_autoctl <command>`` for node ``name``, kept running: it runs the node's postmaster."""
        with open(self.root / f"{name}.log", "ab") as log:
            self._keepers.append(
                subprocess.Popen(
                    [PG_AUTOCTL, *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(),
                    **self._directory.run_as(),
                )
            )

    def stop(self) -> None:
        """Kill every process of the formation (pg_ctl detaches the postmasters: they go by their directory)."""
        if self._directory.root is None:
            return
        for keeper in self._keepers:
            if keeper.poll() is None:
                keeper.kill()
            keeper.wait()
        kill_and_wait(running_inside(self.root))
        self._directory.stop(signal.SIGKILL, timeout=10)

    # what the monitor knows

    def states(self) -> dict[str, tuple[str, str]]:
        """Each node's reported and assigned state, as the monitor has them."""
        rows = self._monitor_query("SELECT nodename, reportedstate::text, goalstate::text FROM pgautofailover.node")
        return {name: (reported, goal) for name, reported, goal in rows}

    def primary(self) -> str | None:
        """The node the monitor lets take writes, if one."""
        return next((name for name, (_, goal) in self.states().items() if goal in _WRITABLE), None)

    def kill_node(self, name: str) -> None:
        """SIGKILL node ``name``: its keeper, its postmaster and every backend, as when its machine dies."""
        kill_and_wait(running_inside(self.root / name))

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in self.ports:
            path = self.root / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def _monitor_query(self, query: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.node_dsn("monitor", "pg_auto_failover"), autocommit=True, connect_timeout=2) as conn:
            cursor = conn.execute(query)
            return cursor.fetchall() if cursor.description is not None else []

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_auto_failover: no {what} within {timeout:g}s\n{self.log_tail()}")
            time.sleep(0.05)


class AutoFailover:
    """The fault: the node the monitor calls primary dies; ``recover`` waits for the one pg_auto_failover promotes."""

    def __init__(self, formation: Formation, dbname: str, timeout: float = 60.0) -> None:
        self.formation = formation
        self.dbname = dbname
        self.timeout = timeout
        self.killed: str | None = None
        self.killed_at = 0.0

    def inject(self) -> None:
        self.killed = self.formation.primary()
        assert self.killed is not None, self.formation.states()
        self.killed_at = time.monotonic()
        self.formation.kill_node(self.killed)

    def recover(self) -> float:
        """The seconds from the kill to the first commit on the new primary, through the formation's DSN."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with psycopg.connect(self.formation.dsn(self.dbname), autocommit=True) as conn:
                    conn.execute("SELECT pg_catalog.txid_current()")
                return time.monotonic() - self.killed_at
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no primary took a write {self.timeout:g}s after {self.killed} died: {error}\n"
                        f"{self.formation.states()}\n{self.formation.log_tail()}"
                    ) from None
                time.sleep(0.02)
