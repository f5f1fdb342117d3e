"""A PostgreSQL server whose data directory lies on a disk that can lose power.

The disk is an ext4 filesystem in an image file, mounted through a loop device. Its power is
cut with the kernel's filesystem shutdown ioctl, told not to flush the journal
(``EXT4_IOC_SHUTDOWN`` with ``EXT4_GOING_FLAGS_NOLOGFLUSH``), as xfstests simulates a crash:
what fsync or fdatasync made durable before it survives, the rest of the page cache is
dropped, and every later write fails. Mounted again, the journal replays as after a reboot.

What the kernel had already written back on its own survives too, as it would have reached a
real disk: the cut can miss a loss, never invent one. A FUSE filesystem that drops every
unsynced write (Jepsen's LazyFS) would be stricter; the ioctl needs no package and no
daemon, and is the kernel's own path for a crash.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cluster import ServerStartError, TemporaryPostgres
from .private_directory import detach_loop_devices, mounts_inside, unmount
from .process import OsUser
from .procfs import freeze, kill_and_wait

# _IOR('X', 125, __u32): EXT4_IOC_SHUTDOWN, the same number as XFS_IOC_GOINGDOWN.
_SHUTDOWN_IOCTL = 0x8004587D
_NO_LOG_FLUSH = 2  # EXT4_GOING_FLAGS_NOLOGFLUSH: journal commits not yet on disk are lost too
# Sparse: the image holds only what was written. A cluster, a template and the WAL between
# checkpoints take a few hundred MB at most.
IMAGE_BYTES = 2 << 30
_TOOLS = ("mkfs.ext4", "losetup", "mount", "umount")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

# What production runs: every commit flushed before it is acknowledged, torn pages repaired
# from the WAL. The temporary server's test settings (cluster.DEFAULT_SETTINGS) turn these off.
PRODUCTION_DURABILITY: Mapping[str, str] = {
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "wal_level": "replica",
    "max_wal_senders": "10",
}


def power_loss_unsupported() -> str | None:
    """Why no disk can lose power here (what is missing, and what would do), or None when one can."""
    if sys.platform != "linux":
        return f"power loss needs Linux (a loop device and ext4's shutdown ioctl); this is {sys.platform}"
    if os.geteuid() != 0:
        return f"power loss needs root, to mount a loop device; this run's uid is {os.geteuid()}"
    if not Path("/dev/loop-control").exists():
        return "power loss needs loop devices, and /dev/loop-control is missing (a container needs --privileged)"
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=_SBIN_PATH) is None]
    if missing:
        return f"power loss needs {', '.join(missing)} (Debian packages e2fsprogs and mount)"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "ext4" not in filesystems.split():
        return "power loss needs the kernel's ext4 filesystem, which /proc/filesystems does not list"
    return None


class PowerLossDisk:
    """An ext4 image in ``directory``, mounted at ``directory/disk``, whose power can be cut."""

    def __init__(self, directory: Path, owner: OsUser | None) -> None:
        self.image = directory / "disk.img"
        self.mount_point = directory / "disk"
        self.owner = owner
        self.device: str | None = None  # the loop device while mounted

    def create(self) -> None:
        with open(self.image, "wb") as image:
            image.truncate(IMAGE_BYTES)
        owner = f"{self.owner.uid}:{self.owner.gid}" if self.owner is not None else f"{os.getuid()}:{os.getgid()}"
        self._run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", f"root_owner={owner}", str(self.image))
        self.mount_point.mkdir()
        self.mount()

    def mount(self) -> None:
        """Mount the image through a loop device of its own, attached now.

        Never ``mount -o loop``: it reuses a loop device still bound to the image, and one
        is bound after the unmount while a mount namespace made meanwhile (``unshare -m``,
        as the examples' run without a system PostgreSQL does) still holds the old mount:
        the new mount would then be the old, shut-down filesystem.
        """
        self.device = self._run("losetup", "--find", "--show", str(self.image)).strip()
        try:
            self._run("mount", "-t", "ext4", self.device, str(self.mount_point))
        except ServerStartError:
            detach_loop_devices([self.device])
            raise

    @property
    def mounted(self) -> bool:
        # From the mount table, not a stat of the mount point: the filesystem may be shut down.
        return Path(os.path.realpath(self.mount_point)) in mounts_inside(self.mount_point.parent)

    def sync(self) -> None:
        """Make everything written so far durable (syncfs of this filesystem only)."""
        fd = os.open(self.mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs {self.mount_point}")
        finally:
            os.close(fd)

    def cut(self) -> None:
        """The power goes: nothing not yet durable reaches the disk, and every later write fails."""
        import fcntl  # POSIX only: this module loads everywhere, as the plugin does

        fd = os.open(self.mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, _SHUTDOWN_IOCTL, struct.pack("I", _NO_LOG_FLUSH))
        finally:
            os.close(fd)

    def unmount(self) -> None:
        if self.mounted:
            unmount(self.mount_point)
        if self.device is not None:
            detach_loop_devices([self.device])  # deferred by the kernel while another namespace holds it
            self.device = None

    def _run(self, tool: str, *arguments: str) -> str:
        binary = shutil.which(tool, path=_SBIN_PATH) or tool
        result = subprocess.run([binary, *arguments], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise ServerStartError(f"{tool} {' '.join(arguments)} failed (exit {result.returncode}): {output}")
        return result.stdout


class PowerLossPostgres(TemporaryPostgres):
    """A ``TemporaryPostgres`` with its data on a ``PowerLossDisk``: ``cut_power()`` drops what is not durable.

    It runs with ``PRODUCTION_DURABILITY``, then ``settings`` over them. Its log, socket and
    lock file stay on the private directory beside the disk, so the log outlives a cut.
    """

    def __init__(self, bindir: Path, *, settings: Mapping[str, str] | None = None, **options: Any) -> None:
        reason = power_loss_unsupported()
        if reason is not None:
            raise ServerStartError(reason)
        super().__init__(bindir, settings={**PRODUCTION_DURABILITY, **(settings or {})}, **options)
        self.disk: PowerLossDisk | None = None
        self.cut_at: float | None = None  # time.monotonic() of the last cut

    @property
    def datadir(self) -> Path:
        return self._child.directory / "disk" / "data"

    def _create_cluster(self, seed: Path | None) -> None:
        self.disk = PowerLossDisk(self._child.directory, self.os_user)
        self.disk.create()
        super()._create_cluster(seed)
        # initdb --no-sync and the initdb cache's copy leave it in the page cache: a cut
        # before the first checkpoint would take the cluster itself.
        self.disk.sync()

    def sync(self) -> None:
        """Make all the server wrote so far durable, whatever its settings (after building a template)."""
        assert self.disk is not None
        self.disk.sync()

    def cut_power(self) -> None:
        """Freeze the server, cut the disk's power, kill the server and every process of it.

        Frozen first, so that no process of it runs after the cut: a backend left alive could
        make a write durable, or acknowledge one, after the power went.
        """
        pid = self.pid
        if pid is None or self.disk is None:
            raise ServerStartError("the power-loss server is not running: there is no power to cut")
        frozen = freeze(pid)
        self.disk.cut()
        self.cut_at = time.monotonic()
        self.kill()
        kill_and_wait(frozen)

    def power_on(self) -> None:
        """Mount the disk again, as a reboot would (the journal replays), and start PostgreSQL on what is left."""
        assert self.disk is not None
        self.kill()
        self.disk.unmount()
        self.disk.mount()
        lock_file = self.datadir / "postmaster.pid"
        # Created before the cut but never synced (fsync=off): empty, and PostgreSQL refuses to start.
        if lock_file.exists() and lock_file.stat().st_size == 0:
            lock_file.unlink()
        self._launch()

    def stop(self) -> None:
        try:
            self.kill(signal.SIGKILL)  # nothing on this disk outlives the test: no shutdown checkpoint
            if self.disk is not None:
                self.disk.unmount()
        finally:
            super().stop()

    def __repr__(self) -> str:
        return f"<PowerLossPostgres {self.version} at {self.root} pid={self.pid}>"
