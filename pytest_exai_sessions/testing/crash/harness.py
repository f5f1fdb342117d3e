"""``CrashHarness``: the crash tools on one test database, built from a workload, a fault and the checker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, NoReturn, TypeVar

import psycopg

from ...clock import SYSTEM_CLOCK, Clock, ManualClock
from ...errors import ExaiSessionsError
from ...manager import SessionManager
from ...models import Session
from ...server.cluster import TemporaryPostgres
from ...server.connection import PostgresServer
from ...server.database import DatabaseDsn, DatabaseUnderTest, database_of
from ...server.pooler import PgBouncer
from ...server.power_loss import PowerLossPostgres
from ...server.replication import ReplicatedCluster
from ...store import SessionStore
from ..recovery import Snapshot, snapshot
from .checker import CrashReport, check
from .child import ChildSpec
from .driver import (
    InProcessWorkload,
    ReplicaPlan,
    WorkloadChild,
    run_group,
    run_in_process,
    run_one,
    run_replicas,
    run_through,
)
from .faults import (
    CutPower,
    EndBackends,
    FailOver,
    Fault,
    FaultAt,
    KillDatabase,
    KillPooler,
    KillProcess,
    PowerLossUnrecoverable,
    fault_at,
    fault_points,
)
from .history import History
from .importable import object_path, resolve

M = TypeVar("M", bound=SessionManager)


class DatabaseCrashUnsupported(ExaiSessionsError):
    """Only a server the plugin started can be killed and restarted."""


def _refuse(reason: str) -> NoReturn:
    raise DatabaseCrashUnsupported(reason)


class CrashHarness:
    """Builds managers on one database and crashes them; closes what it built on ``aclose()``.

    ``database``: as a database fixture hands it (``exai_dsn``, which knows its server, its
    pooler and its DSN past the pooler) or a ``DatabaseUnderTest``; or a plain DSN, with
    ``server`` to crash the database itself. ``unsupported`` is called with a reason when a
    crash is asked of a server it cannot restart or of a pooler it does not have (the
    pytest fixture passes ``pytest.skip``). ``clock``: the clock of the managers it builds
    unless their options name one (the fixtures pass the test's clock).
    """

    def __init__(
        self,
        database: str | DatabaseUnderTest,
        server: PostgresServer | None = None,
        *,
        unsupported: Callable[[str], NoReturn] = _refuse,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        known = database if isinstance(database, DatabaseUnderTest) else database_of(database)
        self.database = known
        # A DatabaseDsn when the database is known, so that what is handed on knows it too.
        self.dsn: str = DatabaseDsn(known) if known is not None else str(database)
        self.server = server if server is not None or known is None else known.server
        self.clock = clock
        self._unsupported = unsupported
        self._managers: list[SessionManager] = []

    @property
    def pooler(self) -> PgBouncer | None:
        """The pooler ``dsn`` goes through (None for a plain DSN: it is not known)."""
        return None if self.database is None else self.database.pooler

    @property
    def direct_dsn(self) -> str:
        """The database past any pooler, for what must not go through one (ending backends)."""
        return self.dsn if self.database is None else self.database.direct_dsn

    async def new_manager(self, manager_class: type[M] = SessionManager, **options: Any) -> M:  # type: ignore[assignment]
        """A started manager with a store of its own on this database (closed by ``aclose()``)."""
        options.setdefault("clock", self.clock)
        return self._keep(await manager_class.open(self.dsn, **options))

    # a manager in this process

    async def crash_and_restart(self, manager: M, **option_overrides: Any) -> M:
        """Kill ``manager`` without a flush or a graceful close; recover in a new one.

        The new manager has the crashed one's class and options, updated by
        ``option_overrides``, and a new store on the same database.
        """
        await self.abandon(manager)
        options = {**manager.options, **option_overrides}
        if not isinstance(manager.store, SessionStore):
            # Nothing was persisted, so nothing can come back: that is the point to show.
            return self._keep(await type(manager)(None, **options).start())
        restarted = await type(manager).open(
            manager.store.conninfo, store_options=manager.store.pool_options, **options
        )
        return self._keep(restarted)

    async def abandon(self, manager: SessionManager) -> None:
        """Drop the manager's connections from the server side, as the death of its process would."""
        if isinstance(manager.store, SessionStore):
            fault = EndBackends(
                self.direct_dsn,
                manager.store.application_name,
                busy_only=self.pooler is not None and self.pooler.mode == "transaction",
            )
            await asyncio.to_thread(fault.inject)
        await manager.abandon()

    # workloads

    async def run_and_abandon(
        self,
        workload: Any,
        *,
        kill_after_acks: int | None = None,
        kill_after_secs: float | None = None,
        kill_at: str | None = None,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """As ``run_and_kill``, but in this process: at the point the workload is cancelled and its manager abandoned.

        The manager is a new one of ``manager_class`` with ``options``; abandoning it ends
        its connections on the server, as ``crash_and_restart`` does. Quicker than a child
        process (nothing to start), but weaker: cancelled code still runs its ``finally``
        blocks, which a killed process never does. ``workload`` may be any async callable.
        """
        at = fault_at(after_acks=kill_after_acks, after_secs=kill_after_secs, at=kill_at)
        initial = await self._rows()
        manager = await self.new_manager(resolve(manager_class), **options)
        history = History()
        running = InProcessWorkload(resolve(workload), manager, params or {}, self.dsn)
        try:
            await run_in_process(running, history, at=at, timeout=timeout)
        finally:
            await self.abandon(manager)
        return await self._check(history, initial, manager_class, options)

    async def run_and_kill(
        self,
        workload: Any,
        *,
        kill_after_acks: int | None = None,
        kill_after_secs: float | None = None,
        kill_at: str | None = None,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """Run ``workload`` in a child process, SIGKILL it at the chosen point, check the history.

        ``workload`` is an importable ``async def workload(ctx: WorkloadContext)`` (or its
        ``"module:function"`` name). Kill after that many acknowledged operations (the store
        answered ``ok`` or ``fail``), after that many seconds, or when it reaches
        ``await ctx.fault_point(kill_at)``. The child's manager gets ``options``; the
        recovered state is read in this process and checked against every operation the
        child recorded before it died.
        """
        at = fault_at(after_acks=kill_after_acks, after_secs=kill_after_secs, at=kill_at)
        return await self.run_with_fault(
            workload, at=at, params=params, manager_class=manager_class, timeout=timeout, **options
        )

    async def run_with_fault(
        self,
        workload: Any,
        *,
        at: FaultAt,
        fault: Fault | None = None,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """Run ``workload`` in a child process; at ``at`` it dies, and ``fault`` (if any) strikes and recovers.

        ``at`` is an ``AfterAcknowledged``, ``AfterSeconds`` or ``AtFaultPoint``; ``fault``
        one of ``faults.py`` (``KillDatabase``, ``KillPooler``, ...): the workload's process is
        killed first, so that nothing it does after the fault goes unrecorded. The rows
        stored before the run are the state the history starts from.
        """
        spec = self._spec(workload, manager_class, options, params or {})
        initial = await self._rows()
        history = History()

        def fire(child: WorkloadChild) -> None:
            KillProcess(child.process).inject()
            if fault is not None:
                fault.inject()
                fault.recover()

        await run_one(spec, history, at=at, fire=fire, timeout=timeout)
        return await self._check(history, initial, manager_class, options)

    async def run_replicas(
        self,
        workload: Any,
        *,
        replicas: int = 3,
        kills: int = 3,
        replace_killed: bool = True,
        seed: int = 0,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """Run ``replicas`` children of ``workload`` at once on this database, SIGKILL ``kills`` of them.

        Each kill hits a replica after a random (seeded) number of its acknowledged
        operations, between 1 and the workload's ``steps`` param (default 40), while the
        others go on; ``replace_killed`` starts a new replica with a new number in its place.
        One replica is never killed, and every replica not killed runs its workload to the
        end. Then the merged history of all of them is checked against every stored row.

        ``workload`` is importable, as for ``run_and_kill``; ``ctx.replica`` is each child's
        number and ``ctx.params`` carries ``params`` plus ``seed`` and ``replica_numbers`` (how
        many numbers the run hands out). The children's managers get ``options``.
        """
        plan = ReplicaPlan.draw(
            replicas=replicas,
            kills=kills,
            replace_killed=replace_killed,
            seed=seed,
            steps=int((params or {}).get("steps", 40)),
        )
        child_params = {**(params or {}), "seed": seed, "replica_numbers": plan.replica_numbers}
        spec = self._spec(workload, manager_class, options, child_params)
        initial = await self._rows()
        history = History(many_writers=True)
        await run_replicas(spec, history, plan, fire=lambda child: KillProcess(child.process).inject(), timeout=timeout)
        return await self._check(history, initial, manager_class, options)

    def _spec(self, workload: Any, manager_class: Any, options: dict[str, Any], params: dict[str, Any]) -> ChildSpec:
        # The test clock's instant as it stands now: moving it later does not reach the child.
        clock = self.clock.value.isoformat() if isinstance(self.clock, ManualClock) and self.clock.value else None
        return ChildSpec(
            dsn=self.dsn,
            workload=object_path(workload),
            manager_class=object_path(manager_class),
            options=options,
            clock=clock,
            params=params,
            record_fd=-1,
        )

    async def _rows(self) -> dict[str, Session]:
        """Every stored session, live or not, by id."""
        async with await SessionStore.open(self.dsn) as store:
            return {session.session_id: session async for session in store.iter_all()}

    async def _check(
        self, history: History, initial: dict[str, Session], manager_class: Any, options: dict[str, Any]
    ) -> CrashReport:
        """Recover in a new manager of the workload's class, and check every stored row against the history."""
        recovered = await self.new_manager(resolve(manager_class), **options)
        rows = {session.session_id: session async for session in recovered.store.iter_all()}
        return check(history, rows, initial=initial)

    # the database

    def _database_fault(self, mode: Literal["kill", "immediate"]) -> KillDatabase:
        if not isinstance(self.server, TemporaryPostgres):
            what = "an external server (--exai-dsn)" if self.server is not None else "no known server"
            self._unsupported(f"database crash helpers need the plugin's temporary server, not {what}")
        return KillDatabase(self.server, mode, self.database)

    def kill_database(self, mode: Literal["kill", "immediate"] = "kill") -> None:
        """Stop the postmaster abruptly and leave it down: SIGKILL, or an immediate shutdown.

        Until ``restart_database()`` every database call of a manager raises PersistenceError.
        """
        self._database_fault(mode).inject()

    def restart_database(self) -> float:
        """Start the postmaster again on the same data directory and port; return the seconds it took.

        Blocks the event loop for that time on purpose: the postmaster must be started from
        the main thread, since it is set to die with the thread that started it. A pooler
        stays up and connects to the server again; this returns once a query on the
        harness's database goes through it.
        """
        return self._database_fault("kill").recover()

    def crash_database(self, mode: Literal["kill", "immediate"] = "kill") -> float:
        """Kill the database and start it again at once; return the seconds until it accepts connections."""
        fault = self._database_fault(mode)
        fault.inject()
        return fault.recover()

    # the power

    def _power_fault(self) -> CutPower:
        if not isinstance(self.server, PowerLossPostgres):
            self._unsupported("power cuts need a server whose disk can lose power: use the power_loss_harness fixture")
        return CutPower(self.server, self.database)

    def cut_power(self) -> float:
        """Cut the database server's power, and boot it; return the seconds from the cut to accepting connections.

        At the cut, whatever was not made durable (fsync) is gone, and every process of the
        server dies at once. The disk is mounted again as after a reboot, and PostgreSQL runs
        crash recovery on what is left. Managers built before reconnect, as after
        ``crash_database()``. Blocks the event loop, as ``crash_database`` does. Raises
        ``PowerLossUnrecoverable``, with the tail of the server's log, when the server does not
        start or the database is gone.
        """
        fault = self._power_fault()
        fault.inject()
        return fault.recover()

    async def run_and_cut_power(
        self,
        workload: Any,
        *,
        cut_after_acks: int | None = None,
        cut_after_secs: float | None = None,
        cut_at: str | None = None,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """As ``run_and_kill``, but the power goes at the chosen point, and the workload's process dies with it.

        Checked as ``run_and_kill`` is: every acknowledged write is present as it was
        acknowledged, an operation in flight wholly present or wholly absent. A database that
        does not come back raises ``PowerLossUnrecoverable``, with the server's log.
        """
        at = fault_at(after_acks=cut_after_acks, after_secs=cut_after_secs, at=cut_at, verb="cut")
        fault = self._power_fault()
        run = self.run_with_fault(
            workload, at=at, fault=fault, params=params, manager_class=manager_class, timeout=timeout, **options
        )
        return await self._unreadable_as_lost(fault, run)

    async def run_replicas_and_cut_power(
        self,
        workload: Any,
        *,
        replicas: int = 3,
        cut_after_acks: int | None = None,
        cut_after_secs: float | None = None,
        cut_at: str | None = None,
        seed: int = 0,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """Run ``replicas`` children of ``workload`` at once; the power goes at the point, counted over all of them.

        Every replica dies with the power; the merged history is checked as ``run_replicas``
        checks it. ``ctx.params`` carries ``params`` plus ``seed`` and ``replica_numbers``.
        """
        at = fault_at(after_acks=cut_after_acks, after_secs=cut_after_secs, at=cut_at, verb="cut")
        fault = self._power_fault()
        child_params = {**(params or {}), "seed": seed, "replica_numbers": replicas}
        spec = self._spec(workload, manager_class, options, child_params)

        async def run() -> CrashReport:
            initial = await self._rows()
            history = History(many_writers=True)

            def fire(children: list[WorkloadChild]) -> None:
                for child in children:
                    KillProcess(child.process).inject()
                fault.inject()
                fault.recover()

            await run_group(spec, history, replicas=replicas, at=at, fire=fire, timeout=timeout)
            return await self._check(history, initial, manager_class, options)

        return await self._unreadable_as_lost(fault, run())

    async def _unreadable_as_lost(self, fault: CutPower, run: Awaitable[CrashReport]) -> CrashReport:
        """``run``; a database that came back but cannot be read after its cut (a table gone) is said as such."""
        cut_before = fault.server.cut_at
        try:
            return await run
        except (ExaiSessionsError, psycopg.Error) as error:
            if fault.server.cut_at == cut_before or isinstance(error, PowerLossUnrecoverable):
                raise  # not after this run's cut, or said already
            raise PowerLossUnrecoverable(
                fault.lost(f"the database cannot be read: {type(error).__name__}: {error}")
            ) from None

    # a failover

    def _cluster(self) -> ReplicatedCluster:
        if not isinstance(self.server, ReplicatedCluster):
            self._unsupported("failovers need a primary with standbys: use the failover_harness fixture")
        return self.server

    def fail_over(self) -> float:
        """SIGKILL the primary, promote the most advanced standby, re-point the others; the seconds to the first write.

        The seconds run from the kill to the first commit the new primary acknowledges through
        this harness's DSN (its pooler, retargeted, when there is one). Managers built before
        follow the new primary through the multi-host DSN without a restart. Blocks the event
        loop, as ``crash_database`` does.
        """
        fault = FailOver(self._cluster(), self.database)
        fault.inject()
        return fault.recover()

    def rejoin(self) -> float:
        """Bring the dead former primary back as a standby of the new one (pg_rewind); the seconds until it streams.

        With synchronous replication it is named a synchronous standby again.
        """
        return self._cluster().rejoin()

    @contextlib.contextmanager
    def stall_replication(self) -> Iterator[None]:
        """Stop the standbys from receiving WAL until the block ends (their WAL receivers are SIGSTOPped).

        Under synchronous replication commits then wait; under asynchronous replication the
        standbys fall behind. ``fail_over()`` inside kills the primary first, then lets the
        standbys receive what had reached them, then promotes: a crash during a lag.
        """
        with self._cluster().stall_replication():
            yield

    def cancel_waiting_commits(self) -> int:
        """Cancel every commit waiting for a synchronous standby, as an impatient client would; how many there were.

        Each was committed on the primary already: its client gets success with a warning
        (which the store turns into ``CommitUncertain``), and a failover may lose it.
        """
        return self._cluster().cancel_waiting_commits()

    async def run_and_fail_over(
        self,
        workload: Any,
        *,
        fail_over_after_acks: int | Sequence[int] | None = None,
        fail_over_after_secs: float | Sequence[float] | None = None,
        fail_over_at: str | Sequence[str] | None = None,
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """Run ``workload`` in a child process; at the chosen point fail over, and let it run on to its end.

        The application outlives a database failover: its manager follows the new primary.
        Several points (``fail_over_after_acks=[10, 45, 80]``, each counted from the start)
        fail over at each, the dead primary rejoining as a standby in between. Checked against
        the last primary: every acknowledged write present as acknowledged, and no later one
        went on from an older row; every write the store refused (a ``PersistenceError`` that
        is not ``CommitUncertain``) absent; every uncertain one (a lost connection, a commit
        whose wait for the standby ended unconfirmed) wholly present or wholly absent.
        """
        points = fault_points(
            after_acks=fail_over_after_acks, after_secs=fail_over_after_secs, at=fail_over_at, verb="fail_over"
        )
        cluster = self._cluster()
        return await self.run_through_fault(
            workload,
            at=points,
            fault=FailOver(cluster, self.database),
            between=cluster.rejoin,  # a standby again, for the next failover
            what="the primary, and failed over,",
            params=params,
            manager_class=manager_class,
            timeout=timeout,
            **options,
        )

    async def run_through_fault(
        self,
        workload: Any,
        *,
        at: FaultAt | Sequence[FaultAt],
        fault: Fault,
        between: Callable[[], object] | None = None,
        what: str = "the database, and it came back,",
        params: dict[str, Any] | None = None,
        manager_class: Any = SessionManager,
        timeout: float = 120.0,
        **options: Any,
    ) -> CrashReport:
        """Run ``workload`` in a child process that lives through ``fault``: injected and recovered at each point.

        For a fault of the database the application outlives (a failover, yours or a failover
        manager's): the workload goes on to its end, and all it did is checked. ``between``
        runs after each fault but the last (to make the next one possible); ``what`` the fault
        did, for the report ("killed <what> after 12 acknowledged operations").
        """
        points = list(at) if isinstance(at, Sequence) else [at]
        spec = self._spec(workload, manager_class, options, params or {})
        initial = await self._rows()
        history = History()
        done = itertools.count(1)

        def fire() -> None:
            fault.inject()
            fault.recover()
            if between is not None and next(done) < len(points):
                between()

        await run_through(spec, history, at=points, fire=fire, timeout=timeout, what=what)
        return await self._check(history, initial, manager_class, options)

    # the pooler

    def _pooler_fault(self) -> KillPooler:
        if self.pooler is None:
            self._unsupported(
                "pooler crash helpers need a pooler in the run: --exai-pooler=transaction or session "
                "(ini exai_pooler, env EXAI_SESSIONS_POOLER)"
            )
        return KillPooler(self.pooler)

    def kill_pooler(self) -> None:
        """SIGKILL PgBouncer and leave it down: every client connection through it drops at once.

        The server keeps running; its backends of the pooler end as they see it gone. Until
        ``restart_pooler()`` every database call of a manager raises PersistenceError.
        """
        self._pooler_fault().inject()

    def restart_pooler(self) -> float:
        """SIGKILL PgBouncer (if it runs) and start it again on the same socket or port; return the seconds it took.

        Clients lose their connections, as when production's pooler restarts; a manager's
        next call connects again. Blocks the event loop, as ``restart_database`` does and
        for the same reason.
        """
        return self._pooler_fault().recover()

    # comparing

    def snapshot(self, manager: SessionManager) -> Snapshot:
        """The manager's sessions by id, to compare with ``assert_full_recovery`` after a crash."""
        return snapshot(manager)

    def _keep(self, manager: M) -> M:
        self._managers.append(manager)
        return manager

    async def aclose(self) -> None:
        managers, self._managers = self._managers, []
        for manager in managers:
            await manager.aclose()
