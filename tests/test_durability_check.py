"""exai-sessions check: the settings under which an acknowledged write can be lost, as the store's connections see them.

The verdicts first, on settings written down here (a safe server, standbys, macOS); then
the command on the run's own server, whose fsync=off and full_page_writes=off it must
report, with overrides for one role or one database; then the header of a run on an
external server.
"""

import os
import secrets
import socket

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from test_cli import run_cli

from pytest_exai_sessions.durability import ServerSettings, Setting, describe, judge, losing, summarize
from pytest_exai_sessions.plugin.config import OPTIONS
from pytest_exai_sessions.server import PostgresServer

LINUX = "PostgreSQL 15.5 (Debian 15.5-1) on x86_64-pc-linux-gnu, compiled by gcc (Debian 12.2.0-14) 12.2.0, 64-bit"
MACOS = "PostgreSQL 16.1 on aarch64-apple-darwin23.1.0, compiled by Apple clang version 15.0.0, 64-bit"
SAFE = {
    "fsync": Setting("on", "default"),
    "synchronous_commit": Setting("on", "default"),
    "wal_writer_delay": Setting("200ms", "default"),
    "full_page_writes": Setting("on", "default"),
    "wal_sync_method": Setting("fdatasync", "default"),
    "synchronous_standby_names": Setting("", "default"),
}


def server_with(version: str = LINUX, **changed: str | Setting) -> ServerSettings:
    """A safe server on Linux but for the ``changed`` settings; a bare value comes from the configuration file."""
    settings = {
        **SAFE,
        **{
            name: Setting(value, "configuration file") if isinstance(value, str) else value
            for name, value in changed.items()
        },
    }
    return ServerSettings("db.example:5432/app as app", version, settings)


def verdict_on(setting: str, server: ServerSettings) -> tuple[bool, str]:
    (finding,) = [finding for finding in judge(server) if finding.setting == setting]
    return finding.loses, finding.why


# the verdicts


def test_a_safe_server_loses_nothing() -> None:
    findings = judge(server_with())

    assert losing(findings) == []
    lines = describe("db.example:5432/app as app", findings)
    assert lines[0] == "durability of db.example:5432/app as app as the store's connections see it:"
    assert [line.split(" (")[0] for line in lines[1:-1]] == [
        "ok    fsync=on",
        "ok    synchronous_commit=on",
        "ok    full_page_writes=on",
        "ok    wal_sync_method=fdatasync",
        "ok    synchronous_standby_names=''",
    ]
    assert lines[-1] == "no setting loses acknowledged writes"


def test_asynchronous_commit_loses_the_last_commits_within_the_wal_writers_delay() -> None:
    loses, why = verdict_on("synchronous_commit", server_with(synchronous_commit="off", wal_writer_delay="1s"))

    assert loses
    assert "acknowledged before its WAL is flushed" in why
    assert why.endswith("up to 3 x wal_writer_delay=1s")


def test_each_losing_setting_is_named_with_its_value_in_the_summary() -> None:
    findings = judge(server_with(fsync="off", full_page_writes="off"))

    assert summarize(findings) == "2 settings can lose acknowledged writes: fsync=off, full_page_writes=off"
    assert summarize(judge(server_with(fsync="off"))) == "1 setting can lose acknowledged writes: fsync=off"
    assert (
        "LOSES fsync=off (configuration file): PostgreSQL never waits for the OS to flush" in describe("s", findings)[1]
    )


@pytest.mark.parametrize(
    ("version", "method", "loses"),
    [
        (LINUX, "fdatasync", False),
        (LINUX, "open_datasync", False),
        (MACOS, "fsync", True),
        (MACOS, "open_datasync", True),
        (MACOS, "fsync_writethrough", False),
    ],
)
def test_on_macos_only_fsync_writethrough_flushes_the_drives_cache(version: str, method: str, loses: bool) -> None:
    assert verdict_on("wal_sync_method", server_with(version, wal_sync_method=method))[0] is loses


@pytest.mark.parametrize(
    ("synchronous_commit", "verdict", "because"),
    [
        ("on", "ok   ", "flushed on the synchronous standby(s) too"),
        ("remote_apply", "ok   ", "flushed on the synchronous standby(s) too"),
        ("remote_write", "LOSES", "written a commit but not flushed it"),
        ("local", "LOSES", "commits wait for no standby: a failover loses"),
        ("off", "LOSES", "commits wait for no standby: a failover loses"),
    ],
)
def test_synchronous_standbys_keep_a_commit_only_when_it_waits_for_their_flush(
    synchronous_commit: str, verdict: str, because: str
) -> None:
    server = server_with(
        synchronous_standby_names="FIRST 1 (replica_a, replica_b)",
        synchronous_commit=Setting(synchronous_commit, "database"),
    )

    line = describe("s", judge(server))[5]

    assert line.startswith(
        f"{verdict} synchronous_standby_names='FIRST 1 (replica_a, replica_b)' (configuration file): "
        f"with synchronous_commit={synchronous_commit} (database) "
    )
    assert because in line


def test_without_synchronous_standbys_the_check_passes_but_warns_of_failover() -> None:
    loses, why = verdict_on("synchronous_standby_names", server_with(synchronous_commit="local"))

    assert not loses
    assert why.startswith("commits wait for no standby: if this server has standbys, a failover to one can lose")


# the command, on the run's own server


@pytest.fixture
def own_server(exai_pg_server: PostgresServer) -> PostgresServer:
    """The run's temporary server, which runs with fsync=off and full_page_writes=off on purpose."""
    if exai_pg_server.external:
        pytest.skip("the settings of an external server are its own")
    return exai_pg_server


