"""The seed's SupabaseSessionService API (compat), against the database.

Each behaviour runs on this test's database and is checked there over a direct connection;
``test_application_code_written_for_the_original_service_runs_unchanged`` runs code written
for the original service. Dates come from ``exai_db_clock``, set by the tests that need them.
"""

import asyncio
import concurrent.futures
import gc
import time
from datetime import UTC, datetime, timedelta

import original_service_app
import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from pytest_exai_sessions import PersistenceError
from pytest_exai_sessions.clock import parse_instant
from pytest_exai_sessions.compat import DSN_ENV, SupabaseSessionService, get_session_service, reset_session_service
from pytest_exai_sessions.session_service import DEFAULT_METADATA
from pytest_exai_sessions.store import _record_request_query

COLUMNS = (
    "session_id, session_state, user_id, user_type, host(ip_address) AS ip_address, user_agent, session_data,"
    " metadata, request_count, total_duration_ms, created_at, last_activity_at, expires_at, version"
)


def rows(dsn):
    """Every row of public.sessions by session_id, read over ``dsn``."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        found = conn.execute(f"SELECT {COLUMNS} FROM public.sessions ORDER BY session_id").fetchall()
    return {row["session_id"]: row for row in found}


def execute(dsn, statement, params=()):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


@pytest_asyncio.fixture
async def service(exai_dsn, exai_db_clock):
    """A service on this test's database whose "now" is the test clock."""
    async with SupabaseSessionService(exai_dsn, clock=exai_db_clock) as service:
        yield service


@pytest_asyncio.fixture
async def shared(exai_dsn, monkeypatch):
    """The process-wide service, on this test's database (EXAI_SESSIONS_DSN), forgotten after the test."""
    monkeypatch.setenv(DSN_ENV, exai_dsn)
    await reset_session_service()
    yield get_session_service()
    await reset_session_service()


# -- configuration


def test_enabled_when_a_dsn_is_configured_by_argument_or_environment(monkeypatch):
    monkeypatch.delenv(DSN_ENV, raising=False)
    assert not SupabaseSessionService().enabled
    assert SupabaseSessionService("dbname=app").enabled
    monkeypatch.setenv(DSN_ENV, "  ")  # blank, as `VAR=` in an env file: unset
    assert not SupabaseSessionService().enabled
    monkeypatch.setenv(DSN_ENV, "dbname=app")
    assert SupabaseSessionService().enabled
    with pytest.raises(ValueError, match="non-blank connection string"):
        SupabaseSessionService("")


@pytest.mark.asyncio
async def test_a_service_without_a_database_says_how_to_configure_one(monkeypatch):
    monkeypatch.delenv(DSN_ENV, raising=False)
    service = SupabaseSessionService()
    with pytest.raises(PersistenceError, match=f"set {DSN_ENV} or pass dsn="):
        await service.save_session("s", {})
    with pytest.raises(PersistenceError, match=DSN_ENV):
        await service.load_session("s")


@pytest.mark.asyncio
async def test_get_session_service_is_one_instance_until_reset(shared):
    assert get_session_service() is shared
    assert shared.enabled
    await shared.save_session("kept", {})

    await reset_session_service()

    fresh = get_session_service()
    assert fresh is not shared
    assert (await fresh.load_session("kept"))["session_id"] == "kept"


def backends(direct_dsn, application_name):
    """How many server processes serve connections named ``application_name``, once those ending have ended."""
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        for _ in range(200):  # a backend exits shortly after its client hangs up
            count = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
            ).fetchone()[0]
            if count == 0:
                break
            time.sleep(0.05)
    return count


def test_one_service_serves_event_loop_after_event_loop(exai_dsn, exai_direct_dsn, monkeypatch):
    """asyncio.run() after asyncio.run() (pytest-asyncio gives each test a loop too): a pool per loop."""
    monkeypatch.setenv(DSN_ENV, exai_dsn)
    asyncio.run(reset_session_service())
    service = get_session_service()

    async def call(method, *args):
        return await getattr(service, method)(*args), service.store.application_name

    try:
        saved, first = asyncio.run(call("save_session", "first", {"n": 1}))
        assert saved
        # A new loop, the first one closed: a pool of its own, the closed loop's dropped.
        row, second = asyncio.run(call("load_session", "first"))
        assert row["session_data"] == {"n": 1}
        assert second != first
        gc.collect()
        if exai_dsn == exai_direct_dsn:  # through a pooler the server's backends are the pooler's
            assert backends(exai_direct_dsn, first) == 0
        asyncio.run(service.aclose())
    finally:
        asyncio.run(reset_session_service())


