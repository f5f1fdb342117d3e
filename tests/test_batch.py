"""update_activity_many: many requests counted in one statement, all or nothing."""

import psycopg
import pytest

from pytest_exai_sessions import SessionManager, SessionNotFound


@pytest.mark.asyncio
async def test_a_batch_counts_every_request_and_returns_the_stored_sessions(persistence, make_batch_manager):
    manager = await make_batch_manager()
    for session_id in ("a", "b"):
        await manager.ensure(session_id)

    result = await manager.update_activity_many([("a", 10), ("b", None), ("a", 5), ("a", 0)])

    assert {sid: (s.request_count, s.total_duration_ms) for sid, s in result.items()} == {"a": (3, 15), "b": (1, 0)}
    assert manager.live_sessions()["a"] == result["a"]
    assert await manager.update_activity_many([]) == {}


@pytest.mark.asyncio
async def test_an_unknown_session_means_nothing_is_counted(persistence, make_batch_manager, exai_dsn):
    manager = await make_batch_manager()
    await manager.ensure("a")

    with pytest.raises(SessionNotFound, match="'ghost'"):
        await manager.update_activity_many([("a", 1), ("ghost", 1)])

    assert manager.live_sessions()["a"].request_count == 0
    if persistence is not None:
        with psycopg.connect(exai_dsn) as conn:
            assert conn.execute("SELECT request_count FROM public.sessions WHERE session_id = 'a'").fetchone() == (0,)


@pytest.mark.asyncio
async def test_bad_input_in_a_batch_writes_nothing(persistence, make_batch_manager):
    manager = await make_batch_manager()
    await manager.ensure("a")
    with pytest.raises(ValueError, match="negative"):
        await manager.update_activity_many([("a", 1), ("a", -5)])
    assert manager.live_sessions()["a"].request_count == 0


@pytest.mark.asyncio
async def test_batches_from_two_managers_are_both_counted(session_manager_factory):
    first, second = await session_manager_factory(), await session_manager_factory()
    await first.ensure("shared")
    await second.get("shared")

    await first.update_activity_many([("shared", 1)] * 50)
    result = await second.update_activity_many([("shared", 2)] * 30)

    assert (result["shared"].request_count, result["shared"].total_duration_ms) == (80, 110)


@pytest.fixture
def make_batch_manager(persistence):
    async def make():
        if persistence is None:
            return SessionManager(None)
        return await persistence()

    return make
