"""exai-sessions maintain: the next months' partitions, retention, the views, under the test clock.

Every "now" here is the database's test clock (exai_db_clock), never the wall clock. The
expected partitions are computed in Python from the instant, independently of the SQL.
"""

import asyncio
import os
import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from partitions import drop_monthly_partitions, monthly_partitions
from psycopg import sql
from test_cli import run_cli

from pytest_exai_sessions import PersistenceError
from pytest_exai_sessions.clock import parse_instant
from pytest_exai_sessions.maintenance import (
    ADVISORY_LOCK_KEY,
    JOBS,
    PARTITIONS,
    RETENTION,
    VIEWS,
    MaintenanceReport,
    maintain,
    maintain_dsn,
    maintain_periodically,
)

VIEW_NAMES = ["unified.mv_error_summary_7d", "unified.mv_performance_metrics_1h", "unified.mv_recent_events_24h"]


def report_of(stdout):
    """{'partitions created': [...], ...} from maintain's output."""
    found = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(": ")
        if key in ("partitions created", "partitions dropped", "views refreshed"):
            found[key] = [] if value == "none" else value.split(", ")
    return found


def name_of(month):
    return f"event_metric_events_y{month:%Y}m{month:%m}"


def month_after(month, count=1):
    index = month.year * 12 + month.month - 1 + count
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def first_of_month(instant):
    return datetime(instant.year, instant.month, 1, tzinfo=UTC)


def upcoming(instant, months_ahead=3):
    """The partitions maintain keeps: the instant's UTC month and the months_ahead after it."""
    return [name_of(month_after(first_of_month(instant), n)) for n in range(months_ahead + 1)]


def month_of(name):
    return datetime(int(name[-7:-3]), int(name[-2:]), 1, tzinfo=UTC)


def past_retention(names, instant, days=90):
    """Those of ``names`` whose month ends at or before instant - days."""
    cutoff = instant - timedelta(days=days)
    return sorted(name for name in names if month_after(month_of(name)) <= cutoff)


def insert_event(conn, timestamp, severity="info"):
    conn.execute(
        "INSERT INTO unified.event_metric_events (event_type, event_category, source_system, severity, event_timestamp)"
        " VALUES ('job', 'maintenance', 'tests', %s, %s)",
        (severity, timestamp),
    )


@pytest.mark.parametrize(
    "instant",
    [
        "2026-12-31T23:59:59Z",  # a year's last second: the next months are next year's
        "2027-01-31T23:59:59.999999Z",  # a month's last instant
        "2028-02-29T00:00:00Z",  # a leap day at midnight
        "2030-12-31T23:59:59Z",
        "2031-03-01T00:00:00Z",  # a month's first instant
    ],
)
def test_maintain_creates_the_next_months_and_drops_those_past_retention(exai_dsn, exai_db_clock, instant):
    now = parse_instant(instant)
    exai_db_clock.set(now)
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        before = monthly_partitions(conn)

    first = run_cli("maintain", "--dsn", exai_dsn)
    second = run_cli("maintain", "--dsn", exai_dsn)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        after = monthly_partitions(conn)
    expected_dropped = past_retention(before, now)
    assert report_of(first.stdout) == {
        "partitions created": [n for n in upcoming(now) if n not in before],
        "partitions dropped": expected_dropped,
        "views refreshed": VIEW_NAMES,
    }
    assert sorted(after) == sorted((set(before) - set(expected_dropped)) | set(upcoming(now)))
    assert report_of(second.stdout) == {
        "partitions created": [],
        "partitions dropped": [],
        "views refreshed": VIEW_NAMES,
    }
    assert "pg_cron jobs: none (pg_cron is not installed in this database)" in first.stdout.splitlines()


