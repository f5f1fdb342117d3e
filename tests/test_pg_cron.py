"""The pg_cron jobs, on a real server with pg_cron preloaded, as Supabase's demoted ``postgres``.

Each test starts a Supabase-like server of its own (``testing.supabase``: the bootstrap
superuser is ``supabase_admin``, ``postgres`` is NOSUPERUSER CREATEDB CREATEROLE BYPASSRLS);
the superuser creates the extension (the project owner's choice there) and grants USAGE on ``cron``.
pg_cron's extension lives in the database ``cron.database_name`` names, here ``postgres``.

Skipped where the server binaries in use have no pg_cron (tox's pg18 env: embedded
PostgreSQL; Debian's package is postgresql-15-cron).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from partitions import monthly_partitions
from psycopg import sql
from test_app_migrations import INI, no_outer_options, run  # noqa: F401 (an autouse fixture)
from test_cli import run_cli
from test_maintenance import insert_event, past_retention, upcoming

from pytest_exai_sessions import apply_migrations, load_migrations
from pytest_exai_sessions.clock import parse_instant
from pytest_exai_sessions.maintenance import maintain
from pytest_exai_sessions.plugin.config import ExaiConfig
from pytest_exai_sessions.plugin.servers import initdb_cache_of
from pytest_exai_sessions.server import find_bindir, server_os_user
from pytest_exai_sessions.testing.supabase import POSTGRES as OWNER
from pytest_exai_sessions.testing.supabase import SupabaseLikeServer

PG_CRON_SETTINGS = {"shared_preload_libraries": "pg_cron", "cron.database_name": "postgres"}
JOBS = {
    "exai-sessions-partitions": ("7 0 * * *", "SELECT unified.create_upcoming_partitions()"),
    "exai-sessions-retention": ("17 0 * * *", "SELECT unified.apply_retention()"),
    "exai-sessions-refresh-views": ("*/5 * * * *", "SELECT unified.refresh_materialized_views()"),
}


def pg_cron_missing(bindir: Path) -> str | None:
    """Why these binaries cannot run pg_cron, or None when they can."""
    pg_config = bindir / "pg_config"
    if not pg_config.exists():
        return f"no pg_config beside {bindir}/postgres to find pg_cron with"
    found = {}
    for option in ("--pkglibdir", "--sharedir"):
        found[option] = Path(
            subprocess.run([pg_config, option], capture_output=True, text=True, check=True).stdout.strip()
        )
    library = found["--pkglibdir"] / "pg_cron.so"
    control = found["--sharedir"] / "extension" / "pg_cron.control"
    for path in (library, control):
        if not path.exists():
            return (
                f"pg_cron is not installed for the server in {bindir} ({path} missing;"
                " Debian: apt install postgresql-15-cron)"
            )
    return None


def pg_cron_server(
    exai_config: ExaiConfig, basedir: Path, settings: dict[str, str] | None = None
) -> SupabaseLikeServer:
    """A Supabase-like server with pg_cron preloaded and ``settings``, not started; skips where there is no pg_cron."""
    bindir = find_bindir(exai_config.pg_bin)
    reason = pg_cron_missing(bindir)
    if reason:
        pytest.skip(reason)
    return SupabaseLikeServer(
        bindir,
        basedir=basedir,
        os_user=server_os_user(None),
        settings={**PG_CRON_SETTINGS, **(settings or {})},
        initdb_cache=initdb_cache_of(exai_config),
    )


@pytest.fixture
def supabase_like(exai_config: ExaiConfig, basedir: Path) -> Iterator[SupabaseLikeServer]:
    """A Supabase-like server of this test's own, with pg_cron preloaded; removed after it."""
    with pg_cron_server(exai_config, basedir) as server:
        yield server


def as_superuser(server: SupabaseLikeServer) -> psycopg.Connection:
    return psycopg.connect(server.admin_dsn(), autocommit=True)


def owner_dsn(server: SupabaseLikeServer) -> str:
    return server.dsn()


def enable_pg_cron(server: SupabaseLikeServer, *, grant_usage: bool = True) -> None:
    """What the project owner does on Supabase (Database > Extensions > pg_cron)."""
    with as_superuser(server) as conn:
        conn.execute("CREATE EXTENSION pg_cron")
        if grant_usage:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA cron TO {}").format(sql.Identifier(OWNER)))


def scheduled_jobs(server: SupabaseLikeServer) -> dict[str, tuple[int, str, str, str, str]]:
    """Every job, as the superuser sees them (all roles'): name -> (jobid, schedule, command, database, user)."""
    with as_superuser(server) as conn:
        rows = conn.execute("SELECT jobname, jobid, schedule, command, database, username FROM cron.job").fetchall()
    assert len(rows) == len({row[0] for row in rows}), f"duplicate jobs: {rows}"
    return {name: (jobid, schedule, command, database, user) for name, jobid, schedule, command, database, user in rows}


