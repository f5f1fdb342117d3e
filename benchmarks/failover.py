"""Section 10 of run.py: how long a failover keeps a ``SessionManager`` from writing, and what replication costs.

The clusters are ``ReplicatedCluster``s of a primary and one standby (synchronous,
``FIRST 1``, or asynchronous), every node on tmpfs and started from one seed data
directory holding the unified schema's template and a clone of it (what
``testing/failover_clusters.py`` builds). The manager connects through the cluster's DSN,
which names both nodes with ``target_session_attrs=read-write``. Three measures:

- kill to the first write acknowledged through the store: a manager counts requests
  (``update_activity``) back to back; the primary is killed (``kill_primary()``) and the
  most advanced standby promoted (``promote()``), from a thread while the manager keeps
  writing on the event loop; the time runs from ``killed_at`` to the end of the first call
  begun after the kill (the server reaped) that the store acknowledges. Beside it, in another thread at the same time,
  ``first_write()``: a fresh connection through the same DSN committing until one is
  acknowledged. Then ``rejoin()`` makes the dead node a standby again for the next round;
- the same for a single server killed and restarted (``KillDatabase``), the manager writing;
- ``update_activity`` on the synchronous cluster, the asynchronous one, a single node with
  the cluster's settings and no standby, and the usual tmpfs server, in alternating blocks.

The manager stays on the event loop and the cluster's blocking calls (psycopg in
synchronous mode, signals, ``waitpid``) run in threads (``asyncio.to_thread``): the
application's side is then what it is in production, one event loop, and those calls
install no signal handler and touch no loop, so they are safe in a thread. A postmaster
started from a thread (``rejoin()``, ``recover()``) dies with that thread (the server's
children are started with PDEATHSIG): the loop's default executor keeps its threads until
``asyncio.run`` ends, after the servers are stopped.

Not part of the test suite: nothing here is asserted.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psycopg
from run import Figure, median_ratio, per_call_rates

from pytest_exai_sessions import SessionManager
from pytest_exai_sessions.errors import PersistenceError
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.replication import ClusterNode, ReplicatedCluster, base_backup_unsupported
from pytest_exai_sessions.testing.crash import KillDatabase
from pytest_exai_sessions.testing.databases import TestDatabases

WRITES_BEFORE_KILL_SECS = 0.3  # the manager writes this long before each kill
RETRY_PAUSE_SECS = 0.005  # after a failed call, as first_write() pauses between its attempts
ACK_TIMEOUT_SECS = 60.0  # no acknowledgement within this after the kill: the round fails
SESSIONS = 100
LATE_SECS = 0.5  # a store this much later than a fresh connection was held up by more than the outage
MODES = {"synchronous (FIRST 1)": True, "asynchronous": False}
SINGLE = "single server"


def make_node(name: str) -> ClusterNode:
    """A node on tmpfs with the cluster's settings, not started."""
    return ClusterNode(find_bindir(), name=name, os_user=server_os_user(None))


def seed_node() -> tuple[ClusterNode, str]:
    """A stopped node holding the template and one clone of it (the clone's name): every node starts from its copy."""
    node = make_node("seed").start()
    try:
        databases = TestDatabases(node)
        databases.create_template()
        dbname = databases.create_clone()
        databases.disconnect()
        node.kill(signal.SIGINT)  # a clean shutdown: the data directory is a consistent copy
    except BaseException:
        node.stop()
        raise
    return node, dbname


async def measure(tmpfs: TemporaryPostgres, *, rounds: int, blocks: int) -> list[Figure]:
    reason = base_backup_unsupported(find_bindir())
    if reason is not None:
        return [Figure(f"not measured: {reason}", 0, "runs")]
    tmpfs_databases = TestDatabases(tmpfs)
    tmpfs_databases.create_template()
    seed: ClusterNode | None = None
    clusters: dict[str, ReplicatedCluster] = {}
    single = make_node("single")
    managers: dict[str, SessionManager] = {}
    try:
        seed, dbname = seed_node()
        for mode, synchronous in MODES.items():
            clusters[mode] = ReplicatedCluster(make_node, standbys=1, synchronous=synchronous).start(seed.datadir)
        single.start(seed.datadir)
        dsns = {mode: cluster.dsn(dbname) for mode, cluster in clusters.items()}
        dsns[SINGLE] = single.dsn(dbname)
        dsns["tmpfs"] = tmpfs.dsn(tmpfs_databases.create_clone())
        try:
            for name, dsn in dsns.items():
                managers[name] = await open_manager(dsn)
            rates = await per_call_rates({name: counting(manager) for name, manager in managers.items()}, blocks, 200)
            outages: dict[str, list[Outage]] = {}
            for mode, cluster in clusters.items():
                outages[mode] = [await fail_over_writing(cluster, managers[mode]) for _ in range(rounds)]
            outages[SINGLE] = [await restart_writing(single, dsns[SINGLE], managers[SINGLE]) for _ in range(rounds)]
        finally:
            for manager in managers.values():
                await manager.aclose()
    finally:
        for cluster in clusters.values():
            cluster.stop()
        single.stop()
        if seed is not None:
            seed.stop()
        tmpfs_databases.drop_template()
    return [*outage_figures(outages, rounds), *cost_figures(rates)]


