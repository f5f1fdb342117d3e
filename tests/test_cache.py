"""--exai-reuse: a cluster with the template kept between runs, rebuilt when anything that shapes it changes."""

import json
import shutil
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from pytest_exai_sessions.schema import load_migrations, migrations_dir
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.cache import CACHE_PREFIX, ClusterCache, cache_key, cached_template_name
from pytest_exai_sessions.testing.databases import TestDatabases
from pytest_exai_sessions.testing.template_schema import ResolvedSchema

# The instant the caches below are built as of: the cache is keyed by its month, so a
# fixed one keeps these tests independent of the day they run on.
AS_OF = datetime(2027, 1, 10, tzinfo=UTC)


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
    arguments = ["-p", "no:cacheprovider", "--exai-reuse", f"--exai-pg-basedir={basedir}", "--exai-clock=2027-01-10"]

    # Two xdist workers race to build the cache: the lock lets one build and both use it.
    pytester.makepyfile(test_second=INNER_TEST)
    pytester.runpytest_subprocess(*arguments, "-n", "2", "-p", "xdist").assert_outcomes(passed=2)
    (cache,) = caches(basedir)
    ready = (cache / "ready.json").stat()
    (template,) = json.loads((cache / "ready.json").read_text())["templates"]
    assert template.startswith("exai_tpl_")

    pytester.runpytest_subprocess(*arguments).assert_outcomes(passed=2)

    assert caches(basedir) == [cache]
    assert (cache / "ready.json").stat().st_ino == ready.st_ino  # used, not rebuilt
    assert clusters(basedir) == []  # every run worked on a copy and removed it


@pytest.fixture
def make_server(basedir):
    bindir, os_user = find_bindir(), server_os_user(None)
    return lambda: TemporaryPostgres(bindir, basedir=basedir, os_user=os_user)


def schema_of(migrations):
    return ResolvedSchema(tuple(migrations), ())


def cache_of(basedir, schema):
    return ClusterCache(basedir, [schema.key], as_of=AS_OF)


def build_with(schema):
    def build(server):
        databases = TestDatabases(server, template=cached_template_name(schema.key), schema=schema)
        databases.create_template()
        databases.close()

    return build


def tables(server, schema):
    with psycopg.connect(server.dsn(cached_template_name(schema.key))) as conn:
        return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_changed_migration_rebuilds_the_cache(make_server, basedir, tmp_path):
    schema = schema_of(load_migrations())
    server = cache_of(basedir, schema).start(make_server, build_with(schema))
    server.stop()
    (old,) = caches(basedir)

    changed = tmp_path / "sql"
    shutil.copytree(Path(str(migrations_dir())), changed)
    (changed / "900_audit.sql").write_text("CREATE TABLE IF NOT EXISTS public.audit (id int);")
    schema = schema_of(load_migrations(changed))
    server = cache_of(basedir, schema).start(make_server, build_with(schema))
    try:
        assert "audit" in tables(server, schema)
    finally:
        server.stop()
    (new,) = caches(basedir)
    assert new != old


@pytest.mark.parametrize("damage", ["no ready marker", "marker of another key", "data directory gone"])
def test_an_incomplete_or_broken_cache_is_rebuilt_not_used(make_server, basedir, damage):
    schema = schema_of(load_migrations())
    cache = cache_of(basedir, schema)
    cache.start(make_server, build_with(schema)).stop()
    (directory,) = caches(basedir)
    if damage == "no ready marker":
        (directory / "ready.json").unlink()
    elif damage == "marker of another key":
        (directory / "ready.json").write_text(json.dumps({"key": "something-else"}))
    else:
        shutil.rmtree(directory / "data")

    server = cache.start(make_server, build_with(schema))
    try:
        assert "sessions" in tables(server, schema)
    finally:
        server.stop()
    (rebuilt,) = caches(basedir)
    assert json.loads((rebuilt / "ready.json").read_text())["templates"] == [cached_template_name(schema.key)]


# the months: the template's partitions are those of the months around the instant it was built as of


def test_the_key_changes_with_the_month_and_only_with_it(make_server):
    server, templates = make_server(), [schema_of(load_migrations()).key]

    def key(*when):
        return cache_key(server, templates, datetime(*when, tzinfo=UTC))

    assert key(2027, 1, 1) == key(2027, 1, 31, 23, 59, 59, 999999)
    assert key(2027, 1, 31, 23, 59, 59, 999999) != key(2027, 2, 1)
    assert key(2027, 12, 15) != key(2028, 12, 15)


CLOCK_TEST = textwrap.dedent(
    """
    import json
    import os

    import psycopg

    def test_an_event_lands_in_the_partition_of_its_month(exai_dsn, exai_db_clock):
        with psycopg.connect(exai_dsn, autocommit=True) as conn:
            now, partition = conn.execute(
                "INSERT INTO unified.event_metric_events (event_type, event_category, source_system)"
                " VALUES ('tick', 'clock', 'tests') RETURNING unified.clock_now(), tableoid::regclass::text"
            ).fetchone()
        with open(os.environ["EXAI_FACTS"], "a") as facts:
            facts.write(json.dumps({"now": now.isoformat(), "partition": partition}) + "\\n")
    """
)


def test_a_cached_template_follows_the_clock_into_a_later_month(pytester, basedir, tmp_path, monkeypatch):
    """Run in January, again in January, then in June: the cache is used, then rebuilt for June."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(CLOCK_TEST)
    facts = tmp_path / "facts.jsonl"
    monkeypatch.setenv("EXAI_FACTS", str(facts))

    def run(clock):
        pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--exai-reuse", f"--exai-pg-basedir={basedir}", f"--exai-clock={clock}"
        ).assert_outcomes(passed=1)
        (cache,) = caches(basedir)
        seen = json.loads(facts.read_text().splitlines()[-1])
        return cache, (cache / "ready.json").stat().st_ino, seen

    january, january_marker, first = run("2027-01-10T08:00:00Z")
    same, same_marker, second = run("2027-01-20T08:00:00Z")
    june, _, third = run("2027-06-15T08:00:00Z")

    assert first == {"now": "2027-01-10T08:00:00+00:00", "partition": "unified.event_metric_events_y2027m01"}
    # The same month: the cache is used as it is, and the clock is this run's.
    assert (same, same_marker) == (january, january_marker)
    assert second == {"now": "2027-01-20T08:00:00+00:00", "partition": "unified.event_metric_events_y2027m01"}
    # Months later: built again, with June's partitions; the January cache is gone.
    assert june != january
    assert third == {"now": "2027-06-15T08:00:00+00:00", "partition": "unified.event_metric_events_y2027m06"}
    assert clusters(basedir) == []
