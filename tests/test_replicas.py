"""Several managers on one database behave as one: coherent reads, versions, merges, global removal and limits."""

import asyncio

import psycopg
import pytest
from psycopg.rows import dict_row

from pytest_exai_sessions import (
    SessionConflict,
    SessionLifecycle,
    SessionLimitExceeded,
    SessionManager,
    SessionNotFound,
    apply_migrations,
    load_migrations,
)


async def rows(dsn, query, params=None):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def lifecycle_events(dsn, event_type):
    found = await rows(
        dsn,
        "SELECT session_id FROM unified.event_metric_events"
        " WHERE event_category = 'session_lifecycle' AND event_type = %s",
        (str(event_type),),
    )
    return sorted(row["session_id"] for row in found)


# -- the four stories of the issue


@pytest.mark.asyncio
async def test_a_change_on_one_replica_is_what_the_other_reads_next(session_replicas):
    a, b = await session_replicas(2)
    await b.ensure("alice", data={"cart": []})
    assert (await b.get("alice")).data == {"cart": []}

    await a.update("alice", data={"cart": ["apple"]})

    assert (await b.get("alice")).data == {"cart": ["apple"]}
    assert (await b.ensure("alice")).data == {"cart": ["apple"]}
    async with b.request("alice") as served:
        assert served.data == {"cart": ["apple"]}


@pytest.mark.asyncio
async def test_read_modify_write_from_two_replicas_cannot_lose_an_update(session_replicas):
    a, b = await session_replicas(2)
    await a.ensure("alice", data={"cart": []})
    seen_by_a, seen_by_b = await a.get("alice"), await b.get("alice")

    await a.update("alice", data={"cart": [*seen_by_a.data["cart"], "apple"]}, expected_version=seen_by_a.version)
    with pytest.raises(SessionConflict) as conflict:
        await b.update("alice", data={"cart": [*seen_by_b.data["cart"], "pear"]}, expected_version=seen_by_b.version)

    assert (conflict.value.expected_version, conflict.value.current_version) == (
        seen_by_b.version,
        seen_by_a.version + 1,
    )
    assert (await b.get("alice")).data == {"cart": ["apple"]}  # b's write changed nothing
    fresh = await b.get("alice")
    retried = await b.update("alice", data={"cart": [*fresh.data["cart"], "pear"]}, expected_version=fresh.version)
    assert (await a.get("alice")).data == retried.data == {"cart": ["apple", "pear"]}


@pytest.mark.asyncio
async def test_a_removal_on_one_replica_takes_effect_on_every_other_at_once(session_replicas, exai_dsn):
    a, b, c = await session_replicas(3)
    await a.ensure("alice")
    assert await b.get("alice") is not None

    await a.remove("alice")  # a logout

    assert await b.get("alice") is None
    assert await c.get("alice") is None
    assert "alice" not in await b.list_ids()
    with pytest.raises(SessionNotFound):
        async with b.request("alice"):
            pass
    with pytest.raises(SessionNotFound):
        await b.update_activity("alice")
    with pytest.raises(SessionNotFound):
        await c.update("alice", data={"revived": True})
    assert await rows(exai_dsn, "SELECT 1 FROM public.sessions WHERE session_id = 'alice'") == []


@pytest.mark.asyncio
async def test_concurrent_requests_from_four_replicas_are_counted_exactly_everywhere(session_replicas, exai_dsn):
    replicas = await session_replicas(4)
    await replicas[0].ensure("alice")

    await asyncio.gather(*(replica.update_activity("alice", 1) for replica in replicas for _ in range(50)))

    assert await rows(exai_dsn, "SELECT request_count, total_duration_ms FROM public.sessions") == [
        {"request_count": 200, "total_duration_ms": 200}
    ]
    for replica in replicas:
        assert (await replica.get("alice")).request_count == 200


# -- the figures


@pytest.mark.asyncio
async def test_four_replicas_times_250_requests_on_ten_sessions_are_exact(session_replicas, exai_dsn):
    replicas = await session_replicas(4)
    ids = [f"s{number}" for number in range(10)]
    for session_id in ids:
        await replicas[0].ensure(session_id)

    await asyncio.gather(*(replica.update_activity(ids[call % 10], 2) for replica in replicas for call in range(250)))

    stored = await rows(exai_dsn, "SELECT session_id, request_count, total_duration_ms, version FROM public.sessions")
    # 1000 requests over 10 sessions: 100 each, and each write moved the version once.
    assert {row["session_id"]: (row["request_count"], row["total_duration_ms"], row["version"]) for row in stored} == {
        session_id: (100, 200, 101) for session_id in ids
    }
    for replica in replicas:
        assert [(await replica.get(session_id)).request_count for session_id in ids] == [100] * 10


