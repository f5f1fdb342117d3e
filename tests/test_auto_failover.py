"""A real failover manager: pg_auto_failover notices the dead primary and promotes the standby by itself.

The same ledger as the kit's own failovers: the workload runs through it in a child
process, on the formation's two-host DSN, and every acknowledged write must be on the node
pg_auto_failover chose. Slow (the formation takes seconds to build); skips without
``pg_autoctl`` (Debian: ``postgresql-15-auto-failover``).
"""

from __future__ import annotations

import pytest
from auto_failover import AutoFailover, Formation, pg_autoctl

from pytest_exai_sessions.plugin.templates import main_schema
from pytest_exai_sessions.server import ExternalPostgres, find_bindir, server_os_user
from pytest_exai_sessions.testing.crash import AfterAcknowledged, CrashHarness
from pytest_exai_sessions.testing.databases import TestDatabases
from pytest_exai_sessions.testing.db_clock import DbClock
from pytest_exai_sessions.testing.workloads import mixed_workload

pytestmark = pytest.mark.slow


@pytest.fixture
def formation(exai_config, basedir):
    if pg_autoctl() is None:
        pytest.skip("no pg_autoctl: apt-get install postgresql-15-auto-failover")
    formation = Formation(find_bindir(exai_config.pg_bin), basedir, server_os_user(exai_config.pg_os_user)).start()
    try:
        yield formation
    finally:
        formation.stop()


@pytest.mark.asyncio
async def test_pg_auto_failover_promotes_by_itself_and_no_acknowledged_write_is_lost(formation, exai_config):
    databases = TestDatabases(
        ExternalPostgres(formation.node_dsn("node1")),
        schema=main_schema(exai_config).resolve(exai_config.rootdir),
        clock_start=exai_config.clock,
    )
    databases.create_template()
    dbname = databases.create_clone()
    databases.disconnect()
    harness = CrashHarness(formation.dsn(dbname), clock=DbClock(formation.dsn(dbname), start=exai_config.clock))
    fault = AutoFailover(formation, dbname)

    try:
        report = await harness.run_through_fault(
            mixed_workload,
            at=AfterAcknowledged(40),
            fault=fault,
            what="node1, and pg_auto_failover failed over,",
            params={"keep_going": True, "steps": 200, "seed": 5, "error_pause": 0.05},
            max_concurrent_sessions=1000,
        )
    finally:
        await harness.aclose()

    report.assert_ok()
    assert fault.killed == "node1"
    assert formation.primary() == "node2"
    assert report.acknowledged > 40, report.summary()
