"""SessionStore and MemoryStore: one interface, one behaviour, tested by the same functions."""

from datetime import UTC, datetime, timedelta

import pytest

from pytest_exai_sessions import Session, SessionState, SessionStore
from pytest_exai_sessions.events import SessionEvents, SessionLifecycle
from pytest_exai_sessions.memory import MemoryStore

T0 = datetime(2028, 2, 29, 12, 0, tzinfo=UTC)
TIMEOUT = timedelta(hours=1)


def at(minutes):
    """(now, stale_before) for a manager with a one-hour timeout, ``minutes`` after T0."""
    now = T0 + timedelta(minutes=minutes)
    return {"now": now, "stale_before": now - TIMEOUT}


def session(session_id, **fields):
    return Session(session_id=session_id, created_at=T0, last_activity=T0, **fields)


@pytest.fixture(params=["postgres", "memory"])
def store(request):
    if request.param == "postgres":
        return request.getfixturevalue("session_store")
    return MemoryStore()


async def rows(store):
    return {s.session_id: s async for s in store.iter_all()}


@pytest.mark.asyncio
async def test_create_returns_the_row_and_refuses_a_live_id(store):
    created = await store.create(session("a", data={"cart": [1]}), **at(0))
    again = await store.create(session("a", data={"other": True}), **at(1))

    assert created == session("a", data={"cart": [1]})
    assert again is None
    assert (await rows(store))["a"] == created


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "ended",
    [{"state": SessionState.EXPIRED}, {"expires_at": T0 + timedelta(minutes=5)}, None],
    ids=["not active", "past expires_at", "idle past the timeout"],
)
async def test_an_id_no_longer_live_is_restarted_afresh(store, ended):
    await store.create(session("a", request_count=0), **at(0))
    await store.record_request("a", duration_ms=5, **at(1))
    if ended and "state" in ended:
        await store.update("a", {"state": ended["state"]}, **at(2))
    elif ended:
        await store.update("a", {"expires_at": ended["expires_at"]}, **at(2))
    later = at(90)
    ended_version = (await rows(store))["a"].version

    assert await store.fetch_live("a", **later) is None
    fresh = Session(session_id="a", created_at=later["now"], last_activity=later["now"])
    restarted = await store.create(fresh, **later)

    # Counters and created_at start again; the version goes on, so that a compare-and-set
    # that read the old session cannot succeed on the new one.
    assert restarted == fresh.model_copy(update={"version": ended_version + 1})
    assert (await rows(store))["a"] == restarted


@pytest.mark.asyncio
async def test_fetch_live_finds_only_live_sessions(store):
    await store.create(session("a"), **at(0))
    assert await store.fetch_live("a", **at(60)) == session("a")  # exactly at the cutoff: live
    assert await store.fetch_live("a", **at(60.001)) is None
    assert await store.fetch_live("unknown", **at(0)) is None


@pytest.mark.asyncio
async def test_record_request_counts_and_moves_last_activity(store):
    await store.create(session("a"), **at(0))
    await store.record_request("a", duration_ms=5, **at(10))
    counted = await store.record_request("a", duration_ms=7, **at(20))

    assert (counted.request_count, counted.total_duration_ms) == (2, 12)
    assert counted.last_activity == T0 + timedelta(minutes=20)
    assert counted.created_at == T0
    assert await store.record_request("unknown", duration_ms=1, **at(20)) is None
    assert await store.record_request("a", duration_ms=1, **at(200)) is None  # timed out meanwhile
    assert (await rows(store))["a"] == counted


@pytest.mark.asyncio
async def test_record_requests_is_all_or_nothing(store):
    await store.create(session("a"), **at(0))
    await store.create(session("b"), **at(0))

    counted = await store.record_requests({"a": (2, 10), "b": (1, 3)}, **at(5))
    refused = await store.record_requests({"a": (1, 1), "missing": (1, 1)}, **at(6))

    assert {s.session_id: (s.request_count, s.total_duration_ms) for s in counted} == {"a": (2, 10), "b": (1, 3)}
    assert [s.session_id for s in refused] == ["a"]  # the live ones: the caller names the missing
    assert (await rows(store))["a"].request_count == 2  # nothing of the refused batch was counted


@pytest.mark.asyncio
async def test_update_sets_the_fields_and_last_activity(store):
    await store.create(session("a", user_id="u1", data={"x": 1}), **at(0))
    updated = await store.update("a", {"data": {"y": 2}, "user_agent": "pytest"}, **at(3))

    assert (updated.data, updated.user_agent, updated.user_id) == ({"y": 2}, "pytest", "u1")
    assert updated.last_activity == T0 + timedelta(minutes=3)
    assert await store.update("unknown", {"data": {}}, **at(3)) is None
    assert (await rows(store))["a"] == updated


@pytest.mark.asyncio
async def test_delete_expire_and_delete_all(store):
    for session_id in ("idle", "busy", "gone"):
        await store.create(session(session_id), **at(0))
    await store.record_request("busy", duration_ms=0, **at(50))

    assert await store.delete("gone") is True
    assert await store.delete("gone") is False
    assert await store.expire_stale(**at(70)) == ["idle"]  # busy is still live
    assert await store.expire_stale(**at(70)) == []  # expired already
    stored = await rows(store)
    assert {sid: s.state for sid, s in stored.items()} == {"idle": SessionState.EXPIRED, "busy": SessionState.ACTIVE}
    assert [s.session_id async for s in store.iter_live(**at(70))] == ["busy"]
    assert await store.delete_all() == 2
    assert await rows(store) == {}


@pytest.mark.asyncio
async def test_what_a_store_hands_out_shares_nothing_with_what_it_keeps(store):
    data = {"cart": {"items": [1]}}
    created = await store.create(session("a", data=data), **at(0))
    data["cart"]["items"].append(2)
    created.data["cart"]["items"].append(3)
    fetched = await store.fetch_live("a", **at(1))
    fetched.data["cart"]["items"].append(4)

    assert (await store.fetch_live("a", **at(1))).data == {"cart": {"items": [1]}}


@pytest.mark.asyncio
async def test_a_memory_store_records_no_lifecycle_events():
    with pytest.raises(ValueError, match="MemoryStore records none"):
        await MemoryStore().create(session("a"), events=SessionEvents(SessionLifecycle.CREATED), **at(0))
    assert MemoryStore.persistent is False


@pytest.mark.asyncio
async def test_an_unknown_pool_option_is_refused_before_connecting():
    with pytest.raises(TypeError, match=r"unknown pool options \['max_pool'\]"):
        await SessionStore.open("host=/nonexistent-exai-socket-dir dbname=nowhere", max_pool=3)