async def open_manager(dsn: str) -> SessionManager:
    manager = await SessionManager.open(dsn, max_concurrent_sessions=10_000, cleanup_interval_secs=0)
    for number in range(SESSIONS):
        await manager.ensure(f"m-{number}")
    return manager


def counting(manager: SessionManager) -> Callable[[int], Awaitable[None]]:
    async def update_activity(number: int) -> None:
        await manager.update_activity(f"m-{number % SESSIONS}", 5)

    return update_activity


# 1. and 2. From the kill to the first acknowledged write


@dataclass
class Call:
    started: float  # time.monotonic()
    ended: float
    error: str | None  # None: acknowledged; else the exception's class


@dataclass
class Writer:
    """A manager counting requests back to back, every call recorded, until ``stop`` is set."""

    manager: SessionManager
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                await self.manager.update_activity(f"m-{number % SESSIONS}", 5)
            except PersistenceError as error:  # CommitUncertain too: not an acknowledgement
                self.calls.append(Call(started, time.monotonic(), type(error).__name__))
                await asyncio.sleep(RETRY_PAUSE_SECS)
            else:
                self.calls.append(Call(started, time.monotonic(), None))
            number += 1

    def after(self, killed_at: float, dead_at: float) -> tuple[list[Call], Call | None]:
        """The calls that ended after the kill up to the first acknowledged one, and that one (None if none yet).

        Only a call begun once the kill had returned (``dead_at``: the server reaped) counts as
        acknowledged: one begun while the signal was on its way may have been answered by the
        dying server. Calls go back to back, so this delays the figure by a call at most.
        """
        before: list[Call] = []
        for call in self.calls:
            if call.ended <= killed_at:
                continue
            if call.error is None and call.started >= dead_at:
                return before, call
            before.append(call)
        return before, None


@dataclass
class Outage:
    store_ack: float  # seconds from the kill to the end of the first call the store acknowledged
    fresh_ack: float  # the same for a fresh connection's first commit
    back: float  # from the kill to promote() returned (a cluster) or accepting connections (a server)
    failures: list[str]  # the errors of the store's calls that failed in between
    first: Call  # the first call begun after the kill, its times from the kill
    rejoin: float = 0.0  # pg_rewind and streaming again (a cluster)


async def fail_over_writing(cluster: ReplicatedCluster, manager: SessionManager) -> Outage:
    """Kill the primary and promote the standby while ``manager`` writes; then rejoin the dead node."""

    def kill() -> float:
        cluster.kill_primary()
        return cluster.killed_at

    outage = await outage_while_writing(manager, kill, cluster.promote, cluster.first_write)
    outage.rejoin = await asyncio.to_thread(cluster.rejoin)
    return outage


async def restart_writing(server: ClusterNode, dsn: str, manager: SessionManager) -> Outage:
    """SIGKILL the server and start it again (``KillDatabase``) while ``manager`` writes."""
    fault = KillDatabase(server)
    killed_at = 0.0

    def kill() -> float:
        nonlocal killed_at
        killed_at = time.monotonic()
        fault.inject()
        return killed_at

    return await outage_while_writing(manager, kill, fault.recover, lambda: fresh_first_commit(dsn, killed_at))


async def outage_while_writing(
    manager: SessionManager, kill: Callable[[], float], bring_back: Callable[[], object], fresh: Callable[[], float]
) -> Outage:
    """``kill()`` (its time.monotonic()), then ``bring_back()`` and ``fresh()`` at once, ``manager`` writing throughout.

    All three in threads: the manager's calls go on on the event loop meanwhile.
    """
    writer = Writer(manager)
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.sleep(WRITES_BEFORE_KILL_SECS)
        killed_at = await asyncio.to_thread(kill)
        dead_at = time.monotonic()

        def back() -> float:
            bring_back()
            return time.monotonic() - killed_at

        back_after, fresh_ack = await asyncio.gather(asyncio.to_thread(back), asyncio.to_thread(fresh))
        between, acknowledged = await first_acknowledgement(writer, task, killed_at, dead_at)
    finally:
        writer.stop.set()
        await task
    first = next(call for call in writer.calls if call.started >= dead_at)
    return Outage(
        acknowledged.ended - killed_at,
        fresh_ack,
        back_after,
        [call.error for call in between if call.error is not None],
        Call(first.started - killed_at, first.ended - killed_at, first.error),
    )


async def first_acknowledgement(
    writer: Writer, task: asyncio.Task[None], killed_at: float, dead_at: float
) -> tuple[list[Call], Call]:
    while True:
        between, acknowledged = writer.after(killed_at, dead_at)
        if acknowledged is not None:
            return between, acknowledged
        if task.done():
            await task  # its error
            raise AssertionError("the writer stopped before an acknowledgement")
        if time.monotonic() - killed_at > ACK_TIMEOUT_SECS:
            raise AssertionError(
                f"no update_activity acknowledged {ACK_TIMEOUT_SECS:g}s after the kill: {between[-3:]}"
            )
        await asyncio.sleep(0.01)