def test_loops_that_stay_open_keep_their_own_pools(exai_dsn, monkeypatch):
    """A loop that is open but not running, and a loop running in another thread, while this one runs."""
    monkeypatch.setenv(DSN_ENV, exai_dsn)
    asyncio.run(reset_session_service())
    service = get_session_service()

    async def call(method, *args):
        return await getattr(service, method)(*args), service.store

    other = asyncio.new_event_loop()
    try:
        _, other_store = other.run_until_complete(call("save_session", "other", {}))
        # Meanwhile another loop (in another thread) and this thread's next asyncio.run().
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            in_thread = thread.submit(asyncio.run, call("save_session", "thread", {}))
            counted, main_store = asyncio.run(call("update_session_activity", "other", 5))
            _, thread_store = in_thread.result(timeout=60)
        assert counted
        assert len({id(other_store), id(main_store), id(thread_store)}) == 3
        # Back on the loop left open: its pool is still there, and serves it.
        row, again = other.run_until_complete(call("load_session", "other"))
        assert again is other_store
        assert (row["request_count"], row["total_duration_ms"]) == (1, 5)
        other.run_until_complete(service.aclose())
        assert other.run_until_complete(call("load_session", "thread"))[0]["session_id"] == "thread"
        other.run_until_complete(service.aclose())
    finally:
        other.close()
        asyncio.run(reset_session_service())


def test_closing_the_service_closes_the_running_loops_pool_and_it_connects_again(exai_dsn, exai_direct_dsn):
    async def scenario():
        async with SupabaseSessionService(exai_dsn) as service:
            await service.save_session("s", {})
            name = service.store.application_name
            await service.aclose()
            assert service.store is None
            if exai_dsn == exai_direct_dsn:
                assert backends(exai_direct_dsn, name) == 0
            assert (await service.load_session("s"))["session_id"] == "s"
            assert service.store is not None and service.store.application_name != name
        assert service.store is None

    asyncio.run(scenario())


# -- save_session, load_session


@pytest.mark.asyncio
async def test_save_session_fills_the_columns_from_the_data_and_defaults_the_rest(
    service, exai_db_clock, exai_direct_dsn
):
    saved_at = exai_db_clock.set("2027-03-15T09:30:00.123456Z")
    data = {"user_id": "u-1", "ip_address": "192.0.2.7", "user_agent": "curl/8", "cart": [1, 2]}

    assert await service.save_session("plain", data) is True

    row = rows(exai_direct_dsn)["plain"]
    assert row["session_data"] == data  # stored whole
    assert (row["session_state"], row["user_type"], row["request_count"], row["total_duration_ms"]) == (
        "active",
        "human",
        0,
        0,
    )
    assert (row["user_id"], row["ip_address"], row["user_agent"]) == ("u-1", "192.0.2.7", "curl/8")
    assert row["metadata"] == DEFAULT_METADATA == {"version": "1.0", "schema": "standard", "source": "session_manager"}
    assert row["created_at"] == row["last_activity_at"] == saved_at


@pytest.mark.asyncio
async def test_save_session_takes_state_counters_and_metadata_from_the_caller(service, exai_direct_dsn):
    data = {"state": "inactive", "user_type": "agent", "request_count": 4, "total_duration_ms": 900}

    await service.save_session("given", data, {"origin": "test"})

    row = rows(exai_direct_dsn)["given"]
    assert (row["session_state"], row["user_type"], row["request_count"], row["total_duration_ms"]) == (
        "inactive",
        "agent",
        4,
        900,
    )
    assert row["metadata"] == {"origin": "test"}


@pytest.mark.asyncio
async def test_save_session_is_an_upsert_that_keeps_when_the_session_began(service, exai_db_clock, exai_direct_dsn):
    began = exai_db_clock.set("2028-02-28T23:00:00Z")
    await service.save_session("again", {"step": 1, "request_count": 1})
    saved_again = exai_db_clock.advance(hours=2)

    await service.save_session("again", {"step": 2, "state": "expired"})

    row = rows(exai_direct_dsn)["again"]
    assert row["session_data"] == {"step": 2, "state": "expired"}
    assert (row["session_state"], row["request_count"]) == ("expired", 0)  # the caller's view, whole
    assert (row["created_at"], row["last_activity_at"]) == (began, saved_again)
    assert row["version"] == 2
    assert list(rows(exai_direct_dsn)) == ["again"]


