"""One test clock for the app and the database: the managers the fixtures hand out, their
pools and every other connection to the test's database move with ``exai_db_clock``."""

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pytest_exai_sessions import SYSTEM_CLOCK, ManualClock, SessionLifecycle, SessionManager
from pytest_exai_sessions.compat import SessionManager as CompatManager
from pytest_exai_sessions.compat import to_epoch_seconds

T0 = datetime(2027, 3, 15, 9, 30, tzinfo=UTC)


def row(dsn, session_id):
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT session_state, created_at, last_activity_at, updated_at FROM public.sessions WHERE session_id = %s",
            (session_id,),
        ).fetchone()


@pytest.mark.asyncio
async def test_a_session_expires_after_an_hour_of_inactivity_without_waiting(session_manager, exai_dsn, exai_db_clock):
    # session_manager was built, started and connected before this line: the clock reaches it anyway.
    assert session_manager.session_timeout_secs == 3600
    exai_db_clock.set(T0)
    session = await session_manager.ensure("idle")

    exai_db_clock.advance(minutes=59)
    still_live = await session_manager.get("idle")
    exai_db_clock.advance(minutes=2)
    gone = await session_manager.get("idle")
    cleaned = await session_manager.cleanup_stale_sessions()

    assert session.created_at == session.last_activity == T0
    assert still_live == session
    assert gone is None
    assert cleaned == 1
    # Marked by the manager's open pool, whose trigger read the moved clock too.
    assert row(exai_dsn, "idle") == ("expired", T0, T0, T0 + timedelta(minutes=61))


@pytest.mark.asyncio
async def test_activity_keeps_a_session_live_past_its_first_hour(session_manager, exai_dsn, exai_db_clock):
    exai_db_clock.set(T0)
    await session_manager.ensure("busy")
    for _ in range(3):
        exai_db_clock.advance(minutes=50)
        used = await session_manager.update_activity("busy", request_duration_ms=5)
    exai_db_clock.advance(minutes=59)

    assert await session_manager.cleanup_stale_sessions() == 0
    assert await session_manager.get("busy") == used
    assert used.last_activity == T0 + timedelta(minutes=150)
    assert row(exai_dsn, "busy")[0] == "active"


@pytest.mark.asyncio
async def test_expires_at_is_read_on_the_same_clock(session_manager, exai_db_clock):
    exai_db_clock.set(T0)
    await session_manager.ensure("ticket", expires_at=T0 + timedelta(minutes=10))
    exai_db_clock.advance(minutes=9, seconds=59)
    assert await session_manager.get("ticket") is not None
    exai_db_clock.advance(seconds=1)
    assert await session_manager.get("ticket") is None


@pytest.mark.asyncio
async def test_a_manager_from_the_factory_and_one_rebuilt_after_a_crash_share_the_clock(
    session_manager_factory, crash_harness, exai_db_clock
):
    manager = await session_manager_factory(session_timeout_secs=600)
    exai_db_clock.set(T0)
    await manager.ensure("s")
    recovered = await crash_harness.crash_and_restart(manager)
    exai_db_clock.advance(minutes=9)
    kept = await recovered.get("s")
    exai_db_clock.advance(minutes=2)

    assert recovered.clock is exai_db_clock
    assert kept is not None and kept.created_at == T0
    assert await recovered.get("s") is None


@pytest.mark.asyncio
@pytest.mark.exai_sessions(record_events=True)
async def test_lifecycle_events_are_stamped_by_the_same_clock(session_manager, exai_db_clock):
    exai_db_clock.set(T0)
    await session_manager.ensure("e")
    exai_db_clock.advance(hours=2)
    await session_manager.cleanup_stale_sessions()

    events = await session_manager.events.query(session_id="e", newest_first=False)
    assert [(e.event_type, e.event_timestamp) for e in events] == [
        (SessionLifecycle.CREATED, T0),
        (SessionLifecycle.EXPIRED, T0 + timedelta(hours=2)),
    ]


