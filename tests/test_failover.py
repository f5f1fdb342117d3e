"""Failover: a primary with streaming standbys, killed mid-workload; the store follows the new primary.

Synchronous replication keeps every acknowledged write through a failover; asynchronous
replication with a lagging standby loses some, and the ledger names them; a commit whose
wait for the standby was cancelled is never acknowledged.
"""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest
from session_states import row, state

from pytest_exai_sessions import CommitUncertain, PersistenceError, SessionManager
from pytest_exai_sessions.server.replication import ReplicatedCluster
from pytest_exai_sessions.testing.crash import Completed, FailOver, History, Invoked, check
from pytest_exai_sessions.testing.workloads import mixed_workload, replica_workload

MANY = {"max_concurrent_sessions": 1000}
FAILOVERS = 10
SLOW_RUNS = 2  # under -m slow: that many runs of FAILOVERS each


def keep_going(seed: int, steps: int = 40) -> dict:
    return {"keep_going": True, "steps": steps, "seed": seed, "sessions": 12, "workers": 3}


@pytest.mark.asyncio
async def test_the_cluster_streams_synchronously_and_the_dsn_finds_the_primary(failover_harness):
    cluster = failover_harness.server
    assert isinstance(cluster, ReplicatedCluster)
    assert "target_session_attrs=read-write" in failover_harness.direct_dsn
    with psycopg.connect(failover_harness.direct_dsn) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert conn.execute("SELECT to_regclass('public.sessions')").fetchone() == ("sessions",)
    rows = cluster.primary.query("SELECT application_name, sync_state FROM pg_stat_replication")
    assert rows == [("node1", "sync")]


def failover_points(seed: int, count: int) -> list[int]:
    """``count`` points of a run, in acknowledged operations, at random distances of 5 to 30."""
    rng = random.Random(seed)
    points = [rng.randint(5, 30)]
    while len(points) < count:
        points.append(points[-1] + rng.randint(5, 30))
    return points