@pytest.mark.asyncio
async def test_load_session_returns_the_row_by_column_name_in_any_state(service, exai_db_clock):
    saved_at = exai_db_clock.set("2030-12-31T23:59:59Z")
    await service.save_session("ended", {"state": "expired", "user_id": "u", "ip_address": "::1"})

    row = await service.load_session("ended")

    assert row == {
        "session_id": "ended",
        "session_state": "expired",
        "user_id": "u",
        "user_type": "human",
        "ip_address": "::1",
        "user_agent": None,
        "session_data": {"state": "expired", "user_id": "u", "ip_address": "::1"},
        "metadata": dict(DEFAULT_METADATA),
        "request_count": 0,
        "total_duration_ms": 0,
        "created_at": saved_at,
        "last_activity_at": saved_at,
        "last_activity": saved_at,  # the alias the original's callers read
        "expires_at": None,
        "version": 1,
    }
    assert type(row["session_state"]) is str and type(row["user_type"]) is str
    assert await service.load_session("never-saved") is None


# -- delete_session, list_sessions


@pytest.mark.asyncio
async def test_delete_session_says_whether_there_was_a_row(service, exai_direct_dsn):
    await service.save_session("gone", {})
    await service.save_session("stays", {})

    assert await service.delete_session("gone") is True
    assert await service.delete_session("gone") is False
    assert list(rows(exai_direct_dsn)) == ["stays"]


@pytest.mark.asyncio
async def test_list_sessions_filters_by_state_limits_and_puts_the_most_recent_first(service, exai_db_clock):
    exai_db_clock.set("2027-03-15T12:00:00Z")
    for name, state in [("a", "active"), ("b", "inactive"), ("c", "active"), ("d", "expired"), ("e", "active")]:
        await service.save_session(name, {"state": state})
        exai_db_clock.advance(minutes=1)

    assert [row["session_id"] for row in await service.list_sessions()] == ["e", "d", "c", "b", "a"]
    assert [row["session_id"] for row in await service.list_sessions("active")] == ["e", "c", "a"]
    assert [row["session_id"] for row in await service.list_sessions(state="active", limit=2)] == ["e", "c"]
    assert [row["session_id"] for row in await service.list_sessions("expired")] == ["d"]
    assert (await service.list_sessions("inactive"))[0]["session_state"] == "inactive"


# -- update_session_activity


@pytest.mark.asyncio
async def test_update_session_activity_counts_a_request_and_moves_the_last_activity(
    service, exai_db_clock, exai_direct_dsn
):
    exai_db_clock.set("2028-02-29T12:00:00Z")
    await service.save_session("busy", {"state": "inactive"})
    later = exai_db_clock.advance(minutes=5)

    assert await service.update_session_activity("busy", request_duration_ms=120) is True
    assert await service.update_session_activity("busy") is True  # no duration: adds 0

    row = rows(exai_direct_dsn)["busy"]
    assert (row["request_count"], row["total_duration_ms"], row["last_activity_at"]) == (2, 120, later)
    assert row["session_state"] == "inactive"  # counted in whatever state, as the original did
    assert await service.update_session_activity("unknown", 5) is False
    assert "unknown" not in rows(exai_direct_dsn)


@pytest.mark.asyncio
async def test_concurrent_activity_updates_lose_no_increment(service, exai_dsn, exai_direct_dsn):
    """Two services (two pools, as two replicas) count 200 requests at once: one atomic statement each."""
    await service.save_session("hot", {})
    durations = list(range(1, 201))
    async with SupabaseSessionService(exai_dsn) as replica:
        results = await asyncio.gather(
            *(
                (service if n % 2 else replica).update_session_activity("hot", duration)
                for n, duration in enumerate(durations)
            )
        )

    assert all(results)
    row = rows(exai_direct_dsn)["hot"]
    assert (row["request_count"], row["total_duration_ms"]) == (200, sum(durations))