@pytest.mark.asyncio
async def test_two_replicas_racing_a_compare_and_set_on_one_version_have_one_winner(session_replicas):
    a, b = await session_replicas(2)
    base = await a.ensure("race", data={"winner": None})

    outcomes = await asyncio.gather(
        a.update("race", data={"winner": "a"}, expected_version=base.version),
        b.update("race", data={"winner": "b"}, expected_version=base.version),
        return_exceptions=True,
    )

    won = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    lost = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert isinstance(lost[0], SessionConflict)
    assert lost[0].current_version == won[0].version == base.version + 1
    assert (await b.get("race")).data == won[0].data


@pytest.mark.asyncio
async def test_merges_from_four_replicas_all_survive(session_replicas):
    replicas = await session_replicas(4)
    await replicas[0].ensure("shared", data={"kept": True})

    await asyncio.gather(
        *(
            replica.merge_data("shared", {f"r{number}-k{call}": call})
            for number, replica in enumerate(replicas)
            for call in range(25)
        )
    )

    merged = (await replicas[1].get("shared")).data
    assert len(merged) == 101 and merged["kept"] is True
    assert {key for key in merged if key != "kept"} == {f"r{n}-k{c}" for n in range(4) for c in range(25)}
    assert (await replicas[2].get("shared")).version == 101


@pytest.mark.asyncio
async def test_a_removal_on_a_then_a_read_on_b_is_none(session_replicas):
    a, b = await session_replicas(2)
    await b.ensure("gone")

    await a.remove("gone")

    assert await b.get("gone") is None


# -- versions and compare-and-set


@pytest.mark.asyncio
async def test_every_write_of_a_row_moves_its_version_by_one(session_replicas, exai_db_clock):
    a, b = await session_replicas(2, session_timeout_secs=60)
    assert (await a.ensure("v")).version == 1
    assert (await b.ensure("v")).version == 1  # reading it changes nothing
    assert (await b.update_activity("v")).version == 2
    assert (await a.update("v", metadata={"m": 1})).version == 3
    assert (await b.merge_data("v", {"k": 1})).version == 4
    assert (await a.update_activity_many([("v", 1), ("v", 2)]))["v"].version == 5
    exai_db_clock.advance(seconds=61)
    assert await a.cleanup_stale_sessions() == 1  # expiring it is a write too
    assert (await b.ensure("v")).version == 7  # a new session under the id goes on counting


@pytest.mark.asyncio
async def test_update_without_expected_version_behaves_as_before(session_replicas):
    a, b = await session_replicas(2)
    await a.ensure("plain", data={"n": 1})
    await b.update("plain", data={"n": 2})

    assert (await a.update("plain", data={"n": 3})).data == {"n": 3}  # no version given: last write wins


@pytest.mark.asyncio
async def test_a_conflict_writes_nothing_and_bad_versions_are_refused(session_manager, exai_dsn):
    session = await session_manager.ensure("cas", data={"n": 1})
    before = await rows(exai_dsn, "SELECT * FROM public.sessions")

    with pytest.raises(SessionConflict, match="at version 1, not 7") as conflict:
        await session_manager.update("cas", data={"n": 2}, expected_version=7)
    for bad in (0, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="expected_version"):
            await session_manager.update("cas", data={"n": 2}, expected_version=bad)
    with pytest.raises(SessionNotFound):
        await session_manager.update("unknown", data={"n": 2}, expected_version=1)

    assert conflict.value.session_id == "cas" and conflict.value.current_version == session.version
    assert await rows(exai_dsn, "SELECT * FROM public.sessions") == before


def test_existing_rows_get_version_1_when_the_migration_adds_it(empty_dsn):
    migrations = load_migrations()
    versions = [migration.version for migration in migrations]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        apply_migrations(conn, migrations[: versions.index(9)])
        conn.execute("INSERT INTO public.sessions (session_id, request_count) VALUES ('old', 5)")
        apply_migrations(conn, migrations)
        assert conn.execute("SELECT version, request_count FROM public.sessions").fetchall() == [(1, 5)]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE public.sessions SET version = 0")


# -- merges


@pytest.mark.asyncio
async def test_merge_data_replaces_top_level_keys_only_and_returns_the_stored_session(session_manager):
    await session_manager.ensure("m", data={"a": 1, "nested": {"x": 1}})

    merged = await session_manager.merge_data("m", {"nested": {"y": 2}, "b": [1, 2]})

    assert merged.data == {"a": 1, "nested": {"y": 2}, "b": [1, 2]}
    assert merged == await session_manager.get("m")
    with pytest.raises(SessionNotFound):
        await session_manager.merge_data("unknown", {"a": 1})


@pytest.mark.asyncio
async def test_merge_data_applies_the_rules_and_limits_of_data_and_writes_nothing_when_broken(
    session_manager, exai_dsn
):
    await session_manager.ensure("m", data={"big": "x" * 600_000})
    before = await rows(exai_dsn, "SELECT * FROM public.sessions")

    with pytest.raises(ValueError, match="not JSON"):
        await session_manager.merge_data("m", {"when": object()})
    with pytest.raises(ValueError):
        await session_manager.merge_data("m", ["not", "an", "object"])
    with pytest.raises(ValueError, match="bytes"):
        await session_manager.merge_data("m", {"x" * 10: "y" * 1_100_000})  # the patch alone is too big
    with pytest.raises(ValueError, match="bytes"):
        await session_manager.merge_data("m", {"more": "y" * 500_000})  # only the merged object is

    assert await rows(exai_dsn, "SELECT * FROM public.sessions") == before