def fresh_first_commit(dsn: str, since: float, timeout: float = 30.0) -> float:
    """What ``ReplicatedCluster.first_write`` does, for a single server: the seconds from ``since``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
                conn.execute("SELECT pg_catalog.txid_current()")
            return time.monotonic() - since
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_PAUSE_SECS)


def outage_figures(outages: dict[str, list[Outage]], rounds: int) -> list[Figure]:
    figures = []
    for name, runs in outages.items():
        cluster = name != SINGLE
        where = f"failover, {name} replication" if cluster else "single server, SIGKILL + restart (KillDatabase)"
        store = [run.store_ack for run in runs]
        fresh = [run.fresh_ack for run in runs]
        failed = [len(run.failures) for run in runs]
        late = [run for run in runs if run.store_ack - run.fresh_ack > LATE_SECS]
        kinds = sorted({kind for run in runs for kind in run.failures})
        kind_counts = ", ".join(f"{kind} {sum(run.failures.count(kind) for run in runs)}" for kind in kinds)
        figures += [
            Figure(
                f"{where}: kill to the first update_activity the store acknowledges, median of {rounds}",
                statistics.median(store) * 1000,
                "ms",
            ),
            Figure(f"{where}: the same, max", max(store) * 1000, "ms"),
            Figure(
                f"{where}: kill to a fresh connection's first commit "
                f"({'first_write()' if cluster else 'the same loop'}, polling meanwhile), median",
                statistics.median(fresh) * 1000,
                "ms",
            ),
            Figure(f"{where}: the same, max", max(fresh) * 1000, "ms"),
            Figure(f"{where}: store / fresh connection, median of per-round ratios", median_ratio(store, fresh), "x"),
            Figure(
                f"{where}: rounds whose store acknowledgement came over {LATE_SECS * 1000:g} ms after the fresh "
                "connection's",
                len(late),
                f"of {rounds} (store {', '.join(f'{run.store_ack * 1000:.0f}' for run in late) or '-'} ms; "
                f"of them {sum(1 for run in late if not run.failures)} with no failed call)",
            ),
            *prompt_figures(where, [run for run in runs if run not in late]),
            Figure(
                f"{where}: kill to {'promote() returned' if cluster else 'recover() returned (accepting connections)'}"
                ", median",
                statistics.median(run.back for run in runs) * 1000,
                "ms",
            ),
            Figure(
                f"{where}: update_activity calls that failed between the kill and the first acknowledgement, median",
                statistics.median(failed),
                f"calls (min {min(failed)}, max {max(failed)}; over all rounds: {kind_counts or 'none'})",
            ),
            Figure(
                f"{where}: the first call begun after the kill, from the kill to its return, median",
                statistics.median(run.first.ended for run in runs) * 1000,
                f"ms (max {max(run.first.ended for run in runs) * 1000:.3g} ms; acknowledged in "
                f"{sum(1 for run in runs if run.first.error is None)} of {rounds} rounds"
                + "".join(
                    f", {kind} in {sum(1 for run in runs if run.first.error == kind)}"
                    for kind in sorted({run.first.error for run in runs if run.first.error is not None})
                )
                + ")",
            ),
        ]
        if cluster:
            rejoin = [run.rejoin for run in runs]
            figures.append(
                Figure(f"{where}: rejoin() (pg_rewind, streaming again), median", statistics.median(rejoin), "s")
            )
    return figures


def prompt_figures(where: str, prompt: list[Outage]) -> list[Figure]:
    """The rounds whose store was not held up: how it compares with a fresh connection then."""
    if not prompt:
        return []
    store = [run.store_ack for run in prompt]
    return [
        Figure(
            f"{where}: in the other {len(prompt)} rounds, kill to the store's first acknowledgement, median",
            statistics.median(store) * 1000,
            "ms",
        ),
        Figure(
            f"{where}: in those rounds, store / fresh connection, median of per-round ratios",
            median_ratio(store, [run.fresh_ack for run in prompt]),
            "x",
        ),
    ]


# 3. What replication costs a call


def cost_figures(rates: dict[str, list[float]]) -> list[Figure]:
    labels = {
        **{mode: f"update_activity, cluster with {mode} replication, one standby" for mode in MODES},
        SINGLE: "update_activity, single node with the cluster's settings, no standby",
        "tmpfs": "update_activity, the usual tmpfs server (test settings: wal_level minimal)",
    }
    figures = [
        Figure(label, statistics.median(1000 / rate for rate in rates[name]), "ms") for name, label in labels.items()
    ]
    figures += [
        Figure(f"update_activity time, {mode} / single node", median_ratio(rates[SINGLE], rates[mode]), "x")
        for mode in MODES
    ]
    sync, asynchronous = MODES
    figures.append(
        Figure(
            "update_activity time, single node / the usual tmpfs server",
            median_ratio(rates["tmpfs"], rates[SINGLE]),
            "x",
        )
    )
    figures.append(
        Figure(
            f"update_activity time, {sync} / {asynchronous}",
            median_ratio(rates[asynchronous], rates[sync]),
            "x",
        )
    )
    return figures