@pytest.mark.asyncio
async def test_counting_a_request_reads_only_its_row(exai_dsn):
    """update_session_activity's statement goes through the session_id index, on a table without statistics."""
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True) as conn:
        await conn.execute("INSERT INTO public.sessions (session_id) SELECT 's' || n FROM generate_series(1, 2000) n")
        explain = b"EXPLAIN (ANALYZE, FORMAT JSON) " + _record_request_query(live_only=False)
        params = {"id": "s7", "duration_ms": 5, "now": datetime(2028, 2, 29, tzinfo=UTC)}
        plan = (await (await conn.execute(explain, params)).fetchone())[0][0]["Plan"]

    scans = [plan, *plan.get("Plans", [])]
    assert [(p["Index Name"], p["Actual Rows"]) for p in scans if "Index Name" in p] == [("sessions_session_id_key", 1)]


# -- cleanup_expired_sessions


@pytest.mark.parametrize(
    "today",
    [
        "2027-03-01T00:30:00Z",  # the original's cutoff (day of month minus days) raised here
        "2028-02-29T12:00:00Z",
        "2028-03-01T00:00:00Z",
        "2031-01-01T00:00:00Z",
    ],
)
@pytest.mark.asyncio
async def test_cleanup_deletes_sessions_last_active_before_the_cutoff_on_any_date(
    service, exai_db_clock, exai_direct_dsn, today
):
    now = parse_instant(today)
    for days in (7, 1, 29, 366):
        execute(exai_direct_dsn, "DELETE FROM public.sessions")
        ages = {
            "older": timedelta(days=days, microseconds=1),
            "older-and-ended": timedelta(days=days + 3),
            "exactly-at-the-cutoff": timedelta(days=days),
            "newer": timedelta(days=days) - timedelta(microseconds=1),
        }
        for name, age in ages.items():
            exai_db_clock.set(now - age)
            await service.save_session(name, {"state": "expired" if "ended" in name else "active"})
        exai_db_clock.set(now)

        deleted = await (
            service.cleanup_expired_sessions() if days == 7 else service.cleanup_expired_sessions(older_than_days=days)
        )

        assert deleted == 2, days
        assert sorted(rows(exai_direct_dsn)) == ["exactly-at-the-cutoff", "newer"], days
    assert await service.cleanup_expired_sessions(older_than_days=0) == 2  # everything active before now
    assert rows(exai_direct_dsn) == {}


@pytest.mark.asyncio
async def test_the_process_wide_service_follows_the_test_clock_once_given_it(shared, exai_db_clock, exai_direct_dsn):
    # Application code calls get_session_service() and cannot pass a clock: the test sets it.
    shared.clock = exai_db_clock
    exai_db_clock.set("2027-03-01T00:30:00Z")
    await shared.save_session("left-in-february", {})
    exai_db_clock.advance(timedelta(days=7, microseconds=1))

    assert await get_session_service().cleanup_expired_sessions() == 1
    assert rows(exai_direct_dsn) == {}


@pytest.mark.asyncio
async def test_cleanup_with_nothing_to_delete_returns_zero(service):
    await service.save_session("fresh", {})
    assert await service.cleanup_expired_sessions() == 0


# -- (de)serialisers


def test_serialize_and_deserialize_map_the_managers_keys_to_the_columns_and_back():
    moment = datetime(2028, 2, 29, 12, tzinfo=UTC)
    # (the manager's key, the table's column, a value): values pass unchanged.
    fields = [
        ("id", "session_id", "s-1"),
        ("state", "session_state", "active"),
        ("user_id", "user_id", "u"),
        ("user_type", "user_type", "agent"),
        ("ip_address", "ip_address", "192.0.2.1"),
        ("user_agent", "user_agent", "ua"),
        ("data", "session_data", {"k": "v"}),
        ("metadata", "metadata", {"m": 1}),
        ("request_count", "request_count", 3),
        ("total_duration_ms", "total_duration_ms", 40),
        ("created_at", "created_at", moment),
        ("last_activity", "last_activity_at", moment),
        ("expires_at", "expires_at", None),
    ]
    view = {key: value for key, _, value in fields}

    record = SupabaseSessionService.serialize_session(view)

    assert record == {column: value for _, column, value in fields}
    assert SupabaseSessionService.deserialize_session(record) == view
    # A row as "SELECT *" (or load_session, with its alias) reads it: the table's own id and updated_at are left out.
    assert SupabaseSessionService.deserialize_session({**record, "id": 7, "updated_at": moment}) == view
    assert SupabaseSessionService.deserialize_session({**record, "last_activity": moment}) == view
    # Keys that already are the column's name pass through.
    assert SupabaseSessionService.serialize_session({"session_id": "s-1", "session_state": "active"}) == {
        "session_id": "s-1",
        "session_state": "active",
    }


