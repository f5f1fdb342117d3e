"""Killing the database itself: committed data survives, and managers reconnect on their own."""

import asyncio
import textwrap

import pytest

from pytest_exai_sessions import PersistenceError, SessionStore, assert_full_recovery


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["kill", "immediate"])
async def test_committed_sessions_survive_and_the_manager_reconnects(mode, session_manager, crash_harness):
    for number in range(50):
        await session_manager.ensure(f"s{number}", data={"n": number})
        await session_manager.update_activity(f"s{number}", request_duration_ms=number)
    before = crash_harness.snapshot(session_manager)

    seconds = crash_harness.crash_database(mode)

    assert seconds < 30  # it did come back; how fast is for benchmarks/
    # The same manager, no rebuild: its first call after the restart succeeds.
    session = await session_manager.update_activity("s0", request_duration_ms=1)
    assert session.request_count == 2
    fresh = await crash_harness.new_manager()
    assert_full_recovery({**before, "s0": session}, fresh)


@pytest.mark.asyncio
async def test_calls_during_the_outage_raise_and_later_ones_succeed(exai_dsn, crash_harness):
    store = await SessionStore.open(exai_dsn, timeout=0.5)
    manager = await crash_harness.new_manager()
    manager = type(manager)(store, close_store=True)
    async with manager:
        await manager.ensure("s1")
        before = manager.live_sessions()

        crash_harness.kill_database()
        try:
            for operation in (
                manager.ensure("s2"),
                manager.update_activity("s1"),
                manager.update("s1", data={"lost": True}),
                manager.remove("s1"),
            ):
                with pytest.raises(PersistenceError):
                    await asyncio.wait_for(operation, timeout=30)  # never hangs: bounded by the store
        finally:
            crash_harness.restart_database()

        assert manager.live_sessions() == before  # nothing the failed calls tried took effect
        assert (await manager.update_activity("s1")).request_count == 1
        assert (await manager.ensure("s2")).session_id == "s2"


@pytest.mark.asyncio
async def test_every_acknowledged_write_survives_a_postmaster_kill_under_load(session_manager_factory, crash_harness):
    # Writers that wait for a pool connection when the server dies give up after the store's
    # timeout: 2 s rather than the default 5, a wait that proves nothing here.
    manager = await session_manager_factory(max_concurrent_sessions=100, store_options={"timeout": 2})
    ids = [f"s{number}" for number in range(20)]
    for session_id in ids:
        await manager.ensure(session_id)
    acknowledged = dict.fromkeys(ids, 0)
    in_flight = dict.fromkeys(ids, 0)
    killed = asyncio.Event()

    async def writer(session_id):
        while not killed.is_set():
            in_flight[session_id] += 1
            try:
                await manager.update_activity(session_id, request_duration_ms=3)
            except PersistenceError:
                return  # the server died under this write: not acknowledged
            finally:
                in_flight[session_id] -= 1
            acknowledged[session_id] += 1

    writers = [asyncio.create_task(writer(session_id)) for session_id in ids]
    while sum(acknowledged.values()) < 300:
        await asyncio.sleep(0.001)
    crash_harness.kill_database()  # blocks the loop: writers are frozen mid-await
    killed.set()
    uncertain = dict(in_flight)
    await asyncio.gather(*writers)
    crash_harness.restart_database()

    recovered = (await crash_harness.new_manager()).live_sessions()
    for session_id in ids:
        count = recovered[session_id].request_count
        # Every acknowledged write is there; one in flight at the kill may or may not be.
        assert acknowledged[session_id] <= count <= acknowledged[session_id] + uncertain[session_id], session_id
        assert recovered[session_id].total_duration_ms == 3 * count


def test_database_crash_helpers_skip_on_an_external_server(pytester, exai_pg_server):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.asyncio
            async def test_crash(crash_harness):
                crash_harness.crash_database()
            """
        )
    )
    result = pytester.runpytest("-rs", f"--exai-dsn={exai_pg_server.dsn()}")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*need the plugin's temporary server, not an external server (--exai-dsn)*"])
