"""What Linux /proc tells of processes (whose child each is, where each runs), and ending them.

A process is named by its pid and its start time together: a pid alone may pass to another
process between a look and a kill. Where there is no /proc (not Linux), nothing is found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple


class ProcessId(NamedTuple):
    pid: int
    start: int  # clock ticks after boot: with the pid, it names one process for good


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process; None when it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def identify(pid: int) -> ProcessId | None:
    stat = _stat(pid)
    return ProcessId(pid, stat[1]) if stat is not None else None


def is_running(process: ProcessId) -> bool:
    """Still that same process, and no zombie (a zombie holds no memory, file or port)."""
    stat = _stat(process.pid)
    return stat is not None and stat[1] == process.start and stat[2] != "Z"


def children(pid: int) -> list[ProcessId]:
    return [ProcessId(child, stat[1]) for child in _pids() if (stat := _stat(child)) is not None and stat[0] == pid]


def _self_and_ancestors() -> set[int]:
    found: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        stat = _stat(pid)
        pid = stat[0] if stat is not None else 0
    return found


def _working_directory(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, a zombie, or another user's
        return ""


def _arguments(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def running_inside(directory: Path) -> list[ProcessId]:
    """The processes whose working directory, or a path on whose command line, lies inside ``directory``.

    A path on the command line counts alone or as the value of ``option=path``. This process
    and its ancestors are never among them.
    """
    names = {str(directory), os.path.realpath(directory)}  # the kernel shows the working directory resolved

    def inside(path: str) -> bool:
        return any(path == name or path.startswith(name + "/") for name in names)

    spared = _self_and_ancestors()
    found: list[ProcessId] = []
    for pid in _pids():
        if pid in spared or (before := identify(pid)) is None:
            continue
        places = [_working_directory(pid)]
        for argument in _arguments(pid):
            places += [argument, argument.partition("=")[2]]
        # Looked at again: what was read belongs to the same process, not to one that took its pid meanwhile.
        if any(inside(place) for place in places) and identify(pid) == before:
            found.append(before)
    return found


def _kill(process: ProcessId) -> None:
    """SIGKILL the process if it still is that one."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here (kernel before 5.3): the start time check alone
        if is_running(process):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signal.SIGKILL)
        return
    try:
        # The pidfd holds on to the process it was opened on: once checked, no other can be hit.
        if is_running(process):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def freeze(pid: int, timeout: float = 10.0) -> list[ProcessId]:
    """SIGSTOP ``pid`` and then its children; return once every one of them is stopped (or gone).

    The parent first, and its children listed only once it is stopped: it forks none in
    between. Returns the children, to be killed or continued by the caller.
    """
    parent = identify(pid)
    if parent is None:
        return []
    _signal(parent, signal.SIGSTOP)
    _wait_until_stopped([parent], timeout)
    found = children(pid)
    for child in found:
        _signal(child, signal.SIGSTOP)
    _wait_until_stopped(found, timeout)
    return found


def _signal(process: ProcessId, sig: int) -> None:
    if is_running(process):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, sig)


def _wait_until_stopped(processes: list[ProcessId], timeout: float) -> None:
    # kill() returns before the signal is delivered: "T" in /proc says it was.
    deadline = time.monotonic() + timeout
    while any((stat := _stat(p.pid)) is not None and stat[1] == p.start and stat[2] not in "TtZX" for p in processes):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {[p.pid for p in processes]} did not stop within {timeout:g}s")
        time.sleep(0.0005)


def kill_and_wait(processes: Iterable[ProcessId], timeout: float = 10.0) -> list[ProcessId]:
    """SIGKILL each process that is still that same one (a stopped one dies too); wait until all are gone.

    Returns those still running after ``timeout`` seconds.
    """
    processes = list(processes)
    for process in processes:
        _kill(process)
    deadline = time.monotonic() + timeout
    while (left := [p for p in processes if is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return left


def stop_processes(processes: Iterable[ProcessId], timeout: float = 10.0) -> None:
    """SIGSTOP each process that is still that same one; return once all are stopped (or gone)."""
    processes = list(processes)
    for process in processes:
        _signal(process, signal.SIGSTOP)
    _wait_until_stopped(processes, timeout)


def continue_processes(processes: Iterable[ProcessId]) -> None:
    """SIGCONT each process that is still that same one."""
    for process in processes:
        _signal(process, signal.SIGCONT)
