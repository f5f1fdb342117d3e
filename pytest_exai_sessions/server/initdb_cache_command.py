"""``python -m pytest_exai_sessions.server.initdb_cache_command [--dir DIR] [--clear]``: the initdb cache's entries.

Not an ``exai-sessions`` subcommand: that CLI belongs to the production core, which knows
nothing of test servers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ExaiSessionsError
from .cluster import default_basedir
from .initdb_cache import BASEDIR_ENV, INITDB_CACHE_DIR_ENV, InitdbCache, default_cache_dir, describe_entry


def main(argv: list[str] | None = None) -> int:
    """List the cache's entries, or remove them (``--clear``); 0 when done, 1 on an unusable directory."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_exai_sessions.server.initdb_cache_command",
        description="List the test servers' initdb cache, or --clear it.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"the cache directory [env {INITDB_CACHE_DIR_ENV}] (default: exai-initdb-cache-<uid> in the base "
        f"directory: {BASEDIR_ENV}, else /dev/shm with 1 GiB free, else the temp dir)",
    )
    parser.add_argument("--clear", action="store_true", help="remove every entry and the directory")
    args = parser.parse_args(argv)
    directory = args.dir or (Path(os.environ[INITDB_CACHE_DIR_ENV]) if os.environ.get(INITDB_CACHE_DIR_ENV) else None)
    if directory is None:
        basedir = Path(os.environ[BASEDIR_ENV]) if os.environ.get(BASEDIR_ENV) else default_basedir()
        directory = default_cache_dir(basedir)
    cache = InitdbCache(directory)
    try:
        if args.clear:
            print(f"removed {cache.clear()} entries and {directory}")
            return 0
        entries = cache.entries()
    except ExaiSessionsError as error:
        print(f"initdb cache: {error}", file=sys.stderr)
        return 1
    print(f"{directory}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for entry in entries:
        print(describe_entry(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
