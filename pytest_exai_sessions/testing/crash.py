"""Crash helpers: abandon a manager as a killed process would, then recover in a new one."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, Literal, NoReturn, TypeVar

import psycopg

from ..clock import SYSTEM_CLOCK, Clock, ManualClock
from ..errors import ExaiSessionsError
from ..manager import SessionManager
from ..server.cluster import TemporaryPostgres
from ..server.connection import PostgresServer
from ..server.pooler import PgBouncer, pooler_at
from ..store import SessionStore
from .backends import terminate_backends
from .history import HistoryBook, HistoryReport
from .ledger import CrashReport, LedgerBook
from .recovery import Snapshot, snapshot
from .workload import import_object, object_path

M = TypeVar("M", bound=SessionManager)

# SIGKILL: the server dies mid-write, as in a power cut of the database host (the OS page
# cache survives here, which is what synchronous_commit relies on). SIGQUIT: PostgreSQL's
# immediate shutdown, no checkpoint, crash recovery at the next start.
DATABASE_CRASH_SIGNALS = {"kill": signal.SIGKILL, "immediate": signal.SIGQUIT}


class DatabaseCrashUnsupported(ExaiSessionsError):
    """Only a server the plugin started can be killed and restarted."""


def _refuse(reason: str) -> NoReturn:
    raise DatabaseCrashUnsupported(reason)


class CrashHarness:
    """Builds managers on one database and crashes them; closes what it built on ``aclose()``.

    With ``server`` (a TemporaryPostgres) it can also crash the database itself, and with
    ``pooler`` (the PgBouncer that ``dsn`` goes through) the pooler. ``unsupported`` is called
    with a reason when a crash is asked of a server it cannot restart or of a pooler it does
    not have (the pytest fixture passes ``pytest.skip``). ``clock``: the clock of the
    managers it builds unless their options name one (the fixtures pass the test's clock).
    ``direct_dsn``: the same database past the pooler, for what must not go through it
    (ending backends). Without them, a PgBouncer of this process that ``dsn`` connects to
    (``--exai-pooler``'s, found by its socket or port) is taken, with its server's DSN of
    the database as the direct one; so a harness built from just a DSN, as the stateful
    machine builds its own, knows the pooler too.
    """

    def __init__(
        self,
        dsn: str,
        server: PostgresServer | None = None,
        *,
        unsupported: Callable[[str], NoReturn] = _refuse,
        clock: Clock = SYSTEM_CLOCK,
        pooler: PgBouncer | None = None,
        direct_dsn: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.pooler = pooler if pooler is not None else pooler_at(dsn)
        if direct_dsn is None and self.pooler is not None:
            direct_dsn = self.pooler.server.dsn(_dbname(dsn))
        self.direct_dsn = direct_dsn or dsn
        self.server = server
        self.clock = clock
        self._unsupported = unsupported
        self._managers: list[SessionManager] = []

    async def new_manager(self, manager_class: type[M] = SessionManager, **options: Any) -> M:  # type: ignore[assignment]
        """A started manager with a store of its own on this database (closed by ``aclose()``)."""
        options.setdefault("clock", self.clock)
        return self._keep(await manager_class.open(self.dsn, **options))

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
        """Drop the manager's connections from the server side, as the death of its process would.

        Behind a transaction pooler only the backends working for it at this moment (in a
        statement or a transaction) are its own: an idle server connection there belongs to
        the pool, and still bears the name of the last client it served, maybe this one.
        Those are left alone, or another replica would lose the connection it is handed next.
        """
        if isinstance(manager.store, SessionStore):
            await asyncio.to_thread(self._terminate_backends, manager.store.application_name)
        await manager.abandon()

    def _terminate_backends(self, application_name: str) -> None:
        with psycopg.connect(self.direct_dsn, autocommit=True) as admin:
            if self.pooler is not None and self.pooler.mode == "transaction":
                _terminate_busy_backends(admin, application_name)
            else:
                terminate_backends(admin, application_name=application_name)

    # a child process

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
        """Run ``workload`` in a child process, SIGKILL it at the chosen point, check the ledger.

        ``workload`` is an importable ``async def workload(ctx: WorkloadContext)`` (or its
        ``"module:function"`` name). Kill after that many acknowledged writes, after that many
        seconds, or when it reaches ``await ctx.fault_point(kill_at)``. The child's manager
        gets ``options``; the recovered state is read in this process and compared with
        every acknowledgement the child made before it died.
        """
        if [kill_after_acks, kill_after_secs, kill_at].count(None) != 2:
            raise ValueError("choose exactly one of kill_after_acks, kill_after_secs and kill_at")
        read_end, write_end = os.pipe()
        spec = {
            "dsn": self.dsn,
            "workload": object_path(workload),
            "manager_class": object_path(manager_class),
            "options": options,
            "clock": self._child_clock(),
            "params": params or {},
            "ledger_fd": write_end,
        }
        with tempfile.TemporaryFile() as child_output:
            child = await _start_workload_child(spec, child_output, stdin=asyncio.subprocess.PIPE)
            os.close(write_end)
            book = LedgerBook()
            try:
                killed_at = await _drive(
                    child,
                    read_end,
                    book,
                    kill_after_acks=kill_after_acks,
                    kill_after_secs=kill_after_secs,
                    kill_at=kill_at,
                    timeout=timeout,
                )
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            if killed_at is None:
                child_output.seek(0)
                tail = child_output.read().decode(errors="replace")[-3000:]
                raise RuntimeError(
                    f"the workload ended (exit {child.returncode}) before the kill point "
                    f"({book.acknowledged} acknowledged writes); output:\n{tail}"
                )
        return await self.check_ledger(book, killed_at, manager_class=manager_class, **options)

    async def check_ledger(
        self, book: LedgerBook, killed_at: str, *, manager_class: Any = SessionManager, **options: Any
    ) -> CrashReport:
        """Recover in a new manager and compare every row with what the ledger allows."""
        cls = import_object(manager_class) if isinstance(manager_class, str) else manager_class
        recovered_manager = await self.new_manager(cls, **options)
        rows = {session.session_id: session async for session in recovered_manager.store.iter_all()}
        report = book.check(rows, killed_at)
        report.recovered = len(recovered_manager.live_sessions())
        return report

    # several child processes at once

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
    ) -> HistoryReport:
        """Run ``replicas`` children of ``workload`` at once on this database, SIGKILL ``kills`` of them.

        Each kill hits a replica after a random (seeded) number of its acknowledgements,
        between 1 and the workload's ``steps`` param (default 40), while the others go on;
        ``replace_killed`` starts a new replica with a new number in its place. One replica is
        never killed, and every replica not killed runs its workload to the end. Then the
        merged history of all of them is checked against every stored row (``HistoryBook``).

        ``workload`` is importable, as for ``run_and_kill``; ``ctx.replica`` is each child's
        number and ``ctx.params`` carries ``params`` plus ``seed`` and ``replica_numbers`` (how
        many numbers the run hands out). The children's managers get ``options``. The sessions
        the workload writes must not exist before the run: the history starts from nothing.
        """
        if replicas < 1 or kills < 0:
            raise ValueError(f"need replicas >= 1 and kills >= 0, got replicas={replicas}, kills={kills}")
        if kills and replicas < 2:
            raise ValueError("killing needs replicas >= 2: one replica is never killed")
        if not replace_killed and kills > replicas - 1:
            raise ValueError(f"without replace_killed at most replicas - 1 = {replicas - 1} can be killed, not {kills}")
        rng = random.Random(seed)
        steps = int((params or {}).get("steps", 40))
        # Slot 0 is never killed: some replica always goes on to the end.
        plans: list[list[int]] = [[] for _ in range(replicas)]
        victims = (
            [rng.randrange(1, replicas) for _ in range(kills)]
            if replace_killed
            else rng.sample(range(1, replicas), kills)
        )
        for slot in victims:
            plans[slot].append(rng.randint(1, steps))
        replica_numbers = replicas + (kills if replace_killed else 0)
        child_params = {**(params or {}), "seed": seed, "replica_numbers": replica_numbers}
        book = HistoryBook()
        numbers = iter(range(replica_numbers))

        def run_one(kill_after_acks: int | None) -> Any:
            return self._run_replica(
                next(numbers),
                workload=workload,
                book=book,
                kill_after_acks=kill_after_acks,
                params=child_params,
                manager_class=manager_class,
                options=options,
            )

        async def run_slot(plan: list[int]) -> None:
            for kill_after in plan:
                await run_one(kill_after)
            if replace_killed or not plan:
                await run_one(None)

        try:
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
                for plan in plans:
                    group.create_task(run_slot(plan))
        except TimeoutError:
            raise TimeoutError(f"the replicas did not finish within {timeout}s") from None
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from failures
        return await self.check_history(book, manager_class=manager_class, **options)

    async def check_history(
        self, book: HistoryBook, *, manager_class: Any = SessionManager, **options: Any
    ) -> HistoryReport:
        """Read every stored row in a new manager and check the merged history against it."""
        cls = import_object(manager_class) if isinstance(manager_class, str) else manager_class
        recovered_manager = await self.new_manager(cls, **options)
        rows = {session.session_id: session async for session in recovered_manager.store.iter_all()}
        return book.check(rows)

    async def _run_replica(
        self,
        replica: int,
        *,
        workload: Any,
        book: HistoryBook,
        kill_after_acks: int | None,
        params: dict[str, Any],
        manager_class: Any,
        options: dict[str, Any],
    ) -> None:
        """One child: read its ledger into ``book``; kill it after that many acks, or let it finish."""
        read_end, write_end = os.pipe()
        spec = {
            "dsn": self.dsn,
            "workload": object_path(workload),
            "manager_class": object_path(manager_class),
            "options": options,
            "clock": self._child_clock(),
            "params": params,
            "ledger_fd": write_end,
            "replica": replica,
        }
        with tempfile.TemporaryFile() as child_output:
            try:
                child = await _start_workload_child(spec, child_output, stdin=asyncio.subprocess.DEVNULL)
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
            )
            acknowledged = 0
            killed = False
            try:
                while line := await reader.readline():
                    record = json.loads(line)
                    book.add(record)
                    if record["t"] in ("ack", "refused"):
                        acknowledged += 1
                        if kill_after_acks is not None and acknowledged >= kill_after_acks and not killed:
                            child.kill()
                            killed = True
                            book.mark_killed(replica, f"after {acknowledged} acknowledgements")
                            # Go on reading: what it wrote before it died is still in the pipe.
                await child.wait()
            finally:
                transport.close()
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            if not killed and child.returncode != 0:
                child_output.seek(0)
                tail = child_output.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"replica {replica} failed (exit {child.returncode}); output:\n{tail}")
            if kill_after_acks is not None and not killed:
                raise RuntimeError(
                    f"replica {replica} ended after {acknowledged} acknowledgements, before its kill point "
                    f"({kill_after_acks}): give the workload more steps"
                )

    def _child_clock(self) -> str | None:
        """The test clock's instant for a child process (None: the child reads the real time)."""
        return self.clock.value.isoformat() if isinstance(self.clock, ManualClock) and self.clock.value else None

    # the database

    def _own_server(self) -> TemporaryPostgres:
        if not isinstance(self.server, TemporaryPostgres):
            what = "an external server (--exai-dsn)" if self.server is not None else "no known server"
            self._unsupported(f"database crash helpers need the plugin's temporary server, not {what}")
        return self.server

    def kill_database(self, mode: Literal["kill", "immediate"] = "kill") -> None:
        """Stop the postmaster abruptly and leave it down: SIGKILL, or an immediate shutdown.

        Until ``restart_database()`` every database call of a manager raises PersistenceError.
        """
        self._own_server().kill(DATABASE_CRASH_SIGNALS[mode])

    def restart_database(self) -> float:
        """Start the postmaster again on the same data directory and port; return the seconds it took.

        Blocks the event loop for that time on purpose: the postmaster must be started from
        the main thread, since it is set to die with the thread that started it. A pooler
        stays up and connects to the server again; this returns once a query on the
        harness's database goes through it (after a failed login PgBouncer refuses clients
        until its next try, every ``server_login_retry``: 0.5 s).
        """
        server = self._own_server()
        started = time.monotonic()
        server.restart()
        if self.pooler is not None and self.pooler.pid is not None:  # unless kill_pooler() left it down
            self.pooler.wait_until_ready(_dbname(self.dsn))
        return time.monotonic() - started

    def crash_database(self, mode: Literal["kill", "immediate"] = "kill") -> float:
        """Kill the database and start it again at once; return the seconds until it accepts connections."""
        self.kill_database(mode)
        return self.restart_database()

    # the pooler

    def _own_pooler(self) -> PgBouncer:
        if self.pooler is None:
            self._unsupported(
                "pooler crash helpers need a pooler in the run: --exai-pooler=transaction or session "
                "(ini exai_pooler, env EXAI_SESSIONS_POOLER)"
            )
        return self.pooler

    def kill_pooler(self) -> None:
        """SIGKILL PgBouncer and leave it down: every client connection through it drops at once.

        The server keeps running; its backends of the pooler end as they see it gone. Until
        ``restart_pooler()`` every database call of a manager raises PersistenceError.
        """
        self._own_pooler().kill()

    def restart_pooler(self) -> float:
        """SIGKILL PgBouncer (if it runs) and start it again on the same socket or port; return the seconds it took.

        Clients lose their connections, as when production's pooler restarts; a manager's
        next call connects again. Blocks the event loop, as ``restart_database`` does and
        for the same reason.
        """
        pooler = self._own_pooler()
        started = time.monotonic()
        pooler.restart()
        return time.monotonic() - started

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


def _terminate_busy_backends(conn: psycopg.Connection[Any], application_name: str, timeout: float = 5.0) -> None:
    """End the backends of ``application_name`` that are in a statement or a transaction; wait until they are gone."""
    query = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND state <> 'idle' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + timeout
    while conn.execute(query, (application_name,)).fetchone() is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the busy backends of {application_name!r} did not exit within {timeout:g}s")
        time.sleep(0.001)


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


async def _start_workload_child(spec: dict[str, Any], output: Any, *, stdin: int) -> asyncio.subprocess.Process:
    """Start the workload child (``-m pytest_exai_sessions.testing.workload``) on ``spec``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest_exai_sessions.testing.workload",
        json.dumps(spec),
        stdin=stdin,
        stdout=output,
        stderr=output,
        pass_fds=(spec["ledger_fd"],),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )


async def _drive(
    child: asyncio.subprocess.Process,
    read_end: int,
    book: LedgerBook,
    *,
    kill_after_acks: int | None,
    kill_after_secs: float | None,
    kill_at: str | None,
    timeout: float,
) -> str | None:
    """Read the ledger until the kill point, kill the child, then read what it wrote before dying."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
    )
    # Until the child is ready only the overall timeout applies; kill_after_secs counts from then.
    deadline = time.monotonic() + timeout
    ready = False
    killed_at: str | None = None
    try:
        while killed_at is None:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=max(remaining, 0))
            except TimeoutError:
                if kill_after_secs is None or not ready:
                    raise TimeoutError(f"the workload reached no kill point within {timeout}s") from None
                killed_at = f"after {kill_after_secs}s"
                break
            if not line:
                # The child ended on its own. Wait, never kill: signalling an exited child
                # would reap it behind asyncio's back.
                await child.wait()
                return None
            record = json.loads(line)
            if record["t"] == "ready":
                ready = True
                if kill_after_secs is not None:
                    deadline = time.monotonic() + kill_after_secs
                continue
            book.add(record)
            if kill_after_acks is not None and book.acknowledged >= kill_after_acks:
                killed_at = f"after {book.acknowledged} acknowledged writes"
            elif record["t"] == "fault":
                if record["name"] == kill_at:
                    killed_at = f"at fault point {kill_at!r}"
                else:
                    assert child.stdin is not None
                    child.stdin.write(b"continue\n")
                    await child.stdin.drain()
        child.kill()
        await child.wait()
        # Whatever the child wrote before it died is still in the pipe: read it all.
        while line := await reader.readline():
            book.add(json.loads(line))
    finally:
        transport.close()
    return killed_at
