"""A server binary run as this process's own child, in a private directory of its own.

Not daemonised (as by pg_ctl or ``pgbouncer -d``): a daemon killed with SIGKILL stays a zombie
of PID 1 (for ever where PID 1 never reaps, as in containers) and blocks a restart. As our
child it is reaped at once, a kill-and-restart takes a fraction of a second, and on Linux the
kernel kills it when we die.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from .private_directory import lock_owner, sweep_stale_clusters
from .procfs import ProcessId, children, kill_and_wait

# The kernel hands out client ports from 32768 up; a server port there can be taken
# by any outgoing connection, so pick below it.
TCP_PORT_RANGE = (15000, 32767)
PORT_ATTEMPTS = 10  # random ports a start tries before it gives up


@dataclass(frozen=True)
class OsUser:
    """The unprivileged user a server runs as (PostgreSQL and PgBouncer refuse to run as root)."""

    name: str
    uid: int
    gid: int


class Startable(ABC):
    """``with`` starts it before the block and stops it after, also when the block raises."""

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ChildServer:
    """One server binary at a time as our child, in a directory that is ours until ``stop``.

    ``create_directory`` makes the directory, ``launch`` starts the binary in it (trying the
    next port while the log says the port is taken), ``kill`` signals and reaps it, ``stop``
    does so and removes the directory. Errors are ``failure`` and carry the tail of its log.
    """

    def __init__(self, role: str, *, log_name: str, os_user: OsUser | None, failure: type[Exception]) -> None:
        """``role`` names it in errors ("the server has not been started"); ``log_name``: its log in the directory."""
        self.role = role
        self.log_name = log_name
        self.os_user = os_user
        self.failure = failure
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None  # the last one started, until stop
        self.program = ""  # the name of its binary, for errors
        self._lock_fd: int | None = None

    @property
    def directory(self) -> Path:
        if self.root is None:
            raise self.failure(f"the {self.role} has not been started")
        return self.root

    @property
    def log_path(self) -> Path:
        return self.directory / self.log_name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def create_directory(self, basedir: Path, *, prefix: str) -> Path:
        """Sweep what dead runs left in ``basedir``, then make our directory there, locked as ours."""
        sweep_stale_clusters(basedir)
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=basedir))
        self._lock_fd = lock_owner(self.root)
        if self.os_user is not None:
            # Only the directory we just created changes owner, nothing above it.
            os.chown(self.root, self.os_user.uid, self.os_user.gid)
        return self.root

    def run_as(self) -> dict[str, Any]:
        """subprocess options that run a command in the directory as the server's OS user."""
        options: dict[str, Any] = {"cwd": self.directory}
        if self.os_user is not None:
            options.update(user=self.os_user.uid, group=self.os_user.gid, extra_groups=[])
        return options

    def spawn(self, command: Sequence[str], *, output_to_log: bool) -> subprocess.Popen[bytes]:
        """Start ``command``; its output goes to the log, or nowhere for a program that writes its own."""
        self.program = Path(command[0]).name
        with contextlib.ExitStack() as stack:
            output: IO[bytes] | int = (
                stack.enter_context(open(self.log_path, "ab")) if output_to_log else subprocess.DEVNULL
            )
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # It only calls prctl(), which is safe between fork and exec even with threads.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
                **self.run_as(),
            )
        return self.process

    def launch(
        self,
        start_on: Callable[[int], None],
        ports: Sequence[int],
        *,
        port_taken: str,
        when_taken: Callable[[int, str], Exception] | None = None,
    ) -> int:
        """Start on the first of ``ports`` that is free; return that port.

        ``start_on(port)`` spawns the server on ``port`` and waits until it is ready, raising
        ``failure`` if it is not. While the log of the attempt says ``port_taken``, the next port
        is tried; when the last is taken, ``when_taken(port, log)`` is raised, if given.
        """
        for attempt, port in enumerate(ports, start=1):
            log_offset = self.log_size()
            try:
                start_on(port)
                return port
            except self.failure:
                log = self.log_tail(offset=log_offset)
                if port_taken in log and attempt < len(ports):
                    continue
                if port_taken in log and when_taken is not None:
                    raise when_taken(port, log) from None
                raise
        raise ValueError("no port to start on")

    def raise_if_exited(self) -> None:
        """While it starts: raise ``failure``, with the log's tail, if it has exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise self.failure(
                f"{self.program} exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
            )

    def kill(self, sig: int = signal.SIGKILL, *, timeout: float, with_children: bool = False) -> None:
        """Send ``sig`` and reap the process (SIGKILLed after ``timeout`` seconds); the directory stays.

        ``with_children``: with SIGKILL, its children are killed too; a parent's death alone
        does not end them.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        orphans: list[ProcessId] = []
        if with_children and sig == signal.SIGKILL:
            # Stopped first, so that it forks none between the listing and the kill.
            process.send_signal(signal.SIGSTOP)
            orphans = children(process.pid)
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        kill_and_wait(orphans)

    def stop(self, sig: int, *, timeout: float) -> None:
        """Shut the process down with ``sig`` (see ``kill``), then remove the directory and let go of its lock."""
        try:
            self.kill(sig, timeout=timeout)
        finally:
            self.process = None
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 30, offset: int = 0) -> str:
        """The last ``lines`` lines of the log from byte ``offset`` on, for error messages."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except (OSError, self.failure):
            return f"(no {Path(self.log_name).stem} log)"
        return "\n".join(text.splitlines()[-lines:])


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec, after the switch of user (a switch would
    # reset it): if we die, the kernel kills the server instead of orphaning it.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