@pytest.mark.asyncio
async def test_the_compat_manager_follows_the_clock_it_is_given(exai_dsn, exai_db_clock):
    exai_db_clock.set(T0)
    async with CompatManager(dsn=exai_dsn, clock=exai_db_clock) as manager:
        session = await manager.ensure("old-api")
        exai_db_clock.advance(minutes=30)
        metrics = await manager.get_session_metrics()
        exai_db_clock.advance(minutes=31)
        timed_out = manager.is_session_timed_out(session)
        cleaned = await manager.cleanup_stale_sessions()

    assert session.created_at == to_epoch_seconds(T0)
    assert metrics["oldest_session_age"] == 1800
    assert timed_out is True
    assert cleaned == 1
    assert row(exai_dsn, "old-api")[0] == "expired"


@pytest.mark.asyncio
async def test_the_child_of_run_and_kill_starts_at_the_clock(crash_harness, exai_db_clock, exai_dsn):
    exai_db_clock.set(T0)
    report = await crash_harness.run_and_kill("crash_workloads:counting_with_a_fault_point", kill_at="halfway")
    report.assert_ok()
    assert row(exai_dsn, "c0")[1] == T0


# the clock objects


def test_a_manual_clock_follows_the_real_time_until_set():
    clock = ManualClock()
    before = datetime.now(UTC)
    reading = clock.now()
    assert before <= reading <= datetime.now(UTC)
    assert clock.value is None

    assert clock.set("2028-02-29T23:59:59Z") == datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC)
    assert clock.advance(seconds=1) == datetime(2028, 3, 1, tzinfo=UTC)
    assert clock.now() == clock.now() == datetime(2028, 3, 1, tzinfo=UTC)  # frozen
    clock.reset()
    assert clock.value is None


def test_a_manual_clock_with_a_start_resets_to_it():
    clock = ManualClock(start="2030-12-31T23:59:59Z")
    assert clock.now() == datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
    clock.advance(seconds=1)
    assert clock.now() == datetime(2031, 1, 1, tzinfo=UTC)
    clock.reset()
    assert clock.now() == clock.start == datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)


@pytest.mark.asyncio
async def test_an_in_memory_manager_reads_its_clock_too():
    clock = ManualClock(start=T0)
    manager = SessionManager(None, session_timeout_secs=60, clock=clock)
    session = await manager.ensure("m")
    clock.advance(seconds=61)
    assert session.created_at == T0
    assert await manager.get("m") is None
    assert await manager.cleanup_stale_sessions() == 1


def test_a_manager_refuses_something_that_is_not_a_clock():
    with pytest.raises(TypeError, match="now\\(\\) method"):
        SessionManager(None, clock=datetime.now)
    assert SessionManager(None).clock is SYSTEM_CLOCK


# --exai-clock: every test of a run starts at one instant

START_TEST = """
import psycopg
import pytest
from datetime import UTC, datetime, timedelta

START = datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)


@pytest.mark.asyncio
async def test_the_managers_and_the_database_start_there(session_manager, exai_dsn, exai_db_clock):
    session = await session_manager.ensure("s")
    with psycopg.connect(exai_dsn) as conn:
        now, partition = conn.execute(
            "INSERT INTO unified.event_metric_events (event_type, event_category, source_system)"
            " VALUES ('tick', 'clock', 'tests') RETURNING unified.clock_now(), tableoid::regclass::text"
        ).fetchone()
    assert session.created_at == now == exai_db_clock.now() == exai_db_clock.start == START
    assert partition == "unified.event_metric_events_y2030m12"  # the template was built as of START
    exai_db_clock.advance(days=400)


@pytest.mark.parametrize("step", [1, 2])
def test_each_test_starts_there_again(exai_dsn, exai_db_clock, step):
    with psycopg.connect(exai_dsn) as conn:
        assert conn.execute("SELECT unified.clock_now()").fetchone() == (START,)
    exai_db_clock.advance(seconds=1)
    exai_db_clock.reset()
    assert exai_db_clock.now() == START
"""


@pytest.mark.parametrize("source", ["command line", "environment", "ini"])
def test_exai_clock_starts_every_test_at_one_instant(pytester, monkeypatch, source):
    instant = "2030-12-31T23:59:59Z"
    ini = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    args = ["-p", "no:cacheprovider"]
    if source == "command line":
        args.append(f"--exai-clock={instant}")
    elif source == "environment":
        monkeypatch.setenv("EXAI_SESSIONS_CLOCK", instant)
    else:
        ini += f"exai_clock = {instant}\n"
    pytester.makeini(ini)
    pytester.makepyfile(START_TEST)

    pytester.runpytest_subprocess(*args).assert_outcomes(passed=3)
