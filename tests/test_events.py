"""EventStore and the SessionManager's lifecycle events, against a real server."""

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from partitions import drop_monthly_partitions
from psycopg import sql
from pydantic import ValidationError

from pytest_exai_sessions import (
    Event,
    EventSeverity,
    EventStore,
    PersistenceError,
    RecordedEvent,
    SessionLifecycle,
    SessionManager,
)
from pytest_exai_sessions.events import LIFECYCLE_CATEGORY, LIFECYCLE_SOURCE

T0 = datetime(2027, 3, 15, 12, 0, tzinfo=UTC)


def event(**fields):
    return Event(**{"event_type": "checkout", "event_category": "shop", "source_system": "api", **fields})


async def rows(dsn, query="SELECT count(*) FROM unified.event_metric_events", params=()):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def block_event_type(dsn, event_type):
    """Make the database refuse events of this type: a real error in the same statement."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # DDL takes no parameters: the value goes in as a quoted literal.
        await conn.execute(
            sql.SQL(
                "ALTER TABLE unified.event_metric_events"
                " ADD CONSTRAINT no_such_event CHECK (event_type <> {}) NOT VALID"
            ).format(sql.Literal(event_type))
        )


async def unblock_event_types(dsn):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE unified.event_metric_events DROP CONSTRAINT no_such_event")


# recording and reading


@pytest.mark.asyncio
async def test_record_returns_the_row_as_stored(event_store, exai_dsn):
    recorded = await event_store.record(
        event(
            session_id="s1",
            user_id="u1",
            correlation_id="req-7",
            event_data={"cart": [1, 2], "total": 9.5},
            event_metrics={"items": 2},
            severity=EventSeverity.WARNING,
            duration_ms=12,
            priority=4,
        )
    )

    assert isinstance(recorded, RecordedEvent)
    assert isinstance(recorded.id, uuid.UUID)
    assert recorded.event_timestamp.tzinfo is UTC
    assert recorded.created_at == recorded.updated_at
    assert recorded.event_data == {"cart": [1, 2], "total": 9.5}
    assert recorded.event_metadata == {"schema_version": 1, "source_system": "api"}  # by the trigger
    assert (recorded.severity, recorded.status, recorded.priority) == ("warning", "completed", 4)
    assert await event_store.get(recorded.id) == recorded
    assert await event_store.get(str(recorded.id)) == recorded
    assert await event_store.get(uuid.uuid4()) is None
    assert await rows(exai_dsn, "SELECT session_id, duration_ms FROM unified.event_metric_events") == [("s1", 12)]


@pytest.mark.asyncio
async def test_the_timestamp_defaults_to_the_database_clock(exai_dsn, exai_db_clock, event_store):
    with psycopg.connect(exai_dsn, autocommit=True) as conn:
        drop_monthly_partitions(conn)
        exai_db_clock.set(T0)
        # Made by the clock: March 2027, whatever month the test runs in.
        conn.execute("SELECT unified.create_monthly_partition()")
    # event_store's pool was opened before set(): it follows the clock at once.
    stamped = await event_store.record(event())
    explicit = await event_store.record(event(event_timestamp=datetime(2020, 1, 2, tzinfo=UTC)))
    partitions = await rows(
        exai_dsn, "SELECT event_timestamp, tableoid::regclass::text FROM unified.event_metric_events ORDER BY 1"
    )

    assert stamped.event_timestamp == stamped.created_at == T0
    assert explicit.event_timestamp == datetime(2020, 1, 2, tzinfo=UTC)
    assert explicit.created_at == T0
    assert partitions == [
        (datetime(2020, 1, 2, tzinfo=UTC), "unified.event_metric_events_default"),
        (T0, "unified.event_metric_events_y2027m03"),
    ]


@pytest.mark.asyncio
async def test_recording_a_recorded_event_again_makes_a_copy(event_store):
    first = await event_store.record(event(event_timestamp=T0))
    copy = await event_store.record(first)
    assert copy.id != first.id
    assert copy.event_timestamp == first.event_timestamp


@pytest.mark.asyncio
async def test_query_by_type_category_source_session_user_severity_and_time(event_store):
    recorded = {}
    for name, minutes, fields in [
        ("a", 0, {"session_id": "s1", "user_id": "u1"}),
        ("b", 10, {"session_id": "s1", "user_id": "u1", "event_type": "login", "event_category": "auth"}),
        ("c", 20, {"session_id": "s2", "user_id": "u2", "severity": "error", "correlation_id": "r1"}),
        ("d", 30, {"session_id": "s2", "source_system": "worker"}),
        ("e", 60 * 24 * 40, {"session_id": "s1"}),  # another month
    ]:
        recorded[name] = await event_store.record(event(event_timestamp=T0 + timedelta(minutes=minutes), **fields))

    async def names(**filters):
        found = await event_store.query(**filters)
        by_id = {e.id: n for n, e in recorded.items()}
        return [by_id[e.id] for e in found]

    assert await names() == ["e", "d", "c", "b", "a"]  # newest first
    assert await names(newest_first=False) == ["a", "b", "c", "d", "e"]
    assert await names(event_type="login") == ["b"]
    assert await names(event_category="shop") == ["e", "d", "c", "a"]
    assert await names(source_system="worker") == ["d"]
    assert await names(session_id="s1") == ["e", "b", "a"]
    assert await names(user_id="u2") == ["c"]
    assert await names(correlation_id="r1") == ["c"]
    assert await names(severity="error") == ["c"]
    assert await names(severity=EventSeverity.INFO, session_id="s2") == ["d"]
    # since inclusive, until exclusive
    assert await names(since=T0 + timedelta(minutes=10), until=T0 + timedelta(minutes=30)) == ["c", "b"]
    assert await names(since=T0 + timedelta(days=1)) == ["e"]
    assert await names(until=T0 + timedelta(minutes=10)) == ["a"]
    assert await names(limit=2) == ["e", "d"]
    assert await names(session_id="nobody") == []
    assert await event_store.query(event_type="checkout", limit=None) == await event_store.query(event_type="checkout")


# the summaries of the materialized views


@pytest.mark.asyncio
async def test_summaries_hold_what_the_views_hold_as_of_the_clock(exai_dsn, exai_db_clock):
    exai_db_clock.set(T0)
    async with await EventStore.open(exai_dsn) as store:
        await store.record(event(event_timestamp=T0 - timedelta(minutes=10), duration_ms=100, response_time_ms=5))
        await store.record(event(event_timestamp=T0 - timedelta(minutes=20), duration_ms=300, response_time_ms=15))
        await store.record(event(event_timestamp=T0 - timedelta(hours=3), severity="error", event_type="pay"))
        await store.record(event(event_timestamp=T0 - timedelta(days=2), severity="critical", event_type="pay"))
        await store.record(event(event_timestamp=T0 - timedelta(days=9), severity="error"))

        assert await store.recent_events() == []  # nothing until refreshed
        await store.refresh_summaries()
        recent = await store.recent_events()
        errors = await store.error_summary()
        performance = await store.performance_metrics()

    assert [e.event_timestamp for e in recent] == [
        T0 - timedelta(minutes=10),
        T0 - timedelta(minutes=20),
        T0 - timedelta(hours=3),
    ]
    assert [(e.event_day.isoformat(), e.event_type, e.severity, e.error_count) for e in errors] == [
        ("2027-03-13", "pay", "critical", 1),
        ("2027-03-15", "pay", "error", 1),
    ]
    assert len(performance) == 1
    perf = performance[0]
    assert (perf.event_type, perf.source_system, perf.event_count) == ("checkout", "api", 2)
    assert (perf.avg_duration_ms, perf.max_duration_ms, perf.avg_response_time_ms) == (200.0, 300, 10.0)
    assert perf.p95_duration_ms == pytest.approx(290.0)
    assert (perf.window_start, perf.window_end) == (T0 - timedelta(hours=1), T0)


# bad input and database errors


@pytest.mark.parametrize(
    "fields",
    [
        {"event_type": ""},
        {"event_type": "   "},
        {"event_category": "a\x00b"},
        {"source_system": 7},
        {"event_timestamp": datetime(2027, 3, 15)},  # naive
        {"event_data": {"tags": {"a"}}},
        {"event_metrics": {"ratio": float("nan")}},
        {"event_metadata": []},
        {"severity": "fatal"},
        {"status": "done"},
        {"priority": 11},
        {"retry_count": -1},
        {"duration_ms": -5},
        {"duration_ms": 2**63},
        {"duration_ms": 1.5},
        {"session_id": "x\x00"},
        {"colour": "blue"},
    ],
)
def test_bad_events_are_refused_by_the_model(fields):
    with pytest.raises(ValidationError):
        event(**fields)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("filters", "error", "message"),
    [
        ({"since": T0, "until": T0 - timedelta(seconds=1)}, ValueError, "is after until"),
        ({"since": datetime(2027, 3, 15)}, ValueError, "timezone-aware"),
        ({"until": "2027-03-15"}, TypeError, "must be a datetime"),
        ({"limit": 0}, ValueError, "positive int"),
        ({"limit": True}, ValueError, "positive int"),
        ({"limit": 10**6}, ValueError, "narrow the time range"),
        ({"severity": "fatal"}, ValueError, "fatal"),
        ({"session_id": "a\x00"}, ValueError, "session_id: text contains NUL"),
        ({"event_type": 3}, TypeError, "event_type must be a str"),
    ],
)
async def test_bad_queries_raise_a_clear_error(event_store, filters, error, message):
    with pytest.raises(error, match=message):
        await event_store.query(**filters)


@pytest.mark.asyncio
async def test_bad_arguments_write_nothing(event_store, exai_dsn):
    with pytest.raises(TypeError, match="takes an Event"):
        await event_store.record({"event_type": "x"})
    with pytest.raises(ValueError, match="must be a UUID"):
        await event_store.get("not-a-uuid")
    assert await rows(exai_dsn) == [(0,)]


@pytest.mark.asyncio
async def test_a_database_error_raises_persistence_error(event_store, exai_dsn):
    await block_event_type(exai_dsn, "forbidden")
    with pytest.raises(PersistenceError, match="recording event 'forbidden' failed: CheckViolation"):
        await event_store.record(event(event_type="forbidden"))
    assert await rows(exai_dsn) == [(0,)]


@pytest.mark.asyncio
async def test_a_closed_store_raises_persistence_error(exai_dsn):
    store = await EventStore.open(exai_dsn)
    await store.close()
    with pytest.raises(PersistenceError, match="querying events failed"):
        await store.query()


# the SessionManager's lifecycle


async def lifecycle(dsn):
    return await rows(
        dsn,
        "SELECT event_type, session_id, user_id, event_category, source_system, event_data, event_metrics"
        " FROM unified.event_metric_events ORDER BY created_at, event_timestamp, id",
    )


def lifecycle_row(event_type, session_id=None, user_id=None, data=None, metrics=None):
    return (str(event_type), session_id, user_id, LIFECYCLE_CATEGORY, LIFECYCLE_SOURCE, data or {}, metrics or {})


@pytest.mark.asyncio
async def test_the_manager_records_created_expired_and_removed(session_manager_factory, exai_dsn, exai_db_clock):
    # Events are listed in the order of their timestamps: the clock moves a second per step.
    exai_db_clock.set(T0)
    manager = await session_manager_factory(record_events=True)
    recorded_at_start = await lifecycle(exai_dsn)

    async def a_request():
        async with manager.request("a"):
            pass

    steps = [
        lambda: manager.ensure("a", user_id="alice"),
        lambda: manager.ensure("a"),  # exists: nothing new
        lambda: manager.ensure("b"),
        lambda: manager.update_activity("a", request_duration_ms=5),  # the hot path records nothing
        lambda: manager.update("a", data={"step": 2}),
        a_request,
        lambda: manager.remove("a"),
        lambda: manager.remove("never-existed"),  # nothing removed, nothing recorded
        lambda: manager.update("b", expires_at=exai_db_clock.now()),
    ]
    for step in steps:
        exai_db_clock.advance(seconds=1)
        await step()
    exai_db_clock.advance(seconds=1)
    assert await manager.cleanup_stale_sessions() == 1

    assert recorded_at_start == []  # starting loads nothing, so it recovers (and records) nothing
    assert await lifecycle(exai_dsn) == [
        lifecycle_row(SessionLifecycle.CREATED, "a", "alice"),
        lifecycle_row(SessionLifecycle.CREATED, "b"),
        lifecycle_row(SessionLifecycle.REMOVED, "a", "alice"),
        lifecycle_row(SessionLifecycle.EXPIRED, "b", data={"reason": "timed out"}),
    ]
    assert manager.options["record_events"] is True
    assert [e.session_id for e in await manager.events.query(session_id="a")] == ["a", "a"]


@pytest.mark.asyncio
async def test_an_expired_id_used_again_is_recorded_as_created_again(session_manager_factory, exai_dsn):
    manager = await session_manager_factory(record_events=True)
    await manager.ensure("a")
    await manager.update("a", state="expired")
    await manager.ensure("a")
    created = await rows(
        exai_dsn, "SELECT count(*) FROM unified.event_metric_events WHERE event_type = %s", ("session.created",)
    )
    assert created == [(2,)]


@pytest.mark.asyncio
async def test_each_complete_recovery_records_one_event_with_the_count(
    session_manager_factory, crash_harness, exai_dsn, exai_db_clock
):
    manager = await session_manager_factory(record_events=True)
    for number in range(25):
        await manager.ensure(f"s{number}")

    restarted = await crash_harness.crash_and_restart(manager)
    assert len(await restarted.recover_all_sessions()) == 25
    await restarted.remove("s0")
    exai_db_clock.advance(seconds=1)  # the events are listed in the order of their timestamps
    assert len(await restarted.recover_all_sessions()) == 24

    recoveries = await rows(
        exai_dsn,
        "SELECT event_metrics, duration_ms IS NOT NULL FROM unified.event_metric_events"
        " WHERE event_type = 'session.recovered' ORDER BY created_at",
    )
    assert restarted.record_events is True
    assert recoveries == [({"sessions": 25}, True), ({"sessions": 24}, True)]


@pytest.mark.asyncio
async def test_without_record_events_nothing_is_recorded(session_manager, exai_dsn):
    await session_manager.ensure("a")
    await session_manager.remove("a")
    assert session_manager.events is None
    assert session_manager.options["record_events"] is False
    assert await rows(exai_dsn) == [(0,)]


def test_record_events_needs_a_store():
    with pytest.raises(ValueError, match="record_events=True needs a store"):
        SessionManager(None, record_events=True)


# a failure to record is a database error: it raises, and memory stays as the database is


@pytest.mark.asyncio
async def test_a_failed_created_event_creates_nothing(session_manager_factory, exai_dsn):
    manager = await session_manager_factory(record_events=True)
    await block_event_type(exai_dsn, "session.created")

    with pytest.raises(PersistenceError, match="creating session 'a' failed: CheckViolation"):
        await manager.ensure("a")

    assert await manager.list_ids() == []
    assert await rows(exai_dsn, "SELECT count(*) FROM public.sessions") == [(0,)]


@pytest.mark.asyncio
async def test_a_failed_removed_event_removes_nothing(session_manager_factory, exai_dsn):
    manager = await session_manager_factory(record_events=True)
    await manager.ensure("a")
    await block_event_type(exai_dsn, "session.removed")

    with pytest.raises(PersistenceError, match="deleting session 'a' failed"):
        await manager.remove("a")

    assert await manager.list_ids() == ["a"]
    assert await rows(exai_dsn, "SELECT session_id FROM public.sessions") == [("a",)]


@pytest.mark.asyncio
async def test_a_failed_expired_event_expires_nothing(session_manager_factory, exai_dsn):
    manager = await session_manager_factory(record_events=True)
    await manager.ensure("a")
    await manager.update("a", expires_at=manager.clock.now())
    await block_event_type(exai_dsn, "session.expired")

    with pytest.raises(PersistenceError, match="expiring timed-out sessions failed"):
        await manager.cleanup_stale_sessions()

    assert await rows(exai_dsn, "SELECT session_state FROM public.sessions") == [("active",)]
    await unblock_event_types(exai_dsn)
    assert await manager.cleanup_stale_sessions() == 1
    assert await rows(exai_dsn, "SELECT session_state FROM public.sessions") == [("expired",)]


@pytest.mark.asyncio
async def test_a_failed_recovery_event_raises_from_the_recovery(session_manager_factory, exai_dsn):
    first = await session_manager_factory()
    await first.ensure("a")
    await block_event_type(exai_dsn, "session.recovered")
    manager = await session_manager_factory(record_events=True)

    with pytest.raises(PersistenceError, match=r"recording event 'session\.recovered' failed"):
        await manager.recover_all_sessions()
