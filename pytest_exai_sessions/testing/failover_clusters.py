"""The run's replicated clusters: a new primary and standbys for each test, all from one seed with the run's template.

The seed is built once: a stopped data directory holding the run's template (the same
``TemplateSchema`` as every other server of the run) and one database cloned from it. Each
test's primary starts from a copy of it, and its standbys are base backups of that primary,
so the test database is on every node from the start. A failover leaves nothing to reuse:
the cluster goes with the test.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import datetime

from ..server.database import DatabaseUnderTest
from ..server.pooler import PgBouncer
from ..server.replication import ClusterNode, ReplicatedCluster
from .databases import TestDatabases
from .template_schema import ResolvedSchema

MakeNode = Callable[[str], ClusterNode]
MakePooler = Callable[[ClusterNode], PgBouncer]


class FailoverClusters:
    """Builds a ``ReplicatedCluster`` per test on a database cloned from the run's template; ``close()`` ends them."""

    def __init__(
        self,
        make_node: MakeNode,
        schema: ResolvedSchema,
        *,
        clock_start: datetime | None = None,
        make_pooler: MakePooler | None = None,
    ) -> None:
        """``make_node(name)``: a node, not started; ``make_pooler(primary)``: a pooler in front of it, not started."""
        self._make_node = make_node
        self._make_pooler = make_pooler
        self._schema = schema
        self._clock_start = clock_start
        self._seed: ClusterNode | None = None
        self._seed_database = ""
        self._running: list[tuple[ReplicatedCluster, PgBouncer | None]] = []

    def database(self, *, standbys: int = 1, synchronous: bool | str = True) -> DatabaseUnderTest:
        """A new cluster with the test database on every node; through the run's pooler, if it has one."""
        seed = self._seed_node()
        cluster = ReplicatedCluster(self._make_node, standbys=standbys, synchronous=synchronous).start(seed.datadir)
        pooler: PgBouncer | None = None
        try:
            if self._make_pooler is not None:
                pooler = self._make_pooler(cluster.primary).start()
        except BaseException:
            cluster.stop()
            raise
        database = DatabaseUnderTest(self._seed_database, cluster, pooler)
        self._running.append((cluster, pooler))
        return database

    def release(self, database: DatabaseUnderTest) -> None:
        """Stop the test's cluster, and its pooler."""
        for cluster, pooler in [pair for pair in self._running if pair[0] is database.server]:
            self._running.remove((cluster, pooler))
            _stop(cluster, pooler)

    def _seed_node(self) -> ClusterNode:
        if self._seed is None:
            node = self._make_node("seed").start()
            try:
                databases = TestDatabases(node, schema=self._schema, clock_start=self._clock_start)
                databases.create_template()
                self._seed_database = databases.create_clone()
                databases.disconnect()
                node.kill(signal.SIGINT)  # a clean shutdown: the data directory is a consistent copy
            except BaseException:
                node.stop()
                raise
            self._seed = node
        return self._seed

    def close(self) -> None:
        running, self._running = self._running, []
        for cluster, pooler in running:
            _stop(cluster, pooler)
        if self._seed is not None:
            self._seed.stop()
            self._seed = None


def _stop(cluster: ReplicatedCluster, pooler: PgBouncer | None) -> None:
    try:
        if pooler is not None:
            pooler.stop()
    finally:
        cluster.stop()
