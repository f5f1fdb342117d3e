"""--exai-reuse: a cluster with the template kept between runs, rebuilt when anything that shapes it changes."""

import json
import shutil
import textwrap
from pathlib import Path

import psycopg
import pytest

from pytest_exai_sessions.databases import TestDatabases
from pytest_exai_sessions.schema import load_migrations, migrations_dir
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.cache import CACHE_PREFIX, CACHED_PREFIX, CACHED_TEMPLATE, ClusterCache


def caches(basedir):
    return sorted(p for p in basedir.glob(f"{CACHE_PREFIX}*") if p.is_dir())


def clusters(basedir):
    return sorted(basedir.glob("exai-pg-*"))


INNER_TEST = textwrap.dedent(
    """
    import psycopg
    import pytest

    @pytest.mark.asyncio
    async def test_the_schema_is_there(session_manager, exai_dsn):
        await session_manager.ensure("a")
        with psycopg.connect(exai_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (1,)
    """
)


def test_a_second_run_starts_from_the_cache(pytester, basedir):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(INNER_TEST)
    arguments = ["-p", "no:cacheprovider", "--exai-reuse", f"--exai-pg-basedir={basedir}"]

    # Two xdist workers race to build the cache: the lock lets one build and both use it.
    pytester.makepyfile(test_second=INNER_TEST)
    pytester.runpytest_subprocess(*arguments, "-n", "2", "-p", "xdist").assert_outcomes(passed=2)
    (cache,) = caches(basedir)
    ready = (cache / "ready.json").stat()
    assert json.loads((cache / "ready.json").read_text())["template"] == CACHED_TEMPLATE

    pytester.runpytest_subprocess(*arguments).assert_outcomes(passed=2)

    assert caches(basedir) == [cache]
    assert (cache / "ready.json").stat().st_ino == ready.st_ino  # used, not rebuilt
    assert clusters(basedir) == []  # every run worked on a copy and removed it


@pytest.fixture
def make_server(basedir):
    bindir, os_user = find_bindir(), server_os_user(None)
    return lambda: TemporaryPostgres(bindir, basedir=basedir, os_user=os_user)


def build_with(migrations):
    def build(server):
        TestDatabases(server, prefix=CACHED_PREFIX).create_template(migrations)

    return build


def tables(server):
    with psycopg.connect(server.dsn(CACHED_TEMPLATE)) as conn:
        return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_changed_migration_rebuilds_the_cache(make_server, basedir, tmp_path):
    first = ClusterCache(basedir, load_migrations())
    server = first.start(make_server, build_with(load_migrations()))
    server.stop()
    (old,) = caches(basedir)

    changed = tmp_path / "sql"
    shutil.copytree(Path(str(migrations_dir())), changed)
    (changed / "900_audit.sql").write_text("CREATE TABLE IF NOT EXISTS public.audit (id int);")
    migrations = load_migrations(changed)
    server = ClusterCache(basedir, migrations).start(make_server, build_with(migrations))
    try:
        assert "audit" in tables(server)
    finally:
        server.stop()
    (new,) = caches(basedir)
    assert new != old


@pytest.mark.parametrize("damage", ["no ready marker", "marker of another key", "data directory gone"])
def test_an_incomplete_or_broken_cache_is_rebuilt_not_used(make_server, basedir, damage):
    cache = ClusterCache(basedir, load_migrations())
    cache.start(make_server, build_with(None)).stop()
    (directory,) = caches(basedir)
    if damage == "no ready marker":
        (directory / "ready.json").unlink()
    elif damage == "marker of another key":
        (directory / "ready.json").write_text(json.dumps({"key": "something-else"}))
    else:
        shutil.rmtree(directory / "data")

    server = cache.start(make_server, build_with(None))
    try:
        assert "sessions" in tables(server)
    finally:
        server.stop()
    (rebuilt,) = caches(basedir)
    assert json.loads((rebuilt / "ready.json").read_text())["template"] == CACHED_TEMPLATE
