"""A cluster with the template database kept between pytest runs (``--exai-reuse``).

Unlike pytest-django's ``--reuse-db``, the cache is keyed by everything that shapes it:
the PostgreSQL version and binaries, the server settings and user, the key of each
template it holds (which covers the content of every migration that built it), and the
month the templates were built in (the migrations create the partitions of the months
around it). A changed migration or a new month gives a new key, so the cache is rebuilt
by itself. Each template is named after its own key (``cached_template_name``).
Each run starts from a copy, never from the cache itself, so concurrent runs and xdist
workers cannot corrupt it; building and copying happen under one file lock. A cache that
is incomplete (a build that died half-way) or does not start is removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from .cluster import ServerStartError, TemporaryPostgres

CACHE_PREFIX = "exai-cache-"
_FORMAT = 2  # bump when the layout of a cache changes


def cached_template_name(template_key: str) -> str:
    """The database a cached template of this key lives in."""
    return f"exai_tpl_{template_key}"


def cache_key(server: TemporaryPostgres, template_keys: Sequence[str], as_of: datetime) -> str:
    """``as_of``: the instant the template's schema is applied as of; its UTC month is part of the
    key, since the migrations create the partitions of the months around it."""
    parts = {
        "format": _FORMAT,
        "version": server.version,
        "bindir": str(server.bindir),
        "settings": sorted(server.settings.items()),
        "os_user": server.os_user.name if server.os_user else None,
        "superuser": server.user,
        "templates": sorted(set(template_keys)),
        "partition_month": as_of.astimezone(UTC).strftime("%Y-%m"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@contextmanager
def _locked(basedir: Path) -> Iterator[None]:
    import fcntl  # here, not at the top: the plugin loads where there is none (the cache is never used there)

    with open(basedir / f"{CACHE_PREFIX}lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ClusterCache:
    """One cached cluster per base directory; a new configuration replaces the old one."""

    def __init__(self, basedir: Path, template_keys: Sequence[str], *, as_of: datetime) -> None:
        """``template_keys``: the keys of the templates it holds; ``build_templates`` (see ``start``) builds them.

        ``as_of``: the instant the templates are built as of (the test clock's start, else now).
        """
        self.basedir = basedir
        self.template_keys = list(template_keys)
        self.as_of = as_of

    def _directory(self, key: str) -> Path:
        return self.basedir / f"{CACHE_PREFIX}{key}"

    def _is_complete(self, directory: Path, key: str) -> bool:
        try:
            ready = json.loads((directory / "ready.json").read_text())
        except (OSError, ValueError):
            return False
        return ready.get("key") == key and (directory / "data" / "PG_VERSION").is_file()

    def start(
        self, make_server: Callable[[], TemporaryPostgres], build_templates: Callable[[TemporaryPostgres], None]
    ) -> TemporaryPostgres:
        """A started server whose cluster holds every template, from the cache if it is valid.

        ``build_templates`` creates them on a fresh server, each named ``cached_template_name(key)``.
        """
        with _locked(self.basedir):
            server = make_server()
            key = cache_key(server, self.template_keys, self.as_of)
            directory = self._directory(key)
            if not self._is_complete(directory, key):
                self._rebuild(make_server, build_templates, key)
            try:
                return server.start(seed=directory / "data")
            except ServerStartError:
                # Broken in a way the marker cannot show: build it again, once.
                self._rebuild(make_server, build_templates, key)
                return make_server().start(seed=directory / "data")

    def _rebuild(
        self,
        make_server: Callable[[], TemporaryPostgres],
        build_templates: Callable[[TemporaryPostgres], None],
        key: str,
    ) -> None:
        for old in self.basedir.glob(f"{CACHE_PREFIX}*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}building-", dir=self.basedir))
        try:
            server = make_server().start()
            try:
                build_templates(server)
            except BaseException:
                server.stop()
                raise
            if server.os_user is not None:
                os.chown(building, server.os_user.uid, server.os_user.gid)  # ours: it may enter to copy
            server.stop_and_keep_data(building / "data")
            templates = [cached_template_name(k) for k in self.template_keys]
            (building / "ready.json").write_text(json.dumps({"key": key, "templates": templates}))
            building.rename(self._directory(key))  # complete or absent, never half-built
        finally:
            shutil.rmtree(building, ignore_errors=True)