def expected_jobs(ids: dict[str, int]) -> dict[str, tuple[int, str, str, str, str]]:
    return {name: (ids[name], schedule, command, "postgres", OWNER) for name, (schedule, command) in JOBS.items()}


def test_migrating_schedules_the_named_jobs_once_as_the_demoted_owner(supabase_like: SupabaseLikeServer) -> None:
    enable_pg_cron(supabase_like)

    with psycopg.connect(owner_dsn(supabase_like), autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
        apply_migrations(conn)
        first = scheduled_jobs(supabase_like)
        assert apply_migrations(conn) == []
        # What the Supabase CLI or SQL editor does: the file run again outside the runner.
        with conn.transaction():
            conn.execute(load_migrations()[-1].sql.encode())
        # service_role calling it schedules no second set: the jobs are the schema owner's.
        with as_superuser(supabase_like) as admin:  # on Supabase postgres may SET ROLE service_role
            admin.execute(sql.SQL("GRANT service_role TO {}").format(sql.Identifier(OWNER)))
        with conn.transaction():
            conn.execute("SET LOCAL ROLE service_role")
            again = conn.execute("SELECT job_name, action FROM unified.schedule_maintenance_jobs()").fetchall()
    maintained = run_cli("maintain", "--dsn", owner_dsn(supabase_like))

    assert first == expected_jobs({name: first[name][0] for name in JOBS})
    assert again == [(name, "kept") for name in JOBS]
    assert maintained.returncode == 0, maintained.stderr
    for name, (schedule, _) in JOBS.items():
        assert f"pg_cron job {name} ({schedule}, jobid {first[name][0]}): kept" in maintained.stdout.splitlines()
    assert scheduled_jobs(supabase_like) == first  # same jobs, same jobids


def test_pg_cron_installed_after_the_schema_gets_its_jobs_from_maintain(supabase_like: SupabaseLikeServer) -> None:
    dsn = owner_dsn(supabase_like)
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)  # pg_cron absent: the migration schedules nothing and does not fail
        assert conn.execute("SELECT to_regnamespace('cron')").fetchone() == (None,)
        assert maintain(conn).jobs == ()

    enable_pg_cron(supabase_like, grant_usage=False)
    without_usage = run_cli("maintain", "--dsn", dsn)
    assert without_usage.returncode == 0, without_usage.stderr
    for name in JOBS:
        assert f"pg_cron job {name} (" in without_usage.stdout
    assert without_usage.stdout.count(f"not scheduled: role {OWNER} has no USAGE on schema cron") == 3
    assert scheduled_jobs(supabase_like) == {}

    with as_superuser(supabase_like) as conn:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA cron TO {}").format(sql.Identifier(OWNER)))
    scheduled = run_cli("maintain", "--dsn", dsn)
    assert scheduled.returncode == 0, scheduled.stderr
    jobs = scheduled_jobs(supabase_like)
    assert jobs == expected_jobs({name: jobs[name][0] for name in JOBS})
    assert scheduled.stdout.count(": scheduled") == 3
    assert run_cli("maintain", "--dsn", dsn).stdout.count(": kept") == 3
    assert scheduled_jobs(supabase_like) == jobs


@pytest.mark.parametrize("instant", ["2030-12-31T23:59:59Z", "2029-02-28T12:00:00Z"])
def test_each_jobs_command_does_its_work(supabase_like: SupabaseLikeServer, instant: str) -> None:
    """Run each scheduled command as the job's user, as pg_cron would, under the database's test clock."""
    enable_pg_cron(supabase_like)
    now = parse_instant(instant)
    with psycopg.connect(owner_dsn(supabase_like), autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute("SELECT unified.set_clock(%s)", (now,))
        before = monthly_partitions(conn)
        jobs = scheduled_jobs(supabase_like)
        commands = {name: command for name, (_, _, command, _, user) in jobs.items() if user == OWNER}

        conn.execute(commands["exai-sessions-partitions"])
        with_upcoming = monthly_partitions(conn)
        conn.execute(commands["exai-sessions-retention"])
        after_retention = monthly_partitions(conn)
        insert_event(conn, now, severity="error")
        conn.execute(commands["exai-sessions-refresh-views"])
        errors = conn.execute("SELECT error_count FROM unified.mv_error_summary_7d").fetchall()
        recent = conn.execute("SELECT count(*) FROM unified.mv_recent_events_24h").fetchone()

    assert sorted(commands) == sorted(JOBS)
    assert set(upcoming(now)) <= set(with_upcoming)
    assert set(with_upcoming) - set(before) == set(upcoming(now)) - set(before)
    assert sorted(set(with_upcoming) - set(after_retention)) == past_retention(with_upcoming, now)
    assert errors == [(1,)]
    assert recent == (1,)


def finished_runs(
    server: SupabaseLikeServer, jobids: list[int], since: datetime
) -> dict[int, tuple[str, str, str, str]]:
    """jobid -> (status, return_message, database, username) of each job's first run started after ``since`` and
    finished, as pg_cron logged it."""
    with as_superuser(server) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (jobid) jobid, status, return_message, database, username FROM cron.job_run_details"
            " WHERE jobid = ANY(%s) AND start_time > %s AND status IN ('succeeded', 'failed') ORDER BY jobid, runid",
            (jobids, since),
        ).fetchall()
    return {jobid: (status, message, database, user) for jobid, status, message, database, user in rows}


