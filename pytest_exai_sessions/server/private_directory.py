"""The private directories the servers run in, and the sweep of those whose owner died.

Each directory holds ``owner.lock``, locked (``flock``) by the process that created it for as
long as it lives. A directory whose lock can be taken belongs to a process that died without
cleaning up (a killed pytest or xdist worker): ``sweep_stale_clusters`` removes those, and only
those of our own user, before each start and at the end of each run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .procfs import kill_and_wait, running_inside

CLUSTER_PREFIX = "exai-pg-"
OWNER_LOCK = "owner.lock"


def lock_owner(root: Path) -> int:
    """Create ``root/owner.lock`` already locked by this process; return its descriptor.

    Locked under a temporary name, then renamed: a sweeper never sees it unlocked.
    """
    import fcntl

    temporary = root / f".{OWNER_LOCK}.{os.getpid()}"
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(temporary, root / OWNER_LOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def mounts_inside(root: Path) -> list[Path]:
    """The mount points inside ``root`` (a power-loss disk), deepest first; none where /proc cannot tell."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    prefix = os.path.realpath(root) + "/"
    # Field 5 is the mount point, with spaces and the like escaped as octal (\040).
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines if len(line.split()) > 4]
    return sorted((Path(p) for p in points if p.startswith(prefix)), key=lambda p: len(p.parts), reverse=True)


def unmount(mount_point: Path) -> None:
    """Unmount it; lazily if something still holds it, so that no mount outlives its directory."""
    umount = _tool("umount")
    for command in ([umount, str(mount_point)], [umount, "--lazy", str(mount_point)]):
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode == 0:
            return
    raise OSError(f"cannot unmount {mount_point}: {(result.stdout + result.stderr).strip()}")


def loop_devices_inside(root: Path) -> list[str]:
    """The loop devices (``/dev/loopN``) whose backing file lies inside ``root``."""
    prefix = os.path.realpath(root) + "/"
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().startswith(prefix):
                found.append(f"/dev/{backing.parent.parent.name}")
        except OSError:  # detached meanwhile
            continue
    return found


def detach_loop_devices(devices: list[str]) -> None:
    """Detach them; the kernel defers it for one still in use (a mount in another namespace)."""
    for device in devices:
        result = subprocess.run([_tool("losetup"), "--detach", device], capture_output=True, text=True)
        if result.returncode != 0 and "No such device" not in result.stderr:
            raise OSError(f"cannot detach {device}: {(result.stdout + result.stderr).strip()}")


def _tool(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) or name


def _postmaster_running_in(root: Path) -> bool:
    """A postmaster whose command line names this directory still runs (a zombie names none)."""
    try:
        pid = int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except (OSError, ValueError):
        return False
    return str(root) in cmdline


def sweep_stale_clusters(basedir: Path) -> list[Path]:
    """Remove the cluster and pooler directories in ``basedir`` whose creator died; return them.

    A directory is removed only when all of these hold: its name has the cluster prefix, it
    holds an ``owner.lock`` file of our own user, nobody holds that lock (the kernel drops
    it when its process dies, however it died), and no postmaster runs in it. Directories of
    other users, of live runs, and those without a lock file are never touched.

    Before a directory goes, the processes still running inside it (by working directory or
    a path on their command line) are killed, and waited for, and what is mounted in it (a
    power-loss disk) is unmounted and its loop device detached.
    """
    removed: list[Path] = []
    try:
        import fcntl
    except ImportError:  # not POSIX: no temporary server ever ran here
        return removed

    try:
        entries = list(basedir.glob(CLUSTER_PREFIX + "*"))
    except OSError:
        return removed
    for root in entries:
        lock_path = root / OWNER_LOCK
        try:
            if not root.is_dir() or root.is_symlink():
                continue
            info = lock_path.lstat()
            if info.st_uid != os.geteuid() or not lock_path.is_file():
                continue
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            if _postmaster_running_in(root):
                continue
            # A backend its test had stopped (SIGSTOP) never notices its postmaster's death:
            # left alone, it would outlive the directory for ever.
            kill_and_wait(running_inside(root))
            try:
                for mount_point in mounts_inside(root):
                    unmount(mount_point)
                detach_loop_devices(loop_devices_inside(root))
            except OSError:
                continue  # never rmtree into a mounted disk
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed
