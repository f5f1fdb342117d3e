"""SessionManager: the behaviour the public API promises, against PostgreSQL and in memory.

Tests taking ``make_manager`` run twice: with a store on this test's database
("postgres") and with ``SessionManager(None)`` ("memory"). Tests of what only a
database can show (rows, other managers, recovery) use the plugin's fixtures directly.
"""

import asyncio
import string
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
import pytest_asyncio
from psycopg.rows import dict_row

from pytest_exai_sessions import (
    ManualClock,
    SessionLimitExceeded,
    SessionManager,
    SessionNotFound,
    SessionState,
    UserType,
    assert_full_recovery,
)

METRIC_KEYS = {
    "total_sessions",
    "active_sessions",
    "oldest_session_age",
    "newest_session_age",
    "avg_session_age",
    "persistence_enabled",
}


@pytest.fixture
def clock(persistence, request, exai_config):
    """The managers' clock: the test's database clock, or a clock of its own for "memory"."""
    if persistence is not None:
        return request.getfixturevalue("exai_db_clock")
    return ManualClock(start=exai_config.clock)


@pytest_asyncio.fixture
async def make_manager(persistence, clock):
    """``await make_manager(**options)``: a started manager, persistent or in memory only, on ``clock``."""
    in_memory = []

    async def make(**options):
        if persistence is not None:
            return await persistence(**options)
        manager = await SessionManager(None, clock=clock, **options).start()
        in_memory.append(manager)
        return manager

    yield make
    for manager in in_memory:
        await manager.aclose()


async def fetch_row(dsn, session_id):
    """The row of ``session_id`` as PostgreSQL holds it, read by a separate connection."""
    async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
        cur = await conn.execute("SELECT * FROM public.sessions WHERE session_id = %s", (session_id,))
        rows = await cur.fetchall()
    assert len(rows) <= 1
    return rows[0] if rows else None


