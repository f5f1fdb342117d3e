"""Failover: a primary with streaming standbys, killed mid-workload; the store follows the new primary.

Synchronous replication keeps every acknowledged write through a failover; asynchronous
replication with a lagging standby loses some, and the ledger names them; a commit whose
wait for the standby was cancelled is never acknowledged.
"""

from __future__ import annotations

import random

import psycopg
import pytest

from pytest_exai_sessions.server.replication import ReplicatedCluster
from pytest_exai_sessions.testing.workloads import mixed_workload

MANY = {"max_concurrent_sessions": 1000}
FAILOVERS = 10


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


@pytest.mark.asyncio
async def test_synchronous_replication_loses_no_acknowledged_write_over_many_failovers(failover_harness):
    rng = random.Random(28)
    reports = []
    for round_ in range(FAILOVERS):
        report = await failover_harness.run_and_fail_over(
            mixed_workload, fail_over_after_acks=rng.randint(5, 60), params=keep_going(round_), **MANY
        )
        reports.append(report)
        report.assert_ok()
        failover_harness.rejoin()
    print([r.summary() for r in reports])
    assert failover_harness.server.failovers == FAILOVERS
