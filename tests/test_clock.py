"""The database clock and everything that reads it: partitions, retention, views, triggers.

``exai_db_clock`` rewrites ``unified.clock_now()`` of this test's database (through
``unified.set_clock()``); every connection sees the new time from its next transaction.
"""

import re
from datetime import UTC, date, datetime, timedelta, timezone

import psycopg
import pytest
from partitions import drop_monthly_partitions
from psycopg import sql
from psycopg.types.json import Jsonb

from pytest_exai_sessions import DbClock, PersistenceError, apply_migrations
from pytest_exai_sessions.clock import parse_instant

PARTITION_NAME = re.compile(r"^event_metric_events_y(\d{4})m(\d{2})$")


def connect(dsn):
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET TIME ZONE 'UTC'")  # readable bounds; the functions themselves do not depend on it
    return conn


def partitions(conn):
    """{name: (start, end)} of the monthly partitions, read from the catalog's bounds."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'unified.event_metric_events'::regclass"
    ).fetchall()
    found = {}
    for name, bound in rows:
        if bound == "DEFAULT":
            continue
        start, end = re.findall(r"'([^']+)'", bound)
        found[name] = (datetime.fromisoformat(start), datetime.fromisoformat(end))
    return found


def month_start(year, month):
    return datetime(year, month, 1, tzinfo=UTC)


def insert_event(conn, timestamp=None, **fields):
    """Insert an event (default timestamp: the column default, i.e. the clock); return (partition, row)."""
    columns = {"event_type": "tick", "event_category": "clock", "source_system": "tests", **fields}
    if timestamp is not None:
        columns["event_timestamp"] = timestamp
    query = sql.SQL(
        "INSERT INTO unified.event_metric_events ({names}) VALUES ({marks})"
        " RETURNING tableoid::regclass::text, id, event_timestamp, created_at, updated_at"
    ).format(
        names=sql.SQL(", ").join(map(sql.Identifier, columns)),
        marks=sql.SQL(", ").join(sql.Placeholder() for _ in columns),
    )
    return conn.execute(query, tuple(columns.values())).fetchone()


# the fixture itself


def test_set_moves_open_and_new_connections_at_once(exai_dsn, exai_db_clock):
    with connect(exai_dsn) as opened_before:
        set_to = exai_db_clock.set("2027-03-15")
        with connect(exai_dsn) as opened_after:
            seen_after = opened_after.execute("SELECT unified.clock_now()").fetchone()[0]
        seen_before = opened_before.execute("SELECT unified.clock_now()").fetchone()[0]
        # A statement the open connection has prepared (psycopg prepares after 5 runs) is
        # planned again: its plan had the old clock inlined.
        insert = "INSERT INTO public.sessions (session_id) VALUES (%s) RETURNING created_at"
        for number in range(6):
            opened_before.execute(insert, (f"s{number}",), prepare=True)
        exai_db_clock.advance(days=1)
        prepared_after = opened_before.execute(insert, ("late",), prepare=True).fetchone()[0]

    assert set_to == datetime(2027, 3, 15, tzinfo=UTC)
    assert seen_after == seen_before == set_to
    assert prepared_after == set_to + timedelta(days=1)
    assert exai_db_clock.now() == exai_db_clock.value == set_to + timedelta(days=1)


@pytest.mark.asyncio
async def test_an_open_async_connection_follows_too(exai_dsn, exai_db_clock):
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True) as conn:
        exai_db_clock.set("2030-01-01")
        assert await (await conn.execute("SELECT unified.clock_now()")).fetchone() == (
            datetime(2030, 1, 1, tzinfo=UTC),
        )
        DbClock(exai_dsn).reset()  # a clock without a start instant: back to the real time
        assert await (await conn.execute("SELECT unified.clock_now() = now()")).fetchone() == (True,)


def test_the_clock_is_frozen_until_moved(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15T10:00:00Z")
    with connect(exai_dsn) as conn:
        first = conn.execute("SELECT unified.clock_now()").fetchone()[0]
        second = conn.execute("SELECT unified.clock_now()").fetchone()[0]
    assert first == second == exai_db_clock.now() == datetime(2027, 3, 15, 10, tzinfo=UTC)


def test_advance_and_reset(exai_dsn):
    clock = DbClock(exai_dsn)
    clock.set(datetime(2027, 3, 15, 12, tzinfo=UTC))
    assert clock.advance(days=1, hours=2) == datetime(2027, 3, 16, 14, tzinfo=UTC)
    assert clock.advance(timedelta(minutes=-30)) == datetime(2027, 3, 16, 13, 30, tzinfo=UTC)
    assert clock.now() == datetime(2027, 3, 16, 13, 30, tzinfo=UTC)

    clock.reset()
    with connect(exai_dsn) as conn:
        clock_now, now = conn.execute("SELECT unified.clock_now(), now()").fetchone()
    with connect(exai_dsn) as conn:
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = 'unified.clock_now'::regproc").fetchone()[0]
    assert clock_now == now
    assert clock.value is None
    # Back to the body of 002: the setting, else now().
    assert body.strip() == "SELECT coalesce(nullif(current_setting('unified.clock', true), '')::timestamptz, now())"


def test_reset_returns_to_the_start_instant(exai_dsn):
    clock = DbClock(exai_dsn, start="2028-02-29T12:00:00Z")
    clock.set("2031-01-01")
    clock.reset()
    with connect(exai_dsn) as conn:
        seen = conn.execute("SELECT unified.clock_now()").fetchone()[0]
    assert seen == clock.now() == clock.value == datetime(2028, 2, 29, 12, tzinfo=UTC)


def test_advance_without_a_set_clock_starts_from_the_real_time(exai_dsn):
    clock = DbClock(exai_dsn)
    before = datetime.now(UTC)
    moved = clock.advance(days=400)
    after = datetime.now(UTC)
    assert before + timedelta(days=400) <= moved <= after + timedelta(days=400)
    with connect(exai_dsn) as conn:
        assert conn.execute("SELECT unified.clock_now()").fetchone() == (moved,)


def test_the_clock_is_per_database(exai_dsn, exai_db_clock, exai_databases):
    exai_db_clock.set("1999-03-15")
    other = exai_databases.create_clone()
    try:
        with connect(exai_databases.server.dsn(other)) as conn:
            other_now, db_now = conn.execute("SELECT unified.clock_now(), now()").fetchone()
        with connect(exai_databases.server.dsn(exai_databases.template)) as conn:
            template_now, template_db_now = conn.execute("SELECT unified.clock_now(), now()").fetchone()
    finally:
        exai_databases.drop(other)
    # Both are where every database of this run starts: the run's start instant, else the real time.
    assert other_now == (exai_db_clock.start or db_now)
    assert template_now == (exai_db_clock.start or template_db_now)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2027-03-15", datetime(2027, 3, 15, tzinfo=UTC)),
        (" 2027-03-15 ", datetime(2027, 3, 15, tzinfo=UTC)),
        ("2027-03-15T12:30:00Z", datetime(2027, 3, 15, 12, 30, tzinfo=UTC)),
        ("2027-03-15 12:30:00-05:00", datetime(2027, 3, 15, 17, 30, tzinfo=UTC)),
        (date(2027, 3, 15), datetime(2027, 3, 15, tzinfo=UTC)),
        (datetime(2027, 3, 15, 1, tzinfo=timezone(timedelta(hours=2))), datetime(2027, 3, 14, 23, tzinfo=UTC)),
    ],
)
def test_accepted_times(given, expected):
    assert parse_instant(given) == expected


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ("2027-03-15 12:00", ValueError, "no UTC offset"),
        (datetime(2027, 3, 15), ValueError, "no UTC offset"),
        ("2027-13-01", ValueError, "month must be in 1..12"),
        ("next tuesday", ValueError, "not an ISO 8601"),
        (1_800_000_000, TypeError, "datetime, a date or an ISO 8601 str"),
    ],
)
def test_bad_times_raise_and_set_nothing(exai_dsn, exai_db_clock, given, error, message):
    exai_db_clock.set("2027-03-15")
    with pytest.raises(error, match=message):
        exai_db_clock.set(given)
    assert exai_db_clock.now() == datetime(2027, 3, 15, tzinfo=UTC)
    assert exai_db_clock.value == datetime(2027, 3, 15, tzinfo=UTC)


def test_a_role_that_does_not_own_the_clock_gets_a_clear_error_and_moves_nothing(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15")
    with connect(exai_dsn) as conn:
        conn.execute("CREATE ROLE exai_clock_nobody LOGIN")
        try:
            clock = DbClock(psycopg.conninfo.make_conninfo(exai_dsn, user="exai_clock_nobody"))
            grants = [
                "GRANT USAGE ON SCHEMA unified TO exai_clock_nobody",
                "GRANT EXECUTE ON FUNCTION unified.set_clock(timestamptz) TO exai_clock_nobody",
                None,
            ]
            refusals = [
                "permission denied for schema unified",
                "permission denied for function set_clock",
                "permission denied for schema unified",  # CREATE on it, to replace clock_now()
            ]
            for refusal, grant in zip(refusals, grants, strict=True):
                with pytest.raises(PersistenceError, match=rf"{refusal}; moving it takes the role that applied"):
                    clock.set("2030-01-01")
                if grant:
                    conn.execute(grant)
            assert clock.value is None
            assert conn.execute("SELECT unified.clock_now()").fetchone() == (datetime(2027, 3, 15, tzinfo=UTC),)
        finally:
            conn.execute("DROP OWNED BY exai_clock_nobody")
            conn.execute("DROP ROLE exai_clock_nobody")


def test_a_clock_that_cannot_reach_its_database_raises_and_stays(exai_dsn):
    clock = DbClock(psycopg.conninfo.make_conninfo(exai_dsn, dbname="exai_no_such_database"))
    with pytest.raises(PersistenceError, match="'exai_no_such_database'"):
        clock.set("2027-03-15")
    assert clock.value is None


def test_the_session_setting_wins_on_its_connection(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15")
    with connect(exai_dsn) as conn:
        conn.execute("BEGIN")
        conn.execute("SET LOCAL unified.clock = '2040-01-01T00:00:00Z'")
        inside = conn.execute("SELECT unified.clock_now()").fetchone()[0]
        conn.execute("COMMIT")
        after = conn.execute("SELECT unified.clock_now()").fetchone()[0]
    assert inside == datetime(2040, 1, 1, tzinfo=UTC)
    assert after == datetime(2027, 3, 15, tzinfo=UTC)


def test_set_clock_refuses_an_infinite_instant_and_the_api_roles(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15")
    with connect(exai_dsn) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="finite"):
            conn.execute("SELECT unified.set_clock('infinity')")
        for role in ("anon", "authenticated", "service_role"):
            conn.execute("BEGIN")
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            readable = conn.execute("SELECT unified.clock_now()").fetchone()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT unified.set_clock(NULL)")
            conn.execute("ROLLBACK")
            assert readable == (datetime(2027, 3, 15, tzinfo=UTC),), role


@pytest.mark.parametrize("datestyle", ["ISO, DMY", "SQL, MDY", "German", "Postgres, YMD"])
def test_a_frozen_clock_reads_alike_under_every_date_style_and_time_zone(exai_dsn, exai_db_clock, datestyle):
    exai_db_clock.set("2028-02-29T23:59:59.123456Z")
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET DateStyle = {}").format(sql.Literal(datestyle)))
        conn.execute("SET TIME ZONE 'Pacific/Kiritimati'")  # UTC+14: already 1 March there
        # Compared in SQL: psycopg reads timestamps in the ISO style only.
        same = conn.execute(
            "SELECT unified.clock_now() = %s", (datetime(2028, 2, 29, 23, 59, 59, 123456, tzinfo=UTC),)
        ).fetchone()
    assert same == (True,)


# every "now" of the schema reads the clock


def test_no_function_or_default_of_the_schema_reads_now_directly(exai_dsn):
    with connect(exai_dsn) as conn:
        functions = conn.execute(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            # set_clock() writes clock_now()'s body, which names now() as text.
            " WHERE n.nspname = 'unified' AND p.proname NOT IN ('clock_now', 'set_clock')"
            " AND replace(p.prosrc, 'clock_now()', '') ~* %s",
            (
                r"\m(now|transaction_timestamp|statement_timestamp|clock_timestamp)\s*\("
                r"|\m(current_timestamp|localtimestamp)\M",
            ),
        ).fetchall()
        defaults = conn.execute(
            "SELECT c.relname, a.attname FROM pg_attrdef d"
            " JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
            " WHERE n.nspname IN ('unified', 'public') AND pg_get_expr(d.adbin, d.adrelid) ~ '(^|[^_])now\\(\\)'"
        ).fetchall()
        clock_defaults = conn.execute(
            "SELECT count(*) FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid"
            " WHERE c.oid IN ('unified.event_metric_events'::regclass, 'public.sessions'::regclass)"
            " AND pg_get_expr(d.adbin, d.adrelid) = 'unified.clock_now()'"
        ).fetchone()
    assert functions == []
    assert defaults == []
    assert clock_defaults == (6,)


def test_initial_partitions_follow_the_clock_when_the_schema_is_applied(empty_dsn):
    with connect(empty_dsn) as conn:
        apply_migrations(conn, as_of=datetime(2031, 5, 10, tzinfo=UTC))
        names = sorted(partitions(conn))
        # The instant applied to the migrations only: afterwards the connection is back on the real time.
        assert conn.execute("SELECT unified.clock_now() = now()").fetchone() == (True,)
    assert names == [f"event_metric_events_y2031m{m:02d}" for m in range(4, 9)]


def test_migrations_as_of_a_naive_instant_are_refused(empty_dsn):
    with connect(empty_dsn) as conn, pytest.raises(ValueError, match="timezone-aware"):
        apply_migrations(conn, as_of=datetime(2031, 5, 10))


def test_inserts_land_in_the_month_of_the_clock_across_years(exai_dsn, exai_db_clock):
    """Partition creation and the timestamp default both follow the clock, years apart."""
    placed = []
    for year, month in [(2027, 3), (2028, 2), (2029, 12), (2030, 1), (2033, 7)]:
        instant = exai_db_clock.set(f"{year}-{month:02d}-15T08:00:00Z")
        with connect(exai_dsn) as conn:
            created = conn.execute("SELECT unified.create_monthly_partition()").fetchone()[0]
            partition, _, timestamp, created_at, updated_at = insert_event(conn)
        placed.append((created, partition, timestamp, created_at, updated_at, instant))

    for created, partition, timestamp, created_at, updated_at, instant in placed:
        expected = f"event_metric_events_y{instant.year}m{instant.month:02d}"
        assert created == expected
        assert partition == f"unified.{expected}"
        assert timestamp == created_at == updated_at == instant


def test_explicit_timestamps_route_to_their_month_or_the_default_partition(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15")
    with connect(exai_dsn) as conn:
        drop_monthly_partitions(conn)
        for month in ("2026-12-15", "2027-06-15", "2029-02-15"):
            conn.execute("SELECT unified.create_monthly_partition(%s::timestamptz)", (month + "T00:00Z",))
        where = {
            # the first and last microsecond of a month, both sides of a year boundary
            "2026-12-01T00:00:00Z": "unified.event_metric_events_y2026m12",
            "2026-12-31T23:59:59.999999Z": "unified.event_metric_events_y2026m12",
            "2027-06-30T23:59:59.999999+00:00": "unified.event_metric_events_y2027m06",
            "2027-07-01T01:59:59+02:00": "unified.event_metric_events_y2027m06",  # still June in UTC
            "2029-02-28T12:00:00Z": "unified.event_metric_events_y2029m02",
            # months without a partition: the default one, never an error
            "2027-07-01T00:00:00Z": "unified.event_metric_events_default",
            "1999-12-31T23:59:59Z": "unified.event_metric_events_default",
            "2100-01-01T00:00:00Z": "unified.event_metric_events_default",
        }
        got = {ts: insert_event(conn, ts)[0] for ts in where}
        total = conn.execute("SELECT count(*) FROM unified.event_metric_events").fetchone()[0]
    assert got == where
    assert total == len(where)


def test_creating_next_months_partition_is_idempotent(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-12-20T18:00:00Z")
    with connect(exai_dsn) as conn:
        drop_monthly_partitions(conn)
        conn.execute("SELECT unified.create_monthly_partition()")
        before = partitions(conn)
        insert_event(conn, "2028-01-05T00:00:00Z")  # waiting in the default partition
        next_month = "SELECT unified.create_monthly_partition(unified.clock_now() + interval '1 month')"
        names = [conn.execute(next_month).fetchone()[0] for _ in range(3)]
        after = partitions(conn)
        moved = conn.execute(
            "SELECT tableoid::regclass::text FROM unified.event_metric_events WHERE event_timestamp = '2028-01-05+00'"
        ).fetchall()
    assert names == ["event_metric_events_y2028m01"] * 3
    assert set(after) - set(before) == {"event_metric_events_y2028m01"}
    assert after["event_metric_events_y2028m01"] == (month_start(2028, 1), month_start(2028, 2))
    assert moved == [("unified.event_metric_events_y2028m01",)]


def test_cleanup_drops_exactly_the_partitions_wholly_older_than_the_retention_window(exai_dsn, exai_db_clock):
    """Clock 2027-06-30 minus the default 90 days is 2027-04-01 00:00 UTC, a month boundary.

    March ends exactly there and is dropped; April starts there and is kept with its rows.
    """
    exai_db_clock.set("2027-06-30T00:00:00Z")
    cutoff = month_start(2027, 4)
    with connect(exai_dsn) as conn:
        for month in range(1, 9):
            conn.execute("SELECT unified.create_monthly_partition(%s)", (month_start(2027, month),))
            insert_event(conn, month_start(2027, month) + timedelta(days=9))
            insert_event(conn, month_start(2027, month + 1) - timedelta(microseconds=1))  # its last instant
        insert_event(conn, "2020-05-05T00:00:00Z")  # default partition, older than the window
        insert_event(conn, "2027-03-31T23:59:59Z")  # March partition's last second
        insert_event(conn, "2035-01-01T00:00:00Z")  # default partition, in the future
        before = partitions(conn)
        rows_before = dict(
            conn.execute("SELECT tableoid::regclass::text, count(*) FROM unified.event_metric_events GROUP BY 1")
        )

        dropped = sorted(r[0] for r in conn.execute("SELECT unified.cleanup_old_partitions()"))
        again = conn.execute("SELECT unified.cleanup_old_partitions()").fetchall()
        after = partitions(conn)
        rows_after = dict(
            conn.execute("SELECT tableoid::regclass::text, count(*) FROM unified.event_metric_events GROUP BY 1")
        )
        default_rows = [
            r[0]
            for r in conn.execute(
                "SELECT event_timestamp FROM unified.event_metric_events_default ORDER BY event_timestamp"
            )
        ]

    expected_dropped = sorted(name for name, (_, end) in before.items() if end <= cutoff)
    assert "event_metric_events_y2027m03" in expected_dropped
    assert "event_metric_events_y2027m04" not in expected_dropped
    assert dropped == expected_dropped
    assert again == []
    assert set(after) == set(before) - set(dropped)
    # Every kept partition keeps every row; no row of a dropped one is left anywhere.
    kept = {f"unified.{name}" for name in after}
    assert {k: v for k, v in rows_after.items() if k in kept} == {k: v for k, v in rows_before.items() if k in kept}
    assert rows_after["unified.event_metric_events_y2027m04"] == 2
    assert not any(f"unified.{name}" in rows_after for name in dropped)
    assert default_rows == [datetime(2035, 1, 1, tzinfo=UTC)]


def test_updated_at_moves_on_update_and_created_at_stays(exai_dsn, exai_db_clock):
    created = exai_db_clock.set("2027-03-15T10:00:00Z")
    with connect(exai_dsn) as conn:
        session = conn.execute(
            "INSERT INTO public.sessions (session_id) VALUES ('s') RETURNING created_at, updated_at, last_activity_at"
        ).fetchone()
        _, event_id, event_ts, *_ = insert_event(conn)
    updated = exai_db_clock.advance(hours=5)
    with connect(exai_dsn) as conn:
        session_after = conn.execute(
            "UPDATE public.sessions SET user_agent = 'curl' WHERE session_id = 's'"
            " RETURNING created_at, updated_at, last_activity_at"
        ).fetchone()
        event_after = conn.execute(
            "UPDATE unified.event_metric_events SET status = 'failed' WHERE id = %s"
            " RETURNING event_timestamp, created_at, updated_at",
            (event_id,),
        ).fetchone()

    assert session == (created, created, created)
    assert session_after == (created, updated, created)
    assert event_ts == created
    assert event_after == (created, created, updated)


# the materialized views: refreshed CONCURRENTLY, so readers and the refresh never wait for each other


def seed_views(conn):
    insert_event(conn, severity="error", duration_ms=40, event_data=Jsonb({"n": 1}))


def view_counts(conn):
    return conn.execute(
        "SELECT (SELECT count(*) FROM unified.mv_recent_events_24h),"
        " (SELECT count(*) FROM unified.mv_error_summary_7d),"
        " (SELECT count(*) FROM unified.mv_performance_metrics_1h)"
    ).fetchone()


def test_refresh_is_not_blocked_by_a_reader_holding_the_views(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15T12:00:00Z")
    with connect(exai_dsn) as reader, connect(exai_dsn) as refresher:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        before = view_counts(reader)  # holds ACCESS SHARE on all three views until it commits
        seed_views(refresher)
        # A refresh that needed an exclusive lock would wait for the reader and then fail here.
        refresher.execute("SET lock_timeout = '2s'")
        refresher.execute("SELECT unified.refresh_materialized_views()")
        during = view_counts(reader)
        assert reader.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        reader.execute("COMMIT")
        after = view_counts(reader)
    assert before == during == (0, 0, 0)  # the reader's snapshot is undisturbed
    assert after == (1, 1, 1)


def test_readers_are_not_blocked_by_a_refresh_in_progress(exai_dsn, exai_db_clock):
    exai_db_clock.set("2027-03-15T12:00:00Z")
    with connect(exai_dsn) as reader, connect(exai_dsn) as refresher:
        seed_views(refresher)
        refresher.execute("BEGIN")
        refresher.execute("SELECT unified.refresh_materialized_views()")  # locks held until COMMIT
        reader.execute("SET lock_timeout = '2s'")
        during = view_counts(reader)
        refresher.execute("COMMIT")
        after = view_counts(reader)
    assert during == (0, 0, 0)
    assert after == (1, 1, 1)


def test_control_a_plain_refresh_would_be_blocked_by_the_reader(exai_dsn):
    """Shows that the two tests above can fail: without CONCURRENTLY the refresh waits."""
    with connect(exai_dsn) as reader, connect(exai_dsn) as refresher:
        reader.execute("BEGIN")
        view_counts(reader)
        refresher.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            refresher.execute("REFRESH MATERIALIZED VIEW unified.mv_recent_events_24h")
        reader.execute("COMMIT")


def test_the_views_windows_follow_the_clock(exai_dsn, exai_db_clock):
    noon = exai_db_clock.set("2027-03-15T12:00:00Z")
    with connect(exai_dsn) as conn:
        for hours_ago, severity, duration in [(0.5, "info", 100), (0.75, "error", 300), (5, "critical", None)]:
            insert_event(conn, noon - timedelta(hours=hours_ago), severity=severity, duration_ms=duration)
        insert_event(conn, noon - timedelta(days=3), severity="error")  # 7-day window only
        insert_event(conn, noon - timedelta(days=10), severity="error")  # outside every window
        insert_event(conn, noon + timedelta(hours=2), severity="error")  # in the future
        conn.execute("SELECT unified.refresh_materialized_views()")
        at_noon = view_counts(conn)
        perf = conn.execute(
            "SELECT event_count, avg_duration_ms, max_duration_ms, window_end FROM unified.mv_performance_metrics_1h"
        ).fetchone()

    exai_db_clock.advance(days=1)
    with connect(exai_dsn) as conn:
        conn.execute("SELECT unified.refresh_materialized_views()")
        next_day = view_counts(conn)
        recent = conn.execute("SELECT event_timestamp FROM unified.mv_recent_events_24h").fetchall()
        errors_next_day = conn.execute("SELECT sum(error_count) FROM unified.mv_error_summary_7d").fetchone()

    # At noon: 3 recent events; error groups (day, severity): 15th error, 15th critical, 12th error.
    assert at_noon == (3, 3, 1)
    assert perf == (2, 200, 300, noon)
    # A day later only the event that was in the future is recent, and it joins the 15th's errors.
    assert recent == [(noon + timedelta(hours=2),)]
    assert next_day == (1, 3, 0)
    assert errors_next_day == (4,)
