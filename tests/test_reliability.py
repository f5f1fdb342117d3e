"""Reliability figures against the real server: replicas counting at once, and 100,000 sessions recovered."""

import asyncio
from collections import defaultdict

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from pytest_exai_sessions import SessionLimitExceeded

REPLICAS = 4
CALLS_PER_REPLICA = 250
SHARED_IDS = [f"shared-{number}" for number in range(10)]


def duration_of(replica, call):
    """A different duration for every call, so that a lost or doubled one shows in the sum."""
    return (replica * CALLS_PER_REPLICA + call) % 97 + 1


async def counters(dsn):
    """request_count and total_duration_ms of every row, read by a connection of its own."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT session_id, request_count, total_duration_ms FROM public.sessions")
        return {session_id: (count, total) for session_id, count, total in await cur.fetchall()}


@pytest.mark.asyncio
async def test_four_replicas_counting_the_same_sessions_at_once_lose_no_update(
    session_manager_factory, crash_harness, exai_dsn
):
    replicas = [await session_manager_factory() for _ in range(REPLICAS)]
    for session_id in SHARED_IDS:
        await replicas[0].ensure(session_id)
    calls = [(replica, call) for replica in range(REPLICAS) for call in range(CALLS_PER_REPLICA)]

    results = await asyncio.gather(
        *(
            replicas[replica].update_activity(SHARED_IDS[call % len(SHARED_IDS)], duration_of(replica, call))
            for replica, call in calls
        )
    )

    expected = defaultdict(lambda: [0, 0])
    for replica, call in calls:
        totals = expected[SHARED_IDS[call % len(SHARED_IDS)]]
        totals[0] += 1
        totals[1] += duration_of(replica, call)
    expected = {session_id: tuple(totals) for session_id, totals in expected.items()}
    assert {count for count, _ in expected.values()} == {REPLICAS * CALLS_PER_REPLICA // len(SHARED_IDS)}
    # Every increment was its own: each session returned each count from 1 to 100 exactly once.
    returned = defaultdict(list)
    for session in results:
        returned[session.session_id].append(session.request_count)
    for session_id, (count, _) in expected.items():
        assert sorted(returned[session_id]) == list(range(1, count + 1)), session_id

    assert await counters(exai_dsn) == expected
    recovered = await crash_harness.crash_and_restart(replicas[1])
    assert {
        session_id: (session.request_count, session.total_duration_ms)
        for session_id, session in recovered.live_sessions().items()
    } == expected


RECOVERED = 100_000
# Rows that must not come back: ended, idle past the default timeout (3600 s), past expires_at.
NOT_LIVE = {
    "ended": "session_state = 'expired'",
    "inactive": "session_state = 'inactive'",
    "idle": "last_activity_at = now() - interval '2 hours'",
    "past-expiry": "expires_at = now() - interval '1 second'",
}

INSERT_SESSIONS = """
INSERT INTO public.sessions (
    session_id, session_state, user_id, user_type, ip_address, user_agent, session_data, metadata,
    request_count, total_duration_ms, created_at, last_activity_at, expires_at
)
SELECT %(prefix)s || i,
       'active',
       CASE WHEN i %% 3 = 0 THEN NULL ELSE 'user-' || (i %% 1000) END,
       (ARRAY['human', 'agent', 'system'])[1 + i %% 3],
       CASE i %% 4
           WHEN 0 THEN NULL
           WHEN 1 THEN ('10.' || (i / 65536) %% 256 || '.' || (i / 256) %% 256 || '.' || i %% 256)::inet
           WHEN 2 THEN ('2001:db8::' || to_hex(i / 65536) || ':' || to_hex(i %% 65536))::inet
           ELSE ('::ffff:192.0.' || (i / 256) %% 256 || '.' || i %% 256)::inet
       END,
       CASE WHEN i %% 5 = 0 THEN NULL ELSE 'agent/' || i || ' ünïcode ''quoted''' END,
       jsonb_build_object(
           'n', i,
           'tags', jsonb_build_array('t' || i %% 7, i %% 2 = 0, NULL),
           'ratio', i / 7.0,
           'nested', jsonb_build_object('deep', jsonb_build_object('text', repeat('x', i %% 40)))
       ),
       jsonb_build_object('schema_version', 1, 'source', CASE WHEN i %% 2 = 0 THEN 'web' ELSE 'api' END),
       i %% 1000,
       (i::bigint * 37) %% 1000000,
       now() - make_interval(secs => 600 + i %% 3000),
       now() - make_interval(secs => i %% 600),
       CASE WHEN i %% 10 = 0 THEN now() + interval '1 day' END
FROM generate_series(1, %(count)s) AS i
"""


def session_fields(row):
    """The fields of a Session, from a raw row of public.sessions as psycopg gives it."""
    address = row["ip_address"]  # psycopg loads inet as an ipaddress object
    return {
        "session_id": row["session_id"],
        "state": row["session_state"],
        "user_id": row["user_id"],
        "user_type": row["user_type"],
        "ip_address": None if address is None else str(address),
        "user_agent": row["user_agent"],
        "data": row["session_data"],
        "metadata": row["metadata"],
        "request_count": row["request_count"],
        "total_duration_ms": row["total_duration_ms"],
        "created_at": row["created_at"],
        "last_activity": row["last_activity_at"],
        "expires_at": row["expires_at"],
        "version": row["version"],
    }


@pytest.mark.slow  # about 10 s: inserting, recovering and comparing 100,000 rows
@pytest.mark.asyncio
async def test_100k_persisted_sessions_are_all_recovered_field_for_field(session_manager_factory, exai_dsn):
    async with await psycopg.AsyncConnection.connect(exai_dsn, autocommit=True, row_factory=dict_row) as conn:
        await conn.execute(INSERT_SESSIONS, {"prefix": "recovered-", "count": RECOVERED})
        for name, change in NOT_LIVE.items():
            await conn.execute(INSERT_SESSIONS, {"prefix": f"{name}-", "count": 100})
            # Each change is a constant of this test, a piece of SQL rather than a value.
            update = sql.SQL("UPDATE public.sessions SET {} WHERE session_id LIKE %s").format(sql.SQL(change))
            await conn.execute(update, (f"{name}-%",))
        cur = await conn.execute("SELECT * FROM public.sessions WHERE session_id LIKE 'recovered-%'")
        expected = {row["session_id"]: session_fields(row) for row in await cur.fetchall()}
    assert len(expected) == RECOVERED

    manager = await session_manager_factory(max_concurrent_sessions=1000)

    recovered = await manager.recover_all_sessions()  # the complete recovery, on request
    assert recovered.keys() == expected.keys()  # all of them, and none of the rows that are not live
    different = {
        sid: {name: (value, got[name]) for name, value in fields.items() if got[name] != value}
        for sid, fields in expected.items()
        if (got := recovered[sid].model_dump()) != fields
    }
    assert not different, f"{len(different)} sessions differ (raw row, recovered), e.g. {list(different.items())[:3]}"
    # Loading them all is never refused; creating one more than the limit is.
    with pytest.raises(SessionLimitExceeded):
        await manager.ensure("one-more")
    assert (await manager.update_activity("recovered-7", 5)).request_count == 8
