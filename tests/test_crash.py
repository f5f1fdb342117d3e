"""crash_harness: a crashed manager's sessions come back, field for field."""

import asyncio

import psycopg
import pytest

from pytest_exai_sessions import SessionManager, assert_full_recovery


class AuditedManager(SessionManager):
    """An application's own subclass: a restart must rebuild this class, not the base one."""


async def backends_named(dsn, application_name):
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        )
        return (await cur.fetchone())[0]


@pytest.mark.asyncio
async def test_crash_drops_the_connections_like_a_dead_process(session_manager, crash_harness, exai_dsn):
    await session_manager.ensure("s")
    name = session_manager.store.application_name
    assert await backends_named(exai_dsn, name) >= 1

    recovered = await crash_harness.crash_and_restart(session_manager)

    assert await backends_named(exai_dsn, name) == 0
    assert recovered is not session_manager
    assert recovered.store.application_name != name
    assert await recovered.list_ids() == ["s"]


@pytest.mark.asyncio
async def test_restart_keeps_the_class_and_options_with_overrides(crash_harness):
    manager = await crash_harness.new_manager(AuditedManager, session_timeout_secs=120, max_inflight=2)
    await manager.ensure("s")

    recovered = await crash_harness.crash_and_restart(manager, max_inflight=4)

    assert type(recovered) is AuditedManager
    assert recovered.options == {**manager.options, "max_inflight": 4}


@pytest.mark.asyncio
async def test_every_acknowledged_write_survives_concurrent_load(session_manager_factory, crash_harness):
    manager = await session_manager_factory(max_concurrent_sessions=500)
    ids = [f"s{i}" for i in range(200)]
    await asyncio.gather(*(manager.ensure(sid, data={"n": i}) for i, sid in enumerate(ids)))
    await asyncio.gather(*(manager.update_activity(sid, request_duration_ms=7) for sid in ids for _ in range(3)))
    before = crash_harness.snapshot(manager)
    assert {s.request_count for s in before.values()} == {3}

    recovered = await crash_harness.crash_and_restart(manager)

    assert_full_recovery(before, recovered)
    assert sum(s.total_duration_ms for s in recovered.live_sessions().values()) == 200 * 3 * 7


@pytest.mark.asyncio
async def test_a_write_after_the_snapshot_is_reported_as_a_difference(session_manager, crash_harness):
    await session_manager.ensure("a")
    before = crash_harness.snapshot(session_manager)
    await session_manager.update("a", data={"later": True})

    recovered = await crash_harness.crash_and_restart(session_manager)

    with pytest.raises(AssertionError, match=r"session 'a' field data: before=\{\} after=\{'later': True\}"):
        assert_full_recovery(before, recovered)


@pytest.mark.asyncio
async def test_timed_out_and_removed_sessions_do_not_come_back(session_manager_factory, crash_harness, exai_db_clock):
    manager = await session_manager_factory(session_timeout_secs=60, cleanup_interval_secs=0)
    await manager.ensure("removed")
    await manager.ensure("idle")
    await manager.remove("removed")
    exai_db_clock.advance(seconds=61)
    await manager.ensure("fresh")

    recovered = await crash_harness.crash_and_restart(manager)

    assert await recovered.list_ids() == ["fresh"]


@pytest.mark.asyncio
async def test_crash_of_a_manager_without_store_recovers_nothing(crash_harness):
    manager = SessionManager(None)
    await manager.ensure("lost")
    recovered = await crash_harness.crash_and_restart(manager)
    assert recovered.live_sessions() == {}
