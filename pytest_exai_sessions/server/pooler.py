"""A throwaway PgBouncer in front of a server: production's pooler, in a test run.

Run as the server is, a ``ChildServer`` (process.py): this process's own child (killed by the
kernel if we die), as the server's OS user when we are root (PgBouncer, like PostgreSQL,
refuses to run as root), in a private directory of its own that holds its configuration, log
and socket, and that ``sweep_stale_clusters`` removes after a crash of the run that made it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Literal, Self

import psycopg

from ..errors import ExaiSessionsError
from .cluster import default_basedir
from .connection import PostgresServer, make_dsn
from .private_directory import CLUSTER_PREFIX
from .process import PORT_ATTEMPTS, TCP_PORT_RANGE, ChildServer, OsUser, Startable

PoolMode = Literal["transaction", "session"]
POOL_MODES: tuple[PoolMode, ...] = ("transaction", "session")
# Where Debian, Homebrew and source builds put the binary, when it is not on PATH (sbin often is not).
_SEARCHED = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin", "/usr/bin")
_UNIX_SOCKET_PORT = 6432  # PgBouncer's usual port; here it only names the socket file
_SHUTDOWN_TIMEOUT = 30.0  # seconds a signal has to end PgBouncer before SIGKILL
# Names the binary to use (a path, or a command on PATH) instead of searching for one.
PGBOUNCER_ENV = "EXAI_SESSIONS_PGBOUNCER"
INSTALL_HINT = (
    "install PgBouncer (Debian/Ubuntu: apt-get install pgbouncer; Fedora: dnf install pgbouncer; "
    f"macOS: brew install pgbouncer) or put its directory on PATH, or name its binary in {PGBOUNCER_ENV}"
)


class PoolerNotFound(ExaiSessionsError):
    """No ``pgbouncer`` binary; the message says how to install one."""


class PoolerStartError(ExaiSessionsError):
    """PgBouncer exited or did not accept connections; the message carries its log."""


def find_pgbouncer() -> Path:
    """The ``pgbouncer`` binary: the one ``$EXAI_SESSIONS_PGBOUNCER`` names (a path, or a command on PATH),
    else the first on PATH or in the usual system directories; ``PoolerNotFound`` when there is none."""
    chosen = os.environ.get(PGBOUNCER_ENV, "").strip()
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise PoolerNotFound(
                f"no pgbouncer binary: {PGBOUNCER_ENV}={chosen!r} is neither an executable file nor a command "
                f"on PATH; {INSTALL_HINT}"
            )
        return Path(found)
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path=os.pathsep.join(_SEARCHED))
    if found is None:
        raise PoolerNotFound(f"no pgbouncer binary on PATH nor in {', '.join(_SEARCHED)}: {INSTALL_HINT}")
    return Path(found)


def pgbouncer_version(binary: Path) -> str:
    """The version ``binary --version`` reports (``1.18.0``), or ``unknown``; starts no pooler."""
    try:
        output = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = output.splitlines()[0] if output.strip() else ""
    return first.removeprefix("PgBouncer").strip() or "unknown"


class PgBouncer(Startable):
    """PgBouncer in ``mode`` in front of ``server``; ``dsn(dbname)`` goes through it.

    Every database of the server is reachable through it under its own name, as the
    server's user (and ``users``), with the server's own authentication behind it.
    """

    def __init__(
        self,
        server: PostgresServer,
        *,
        mode: PoolMode = "transaction",
        binary: Path | None = None,
        os_user: OsUser | None = None,
        basedir: Path | None = None,
        listen_tcp: bool = False,
        users: tuple[str, ...] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        if mode not in POOL_MODES:
            raise ValueError(f"pool mode must be one of {', '.join(POOL_MODES)}, got {mode!r}")
        self.server = server
        self.mode = mode
        self.binary = binary or find_pgbouncer()
        self.os_user = os_user
        self.basedir = basedir or default_basedir()
        self.listen_tcp = listen_tcp
        self.users = tuple(dict.fromkeys((server.user, *users)))
        self.startup_timeout = startup_timeout
        self.port = _UNIX_SOCKET_PORT
        self._child = ChildServer("pooler", log_name="pgbouncer.log", os_user=os_user, failure=PoolerStartError)

    # where things are

    @property
    def root(self) -> Path | None:
        """The pooler's private directory, while it is started."""
        return self._child.root

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.listen_tcp else str(self._child.directory)

    @property
    def user(self) -> str:
        return self.server.user

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    def dsn(self, dbname: str | None = None) -> str:
        """The DSN of database ``dbname`` (default: the server's maintenance one) through the pooler."""
        return make_dsn(
            host=self.host, port=self.port, user=self.server.user, dbname=dbname or self.server.dbname,
            password=self.server.password,
        )  # fmt: skip

    # lifecycle

    def start(self) -> Self:
        """Write the configuration, start PgBouncer and wait until a query goes through it."""
        try:
            self._child.create_directory(self.basedir, prefix=f"{CLUSTER_PREFIX}pooler-")
            self._write_auth_file()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_auth_file(self) -> None:
        # auth_type trust still looks every user up here; the password is what PgBouncer
        # gives the server when the server asks for one (an external server).
        password = self.server.password or ""
        lines = [f"{_quoted(user)} {_quoted(password if user == self.server.user else '')}\n" for user in self.users]
        self._write("users.txt", "".join(lines))

    def _config(self) -> str:
        root = self._child.directory
        server = self.server
        target = f"host={server.host} port={server.port}"
        return "\n".join([
            "[databases]",
            # Any database name the client asks for, on the server, under that name.
            f"* = {target}",
            "[pgbouncer]",
            f"pool_mode = {self.mode}",
            f"listen_addr = {'127.0.0.1' if self.listen_tcp else ''}",
            f"listen_port = {self.port}",
            f"unix_socket_dir = {root}",
            "auth_type = trust",
            # SHOW POOLS, SHOW CLIENTS ... in the console, database pgbouncer, as the server's user.
            f"admin_users = {server.user}",
            f"auth_file = {root / 'users.txt'}",
            # Any other role of the server too, looked up in pg_shadow as the server's user.
            f"auth_user = {server.user}",
            f"logfile = {root / 'pgbouncer.log'}",
            f"pidfile = {root / 'pgbouncer.pid'}",
            # Many test databases, each a pool of its own; the server allows 200 connections.
            "max_client_conn = 1000",
            # Session mode holds a server connection per client: enough for a test's many pools.
            f"default_pool_size = {20 if self.mode == 'transaction' else 100}",
            "max_db_connections = 100",
            # After a server restart, retry its login soon rather than after the default 15 s.
            "server_login_retry = 0.5",
            # A pool of a dropped test database holds nothing for long.
            "server_idle_timeout = 30",
            "log_connections = 0",
            "log_disconnections = 0",
            "",
        ])  # fmt: skip

    def _launch(self) -> None:
        """Start PgBouncer on the existing directory (also after a kill), on the same port if it had one."""
        any_port = self.listen_tcp and self._child.process is None
        ports = [random.randint(*TCP_PORT_RANGE) for _ in range(PORT_ATTEMPTS)] if any_port else [self.port]
        self._child.launch(self._start_on, ports, port_taken="Address already in use")

    def _start_on(self, port: int) -> None:
        self.port = port
        self._write("pgbouncer.ini", self._config())
        self._child.spawn([str(self.binary), "-q", str(self._child.directory / "pgbouncer.ini")], output_to_log=False)
        self._wait_until_ready()

    def wait_until_ready(self, dbname: str | None = None) -> None:
        """Wait until a query on ``dbname`` (default: the maintenance database) goes through.

        After a restart of the server, PgBouncer refuses each database's clients until its
        next login to the server succeeds, retried every ``server_login_retry`` (0.5 s here).
        """
        self._wait_until_ready(dbname, starting=False)

    def _wait_until_ready(self, dbname: str | None = None, *, starting: bool = True) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._child.raise_if_exited()
            try:
                with psycopg.connect(self.dsn(dbname), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    if starting:
                        self.kill()
                    raise PoolerStartError(
                        f"pgbouncer did not pass a query on to database {dbname or self.server.dbname!r} within "
                        f"{self.startup_timeout}s ({error}):\n{self.log_tail()}"
                    ) from None
                time.sleep(0.01)

    def retarget(self, server: PostgresServer) -> None:
        """From now on connect to ``server`` (a promoted standby): the configuration is rewritten and reloaded.

        Clients stay connected to PgBouncer; their next transactions get server connections to
        the new server, as after a failover behind a pooler whose target is changed.
        """
        self.server = server
        self._write("pgbouncer.ini", self._config())
        if self.pid is not None:
            os.kill(self.pid, signal.SIGHUP)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal PgBouncer (SIGKILL by default) and reap it: every client and server connection drops."""
        self._child.kill(sig, timeout=_SHUTDOWN_TIMEOUT)

    def restart(self) -> None:
        """Kill PgBouncer and start it again on the same socket or port."""
        self.kill()
        self._launch()

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM), then remove every file."""
        self._child.stop(signal.SIGTERM, timeout=_SHUTDOWN_TIMEOUT)

    def _write(self, name: str, text: str) -> None:
        path = self._child.directory / name
        path.write_text(text)
        if self.os_user is not None:
            os.chown(path, self.os_user.uid, self.os_user.gid)
        path.chmod(0o600)

    def log_tail(self, lines: int = 30, offset: int = 0) -> str:
        return self._child.log_tail(lines, offset)

    def __repr__(self) -> str:
        return f"<PgBouncer {self.mode} mode at {self.root} pid={self.pid}>"


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'
