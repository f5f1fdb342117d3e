"""A throwaway PgBouncer in front of a server: production's pooler, in a test run.

Run as the server is: this process's own child (killed by the kernel if we die), as the
server's OS user when we are root (PgBouncer, like PostgreSQL, refuses to run as root), in
a private directory of its own that holds its configuration, log and socket. The directory
carries an ``owner.lock`` like a cluster's, so ``sweep_stale_clusters`` removes it after a
crash of the run that made it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import ExaiSessionsError
from .cluster import (
    _TCP_PORT_RANGE,
    CLUSTER_PREFIX,
    OsUser,
    _die_with_parent,
    _lock_owner,
    default_basedir,
    sweep_stale_clusters,
)
from .connection import PostgresServer, make_dsn

PoolMode = Literal["transaction", "session"]
POOL_MODES: tuple[PoolMode, ...] = ("transaction", "session")
# Where Debian, Homebrew and source builds put the binary, when it is not on PATH (sbin often is not).
_SEARCHED = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin", "/usr/bin")
_UNIX_SOCKET_PORT = 6432  # PgBouncer's usual port; here it only names the socket file
# Names the binary to use (a path, or a command on PATH) instead of searching for one.
PGBOUNCER_ENV = "EXAI_SESSIONS_PGBOUNCER"
INSTALL_HINT = (
    "install PgBouncer (Debian/Ubuntu: apt-get install pgbouncer; Fedora: dnf install pgbouncer; "
    f"macOS: brew install pgbouncer) or put its directory on PATH, or name its binary in {PGBOUNCER_ENV}"
)


# The poolers this process runs, by where clients reach them: a crash helper given only a DSN
# finds the pooler behind it (and the server past it) here.
_RUNNING: dict[tuple[str, int], PgBouncer] = {}


def pooler_at(dsn: str) -> PgBouncer | None:
    """The running PgBouncer of this process that ``dsn`` connects to, or None (a direct DSN, another pooler)."""
    params = conninfo_to_dict(dsn)
    try:
        where = (str(params.get("host") or ""), int(params.get("port") or 5432))
    except ValueError:
        return None
    return _RUNNING.get(where)


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


class PgBouncer:
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
        self.root: Path | None = None
        self.port = _UNIX_SOCKET_PORT
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    # where things are

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.listen_tcp else str(self._require_root())

    @property
    def user(self) -> str:
        return self.server.user

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    @property
    def log_path(self) -> Path:
        return self._require_root() / "pgbouncer.log"

    def dsn(self, dbname: str | None = None) -> str:
        """The DSN of database ``dbname`` (default: the server's maintenance one) through the pooler."""
        return make_dsn(
            host=self.host, port=self.port, user=self.server.user, dbname=dbname or self.server.dbname,
            password=self.server.password,
        )  # fmt: skip

    def _require_root(self) -> Path:
        if self.root is None:
            raise PoolerStartError("the pooler has not been started")
        return self.root

    # lifecycle

    def start(self) -> Self:
        """Write the configuration, start PgBouncer and wait until a query goes through it."""
        sweep_stale_clusters(self.basedir)  # what crashed runs left here, also with no server of ours
        self.root = Path(tempfile.mkdtemp(prefix=f"{CLUSTER_PREFIX}pooler-", dir=self.basedir))
        try:
            self._lock_fd = _lock_owner(self.root)
            if self.os_user is not None:
                os.chown(self.root, self.os_user.uid, self.os_user.gid)
            self._write_auth_file()
            self._launch()
        except BaseException:
            self.stop()
            raise
        _RUNNING[(self.host, self.port)] = self
        return self

    def _write_auth_file(self) -> None:
        # auth_type trust still looks every user up here; the password is what PgBouncer
        # gives the server when the server asks for one (an external server).
        password = self.server.password or ""
        lines = [f"{_quoted(user)} {_quoted(password if user == self.server.user else '')}\n" for user in self.users]
        self._write("users.txt", "".join(lines))

    def _config(self) -> str:
        root = self._require_root()
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
        attempts = 10 if self.listen_tcp and self._process is None else 1
        for attempt in range(attempts):
            if self.listen_tcp and self._process is None:
                self.port = random.randint(*_TCP_PORT_RANGE)
            self._write("pgbouncer.ini", self._config())
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._process = self._spawn()
            try:
                self._wait_until_ready()
                return
            except PoolerStartError:
                if attempt + 1 < attempts and "Address already in use" in self.log_tail(offset=log_offset):
                    self._process = None
                    continue
                raise

    def _spawn(self) -> subprocess.Popen[bytes]:
        root = self._require_root()
        options: dict[str, Any] = {"cwd": root}
        if self.os_user is not None:
            options.update(user=self.os_user.uid, group=self.os_user.gid, extra_groups=[])
        return subprocess.Popen(
            [str(self.binary), "-q", str(root / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it logs to its logfile
            # It only calls prctl(), which is safe between fork and exec even with threads.
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            **options,
        )

    def wait_until_ready(self, dbname: str | None = None) -> None:
        """Wait until a query on ``dbname`` (default: the maintenance database) goes through.

        After a restart of the server, PgBouncer refuses each database's clients until its
        next login to the server succeeds, retried every ``server_login_retry`` (0.5 s here).
        """
        self._wait_until_ready(dbname, starting=False)

    def _wait_until_ready(self, dbname: str | None = None, *, starting: bool = True) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                raise PoolerStartError(
                    f"pgbouncer exited with code {self._process.returncode} while starting:\n{self.log_tail()}"
                )
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

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal PgBouncer (SIGKILL by default) and reap it: every client and server connection drops."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Kill PgBouncer and start it again on the same socket or port."""
        self.kill()
        self._launch()

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM), then remove every file."""
        try:
            self.kill(signal.SIGTERM)
        finally:
            self._process = None
            if self.root is not None:
                if _RUNNING.get((self.host, self.port)) is self:
                    del _RUNNING[(self.host, self.port)]
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _write(self, name: str, text: str) -> None:
        path = self._require_root() / name
        path.write_text(text)
        if self.os_user is not None:
            os.chown(path, self.os_user.uid, self.os_user.gid)
        path.chmod(0o600)

    def log_tail(self, lines: int = 30, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except (OSError, PoolerStartError):
            return "(no pgbouncer log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgBouncer {self.mode} mode at {self.root} pid={self.pid}>"


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'