def test_retention_is_read_from_the_settings_row_at_run_time(exai_dsn, exai_db_clock):
    """Clock 2031-06-15, retention 200 days: the cutoff is 2030-11-27, so months up to October 2030 go."""
    exai_db_clock.set("2031-06-15T12:00:00Z")
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        drop_monthly_partitions(conn)
        for month in range(12, 30):  # 2030-01 .. 2031-06
            conn.execute(
                "SELECT unified.create_monthly_partition(%s)",
                (datetime(2029 + month // 12, month % 12 + 1, 1, tzinfo=UTC),),
            )
        insert_event(conn, "2030-05-05T00:00:00Z")
        insert_event(conn, "2030-11-27T12:00:00Z")
        insert_event(conn, "2019-01-01T00:00:00Z")  # default partition, past any retention
        assert conn.execute("SELECT retention_days, months_ahead FROM unified.maintenance_settings").fetchone() == (
            90,
            3,
        )
        conn.execute("UPDATE unified.maintenance_settings SET retention_days = 200")

        report = maintain(conn)
        kept = conn.execute("SELECT event_timestamp FROM unified.event_metric_events ORDER BY 1").fetchall()
        left = monthly_partitions(conn)

    assert report.partitions_dropped == tuple(f"event_metric_events_y2030m{m:02d}" for m in range(1, 11))
    assert report.partitions_created == (
        "event_metric_events_y2031m07",
        "event_metric_events_y2031m08",
        "event_metric_events_y2031m09",
    )
    assert kept == [(datetime(2030, 11, 27, 12, tzinfo=UTC),)]
    assert left[0] == "event_metric_events_y2030m11"


def test_the_settings_refuse_what_makes_no_sense(exai_dsn):
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        for change in ("retention_days = -1", "months_ahead = -1", "months_ahead = 25", "retention_days = NULL"):
            with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.NotNullViolation)):
                conn.execute(f"UPDATE unified.maintenance_settings SET {change}")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO unified.maintenance_settings (only_row) VALUES (false)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO unified.maintenance_settings DEFAULT VALUES")
        assert conn.execute("SELECT * FROM unified.maintenance_settings").fetchall() == [(True, 90, 3)]


def test_the_views_are_refreshed_also_when_empty_or_never_populated(exai_dsn, exai_db_clock):
    exai_db_clock.set("2030-12-31T23:59:59Z")
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        # Empty but populated (as migration 004 leaves them): CONCURRENTLY works on those.
        assert maintain(conn).views_refreshed == tuple(VIEW_NAMES)
        # Not populated (a schema-only restore): CONCURRENTLY would fail, a plain refresh is used.
        conn.execute("REFRESH MATERIALIZED VIEW unified.mv_error_summary_7d WITH NO DATA")
        insert_event(conn, "2030-12-31T23:00:00Z", severity="error")
        maintain(conn)
        summary = conn.execute("SELECT event_day::text, error_count FROM unified.mv_error_summary_7d").fetchall()
        populated = conn.execute(
            "SELECT bool_and(ispopulated) FROM pg_matviews WHERE schemaname = 'unified'"
        ).fetchone()
        insert_event(conn, "2030-12-31T23:30:00Z", severity="critical")
        maintain(conn)
        recent = conn.execute("SELECT count(*) FROM unified.mv_recent_events_24h").fetchone()
    assert summary == [("2030-12-31", 1)]
    assert populated == (True,)
    assert recent == (2,)


