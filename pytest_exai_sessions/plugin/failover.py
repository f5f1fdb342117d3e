"""The failover fixtures: a crash harness on a primary with streaming standbys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from ..server import find_bindir, server_os_user
from ..server.pooler import PgBouncer, find_pgbouncer
from ..server.replication import ClusterNode, base_backup_unsupported, parse_policy
from ..testing.crash import CrashHarness
from ..testing.failover_clusters import FailoverClusters
from .config import ExaiConfig
from .harnesses import harness_on
from .servers import initdb_cache_of
from .templates import main_schema

FAILOVER_MARKER = "exai_failover"
_MARKER_DEFAULTS: dict[str, Any] = {"standbys": 1, "synchronous": True}


def marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``standbys`` and ``synchronous`` of this test's ``@pytest.mark.exai_failover(...)`` marks (closest wins)."""
    options = dict(_MARKER_DEFAULTS)
    for mark in reversed(list(request.node.iter_markers(FAILOVER_MARKER))):
        unknown = sorted(set(mark.kwargs) - set(_MARKER_DEFAULTS))
        if mark.args or unknown:
            pytest.fail(
                f"@pytest.mark.{FAILOVER_MARKER} takes only standbys= and synchronous=, got {mark.args!r} {unknown!r}",
                pytrace=False,
            )
        options.update(mark.kwargs)
    standbys = options["standbys"]
    if not isinstance(standbys, int) or isinstance(standbys, bool) or standbys < 1:
        pytest.fail(f"@pytest.mark.{FAILOVER_MARKER}(standbys=...) needs an int >= 1, got {standbys!r}", pytrace=False)
    try:
        parse_policy(options["synchronous"])
    except ValueError as error:
        pytest.fail(f"@pytest.mark.{FAILOVER_MARKER}: {error}", pytrace=False)
    return options


@pytest.fixture(scope="session")
def exai_failover_clusters(exai_config: ExaiConfig) -> Iterator[FailoverClusters]:
    """The run's replicated clusters: one per failover test, from a seed with the run's template."""
    if exai_config.dsn is not None:
        pytest.skip("failovers need the plugin's own servers, not --exai-dsn")
    bindir = find_bindir(exai_config.pg_bin)
    reason = base_backup_unsupported(bindir)
    if reason is not None:
        pytest.skip(f"no standbys here: {reason}")
    os_user = server_os_user(exai_config.pg_os_user)

    def make_node(name: str) -> ClusterNode:
        return ClusterNode(
            bindir,
            name=name,
            basedir=exai_config.pg_basedir,
            os_user=os_user,
            settings=exai_config.pg_settings,
            startup_timeout=exai_config.pg_startup_timeout,
            initdb_cache=initdb_cache_of(exai_config),
        )

    def make_pooler(primary: ClusterNode) -> PgBouncer:
        assert exai_config.pooler is not None
        return PgBouncer(
            primary, mode=exai_config.pooler, binary=find_pgbouncer(), os_user=os_user, basedir=exai_config.pg_basedir
        )

    clusters = FailoverClusters(
        make_node,
        main_schema(exai_config).resolve(exai_config.rootdir),
        clock_start=exai_config.clock,
        make_pooler=make_pooler if exai_config.pooler is not None else None,
    )
    try:
        yield clusters
    finally:
        clusters.close()


@pytest_asyncio.fixture
async def failover_harness(
    exai_failover_clusters: FailoverClusters, exai_config: ExaiConfig, request: pytest.FixtureRequest
) -> AsyncIterator[CrashHarness]:
    """A CrashHarness on a primary with streaming standbys: fail_over(), rejoin(), run_and_fail_over() and more.

    Its dsn names every node with target_session_attrs=read-write, as production's does (through
    the run's --exai-pooler, retargeted at each failover). @pytest.mark.exai_failover(standbys=1,
    synchronous=True) chooses the standbys and FIRST 1 / "ANY k" / False (asynchronous).
    stall_replication() stops the standbys' WAL receivers; cancel_waiting_commits() cancels commits
    waiting for a synchronous standby.
    """
    options = marker_options(request)
    async with harness_on(
        lambda: exai_failover_clusters.database(**options),
        exai_failover_clusters.release,
        clock_start=exai_config.clock,
        what="the replicated cluster",
    ) as harness:
        yield harness


def register_marker(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FAILOVER_MARKER}(standbys=1, synchronous=True): the failover_harness's cluster: how many streaming "
        "standbys, and synchronous replication (True: FIRST 1; 'FIRST k', 'ANY k'; False: asynchronous)",
    )
