"""The compat SessionManager behaves like the original in-memory one, in memory and persisted.

Tests taking ``mode`` run twice: "memory" (the original's behaviour, no database) and
"postgres" (``enable_persistence=True`` with the DSN in ``EXAI_SESSIONS_DSN``). Where a
scenario has two halves, ``await mode.restart(manager)`` sits between them: in the
postgres run it abandons the manager as a killed process would (the crash harness
terminates its connections on the server) and a new manager recovers; in memory a crash
would lose everything, so the same manager carries on. Every assertion after it holds
in both runs.
"""

import asyncio
import random
import string
import time
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
import pytest_asyncio

from pytest_exai_sessions import ManualClock, PersistenceError, SessionLimitExceeded, assert_full_recovery, snapshot
from pytest_exai_sessions import SessionManager as CoreSessionManager
from pytest_exai_sessions.compat import DSN_ENV, Session, SessionManager, from_epoch_seconds, to_epoch_seconds

SETTINGS_ENV = (
    "SESSION_TIMEOUT_SECS",
    "SESSION_MAX_CONCURRENT",
    "SESSION_CLEANUP_INTERVAL",
    "EXAI_WS_SESSION_MAX_INFLIGHT",
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def original_defaults(monkeypatch):
    """The original's defaults, whatever the environment running the tests holds."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)


class Mode:
    """Builds compat managers, in memory or persisted, and crashes and restarts persisted ones.

    ``clock``: a test clock the managers may be given (``make(clock=mode.clock)``); in the
    postgres run it is ``exai_db_clock``, which moves the database's time too.
    """

    def __init__(self, name, harness=None, clock=None):
        self.name = name
        self.persisted = harness is not None
        self.clock = clock if clock is not None else ManualClock()
        self._harness = harness
        self._managers = []

    def make(self, **options):
        """A compat manager built as the application builds it (persisted: DSN from the environment)."""
        manager = SessionManager(enable_persistence=self.persisted, **options)
        self._managers.append(manager)
        return manager

    async def restart(self, manager):
        """Crash ``manager`` and return the manager of the restarted process (the same one in memory)."""
        if not self.persisted:
            return manager
        await self._harness.abandon(manager.core)
        return self.make(**manager.options, clock=manager.clock)

    async def aclose(self):
        for manager in self._managers:
            await manager.aclose()


@pytest.fixture(params=["memory", "postgres"])
def compat_backend(request, monkeypatch):
    if request.param == "memory":
        return Mode("memory")
    dsn = request.getfixturevalue("exai_dsn")
    harness = request.getfixturevalue("crash_harness")
    monkeypatch.setenv(DSN_ENV, dsn)
    return Mode("postgres", harness, request.getfixturevalue("exai_db_clock"))


@pytest_asyncio.fixture
async def mode(compat_backend):
    yield compat_backend
    await compat_backend.aclose()


async def get_all(manager, ids):
    return {session_id: await manager.get(session_id) for session_id in ids}


# -- creation, ids, identity


@pytest.mark.asyncio
async def test_ensure_creates_a_session_with_the_original_attributes(mode):
    manager = mode.make()

    session = await manager.ensure("test-session-1")

    assert isinstance(session, Session)
    assert session.session_id == "test-session-1"
    assert isinstance(session.created_at, float)
    assert session.created_at == pytest.approx(time.time(), abs=60)  # epoch seconds
    assert session.last_activity >= session.created_at > 0
    assert (session.inflight, session.closed, session.max_inflight) == (0, False, 8)
    assert isinstance(session.sem, asyncio.BoundedSemaphore)
    for _ in range(8):
        await session.sem.acquire()
    assert session.sem.locked()  # max_inflight slots, no more
    for _ in range(8):
        session.sem.release()
    with pytest.raises(ValueError, match="released too many times"):
        session.sem.release()

    manager = await mode.restart(manager)

    recovered = await manager.get("test-session-1")
    assert (recovered.created_at, recovered.last_activity) == (session.created_at, session.last_activity)
    assert (recovered.inflight, recovered.closed, recovered.max_inflight) == (0, False, 8)


@pytest.mark.asyncio
async def test_ensure_without_an_id_makes_a_new_random_one(mode):
    manager = mode.make()

    first = await manager.ensure(None)
    second = await manager.ensure("")

    for session in (first, second):
        assert len(session.session_id) == 43  # secrets.token_urlsafe(32), as the original
        assert set(session.session_id) <= set(string.ascii_letters + string.digits + "-_")
    assert first.session_id != second.session_id
    ids = sorted([first.session_id, second.session_id])
    assert sorted(await manager.list_ids()) == ids

    manager = await mode.restart(manager)

    assert sorted(await manager.list_ids()) == ids


@pytest.mark.asyncio
async def test_get_returns_the_very_object_ensure_returned(mode):
    manager = mode.make()

    created = await manager.ensure("test-session-2")
    created.inflight = 2  # the application's own bookkeeping on the object

    assert await manager.get("test-session-2") is created
    assert await manager.ensure("test-session-2") is created
    assert (await manager.get("test-session-2")).inflight == 2
    assert await manager.get("nonexistent") is None

    manager = await mode.restart(manager)

    recovered = await manager.get("test-session-2")
    assert await manager.get("test-session-2") is recovered
    assert await manager.ensure("test-session-2") is recovered
    assert recovered.created_at == created.created_at
    if mode.persisted:
        assert recovered is not created  # a new process, new objects; inflight starts again at 0
        assert recovered.inflight == 0


# -- timeouts, activity, cleanup, metrics


@pytest.mark.asyncio
async def test_idle_sessions_time_out_and_cleanup_removes_them(mode):
    manager = mode.make(session_timeout_secs=1, clock=mode.clock)
    ids = ["session-1", "session-2", "session-3"]
    for session_id in ids:
        await manager.ensure(session_id)
    before = await manager.get_session_metrics()

    manager = await mode.restart(manager)

    sessions = await get_all(manager, ids)
    assert not any(manager.is_session_timed_out(session) for session in sessions.values())
    mode.clock.advance(seconds=1.1)
    assert all(manager.is_session_timed_out(session) for session in sessions.values())
    timed_out = await manager.get_session_metrics()
    # The original revived a timed-out session on activity until cleanup ran: so does this one.
    await manager.update_activity("session-3")
    assert not manager.is_session_timed_out(sessions["session-3"])

    assert await manager.cleanup_stale_sessions() == 2
    assert await manager.list_ids() == ["session-3"]
    assert await manager.cleanup_stale_sessions() == 0
    after = await manager.get_session_metrics()

    assert (before["total_sessions"], before["active_sessions"]) == (3, 3)
    assert before["oldest_session_age"] >= before["avg_session_age"] >= before["newest_session_age"] >= 0
    assert before["persistence_enabled"] is mode.persisted
    assert (timed_out["total_sessions"], timed_out["active_sessions"]) == (3, 0)
    assert timed_out["newest_session_age"] >= 1
    assert (after["total_sessions"], after["active_sessions"]) == (1, 1)
    assert after["oldest_session_age"] < 1  # the revived session started again

    manager = await mode.restart(manager)

    assert await manager.list_ids() == ["session-3"]  # the cleaned ones stay gone
    assert await manager.get("session-1") is None


@pytest.mark.asyncio
async def test_activity_keeps_a_session_alive(mode):
    manager = mode.make(session_timeout_secs=1.5, clock=mode.clock)
    kept = await manager.ensure("kept")
    await manager.ensure("idle")
    created_activity = kept.last_activity
    mode.clock.advance(seconds=0.8)

    await manager.update_activity("kept", request_duration_ms=12)
    await manager.update_activity("kept", 3.4)  # float milliseconds, as callers measured them
    await manager.update_activity("never-created")  # ignored, as by the original

    assert kept.last_activity > created_activity  # the object ensure returned moved forward
    assert (kept.request_count, kept.total_duration_ms) == (2, 15)

    manager = await mode.restart(manager)

    kept, idle = (await get_all(manager, ["kept", "idle"])).values()
    mode.clock.advance(seconds=0.8)
    assert not manager.is_session_timed_out(kept)
    assert manager.is_session_timed_out(idle)
    assert await manager.cleanup_stale_sessions() == 1
    assert await manager.list_ids() == ["kept"]
    assert (kept.request_count, kept.total_duration_ms) == (2, 15)
    assert await manager.get("never-created") is None


@pytest.mark.asyncio
async def test_metrics_of_an_empty_manager(mode):
    manager = mode.make()

    metrics = await manager.get_session_metrics()

    assert metrics == {
        "total_sessions": 0,
        "active_sessions": 0,
        "oldest_session_age": 0,
        "newest_session_age": 0,
        "avg_session_age": 0,
        "persistence_enabled": mode.persisted,
    }


# -- limits


@pytest.mark.asyncio
async def test_the_limit_refuses_new_sessions_until_room_is_freed(mode):
    manager = mode.make(max_concurrent_sessions=2)
    first = await manager.ensure("session-1")
    await manager.ensure("session-2")

    with pytest.raises(RuntimeError, match="Maximum concurrent sessions") as refused:
        await manager.ensure("session-overflow")
    assert isinstance(refused.value, SessionLimitExceeded)
    assert await manager.ensure("session-1") is first  # an existing session is never refused

    manager = await mode.restart(manager)

    with pytest.raises(RuntimeError, match="Maximum concurrent sessions"):
        await manager.ensure("session-overflow")  # recovered sessions count
    await manager.remove("session-2")  # removing frees room
    await manager.ensure("session-3")
    (await manager.get("session-1")).closed = True  # the application closed it: it counts as timed out
    assert manager.is_session_timed_out(await manager.get("session-1"))
    assert await manager.cleanup_stale_sessions() == 1  # and cleanup frees its room
    await manager.ensure("session-4")
    assert sorted(await manager.list_ids()) == ["session-3", "session-4"]

    manager = await mode.restart(manager)

    assert sorted(await manager.list_ids()) == ["session-3", "session-4"]  # closed stays closed


# -- removal and independence


@pytest.mark.asyncio
async def test_remove_forgets_a_session_and_ignores_unknown_ids(mode):
    manager = mode.make()
    await manager.ensure("session-1")
    await manager.ensure("session-2")
    assert await manager.get("session-1") is not None

    await manager.remove("session-1")
    await manager.remove("session-1")
    await manager.remove("nonexistent")
    await manager.remove("")  # no session can have this id: unknown, not an error

    assert await manager.get("session-1") is None
    assert await manager.list_ids() == ["session-2"]

    manager = await mode.restart(manager)

    assert await manager.get("session-1") is None
    assert await manager.list_ids() == ["session-2"]


@pytest.mark.asyncio
@pytest.mark.parametrize("compat_backend", ["memory"], indirect=True)
async def test_two_managers_are_independent_in_memory(mode):
    first = mode.make(max_concurrent_sessions=1)
    second = mode.make(max_concurrent_sessions=1)
    await second.list_ids()  # both running before anything is written

    mine = await first.ensure("session-1")
    theirs = await second.ensure("session-2")  # each has its own limit

    assert await second.list_ids() == ["session-2"]
    assert await first.list_ids() == ["session-1"]
    assert await second.get("session-1") is None
    await second.remove("session-2")
    assert await first.get("session-1") is mine
    assert theirs.session_id not in await second.list_ids()


@pytest.mark.asyncio
@pytest.mark.parametrize("compat_backend", ["postgres"], indirect=True)
async def test_persistent_managers_on_one_database_serve_one_set_of_sessions(mode):
    first = mode.make(max_concurrent_sessions=2)
    second = mode.make(max_concurrent_sessions=2)
    await second.list_ids()  # both running before anything is written

    mine = await first.ensure("session-1")
    await second.ensure("session-2")

    # The limit counts the database's live sessions, whichever replica created them.
    with pytest.raises(SessionLimitExceeded):
        await first.ensure("session-3")
    assert await second.list_ids() == await first.list_ids() == ["session-1", "session-2"]
    # A replica loads what the other wrote into an object of its own, and sees its changes.
    loaded = await second.get("session-1")
    assert loaded is not mine
    assert (loaded.session_id, loaded.created_at) == (mine.session_id, mine.created_at)
    await first.update_activity("session-1", request_duration_ms=3)
    assert (await second.get("session-1")) is loaded
    assert (loaded.request_count, loaded.total_duration_ms) == (1, 3)
    # A removal on one is a removal on both: the other never hands the session out again.
    await second.remove("session-1")
    assert await first.get("session-1") is None
    await first.update_activity("session-1")  # ignored: it does not come back
    assert await second.list_ids() == await first.list_ids() == ["session-2"]


# -- settings


@pytest.mark.asyncio
async def test_the_environment_sets_the_defaults(mode, monkeypatch):
    monkeypatch.setenv("SESSION_TIMEOUT_SECS", "120")
    monkeypatch.setenv("SESSION_MAX_CONCURRENT", "2")
    monkeypatch.setenv("SESSION_CLEANUP_INTERVAL", "7.5")
    monkeypatch.setenv("EXAI_WS_SESSION_MAX_INFLIGHT", "3")
    manager = mode.make()

    session = await manager.ensure("a")
    await manager.ensure("b")

    assert manager.options == {
        "session_timeout_secs": 120,
        "max_concurrent_sessions": 2,
        "cleanup_interval_secs": 7.5,
        "max_inflight": 3,
    }
    assert session.max_inflight == 3
    with pytest.raises(RuntimeError, match=r"Maximum concurrent sessions \(2\)"):
        await manager.ensure("c")
    # The core underneath (and its store, when persisted) runs with the same settings.
    assert manager.core.options["session_timeout_secs"] == 120
    assert manager.core.persistence_enabled is mode.persisted


def test_without_environment_the_original_defaults_apply():
    manager = SessionManager()

    assert manager.options == {
        "session_timeout_secs": 3600,
        "max_concurrent_sessions": 100,
        "cleanup_interval_secs": 300,
        "max_inflight": 8,
    }
    assert manager.persistence_enabled is False
    assert Session("s").max_inflight == 8


def test_environment_is_read_when_a_manager_is_built_and_arguments_win(monkeypatch):
    monkeypatch.setenv("SESSION_TIMEOUT_SECS", "10")
    monkeypatch.setenv("SESSION_MAX_CONCURRENT", " 5 ")
    monkeypatch.setenv("SESSION_CLEANUP_INTERVAL", "")  # blank, as `VAR=` in an env file: unset
    monkeypatch.setenv("EXAI_WS_SESSION_MAX_INFLIGHT", "2")

    from_environment = SessionManager()
    explicit = SessionManager(session_timeout_secs=30, max_concurrent_sessions=7, cleanup_interval_secs=60)

    assert from_environment.options == {
        "session_timeout_secs": 10,
        "max_concurrent_sessions": 5,
        "cleanup_interval_secs": 300,
        "max_inflight": 2,
    }
    assert explicit.options == {
        "session_timeout_secs": 30,
        "max_concurrent_sessions": 7,
        "cleanup_interval_secs": 60,
        "max_inflight": 2,
    }
    assert Session("s").max_inflight == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SESSION_TIMEOUT_SECS", "an hour"),
        ("SESSION_TIMEOUT_SECS", "0"),
        ("SESSION_TIMEOUT_SECS", "nan"),
        ("SESSION_MAX_CONCURRENT", "1.5"),
        ("SESSION_MAX_CONCURRENT", "-3"),
        ("SESSION_CLEANUP_INTERVAL", "5m"),
        ("SESSION_CLEANUP_INTERVAL", "-1"),
        ("EXAI_WS_SESSION_MAX_INFLIGHT", "eight"),
    ],
)
def test_a_malformed_environment_value_is_an_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)

    with pytest.raises(ValueError, match=f"environment variable {name}="):
        SessionManager()


def test_a_malformed_max_inflight_also_stops_building_a_session(monkeypatch):
    monkeypatch.setenv("EXAI_WS_SESSION_MAX_INFLIGHT", "0")

    with pytest.raises(ValueError, match="EXAI_WS_SESSION_MAX_INFLIGHT='0' must be at least 1"):
        Session("s")


@pytest.mark.parametrize(
    "arguments",
    [
        {"session_timeout_secs": 0},
        {"max_concurrent_sessions": 0},
        {"max_concurrent_sessions": True},
        {"cleanup_interval_secs": -1},
        {"max_inflight": 2.5},
    ],
)
def test_bad_arguments_are_refused_when_the_manager_is_built(arguments):
    (name,) = arguments

    with pytest.raises(ValueError, match=name):
        SessionManager(**arguments)


def test_persistence_must_know_its_database(monkeypatch):
    monkeypatch.delenv(DSN_ENV, raising=False)

    with pytest.raises(ValueError, match=f"enable_persistence=True needs a database: set {DSN_ENV}"):
        SessionManager(enable_persistence=True)  # the seed fell back to memory here, silently
    with pytest.raises(ValueError, match="contradicts"):
        SessionManager(enable_persistence=False, dsn="dbname=app")
    assert SessionManager(dsn="dbname=app").persistence_enabled  # a DSN alone turns it on


# -- no event loop and no database when built


@pytest.mark.parametrize("persisted", [False, True], ids=["memory", "postgres"])
def test_a_manager_built_outside_any_event_loop_works_in_the_loop_that_uses_it(persisted, request, monkeypatch):
    if persisted:
        monkeypatch.setenv(DSN_ENV, request.getfixturevalue("exai_dsn"))
    with pytest.raises(RuntimeError, match="no running event loop"):
        asyncio.get_running_loop()

    # As the daemon did at import time: `_sessions = SessionManager()`.
    manager = SessionManager(session_timeout_secs=60, enable_persistence=persisted)
    standalone = Session("standalone", max_inflight=1)

    async def main():
        try:
            async with standalone.sem:
                assert standalone.sem.locked()
            return await serve(manager, clients=3)
        finally:
            await manager.aclose()

    outcome = asyncio.run(main())

    assert outcome["metrics"]["total_sessions"] == 3
    assert outcome["metrics"]["persistence_enabled"] is persisted


def test_a_persistent_manager_connects_on_first_use_and_reports_failures(monkeypatch):
    monkeypatch.setenv(DSN_ENV, "host=/nonexistent-exai-socket-dir dbname=nowhere")

    manager = SessionManager(enable_persistence=True, store_options={"timeout": 0.5, "connect_timeout": 1})

    assert manager.persistence_enabled
    with pytest.raises(RuntimeError, match="connects on first use"):
        _ = manager.core

    async def first_use():
        with pytest.raises(PersistenceError, match="nonexistent-exai-socket-dir"):
            await manager.ensure("s")
        # Not a silent fallback to memory: the next call tries again and fails again.
        with pytest.raises(PersistenceError):
            await manager.list_ids()

    asyncio.run(first_use())


# -- persistence through the same core


@pytest.mark.asyncio
async def test_recovered_floats_equal_the_ones_before_the_crash(mode):
    manager = mode.make()
    ids = [f"session-{n}" for n in range(25)]
    for session_id in ids:
        await manager.ensure(session_id)
    for session_id in ids[::3]:
        await manager.update_activity(session_id, request_duration_ms=7)
    sessions = await get_all(manager, ids)
    before = {sid: (s.created_at, s.last_activity, s.request_count, s.total_duration_ms) for sid, s in sessions.items()}
    records = snapshot(manager.core)
    # Each float is the stored microsecond timestamp of the core's record, exactly.
    for session_id, session in sessions.items():
        assert from_epoch_seconds(session.created_at) == records[session_id].created_at
        assert to_epoch_seconds(records[session_id].last_activity) == session.last_activity

    manager = await mode.restart(manager)

    recovered = await get_all(manager, ids)
    after = {sid: (s.created_at, s.last_activity, s.request_count, s.total_duration_ms) for sid, s in recovered.items()}
    assert after == before  # == on floats: exactly equal, not approximately
    assert_full_recovery(records, manager.core)  # and every field of the core's records


@pytest.mark.asyncio
async def test_recover_all_sessions_loads_what_another_manager_wrote(mode):
    manager = mode.make()
    assert await manager.recover_all_sessions() == 0
    other = mode.make()
    await other.ensure("written-by-another-replica")

    recovered = await manager.recover_all_sessions()

    if mode.persisted:
        assert recovered == 1
        assert await manager.list_ids() == ["written-by-another-replica"]
    else:
        assert recovered == 0  # two in-memory managers share nothing
        assert await manager.list_ids() == []
    assert await manager.recover_all_sessions() == 0  # nothing new the second time


@pytest.mark.asyncio
async def test_a_compat_manager_works_on_a_core_store_it_was_given(session_store, exai_dsn):
    core = CoreSessionManager(session_store)
    async with SessionManager(store=session_store, max_concurrent_sessions=5) as manager:
        session = await manager.ensure("shared")
        await manager.update_activity("shared", request_duration_ms=4)
        closed = await manager.ensure("closed-by-the-app")
        closed.closed = True
        assert await manager.cleanup_stale_sessions() == 1

        record = await core.get("shared")  # the core sees exactly what the compat manager wrote
        assert to_epoch_seconds(record.last_activity) == session.last_activity
        assert (record.request_count, record.total_duration_ms) == (1, 4)

    # aclose() left the caller's store open, and the closed session's row ended as inactive.
    assert await core.get("shared") is not None
    async with await psycopg.AsyncConnection.connect(exai_dsn) as conn:
        cur = await conn.execute(
            "SELECT session_state FROM public.sessions WHERE session_id = %s", ("closed-by-the-app",)
        )
        assert await cur.fetchone() == ("inactive",)


@pytest.mark.asyncio
async def test_a_closed_manager_refuses_further_use():
    manager = SessionManager()
    await manager.ensure("s")
    await manager.aclose()
    await manager.aclose()  # twice is fine

    with pytest.raises(RuntimeError, match="closed with aclose"):
        await manager.ensure("s")


@pytest.mark.asyncio
async def test_ids_no_store_can_hold_are_refused_on_creation_and_unknown_elsewhere(mode):
    manager = mode.make()

    for bad in ("x" * 256, "a\x00b", " "):
        with pytest.raises(ValueError, match="session id"):
            await manager.ensure(bad)
        assert await manager.get(bad) is None
        await manager.update_activity(bad)
        await manager.remove(bad)
    with pytest.raises(ValueError, match="non-negative number of milliseconds"):
        await manager.update_activity("any", request_duration_ms=-1.0)
    assert await manager.list_ids() == []


# -- conversions


def test_epoch_seconds_and_datetimes_convert_exactly_both_ways():
    rng = random.Random(20251108)
    limit = int((datetime(2242, 1, 1, tzinfo=UTC) - EPOCH) / timedelta(microseconds=1))
    moments = [
        EPOCH,
        EPOCH - timedelta(microseconds=1),
        datetime(2038, 1, 19, 3, 14, 7, 999999, tzinfo=UTC),
        datetime(2241, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime.now(UTC),
    ]
    moments += [EPOCH + timedelta(microseconds=rng.randrange(limit)) for _ in range(20000)]

    for moment in moments:
        seconds = to_epoch_seconds(moment)
        assert from_epoch_seconds(seconds) == moment
        assert to_epoch_seconds(from_epoch_seconds(seconds)) == seconds


def test_conversions_round_to_the_microsecond_postgres_keeps_and_respect_time_zones():
    # time.time() has bits below a microsecond; the stored value is the nearest microsecond.
    assert from_epoch_seconds(1.0000004) == EPOCH + timedelta(seconds=1)
    assert from_epoch_seconds(1.0000006) == EPOCH + timedelta(seconds=1, microseconds=1)
    assert from_epoch_seconds(1_700_000_000) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    berlin = datetime(2025, 11, 8, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    assert to_epoch_seconds(berlin) == to_epoch_seconds(datetime(2025, 11, 8, 12, 0, tzinfo=UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        to_epoch_seconds(datetime(2025, 11, 8, 12, 0))  # naive on purpose
    with pytest.raises(ValueError, match="finite"):
        from_epoch_seconds(float("inf"))


# -- application code written against the original manager


async def handle_connection(manager, session_id, calls):
    """A connection handler of the original daemon, written for `src.daemon.session_manager`."""
    session = await manager.ensure(session_id)
    for _ in range(calls):
        async with session.sem:
            session.inflight += 1
            try:
                await asyncio.sleep(0)
            finally:
                session.inflight -= 1
        await manager.update_activity(session.session_id)
    return session


async def serve(manager, clients):
    """The daemon's main loop in small: connections, a disconnect, periodic cleanup, a health report."""
    sessions = await asyncio.gather(*(handle_connection(manager, f"client-{n}", 2) for n in range(clients)))
    anonymous = await handle_connection(manager, None, 1)
    for session in sessions:
        assert isinstance(session, Session)
        assert await manager.get(session.session_id) is session
        assert not manager.is_session_timed_out(session)
    await manager.remove(anonymous.session_id)  # the client disconnected
    cleaned = await manager.cleanup_stale_sessions()
    return {
        "ids": sorted(await manager.list_ids()),
        "inflight": [session.inflight for session in sessions],
        "idle_seconds": [time.time() - session.last_activity for session in sessions],
        "cleaned": cleaned,
        "metrics": await manager.get_session_metrics(),
    }


@pytest.mark.asyncio
async def test_application_code_written_for_the_original_runs_unchanged(mode):
    manager = mode.make(session_timeout_secs=3600, max_concurrent_sessions=10)

    outcome = await serve(manager, clients=4)

    assert outcome["ids"] == ["client-0", "client-1", "client-2", "client-3"]
    assert outcome["inflight"] == [0, 0, 0, 0]
    assert all(0 <= idle < 3600 for idle in outcome["idle_seconds"])
    assert outcome["cleaned"] == 0
    assert (outcome["metrics"]["total_sessions"], outcome["metrics"]["active_sessions"]) == (4, 4)

    manager = await mode.restart(manager)

    # Persisted, the daemon's sessions survived the crash; in memory, it never crashed.
    assert sorted(await manager.list_ids()) == outcome["ids"]
    assert [(await manager.get(sid)).request_count for sid in outcome["ids"]] == [2, 2, 2, 2]