def test_bad_input_and_database_errors_exit_non_zero_with_one_line(empty_dsn):
    missing = run_cli("maintain", env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2
    assert "--dsn" in missing.stderr and "EXAI_SESSIONS_DSN" in missing.stderr

    unreachable = run_cli("maintain", "--dsn", "host=/nonexistent-socket-dir dbname=x connect_timeout=2")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("exai-sessions: ") and len(unreachable.stderr.strip().splitlines()) == 1

    unmigrated = run_cli("maintain", "--dsn", empty_dsn)
    assert unmigrated.returncode == 1
    assert unmigrated.stderr.strip() == (
        "exai-sessions: this database lacks unified.schedule_maintenance_jobs() (migration 010):"
        " apply the migrations first (exai-sessions migrate)"
    )
    assert unmigrated.stdout == ""
    with pytest.raises(TypeError, match="wait must be a bool"):
        maintain_dsn(empty_dsn, wait="no")


def test_the_dsn_can_come_from_the_environment(exai_dsn):
    result = run_cli("maintain", env={**os.environ, "EXAI_SESSIONS_DSN": exai_dsn})
    assert result.returncode == 0, result.stderr
    assert report_of(result.stdout)["views refreshed"] == VIEW_NAMES


def test_two_concurrent_runs_take_turns_and_each_partition_is_made_once(exai_dsn, exai_db_clock):
    now = parse_instant("2029-11-30T23:59:59Z")
    exai_db_clock.set(now)
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        drop_monthly_partitions(conn)
        insert_event(conn, "2029-12-10T00:00:00Z")  # waits in the default partition for December's
    command = [sys.executable, "-m", "pytest_exai_sessions", "maintain", "--dsn", exai_dsn]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    created = [name for out, _ in outputs for name in report_of(out)["partitions created"]]
    assert sorted(created) == upcoming(now)  # each by one of the two runs
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        assert monthly_partitions(conn) == upcoming(now)
        assert conn.execute("SELECT tableoid::regclass::text FROM unified.event_metric_events").fetchall() == [
            ("unified.event_metric_events_y2029m12",)
        ]


def test_maintain_through_pgbouncer_in_transaction_mode(exai_dsn, exai_db_clock, exai_pgbouncer):
    now = parse_instant("2028-02-29T12:00:00Z")
    exai_db_clock.set(now)
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        drop_monthly_partitions(conn)
    pooled = exai_pgbouncer("transaction").dsn(psycopg.conninfo.conninfo_to_dict(exai_dsn)["dbname"])

    first = run_cli("maintain", "--dsn", pooled)
    second = run_cli("maintain", "--dsn", pooled)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert report_of(first.stdout)["partitions created"] == upcoming(now)
    assert report_of(second.stdout)["partitions created"] == []


def test_a_step_another_runner_holds_is_skipped_without_waiting(exai_dsn):
    with psycopg.connect(exai_dsn) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        report = maintain_dsn(exai_dsn, wait=False)
        holder.rollback()
    assert report == MaintenanceReport(skipped=(PARTITIONS, RETENTION, VIEWS, JOBS))
    assert "skipped partitions: another runner was doing it" in report.lines()


@pytest.mark.asyncio
async def test_two_replicas_running_it_periodically_share_the_work(exai_dsn, exai_db_clock):
    now = parse_instant("2027-12-31T23:59:59Z")
    exai_db_clock.set(now)
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        drop_monthly_partitions(conn)
    reports = {"a": [], "b": []}
    enough = asyncio.Event()

    def collect(replica):
        def on_report(report):
            reports[replica].append(report)
            if all(len(done) >= 3 for done in reports.values()):
                enough.set()

        return on_report

    replicas = [
        asyncio.create_task(maintain_periodically(exai_dsn, every_seconds=0.01, on_report=collect(name)))
        for name in reports
    ]
    try:
        await asyncio.wait_for(enough.wait(), timeout=120)
    finally:
        for replica in replicas:
            replica.cancel()
        await asyncio.gather(*replicas, return_exceptions=True)

    everything = [report for done in reports.values() for report in done]
    created = [name for report in everything for name in report.partitions_created]
    assert sorted(created) == upcoming(now)  # each month made by one replica, once
    assert all(not report.partitions_dropped for report in everything)
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        assert monthly_partitions(conn) == upcoming(now)


@pytest.mark.asyncio
async def test_the_periodic_runner_refuses_bad_input_and_ends_on_a_database_error(empty_dsn):
    with pytest.raises(ValueError, match="every_seconds must be positive"):
        await maintain_periodically(empty_dsn, every_seconds=0)
    with pytest.raises(TypeError, match="every_seconds must be a number"):
        await maintain_periodically(empty_dsn, every_seconds="60")
    with pytest.raises(PersistenceError, match="apply the migrations first"):
        await maintain_periodically(empty_dsn, every_seconds=60)


def test_a_member_of_service_role_may_run_it(exai_dsn, exai_db_clock):
    """The functions are SECURITY DEFINER with EXECUTE for service_role: no ownership needed."""
    now = parse_instant("2032-06-30T23:59:59Z")
    exai_db_clock.set(now)
    role = f"exai_maintainer_{secrets.token_hex(4)}"
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        drop_monthly_partitions(conn)
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE service_role").format(sql.Identifier(role)))
        try:
            result = run_cli("maintain", "--dsn", psycopg.conninfo.make_conninfo(exai_dsn, user=role))
            for name in ("create_upcoming_partitions", "apply_retention", "schedule_maintenance_jobs"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                    conn.execute("SET LOCAL ROLE authenticated")
                    conn.execute(sql.SQL("SELECT * FROM {}()").format(sql.Identifier("unified", name)))
        finally:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert result.returncode == 0, result.stderr
    assert report_of(result.stdout)["partitions created"] == upcoming(now)