@pytest.mark.asyncio
async def test_deserialize_gives_the_managers_view_of_a_loaded_row(service):
    await service.save_session("viewed", {"state": "inactive", "user_id": "u", "x": 1})

    view = service.deserialize_session(await service.load_session("viewed"))

    assert (view["id"], view["state"], view["user_id"], view["data"]) == (
        "viewed",
        "inactive",
        "u",
        {"state": "inactive", "user_id": "u", "x": 1},
    )
    assert view["last_activity"] == view["created_at"]
    assert "session_id" not in view and "last_activity_at" not in view


@pytest.mark.parametrize(
    ("convert", "value", "message"),
    [
        ("serialize_session", {"id": "s", "inflight": 2}, "unknown session key 'inflight'"),
        ("serialize_session", {"id": "a", "session_id": "b"}, "two different values for 'session_id'"),
        ("deserialize_session", {"session_id": "s", "bogus": 1}, "unknown session key 'bogus'"),
        ("deserialize_session", ["session_id"], "must be a dict"),
    ],
)
def test_serialisers_refuse_what_they_cannot_map(convert, value, message):
    with pytest.raises(ValueError, match=message):
        getattr(SupabaseSessionService, convert)(value)


# -- bad input: ValueError, and nothing written


class NotJson:
    pass


BAD_CALLS = [
    ("save_session", ("",), {"session_data": {}}, "session id"),
    ("save_session", ("x" * 256, {}), {}, "at most 255"),
    ("save_session", ("bad\x00id", {}), {}, "control character"),
    ("save_session", (7, {}), {}, "must be a str"),
    ("save_session", ("kept", ["not", "a", "dict"]), {}, "session_data must be a dict"),
    ("save_session", ("kept", None), {}, "session_data must be a dict"),
    ("save_session", ("kept", {"state": "paused"}), {}, "state"),
    ("save_session", ("kept", {"user_type": "robot"}), {}, "user_type"),
    ("save_session", ("kept", {"request_count": -1}), {}, "request_count"),
    ("save_session", ("kept", {"request_count": "3"}), {}, "request_count"),
    ("save_session", ("kept", {"request_count": 2**63}), {}, "does not fit a bigint"),
    ("save_session", ("kept", {"total_duration_ms": -5}), {}, "total_duration_ms"),
    ("save_session", ("kept", {"ip_address": "not-an-ip"}), {}, "IPv4 or IPv6"),
    ("save_session", ("kept", {"blob": NotJson()}), {}, "is not JSON"),
    ("save_session", ("kept", {}, ["meta"]), {}, "metadata must be a dict"),
    ("load_session", ("",), {}, "session id"),
    ("delete_session", (None,), {}, "must be a str"),
    ("update_session_activity", ("kept", -1), {}, "must not be negative"),
    ("update_session_activity", ("kept", 1.5), {}, "must be an int"),
    ("update_session_activity", ("kept", True), {}, "must be an int"),
    ("update_session_activity", ("",), {}, "session id"),
    ("list_sessions", ("paused",), {}, "unknown session state 'paused'"),
    ("list_sessions", (), {"limit": 0}, "limit must be"),
    ("list_sessions", (), {"limit": "10"}, "limit must be"),
    ("list_sessions", (), {"limit": True}, "limit must be"),
    ("cleanup_expired_sessions", (-1,), {}, "older_than_days must be"),
    ("cleanup_expired_sessions", ("7",), {}, "older_than_days must be"),
    ("cleanup_expired_sessions", (7.5,), {}, "older_than_days must be"),
    ("cleanup_expired_sessions", (10**6,), {}, "before the year 1"),
]


@pytest.mark.parametrize("call", BAD_CALLS, ids=[call[0] for call in BAD_CALLS])
@pytest.mark.asyncio
async def test_bad_input_raises_value_error_and_writes_nothing(service, exai_direct_dsn, call):
    method, args, kwargs, message = call
    await service.save_session("kept", {"state": "active", "n": 1})
    before = rows(exai_direct_dsn)

    with pytest.raises(ValueError, match=message):
        await getattr(service, method)(*args, **kwargs)

    assert rows(exai_direct_dsn) == before


