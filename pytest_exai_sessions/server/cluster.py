"""A throwaway PostgreSQL cluster whose postmaster is this process's own child.

Not pg_ctl: pg_ctl daemonises the postmaster, so after a SIGKILL it stays a zombie
of PID 1 (for ever where PID 1 never reaps, as in containers) and blocks a restart.
As our child it is reaped at once and a kill-and-restart takes a fraction of a second.
"""

from __future__ import annotations

import ctypes
import os
import pwd
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

import psycopg

from ..errors import ExaiSessionsError
from .binaries import server_version
from .connection import make_dsn

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
}
# The kernel hands out client ports from 32768 up; a server port there can be taken
# by any outgoing connection, so pick below it.
_TCP_PORT_RANGE = (15000, 32767)
_SOCKET_PATH_MAX = 107  # sun_path on Linux, minus the terminating NUL
_UNIX_SOCKET_PORT = 5432  # only names the socket file in our private directory


class ServerStartError(ExaiSessionsError):
    """initdb or the postmaster failed; the message carries the tail of the log."""


@dataclass(frozen=True)
class OsUser:
    name: str
    uid: int
    gid: int


def server_os_user(name: str | None) -> OsUser | None:
    """The unprivileged user to run PostgreSQL as, or None to run it as ourselves.

    PostgreSQL refuses to run as root, so as root we switch to ``name`` (default
    ``postgres``); as anyone else we run it as that user, unless asked otherwise.
    """
    if os.geteuid() != 0 and not name:
        return None
    wanted = name or "postgres"
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError:
        raise ServerStartError(
            f"running as root, and PostgreSQL refuses to run as root; the OS user {wanted!r} to run it "
            "as does not exist. Create an unprivileged user (e.g. `useradd --system postgres`) or set "
            "--exai-pg-os-user / the exai_pg_os_user ini option to one that exists."
        ) from None
    if entry.pw_uid == 0:
        raise ServerStartError(f"--exai-pg-os-user={wanted!r} is root; PostgreSQL needs an unprivileged user")
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise ServerStartError(f"--exai-pg-os-user={wanted!r} needs root (only root can switch users)")
    return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def default_basedir() -> Path:
    """tmpfs when there is one: initdb and CREATE DATABASE are many times faster there."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


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
    ) -> None:
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
        self.version = server_version(bindir)
        self.root: Path | None = None
        self.port = port or _UNIX_SOCKET_PORT
        self._process: subprocess.Popen[bytes] | None = None

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
        return str(self._require_root()).startswith("/dev/shm/")

    def dsn(self, dbname: str | None = None) -> str:
        return make_dsn(host=self.host, port=self.port, user=self.user, dbname=dbname or self.dbname)

    def _require_root(self) -> Path:
        if self.root is None:
            raise ServerStartError("the server has not been started")
        return self.root

    # lifecycle

    def start(self) -> Self:
        """Create the cluster and start the postmaster; wait until it accepts connections."""
        self.root = Path(tempfile.mkdtemp(prefix="exai-pg-", dir=self.basedir))
        try:
            if len(str(self.root / f".s.PGSQL.{self.port}")) > _SOCKET_PATH_MAX:
                raise ServerStartError(
                    f"socket path under {self.root} is longer than {_SOCKET_PATH_MAX} bytes; "
                    "choose a shorter --exai-pg-basedir"
                )
            if self.os_user is not None:
                # Only the directory we just created changes owner, nothing above it.
                os.chown(self.root, self.os_user.uid, self.os_user.gid)
            self._initdb()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        command = [
            str(self.bindir / "initdb"),
            "--pgdata", str(self.datadir),
            "--username", self.user,
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **self._as_server_user())
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
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                **self._as_server_user(),
            )

    def _as_server_user(self) -> dict[str, Any]:
        options: dict[str, Any] = {"cwd": self._require_root()}
        if self.os_user is not None:
            options.update(user=self.os_user.uid, group=self.os_user.gid, extra_groups=[])
        return options

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                raise ServerStartError(
                    f"postgres exited with code {self._process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerStartError(
                        f"postgres did not accept connections within {self.startup_timeout}s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.01)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the postmaster (SIGKILL by default) and reap it; the data directory stays."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

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


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec, after the switch of user (a switch would
    # reset it): if pytest dies, the kernel kills the postmaster instead of orphaning it.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