@pytest.mark.slow  # pg_cron 1.4 schedules by the minute: its first run of a job may be a minute away
def test_pg_cron_itself_runs_every_job_as_its_owner(exai_config: ExaiConfig, basedir: Path) -> None:
    """pg_cron's scheduler, not the test, runs the three jobs; their effects are those of the commands."""
    now = parse_instant("2031-01-15T12:00:00Z")
    # Background workers: the jobs need no login over a socket; they still run as the job's user.
    with pg_cron_server(exai_config, basedir, {"cron.use_background_workers": "on"}) as server:
        enable_pg_cron(server)
        with psycopg.connect(owner_dsn(server), autocommit=True) as conn:
            # The clock is frozen before the last migration schedules the jobs: a run pg_cron starts meanwhile
            # (on their own schedules) works in the test's month too, and finds nothing to do.
            apply_migrations(conn, load_migrations()[:-1], as_of=now)
            conn.execute("SELECT unified.set_clock(%s)", (now,))
            apply_migrations(conn, as_of=now)
            conn.execute("UPDATE unified.maintenance_settings SET retention_days = 1, months_ahead = 6")
            insert_event(conn, now, severity="error")
            before = monthly_partitions(conn)
            ids = {name: jobid for name, (jobid, *_) in scheduled_jobs(server).items()}
            jobids = list(ids.values())
            with as_superuser(server) as admin:  # pg_cron 1.4 grants alter_job to no one else
                for jobid in jobids:
                    admin.execute("SELECT cron.alter_job(%s, schedule => '* * * * *')", (jobid,))
                # The server's own time, only to tell the runs that follow from any before.
                (since,) = admin.execute("SELECT clock_timestamp()").fetchone()

            runs: dict[int, tuple[str, str, str, str]] = {}
            deadline = time.monotonic() + 180  # a wait with a bound, not a timing: three minute ticks
            while len(runs) < len(jobids) and time.monotonic() < deadline:
                time.sleep(0.5)
                runs = finished_runs(server, jobids, since)

            after = monthly_partitions(conn)
            errors = conn.execute("SELECT error_count FROM unified.mv_error_summary_7d").fetchall()

    kept = sorted(set(before) | set(upcoming(now, months_ahead=6)))
    dropped = past_retention(kept, now, days=1)
    created = set(upcoming(now, months_ahead=6)) - set(before)
    # pg_cron logs each command's tag: the functions return a row per partition created or dropped.
    assert runs == {
        ids["exai-sessions-partitions"]: ("succeeded", f"SELECT {len(created)}", "postgres", OWNER),
        ids["exai-sessions-retention"]: ("succeeded", f"SELECT {len(dropped)}", "postgres", OWNER),
        ids["exai-sessions-refresh-views"]: ("succeeded", "SELECT 1", "postgres", OWNER),
    }
    assert created and dropped
    assert after == sorted(set(kept) - set(dropped))
    assert errors == [(1,)]


PLUGIN_TEST = """
import psycopg

from pytest_exai_sessions import apply_migrations


def test_the_run_server_has_pg_cron_for_its_postgres_database(exai_pg_server):
    with psycopg.connect(exai_pg_server.dsn("postgres"), autocommit=True) as conn:
        assert conn.execute("SHOW shared_preload_libraries").fetchone() == ("pg_cron",)
        conn.execute("CREATE EXTENSION pg_cron")
        apply_migrations(conn)
        jobs = conn.execute("SELECT jobname, database FROM cron.job ORDER BY 1").fetchall()
    assert jobs == [(name, "postgres") for name in {names}]
"""


def test_the_plugin_starts_its_server_with_pg_cron_from_two_settings(
    pytester: pytest.Pytester, basedir: Path, exai_config: ExaiConfig
) -> None:
    """The README's recipe: two --exai-pg-setting flags (or exai_pg_settings in the ini file)."""
    bindir = find_bindir(exai_config.pg_bin)
    reason = pg_cron_missing(bindir)
    if reason:
        pytest.skip(reason)
    pytester.makeini(INI)
    pytester.makepyfile(PLUGIN_TEST.replace("{names}", repr(sorted(JOBS))))
    settings = [f"--exai-pg-setting={name}={value}" for name, value in PG_CRON_SETTINGS.items()]
    result = run(pytester, basedir, f"--exai-pg-bin={bindir}", *settings)
    result.assert_outcomes(passed=1)