async def execute(dsn, query, params=None):
    """Run one statement on the test database as another tool would."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(query, params)


# -- ensure


@pytest.mark.asyncio
async def test_ensure_without_an_id_creates_a_new_random_one(make_manager):
    manager = await make_manager()

    first = await manager.ensure()
    second = await manager.ensure("")

    for session in (first, second):
        # secrets.token_urlsafe(32): 43 URL-safe characters
        assert len(session.session_id) == 43
        assert set(session.session_id) <= set(string.ascii_letters + string.digits + "-_")
        assert session.state is SessionState.ACTIVE
        assert session.request_count == session.total_duration_ms == 0
        assert session.created_at == session.last_activity
    assert first.session_id != second.session_id
    assert sorted(await manager.list_ids()) == sorted([first.session_id, second.session_id])


@pytest.mark.asyncio
async def test_ensure_applies_attributes_only_when_it_creates(make_manager, clock):
    manager = await make_manager()
    expires = clock.now() + timedelta(days=1)

    created = await manager.ensure(
        "s1",
        user_id="alice",
        user_type="agent",
        ip_address="192.0.2.7",
        user_agent="pytest",
        data={"cart": [1, 2]},
        metadata={"source": "test"},
        expires_at=expires,
    )
    again = await manager.ensure("s1", user_id="bob", user_type="system", data={"cart": []})

    assert (created.user_id, created.user_type, created.ip_address) == ("alice", UserType.AGENT, "192.0.2.7")
    assert (created.user_agent, created.data, created.metadata) == ("pytest", {"cart": [1, 2]}, {"source": "test"})
    assert created.expires_at == expires
    assert again == created


@pytest.mark.asyncio
async def test_ensure_returns_a_live_session_unchanged(make_manager):
    manager = await make_manager()
    await manager.ensure("s1", data={"step": 1})
    counted = await manager.update_activity("s1", request_duration_ms=5)

    assert await manager.ensure("s1") == counted
    assert (await manager.get("s1")).request_count == 1  # ensure() is not a request


@pytest.mark.asyncio
async def test_the_caller_keeps_no_handle_on_the_stored_data(make_manager):
    manager = await make_manager()
    data = {"cart": {"items": [1]}}

    await manager.ensure("s1", data=data)
    data["cart"]["items"].append(2)

    assert (await manager.get("s1")).data == {"cart": {"items": [1]}}


# -- get, list_ids, remove


@pytest.mark.asyncio
async def test_get_never_creates(make_manager):
    manager = await make_manager()

    assert await manager.get("nobody") is None
    assert await manager.list_ids() == []


@pytest.mark.asyncio
async def test_remove_forgets_the_session_and_ignores_unknown_ids(make_manager):
    manager = await make_manager()
    await manager.ensure("keep")
    await manager.ensure("drop")

    await manager.remove("drop")
    await manager.remove("drop")
    await manager.remove("never-existed")

    assert await manager.get("drop") is None
    assert await manager.list_ids() == ["keep"]


# -- update and update_activity


@pytest.mark.asyncio
async def test_update_replaces_the_given_fields_and_keeps_the_others(make_manager, clock):
    manager = await make_manager()
    before = await manager.ensure("s1", user_id="alice", data={"a": 1, "b": 2}, metadata={"m": 1})
    clock.advance(seconds=2)  # to see last_activity change

    after = await manager.update("s1", data={"c": 3}, ip_address="2001:db8::1")

    assert after.data == {"c": 3}  # replaced, not merged
    assert after.ip_address == "2001:db8::1"
    assert (after.metadata, after.user_id, after.created_at) == ({"m": 1}, "alice", before.created_at)
    assert after.last_activity > before.last_activity
    assert after.request_count == 0  # an update is not a request
    assert await manager.get("s1") == after


@pytest.mark.asyncio
async def test_update_with_an_empty_object_clears_it(make_manager):
    manager = await make_manager()
    await manager.ensure("s1", data={"a": 1}, metadata={"m": 1})

    updated = await manager.update("s1", data={}, metadata={})

    assert (updated.data, updated.metadata) == ({}, {})


@pytest.mark.asyncio
async def test_update_activity_counts_a_request_and_its_duration(make_manager, clock):
    manager = await make_manager()
    created = await manager.ensure("s1")
    clock.advance(seconds=2)

    await manager.update_activity("s1", request_duration_ms=10)
    await manager.update_activity("s1", 5)
    session = await manager.update_activity("s1")  # no duration: counts the request only

    assert (session.request_count, session.total_duration_ms) == (3, 15)
    assert session.last_activity > created.last_activity
    assert await manager.get("s1") == session


async def handle_request(manager, session_id):
    async with manager.request(session_id):
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "operation",
    [
        lambda m: m.update("ghost", data={"x": 1}),
        lambda m: m.update_activity("ghost", 1),
        lambda m: handle_request(m, "ghost"),
    ],
    ids=["update", "update_activity", "request"],
)
async def test_unknown_ids_raise_session_not_found(make_manager, operation):
    manager = await make_manager()

    with pytest.raises(SessionNotFound) as error:
        await operation(manager)

    assert isinstance(error.value, KeyError)
    assert error.value.session_id == "ghost"
    assert "'ghost'" in str(error.value)
    assert await manager.list_ids() == []


# -- request


@pytest.mark.asyncio
async def test_request_counts_the_request_and_its_duration(make_manager):
    manager = await make_manager()
    await manager.ensure("s1")

    async with manager.request("s1") as session:
        assert session.session_id == "s1"
        await asyncio.sleep(0.02)

    counted = await manager.get("s1")
    assert counted.request_count == 1
    assert counted.total_duration_ms >= 20


@pytest.mark.asyncio
async def test_a_failing_request_is_still_counted(make_manager):
    manager = await make_manager()
    await manager.ensure("s1")

    with pytest.raises(ValueError, match="handler failed"):
        async with manager.request("s1"):
            raise ValueError("handler failed")

    assert (await manager.get("s1")).request_count == 1


@pytest.mark.asyncio
async def test_request_lets_at_most_max_inflight_run_at_once(make_manager):
    manager = await make_manager(max_inflight=2)
    await manager.ensure("s1")
    inside = peak = 0
    release = asyncio.Event()

    async def handle():
        nonlocal inside, peak
        async with manager.request("s1"):
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(handle()) for _ in range(6)]
    while inside < 2:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # the other four had every chance to get in
    assert inside == 2

    release.set()
    await asyncio.gather(*tasks)

    assert peak == 2
    assert (await manager.get("s1")).request_count == 6


# -- limits


@pytest.mark.asyncio
async def test_creating_beyond_max_concurrent_sessions_is_refused(make_manager):
    manager = await make_manager(max_concurrent_sessions=2)
    first = await manager.ensure("a")
    await manager.ensure("b")

    with pytest.raises(SessionLimitExceeded, match="Maximum concurrent sessions") as error:
        await manager.ensure("c")

    assert isinstance(error.value, RuntimeError)
    assert error.value.limit == 2
    assert await manager.ensure("a") == first  # existing sessions are still served
    await manager.remove("b")
    assert (await manager.ensure("c")).session_id == "c"
    assert sorted(await manager.list_ids()) == ["a", "c"]


@pytest.mark.asyncio
async def test_concurrent_creations_cannot_overshoot_the_limit(make_manager):
    manager = await make_manager(max_concurrent_sessions=3)

    results = await asyncio.gather(*(manager.ensure(f"s{n}") for n in range(8)), return_exceptions=True)

    created = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, SessionLimitExceeded)]
    assert (len(created), len(refused)) == (3, 5)
    assert sorted(await manager.list_ids()) == sorted(session.session_id for session in created)
    # and nothing was written for the refused ones
    if manager.persistence_enabled:
        async with await psycopg.AsyncConnection.connect(manager.store.conninfo) as conn:
            cur = await conn.execute("SELECT count(*) FROM public.sessions")
            assert await cur.fetchone() == (3,)
    else:
        assert len([session async for session in manager.store.iter_all()]) == 3


@pytest.mark.asyncio
async def test_concurrent_ensures_of_one_id_give_one_session(make_manager):
    manager = await make_manager()

    sessions = await asyncio.gather(*(manager.ensure("same", data={"n": n}) for n in range(5)))

    assert len({session.created_at for session in sessions}) == 1
    assert await manager.list_ids() == ["same"]


# -- timeouts, cleanup, metrics


@pytest.mark.asyncio
async def test_an_idle_session_times_out_and_a_fresh_one_replaces_it(make_manager, clock):
    manager = await make_manager(session_timeout_secs=60)
    old = await manager.ensure("s1", data={"step": 1})
    await manager.update_activity("s1", 7)
    clock.advance(seconds=59)
    assert not manager.is_session_timed_out(old)

    clock.advance(seconds=2)

    assert manager.is_session_timed_out(old)
    metrics = await manager.get_session_metrics()
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (1, 0)
    assert await manager.get("s1") is None
    assert await manager.cleanup_stale_sessions() == 1
    assert await manager.list_ids() == []
    with pytest.raises(SessionNotFound):
        await manager.update_activity("s1")

    fresh = await manager.ensure("s1")

    assert fresh.created_at > old.created_at
    assert (fresh.data, fresh.request_count, fresh.total_duration_ms) == ({}, 0, 0)


@pytest.mark.asyncio
async def test_a_session_past_expires_at_is_timed_out(make_manager, clock):
    manager = await make_manager()
    await manager.ensure("s1")

    expired = await manager.update("s1", expires_at=clock.now())

    assert manager.is_session_timed_out(expired)
    assert await manager.get("s1") is None
    assert await manager.cleanup_stale_sessions() == 1
    assert await manager.cleanup_stale_sessions() == 0


@pytest.mark.asyncio
async def test_inactive_and_expired_sessions_count_as_timed_out(make_manager):
    manager = await make_manager()
    session = await manager.ensure("s1")

    assert not manager.is_session_timed_out(session)
    assert manager.is_session_timed_out(session.model_copy(update={"state": SessionState.INACTIVE}))
    assert manager.is_session_timed_out(session.model_copy(update={"state": SessionState.EXPIRED}))


@pytest.mark.asyncio
async def test_metrics_of_an_empty_manager(make_manager, persistence):
    manager = await make_manager()

    metrics = await manager.get_session_metrics()

    assert metrics == {
        "total_sessions": 0,
        "active_sessions": 0,
        "oldest_session_age": 0.0,
        "newest_session_age": 0.0,
        "avg_session_age": 0.0,
        "persistence_enabled": persistence is not None,
    }


@pytest.mark.asyncio
async def test_metrics_count_and_age_the_sessions_in_memory(make_manager, clock):
    manager = await make_manager()
    clock.set("2028-02-29T12:00:00Z")
    await manager.ensure("old")
    clock.advance(seconds=10)
    await manager.ensure("new")
    clock.advance(seconds=5)

    metrics = await manager.get_session_metrics()

    assert set(metrics) == METRIC_KEYS
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (2, 2)
    ages = metrics["oldest_session_age"], metrics["newest_session_age"], metrics["avg_session_age"]
    assert ages == (15, 5, 10)


# -- lifecycle and options


@pytest.mark.parametrize(
    "options",
    [
        {"session_timeout_secs": 0},
        {"session_timeout_secs": -5},
        {"max_concurrent_sessions": 0},
        {"max_inflight": 0},
        {"max_inflight": True},
        {"cleanup_interval_secs": -1},
    ],
)
def test_invalid_options_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        SessionManager(None, **options)


@pytest.mark.asyncio
async def test_a_manager_is_an_async_context_manager():
    async with SessionManager(None, session_timeout_secs=60) as manager:
        await manager.ensure("s1")
        assert manager.options["session_timeout_secs"] == 60
        assert not manager.persistence_enabled


# -- what only PostgreSQL can show


@pytest.mark.asyncio
async def test_every_call_is_written_through_to_the_row(session_manager, exai_dsn):
    await session_manager.ensure("s1", user_id="alice", ip_address="192.0.2.7", data={"a": 1})
    await session_manager.update("s1", metadata={"tier": "gold"})
    session = await session_manager.update_activity("s1", request_duration_ms=12)

    row = await fetch_row(exai_dsn, "s1")

    assert row["session_state"] == "active"
    assert (row["user_id"], str(row["ip_address"]), row["user_type"]) == ("alice", "192.0.2.7", "human")
    assert (row["session_data"], row["metadata"]) == ({"a": 1}, {"tier": "gold"})
    assert (row["request_count"], row["total_duration_ms"]) == (1, 12)
    assert (row["created_at"], row["last_activity_at"]) == (session.created_at, session.last_activity)

    await session_manager.remove("s1")

    assert await fetch_row(exai_dsn, "s1") is None


@pytest.mark.asyncio
async def test_get_does_not_write_a_row(session_manager, exai_dsn):
    assert await session_manager.get("nobody") is None
    assert await fetch_row(exai_dsn, "nobody") is None


@pytest.mark.asyncio
async def test_a_row_written_by_another_tool_loads_with_the_column_defaults(session_manager, exai_dsn):
    await execute(exai_dsn, "INSERT INTO public.sessions (session_id) VALUES ('from-sql')")
    row = await fetch_row(exai_dsn, "from-sql")

    session = await session_manager.get("from-sql")

    assert session is not None
    assert session.state is SessionState.ACTIVE and session.user_type is UserType.HUMAN
    assert (session.user_id, session.ip_address, session.user_agent, session.expires_at) == (None,) * 4
    assert session.data == {}
    assert session.metadata == {"schema_version": 1}
    assert (session.request_count, session.total_duration_ms) == (0, 0)
    assert (session.created_at, session.last_activity) == (row["created_at"], row["last_activity_at"])
    assert await session_manager.ensure("from-sql", user_id="someone", data={"x": 1}) == session
    assert await session_manager.list_ids() == ["from-sql"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "dead_row",
    [
        "session_state = 'expired'",
        "session_state = 'inactive'",
        "last_activity_at = unified.clock_now() - interval '2 hours'",  # past the default timeout of 3600 s
        "expires_at = unified.clock_now() - interval '1 second'",
    ],
)
async def test_ensure_restarts_a_dead_row_under_the_same_id(session_manager, exai_dsn, exai_db_clock, dead_row):
    exai_db_clock.set("2027-03-15T12:00:00Z")
    await execute(
        exai_dsn,
        "INSERT INTO public.sessions (session_id, user_id, session_data, request_count, total_duration_ms, created_at)"
        " VALUES ('old', 'previous-user', '{\"cart\": [1]}', 7, 700, unified.clock_now() - interval '1 day')",
    )
    await execute(exai_dsn, f"UPDATE public.sessions SET {dead_row} WHERE session_id = 'old'")
    assert await session_manager.get("old") is None  # get() neither loads nor revives it

    fresh = await session_manager.ensure("old", user_id="new-user")

    assert fresh.state is SessionState.ACTIVE
    assert (fresh.user_id, fresh.data, fresh.expires_at) == ("new-user", {}, None)
    assert (fresh.request_count, fresh.total_duration_ms) == (0, 0)
    assert fresh.created_at == exai_db_clock.now()
    row = await fetch_row(exai_dsn, "old")
    assert (row["session_state"], row["user_id"], row["request_count"]) == ("active", "new-user", 0)
    assert row["created_at"] == fresh.created_at


@pytest.mark.asyncio
async def test_get_leaves_a_dead_row_as_it_is(session_manager, exai_dsn):
    await execute(exai_dsn, "INSERT INTO public.sessions (session_id, session_state) VALUES ('gone', 'expired')")
    before = await fetch_row(exai_dsn, "gone")

    assert await session_manager.get("gone") is None

    assert await fetch_row(exai_dsn, "gone") == before


@pytest.mark.asyncio
async def test_two_managers_never_lose_a_counted_request(session_manager_factory, exai_dsn):
    replica_a = await session_manager_factory()
    replica_b = await session_manager_factory()
    await replica_a.ensure("shared")
    assert await replica_b.get("shared") is not None

    await asyncio.gather(
        *(replica_a.update_activity("shared", request_duration_ms=3) for _ in range(60)),
        *(replica_b.update_activity("shared", request_duration_ms=2) for _ in range(60)),
    )

    row = await fetch_row(exai_dsn, "shared")
    assert (row["request_count"], row["total_duration_ms"]) == (120, 60 * 3 + 60 * 2)
    fresh = await session_manager_factory()
    assert (await fresh.get("shared")).request_count == 120


@pytest.mark.asyncio
async def test_update_activity_returns_the_row_with_what_another_writer_changed(session_manager_factory, exai_dsn):
    counting = await session_manager_factory()
    other = await session_manager_factory()
    await counting.ensure("shared", data={"step": 1})
    await counting.update_activity("shared", request_duration_ms=4)
    await other.update("shared", data={"step": 2}, user_agent="other-replica", ip_address="192.0.2.9")
    await execute(exai_dsn, "UPDATE public.sessions SET metadata = '{\"tool\": true}' WHERE session_id = 'shared'")

    session = await counting.update_activity("shared", request_duration_ms=5)

    # Not the copy in memory with new counters: the whole row as it is now stored.
    assert (session.data, session.metadata) == ({"step": 2}, {"tool": True})
    assert (session.user_agent, session.ip_address) == ("other-replica", "192.0.2.9")
    assert (session.request_count, session.total_duration_ms) == (2, 9)
    assert await counting.get("shared") == session
    assert session == await (await session_manager_factory()).get("shared")


@pytest.mark.asyncio
async def test_the_limit_never_refuses_a_session_that_exists_in_the_database(session_manager_factory, exai_dsn):
    small = await session_manager_factory(max_concurrent_sessions=1)
    other = await session_manager_factory()
    await small.ensure("mine")
    await other.ensure("shared")

    loaded = await small.ensure("shared")

    assert loaded == await other.get("shared")
    assert sorted(await small.list_ids()) == ["mine", "shared"]
    with pytest.raises(SessionLimitExceeded):
        await small.ensure("brand-new")
    assert await fetch_row(exai_dsn, "brand-new") is None


@pytest.mark.asyncio
async def test_recovery_restores_every_live_session_even_above_the_limit(session_manager_factory, crash_harness):
    manager = await session_manager_factory(max_concurrent_sessions=10)
    for number in range(5):
        await manager.ensure(f"s{number}", data={"n": number})
    before = crash_harness.snapshot(manager)

    recovered = await crash_harness.crash_and_restart(manager, max_concurrent_sessions=2)

    assert_full_recovery(before, recovered)
    assert len(await recovered.recover_all_sessions()) == 5
    with pytest.raises(SessionLimitExceeded):
        await recovered.ensure("one-more")


@pytest.mark.asyncio
async def test_recovery_skips_rows_that_are_not_live(session_manager, session_manager_factory, exai_dsn):
    await session_manager.ensure("live")
    for state in ("inactive", "expired"):
        await execute(
            exai_dsn, "INSERT INTO public.sessions (session_id, session_state) VALUES (%s, %s)", (state, state)
        )
    await execute(
        exai_dsn,
        "INSERT INTO public.sessions (session_id, last_activity_at)"
        " VALUES ('idle', unified.clock_now() - interval '2 hours')",
    )

    restarted = await session_manager_factory()

    assert await restarted.list_ids() == ["live"]


@pytest.mark.asyncio
async def test_cleanup_expires_rows_but_not_one_another_manager_just_used(
    session_manager_factory, exai_dsn, exai_db_clock
):
    this = await session_manager_factory(session_timeout_secs=60)
    await this.ensure("idle")
    await this.ensure("busy")
    other = await session_manager_factory(session_timeout_secs=60)
    exai_db_clock.advance(seconds=40)
    await other.update_activity("busy")
    exai_db_clock.advance(seconds=40)  # "idle" is 80 s idle; "busy" was used 40 s ago, but not here

    assert await this.cleanup_stale_sessions() == 1

    assert await this.list_ids() == ["busy"]
    assert (await fetch_row(exai_dsn, "idle"))["session_state"] == "expired"
    assert (await fetch_row(exai_dsn, "busy"))["session_state"] == "active"
    assert (await this.get("busy")).request_count == 1  # loaded again from the database


@pytest.mark.asyncio
async def test_timestamps_are_utc_and_round_trip_to_the_microsecond(session_manager, session_manager_factory, exai_dsn):
    tokyo = timezone(timedelta(hours=9))
    expires = datetime(2031, 5, 6, 7, 8, 9, 123457, tzinfo=tokyo)

    created = await session_manager.ensure("s1", expires_at=expires)
    row = await fetch_row(exai_dsn, "s1")
    reloaded = await (await session_manager_factory()).get("s1")

    for session in (created, reloaded):
        for value in (session.created_at, session.last_activity, session.expires_at):
            assert value.tzinfo is UTC
    assert created.expires_at == expires and created.expires_at.microsecond == 123457
    assert (row["created_at"], row["last_activity_at"], row["expires_at"]) == (
        created.created_at,
        created.last_activity,
        created.expires_at,
    )
    assert reloaded == created


@pytest.mark.asyncio
async def test_what_is_in_memory_is_exactly_what_a_reload_returns(
    session_manager, session_manager_factory, exai_db_clock
):
    await session_manager.ensure(
        "rich",
        user_id="ü-user",
        user_type="system",
        ip_address="2001:DB8:0:0:0:0:0:1",
        user_agent="Mozilla/5.0",
        data={
            "text": "naïve “quotes” \\ and 🙂",
            "int": 2**70,
            "floats": [0.1, 1e-7, 1.5e16, -0.0],
            "nested": {"list": [None, True, {"deep": []}]},
        },
        metadata={"schema_version": 1, "tags": ["a", "b"]},
        expires_at=exai_db_clock.now() + timedelta(hours=1),
    )
    await session_manager.update_activity("rich", 250)
    await session_manager.ensure("plain")
    await session_manager.update("plain", data={"replaced": True})

    fresh = await session_manager_factory()

    assert_full_recovery(session_manager, fresh)
    assert (await fresh.get("rich")).ip_address == "2001:db8::1"


@pytest.mark.asyncio
async def test_connect_opens_recovers_and_closes(exai_dsn):
    async with SessionManager.connect(exai_dsn, session_timeout_secs=600) as manager:
        assert manager.persistence_enabled
        created = await manager.ensure("s1", data={"kept": True})

    async with SessionManager.connect(exai_dsn) as restarted:
        assert await restarted.list_ids() == ["s1"]
        assert await restarted.get("s1") == created