# -- database errors: PersistenceError


@pytest.mark.asyncio
async def test_a_database_without_the_sessions_table_raises_persistence_error(empty_dsn):
    async with SupabaseSessionService(empty_dsn) as service:
        for call in (
            service.save_session("s", {}),
            service.load_session("s"),
            service.delete_session("s"),
            service.list_sessions(),
            service.update_session_activity("s", 1),
            service.cleanup_expired_sessions(),
        ):
            with pytest.raises(PersistenceError, match="sessions"):
                await call


@pytest.mark.asyncio
async def test_an_unreachable_database_raises_persistence_error():
    service = SupabaseSessionService(
        "host=/nonexistent-exai-socket-dir dbname=nowhere", store_options={"timeout": 1, "connect_timeout": 1}
    )
    with pytest.raises(PersistenceError, match="nonexistent-exai-socket-dir"):
        await service.save_session("s", {})
    await service.aclose()


@pytest.mark.asyncio
async def test_a_refused_write_raises_persistence_error_and_changes_nothing(service, exai_direct_dsn):
    await service.save_session("kept", {"n": 1})
    before = rows(exai_direct_dsn)
    # The table's own rule, stricter than the service's input checks: no ids shorter than 3 characters.
    execute(exai_direct_dsn, "ALTER TABLE public.sessions ADD CONSTRAINT test_id_length CHECK (length(session_id) > 2)")

    with pytest.raises(PersistenceError, match="saving session 'no'"):
        await service.save_session("no", {})

    assert rows(exai_direct_dsn) == before


# -- recovery, the original's code, a pooler


@pytest.mark.asyncio
async def test_sessions_saved_through_the_service_are_there_after_its_process_died(shared, crash_harness):
    sessions = {f"user-{n:02d}": {"state": "active", "user_id": f"u{n}", "cart": list(range(n))} for n in range(20)}
    await original_service_app.persist_sessions(sessions)
    for n in range(5):
        await shared.update_session_activity(f"user-{n:02d}", request_duration_ms=10 * n)
    await shared.delete_session("user-19")
    await shared.save_session("user-18", {"state": "inactive"})  # ended: not among the recovered

    await crash_harness.abandon(shared)  # its connections killed on the server, nothing flushed
    await reset_session_service()  # the restarted process builds its own

    recovered = await original_service_app.recover_sessions()
    assert sorted(recovered) == [f"user-{n:02d}" for n in range(18)]
    for session_id, view in recovered.items():
        n = int(session_id[-2:])
        expected = (session_id, "active", f"u{n}", sessions[session_id])
        assert (view["id"], view["state"], view["user_id"], view["data"]) == expected
        assert (view["request_count"], view["total_duration_ms"]) == ((1, 10 * n) if n < 5 else (0, 0))
    service = get_session_service()
    assert await service.load_session("user-19") is None  # deleted before the crash: stays deleted
    assert (await service.load_session("user-18"))["session_state"] == "inactive"


@pytest.mark.asyncio
async def test_application_code_written_for_the_original_service_runs_unchanged(shared):
    assert await original_service_app.check_session_service() is True


@pytest.mark.asyncio
async def test_the_original_code_finds_the_service_disabled_without_a_database(monkeypatch, capsys):
    monkeypatch.delenv(DSN_ENV, raising=False)
    await reset_session_service()
    try:
        assert await original_service_app.check_session_service() is False
    finally:
        await reset_session_service()
    assert "not configured" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_through_a_transaction_mode_pooler(exai_pgbouncer, exai_direct_dsn, monkeypatch):
    """Through PgBouncer in transaction mode: the original's flow, and enough calls per connection to prepare."""
    pooled = exai_pgbouncer("transaction").dsn(conninfo_to_dict(exai_direct_dsn)["dbname"])
    monkeypatch.setenv(DSN_ENV, pooled)
    await reset_session_service()
    try:
        assert await original_service_app.check_session_service() is True
        service = get_session_service()
        await service.save_session("pooled", {})
        assert all(await asyncio.gather(*(service.update_session_activity("pooled", 1) for _ in range(60))))
        for _ in range(10):
            assert (await service.load_session("pooled"))["request_count"] == 60
            assert len(await service.list_sessions("active")) == 1
    finally:
        await reset_session_service()
    assert rows(exai_direct_dsn)["pooled"]["total_duration_ms"] == 60