@pytest.fixture
def new_role(own_server: PostgresServer, exai_direct_dsn: str):
    """A login role of this test's own (name, password); dropped afterwards with its settings in every database."""
    name, password = f"exai_durability_{secrets.token_hex(4)}", secrets.token_hex(16)
    with psycopg.connect(exai_direct_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    try:
        yield name, password
    finally:
        with psycopg.connect(exai_direct_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def lines_of(result) -> list[str]:
    return result.stdout.splitlines()


def test_the_temporary_server_loses_writes_to_fsync_and_full_page_writes(own_server, exai_direct_dsn) -> None:
    result = run_cli("check", "--dsn", exai_direct_dsn)

    assert result.returncode == 1, result.stderr
    params = conninfo_to_dict(exai_direct_dsn)
    title, *settings, summary = lines_of(result)
    assert title.startswith("durability of ")
    assert title.endswith(f"/{params['dbname']} as {params['user']} as the store's connections see it:")
    assert [line.split(": ")[0] for line in settings] == [
        "LOSES fsync=off (command line)",
        "ok    synchronous_commit=on (command line)",
        "LOSES full_page_writes=off (command line)",
        "ok    wal_sync_method=fdatasync (default)",
        "ok    synchronous_standby_names='' (default)",
    ]
    assert summary == "2 settings can lose acknowledged writes: fsync=off, full_page_writes=off"


@pytest.mark.parametrize(
    ("source", "statement"),
    [
        ("user", "ALTER ROLE {role} SET synchronous_commit = off"),
        ("database", "ALTER DATABASE {database} SET synchronous_commit = off"),
        ("database user", "ALTER ROLE {role} IN DATABASE {database} SET synchronous_commit = off"),
    ],
)
def test_an_override_for_the_stores_role_or_database_is_judged_where_it_applies(
    source: str, statement: str, new_role, exai_direct_dsn: str
) -> None:
    role, password = new_role
    database = conninfo_to_dict(exai_direct_dsn)["dbname"]
    with psycopg.connect(exai_direct_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(role=sql.Identifier(role), database=sql.Identifier(database)))

    result = run_cli("check", "--dsn", make_conninfo(exai_direct_dsn, user=role, password=password))

    assert result.returncode == 1, result.stderr
    line = lines_of(result)[2]
    assert line.startswith(
        f"LOSES synchronous_commit=off ({source}): a commit is acknowledged before its WAL is flushed"
    )
    assert "3 x wal_writer_delay=" in line
    assert lines_of(result)[-1].startswith("3 settings can lose acknowledged writes: fsync=off, synchronous_commit=off")


def test_the_connections_own_settings_count_too(own_server, exai_direct_dsn: str) -> None:
    result = run_cli("check", "--dsn", exai_direct_dsn, env={**os.environ, "PGOPTIONS": "-c synchronous_commit=off"})

    assert lines_of(result)[2].startswith("LOSES synchronous_commit=off (client): ")


def test_a_local_commit_without_standbys_passes_with_a_failover_warning(own_server, exai_direct_dsn: str) -> None:
    database = conninfo_to_dict(exai_direct_dsn)["dbname"]
    with psycopg.connect(exai_direct_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = local").format(sql.Identifier(database)))

    lines = lines_of(run_cli("check", "--dsn", exai_direct_dsn))

    assert lines[2].startswith("ok    synchronous_commit=local (database): ")
    assert lines[5] == (
        "ok    synchronous_standby_names='' (default): commits wait for no standby: "
        "if this server has standbys, a failover to one can lose acknowledged writes"
    )


def test_without_a_database_the_command_says_how_to_give_one() -> None:
    environment = {name: value for name, value in os.environ.items() if name != "EXAI_SESSIONS_DSN"}

    result = run_cli("check", env=environment)

    assert result.returncode == 2
    assert result.stderr.strip() == "exai-sessions: no database given: pass --dsn or set EXAI_SESSIONS_DSN"
    assert result.stdout == ""


def closed_port() -> int:
    """A local TCP port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_cannot_be_reached_is_an_error_not_a_verdict() -> None:
    result = run_cli("check", "--timeout", "0.5", "--dsn", f"host=127.0.0.1 port={closed_port()} dbname=nowhere")

    assert result.returncode == 1
    assert result.stdout == ""
    (error,) = result.stderr.splitlines()
    assert error.startswith("exai-sessions: connecting to dbname=nowhere host=127.0.0.1 port=")
    assert "Connection refused" in error


# the report header of a run on an external server


@pytest.fixture
def inner_run(exai_config, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An inner run with one passing test and none of the outer run's plugin options (read before they go)."""
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    return pytester


def test_the_header_names_the_settings_of_an_external_server_that_lose_writes(
    own_server, exai_direct_dsn: str, inner_run: pytest.Pytester
) -> None:
    result = inner_run.runpytest(f"--exai-dsn={exai_direct_dsn}")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "exai-sessions: durability of the external server: "
            "2 settings can lose acknowledged writes: fsync=off, full_page_writes=off (exai-sessions check *"
        ]
    )


def test_the_header_of_a_server_that_cannot_be_reached_says_so_and_the_run_goes_on(
    inner_run: pytest.Pytester,
) -> None:
    result = inner_run.runpytest(f"--exai-dsn=host=127.0.0.1 port={closed_port()} dbname=nowhere")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["exai-sessions: durability of the external server: could not check (*refused*)"])
