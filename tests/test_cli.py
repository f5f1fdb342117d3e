"""exai-sessions migrate / status: the command deployments run instead of pasting SQL."""

import os
import subprocess
import sys

import psycopg

from pytest_exai_sessions import load_migrations


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pytest_exai_sessions", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_migrate_brings_an_empty_database_to_the_current_schema(empty_dsn):
    files = [m.filename for m in load_migrations()]

    status = run_cli("status", "--dsn", empty_dsn)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [f"{name}: pending" for name in files]

    first = run_cli("migrate", "--dsn", empty_dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"applied {name}" for name in files]

    second = run_cli("migrate", "--dsn", empty_dsn)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "nothing to apply: the schema is up to date"

    status = run_cli("status", "--dsn", empty_dsn)
    assert all(": applied " in line for line in status.stdout.splitlines())
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (0,)


def test_the_dsn_can_come_from_the_environment(empty_dsn):
    result = run_cli("migrate", env={**os.environ, "EXAI_SESSIONS_DSN": empty_dsn})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("applied ")


def test_dry_run_prints_the_sql_and_changes_nothing(empty_dsn):
    result = run_cli("migrate", "--dry-run", "--dsn", empty_dsn)

    assert result.returncode == 0, result.stderr
    for migration in load_migrations():
        assert f"-- {migration.filename}" in result.stdout
    assert "CREATE TABLE" in result.stdout
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regclass('public.sessions')").fetchone() == (None,)


def test_failures_exit_non_zero_with_one_line():
    missing = run_cli("migrate", env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2
    assert "--dsn" in missing.stderr and "EXAI_SESSIONS_DSN" in missing.stderr

    unreachable = run_cli("status", "--dsn", "host=/nonexistent-socket-dir dbname=x connect_timeout=2")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("exai-sessions: ")
    assert len(unreachable.stderr.strip().splitlines()) == 1