@pytest.mark.asyncio
async def test_synchronous_replication_loses_no_acknowledged_write_over_many_failovers(failover_harness):
    points = failover_points(28, FAILOVERS)
    report = await failover_harness.run_and_fail_over(
        mixed_workload, fail_over_after_acks=points, params=keep_going(28, steps=points[-1] // 3 + 20), **MANY
    )

    report.assert_ok()
    assert failover_harness.server.failovers == FAILOVERS
    assert report.kill_points == 1 and report.killed_at.count("acknowledged operations") == FAILOVERS
    assert report.acknowledged > points[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "synchronous",
    [
        pytest.param("FIRST 1", marks=pytest.mark.exai_failover(standbys=1, synchronous="FIRST 1")),
        pytest.param("ANY 1", marks=pytest.mark.exai_failover(standbys=2, synchronous="ANY 1")),
    ],
)
@pytest.mark.asyncio
async def test_many_more_failovers_lose_no_acknowledged_write(failover_harness, synchronous):
    for run in range(SLOW_RUNS):
        points = failover_points(run, FAILOVERS)
        report = await failover_harness.run_and_fail_over(
            mixed_workload,
            fail_over_after_acks=points,
            params={**keep_going(run, steps=points[-1] // 3 + 20), "sessions": 12 + run},
            **MANY,
        )
        report.assert_ok()
        failover_harness.rejoin()
    assert failover_harness.server.failovers == SLOW_RUNS * FAILOVERS


@pytest.mark.exai_failover(synchronous=False)
@pytest.mark.asyncio
async def test_asynchronous_replication_with_a_lagging_standby_loses_acknowledged_writes_and_says_so(failover_harness):
    with failover_harness.stall_replication():
        report = await failover_harness.run_and_fail_over(
            "crash_workloads:large_writes_through_errors", fail_over_after_acks=150, params={"steps": 200}
        )

    assert not report.ok
    lost = [v for v in report.violations if "acknowledged" in v.problem]
    assert lost, report.summary()
    with pytest.raises(AssertionError, match="violations of the acknowledged history"):
        report.assert_ok()
    print(report.summary(), len(lost), lost[0])


@pytest.mark.exai_failover(standbys=2, synchronous="ANY 1")
@pytest.mark.asyncio
async def test_any_one_of_two_synchronous_standbys_loses_no_acknowledged_write_over_many_failovers(failover_harness):
    cluster = failover_harness.server
    assert cluster.primary.query("SHOW synchronous_standby_names") == [('ANY 1 ("node1", "node2")',)]
    points = failover_points(2, FAILOVERS)
    report = await failover_harness.run_and_fail_over(
        mixed_workload, fail_over_after_acks=points, params=keep_going(2, steps=points[-1] // 3 + 20), **MANY
    )

    report.assert_ok()
    assert cluster.failovers == FAILOVERS
    # The last failover left one standby, re-pointed: the new primary waits for it alone.
    (standby,) = cluster.standbys
    assert cluster.primary.query("SHOW synchronous_standby_names") == [(f'ANY 1 ("{standby.name}")',)]


@pytest.mark.exai_failover(synchronous=True)
@pytest.mark.asyncio
async def test_a_commit_whose_wait_for_the_standby_is_cancelled_is_uncertain_and_a_failover_loses_it(
    failover_harness,
):
    manager = await failover_harness.new_manager()
    impatient = await failover_harness.new_manager(store_options={"timeout": 0.1})
    await manager.ensure("kept", data={"n": 0})
    primary = failover_harness.server.primary.dsn(failover_harness.database.name)
    with failover_harness.stall_replication():
        fill_the_standbys_socket(failover_harness)
        waiting = asyncio.ensure_future(manager.update("kept", data={"n": 1}))
        await wait_for_commits_waiting(failover_harness, 1)
        assert failover_harness.cancel_waiting_commits() == 1
        with pytest.raises(CommitUncertain, match="synchronous"):
            await waiting
        # Committed on the primary, which every reader there sees: success would have been a lie.
        with psycopg.connect(primary) as conn:
            assert conn.execute("SELECT session_data FROM sessions WHERE session_id = 'kept'").fetchone() == ({"n": 1},)
        assert (await manager.get("kept")).data == {"n": 1}  # a plain read is the primary's
        with pytest.raises(CommitUncertain):  # a confirmed one waits for the standby, which lags
            await impatient.get("kept", confirmed=True)
        with pytest.raises(CommitUncertain):  # so does ensure: it hands out only what survives
            await impatient.ensure("kept")
        failover_harness.fail_over()
    assert (await manager.get("kept")).data == {"n": 0}


@pytest.mark.exai_failover(synchronous=True)
@pytest.mark.asyncio
async def test_the_store_deadline_never_acknowledges_a_commit_the_standby_did_not_confirm(failover_harness):
    """The lost acknowledgement: stalled standbys, commits cancelled at the store's deadline, then a failover."""
    with failover_harness.stall_replication():
        fill_the_standbys_socket(failover_harness)
        report = await failover_harness.run_and_fail_over(
            mixed_workload,
            fail_over_after_secs=1.5,
            params=keep_going(7, steps=60),
            store_options={"timeout": 0.1},  # the answer deadline is twice that
            **MANY,
        )
    report.assert_ok()
    assert report.uncertain > 0, report.summary()


@pytest.mark.exai_failover(synchronous=True)
@pytest.mark.asyncio
async def test_a_rolling_failover_under_replica_traffic_loses_nothing_and_requests_come_back(failover_harness):
    # Requests of another database of the cluster: rows of the checked one no operation recorded are violations.
    with psycopg.connect(failover_harness.server.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE probe TEMPLATE "{failover_harness.database.name}"')
    probe = await SessionManager.open(failover_harness.server.dsn("probe"))
    await probe.ensure("probe")
    traffic = asyncio.ensure_future(
        failover_harness.run_replicas(
            replica_workload, replicas=2, kills=0, params={"steps": 150, "keep_going": True}, **MANY
        )
    )
    attempts = []
    for _ in range(2):
        await asyncio.sleep(0.3)
        failover_harness.fail_over()
        attempts.append(await attempts_until_acknowledged(probe))
        failover_harness.rejoin()
    report = await traffic
    report.assert_ok()
    assert attempts == [1, 1], "the first request after each failover is acknowledged"
    assert failover_harness.server.failovers == 2
    assert (await probe.get("probe")).request_count == 2
    await probe.aclose()


@pytest.mark.asyncio
async def test_a_call_made_while_there_is_no_primary_waits_for_the_new_one(failover_harness):
    manager = await failover_harness.new_manager()
    await manager.ensure("waiting")
    failover = FailOver(failover_harness.server, failover_harness.database)

    failover.inject()  # the primary dies: the pool's connections die while idle; no node takes writes now
    call = asyncio.ensure_future(manager.update_activity("waiting"))
    await asyncio.sleep(0.05)
    assert not call.done()  # it waits for a primary, within the pool's timeout
    await asyncio.to_thread(failover.recover)  # a standby promoted (and the run's pooler, if any, retargeted)

    assert (await call).request_count == 1


def fill_the_standbys_socket(harness):
    """More WAL than a stalled standby's socket holds: what is written next is a lag, not just a pause.

    The primary sends WAL on while the receiver is stopped, until the socket is full; a
    failover lets the standby read what is in it. Committed without waiting for the standby.
    """
    with psycopg.connect(harness.server.primary.dsn(harness.database.name), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = local")
        conn.execute("CREATE TABLE lag AS SELECT repeat(md5(i::text), 60) AS filler FROM generate_series(1, 3000) i")


async def attempts_until_acknowledged(manager, limit=5):
    for attempt in range(1, limit + 1):
        try:
            await manager.update_activity("probe")
        except PersistenceError:
            continue
        return attempt
    raise AssertionError(f"no request acknowledged in {limit} attempts after the failover")


async def wait_for_commits_waiting(harness, count, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
    while harness.server.primary.query(query)[0][0] < count:
        assert loop.time() < deadline, "no commit waits for the standby"
        await asyncio.sleep(0.01)


# The rule that sees a loss later writes covered up: versions never go back.


def one_writer_history(*operations):
    """(name, intent_at, ack_at, version) of one process on session "s"; the row holds the last one's state."""
    history = History()
    for sequence, (name, at, ack_at, version) in enumerate(operations, start=1):
        history.add(Invoked(0, sequence, "s", name, {}, None, at=at))
        history.add(Completed(0, sequence, "s", "ok", state("s", version=version), at=ack_at))
    return history


def test_a_write_acknowledged_at_an_older_version_than_an_earlier_one_is_a_loss():
    # The row ends at v3 either way: only the order of the acknowledgements tells them apart.
    lost = one_writer_history(("ensure", 0, 1, 1), ("update", 2, 3, 2), ("update", 4, 5, 3), ("update", 6, 7, 3))
    kept = one_writer_history(("ensure", 0, 1, 1), ("update", 2, 3, 2), ("update", 4, 5, 3))

    assert check(kept, {"s": row("s", version=3)}).ok
    [violation] = check(lost, {"s": row("s", version=3)}).violations
    assert violation.rule == "versions go forward"
    assert "acknowledged v3 after v3 was acknowledged" in violation.problem
    assert "acknowledged writes were lost" in violation.problem


def test_a_read_that_started_after_a_write_was_acknowledged_must_not_see_an_older_version():
    stale = one_writer_history(("ensure", 0, 1, 1), ("update", 2, 3, 2), ("get", 4, 5, 1))
    overlapping = one_writer_history(("ensure", 0, 1, 1), ("update", 2, 5, 2), ("get", 3, 4, 1))

    assert check(overlapping, {"s": row("s", version=2)}).ok  # the read began before the write was answered
    found = check(stale, {"s": row("s", version=2)}).violations
    [violation] = [v for v in found if v.rule == "versions go forward"]
    assert "acknowledged v1 after v2" in violation.problem


# As users run it: through the run's pooler, with the marker's options checked.


def test_through_a_transaction_pooler_the_failover_retargets_pgbouncer_and_loses_nothing(pytester, pgbouncer_binary):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import psycopg
        import pytest

        from pytest_exai_sessions.testing.workloads import mixed_workload

        @pytest.mark.asyncio
        async def test_fail_over_behind_the_pooler(failover_harness):
            pooler = failover_harness.pooler
            assert pooler is not None and pooler.mode == "transaction"
            old = failover_harness.server.primary
            assert pooler.server is old
            report = await failover_harness.run_and_fail_over(
                mixed_workload, fail_over_after_acks=20,
                params={"keep_going": True, "steps": 30, "seed": 3}, max_concurrent_sessions=1000,
            )
            report.assert_ok()
            assert pooler.server is failover_harness.server.primary is not old
            with psycopg.connect(failover_harness.dsn, autocommit=True) as conn:
                (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
                assert pid != conn.info.backend_pid  # still through PgBouncer
        """
    )
    result = pytester.runpytest("--exai-pooler=transaction", "-p", "no:randomly")
    result.assert_outcomes(passed=1)


def test_the_failover_marker_refuses_what_it_does_not_know(pytester):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.exai_failover(standbys=0)
        def test_none(failover_harness):
            pass

        @pytest.mark.exai_failover(synchronous="MOST 2")
        def test_bad_policy(failover_harness):
            pass

        @pytest.mark.exai_failover(replicas=2)
        def test_unknown(failover_harness):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*exai_failover(standbys=...) needs an int >= 1, got 0*",
            "*synchronous must be True, False, 'FIRST k' or 'ANY k' with k >= 1, not 'MOST 2'*",
            "*exai_failover takes only standbys= and synchronous=, got ()*replicas*",
        ]
    )


def test_a_cluster_that_cannot_start_fails_its_test_with_the_reason(pytester):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        def test_needs_standbys(failover_harness):
            pass
        """
    )
    # Streaming needs wal_level replica: the run's setting, put over the cluster's, stops its primary.
    result = pytester.runpytest("-p", "no:randomly", "--exai-pg-setting=wal_level=minimal")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the replicated cluster did not start: ServerStartError: *"])