# -- removal, expiry and lifecycle events across replicas


@pytest.mark.asyncio
async def test_expiry_by_one_replica_is_global_and_each_change_is_recorded_once(
    session_replicas, exai_dsn, exai_db_clock
):
    replicas = await session_replicas(3, session_timeout_secs=60, record_events=True)
    # The same new id, ensured by all at once: one session, one "created" event.
    created = await asyncio.gather(*(replica.ensure("alice") for replica in replicas))
    assert len({session.created_at for session in created}) == 1
    await replicas[0].ensure("bob")
    exai_db_clock.advance(seconds=61)

    expired = await asyncio.gather(*(replica.cleanup_stale_sessions() for replica in replicas))

    assert sum(expired) == 2  # each session expired by exactly one replica
    for replica in replicas:
        assert await replica.get("alice") is None and await replica.list_ids() == []
    await replicas[1].remove("bob")
    await replicas[2].remove("bob")  # already gone: nothing to record
    assert await lifecycle_events(exai_dsn, SessionLifecycle.CREATED) == ["alice", "bob"]
    assert await lifecycle_events(exai_dsn, SessionLifecycle.EXPIRED) == ["alice", "bob"]
    assert await lifecycle_events(exai_dsn, SessionLifecycle.REMOVED) == ["bob"]


@pytest.mark.asyncio
async def test_list_ids_and_metrics_count_every_replica_s_sessions(session_replicas, exai_db_clock):
    a, b = await session_replicas(2, session_timeout_secs=60)
    exai_db_clock.set("2031-01-02T03:04:05Z")  # frozen: the ages below are exact
    await a.ensure("from-a")
    exai_db_clock.advance(seconds=10)
    await b.ensure("from-b")

    assert await a.list_ids() == await b.list_ids() == ["from-a", "from-b"]
    metrics = await b.get_session_metrics()
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (2, 2)
    assert (metrics["oldest_session_age"], metrics["newest_session_age"], metrics["avg_session_age"]) == (10, 0, 5)
    exai_db_clock.advance(seconds=55)  # from-a is idle past the timeout, not cleaned up yet
    metrics = await a.get_session_metrics()
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (2, 1)


# -- the limit is global


@pytest.mark.asyncio
async def test_max_concurrent_sessions_counts_every_replica_s_live_sessions(session_replicas, exai_db_clock):
    a, b = await session_replicas(2, max_concurrent_sessions=3, session_timeout_secs=60)
    await a.ensure("a1")
    await b.ensure("b1")
    await a.ensure("a2")

    with pytest.raises(SessionLimitExceeded):
        await b.ensure("b2")
    assert (await b.ensure("a1")).session_id == "a1"  # an existing session is never refused
    await a.remove("a1")  # room freed on one replica is room on every other
    await b.ensure("b2")
    exai_db_clock.advance(seconds=61)  # idle sessions hold no slot, even before cleanup
    await a.ensure("a3")


@pytest.mark.asyncio
async def test_replicas_creating_at_once_never_pass_the_limit(session_replicas, exai_dsn):
    replicas = await session_replicas(4, max_concurrent_sessions=5)

    outcomes = await asyncio.gather(
        *(replica.ensure(f"r{number}-{call}") for number, replica in enumerate(replicas) for call in range(4)),
        return_exceptions=True,
    )

    created = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(created) == 5 and len(refused) == 11, outcomes
    assert all(isinstance(error, SessionLimitExceeded) for error in refused)
    assert (await rows(exai_dsn, "SELECT count(*) AS n FROM public.sessions"))[0]["n"] == 5


# -- what stays in one process


@pytest.mark.asyncio
async def test_request_slots_are_per_replica(session_replicas):
    a, b = await session_replicas(2, max_inflight=1)
    await a.ensure("busy")
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def hold_the_slot():
        async with a.request("busy"):
            inside.set()
            await leave.wait()

    holder = asyncio.create_task(hold_the_slot())
    await inside.wait()
    async with b.request("busy"):  # b's slot is its own: it does not wait for a's
        pass
    leave.set()
    await holder
    assert (await b.get("busy")).request_count == 2


@pytest.mark.asyncio
async def test_a_replica_starts_without_loading_sessions(session_replicas, exai_dsn):
    (writer,) = await session_replicas(1)
    for number in range(20):
        await writer.ensure(f"s{number}")

    async with SessionManager.connect(exai_dsn, cleanup_interval_secs=0) as fresh:
        # Nothing loaded, everything served: the first read of a session goes to the database.
        assert repr(fresh).startswith("<SessionManager persisted")
        assert (await fresh.get("s7")).session_id == "s7"
        assert len(await fresh.recover_all_sessions()) == 20  # and a complete recovery, on request
