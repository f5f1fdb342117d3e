"""The nemesis of a crash test: what breaks (a fault), and when (a point of the workload).

A fault is an object with ``inject()`` (break it now) and ``recover()`` (bring back what
comes back; the seconds it took). Each is synchronous on purpose: a server is restarted
from the main thread, since it is set to die with the thread that started it. A new kind
of crash is a new fault here, never a new path through the driver or the checker.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import psycopg

from ...errors import ExaiSessionsError
from ...server.cluster import ServerStartError, TemporaryPostgres
from ...server.database import DatabaseUnderTest
from ...server.pooler import PgBouncer
from ...server.power_loss import PowerLossPostgres
from ...server.replication import ReplicatedCluster
from ..backends import terminate_backends

# SIGKILL: the server dies mid-write; the OS page cache survives, so every commit does too,
# whatever synchronous_commit says. SIGQUIT: PostgreSQL's immediate shutdown, no
# checkpoint, crash recovery at the next start.
DATABASE_CRASH_SIGNALS = {"kill": signal.SIGKILL, "immediate": signal.SIGQUIT}


class Fault(Protocol):
    def inject(self) -> None: ...

    def recover(self) -> float:
        """Bring back what the fault took down; the seconds until it serves again."""
        ...


@dataclass
class KillProcess:
    """SIGKILL a workload's process: the application dies mid-operation."""

    process: asyncio.subprocess.Process

    def inject(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    def recover(self) -> float:
        return 0.0  # a new process is a new manager: the harness builds it


@dataclass
class EndBackends:
    """End the server backends of one application name, as the death of its process would.

    Behind a transaction pooler only the backends working for it at this moment (in a
    statement or a transaction) are its own: an idle server connection there belongs to the
    pool, and still bears the name of the last client it served, maybe this one. Those are
    left alone, or another replica would lose the connection it is handed next.
    """

    direct_dsn: str
    application_name: str
    busy_only: bool = False

    def inject(self) -> None:
        with psycopg.connect(self.direct_dsn, autocommit=True) as admin:
            if self.busy_only:
                _terminate_busy_backends(admin, self.application_name)
            else:
                terminate_backends(admin, application_name=self.application_name)

    def recover(self) -> float:
        return 0.0


@dataclass
class KillDatabase:
    """Stop the postmaster abruptly (SIGKILL, or an immediate shutdown); ``recover`` restarts it.

    ``database``: the test's database, whose pooler (if any) stays up and connects again:
    ``recover`` returns once a query on that database goes through it (after a failed
    login PgBouncer refuses clients until its next try, every ``server_login_retry``: 0.5 s).
    """

    server: TemporaryPostgres
    mode: Literal["kill", "immediate"] = "kill"
    database: DatabaseUnderTest | None = None

    def inject(self) -> None:
        self.server.kill(DATABASE_CRASH_SIGNALS[self.mode])

    def recover(self) -> float:
        started = time.monotonic()
        self.server.restart()
        pooler = None if self.database is None else self.database.pooler
        if self.database is not None and pooler is not None and pooler.pid is not None:  # unless it was killed too
            pooler.wait_until_ready(self.database.name)
        return time.monotonic() - started


class PowerLossUnrecoverable(ExaiSessionsError):
    """After a power cut the database did not come back: the server did not start, or the database cannot be read."""


@dataclass
class CutPower:
    """The database server's power goes: what was not durable is lost; ``recover`` boots it again.

    ``recover`` returns the seconds from the cut itself to accepting connections. It raises
    ``PowerLossUnrecoverable``, with the tail of the server's log, when the server does not
    start, or when ``database`` (if given) no longer accepts a connection.
    """

    server: PowerLossPostgres
    database: DatabaseUnderTest | None = None

    def inject(self) -> None:
        self.server.cut_power()

    def recover(self) -> float:
        try:
            self.server.power_on()
        except ServerStartError as error:
            raise PowerLossUnrecoverable(f"the server did not start after the power cut: {error}") from None
        assert self.server.cut_at is not None
        seconds = time.monotonic() - self.server.cut_at
        if self.database is not None:
            self._connect(self.database.direct_dsn)
        return seconds

    def _connect(self, dsn: str) -> None:
        # At once, not after a pool's retries: a database the cut took never comes back.
        try:
            psycopg.connect(dsn, connect_timeout=10).close()
        except psycopg.OperationalError as error:
            raise PowerLossUnrecoverable(self.lost(f"the database does not accept a connection: {error}")) from None

    def lost(self, what: str) -> str:
        """A message on what the cut left unreadable, with the server's log."""
        return f"after the power cut {what}\nserver log:\n{self.server.log_tail()}"


@dataclass
class FailOver:
    """The primary dies (``inject``); the most advanced standby is promoted and the others follow it (``recover``).

    The application lives on: unlike the other faults, a workload runs through it. ``recover``
    returns the seconds from the kill to the first commit acknowledged on the new primary,
    through ``database``'s pooler when it has one (retargeted to the new primary, as an
    operator or a failover manager would).
    """

    cluster: ReplicatedCluster
    database: DatabaseUnderTest | None = None

    def inject(self) -> None:
        self.cluster.kill_primary()

    def recover(self) -> float:
        self.cluster.promote()
        pooler = None if self.database is None else self.database.pooler
        if pooler is not None:
            pooler.retarget(self.cluster.primary)
        return self.cluster.first_write(None if self.database is None else self.database.dsn)


@dataclass
class KillPooler:
    """SIGKILL PgBouncer: every client connection through it drops at once; the server runs on."""

    pooler: PgBouncer

    def inject(self) -> None:
        self.pooler.kill()

    def recover(self) -> float:
        """Start it again (killing it first if it runs) on the same socket or port."""
        started = time.monotonic()
        self.pooler.restart()
        return time.monotonic() - started


# When a fault fires, counted in the workload's own terms.


@dataclass(frozen=True)
class AfterAcknowledged:
    """Once the workload's store has answered ``count`` operations: ``ok`` or ``fail``, not uncertain."""

    count: int


@dataclass(frozen=True)
class AfterSeconds:
    """``seconds`` after the workload's manager is open."""

    seconds: float

    def __str__(self) -> str:
        return f"after {self.seconds}s"


@dataclass(frozen=True)
class AtFaultPoint:
    """When the workload reaches ``await ctx.fault_point(name)``."""

    name: str

    def __str__(self) -> str:
        return f"at fault point {self.name!r}"


FaultAt = AfterAcknowledged | AfterSeconds | AtFaultPoint


def fault_points(
    *,
    after_acks: int | Sequence[int] | None,
    after_secs: float | Sequence[float] | None,
    at: str | Sequence[str] | None,
    verb: str,
) -> list[FaultAt]:
    """The points chosen by one of the ``<verb>_after_acks``, ``<verb>_after_secs`` and ``<verb>_at`` keywords.

    Each may be one value or several, in the order they come; every count and every number
    of seconds from the start of the run.
    """
    if sum(value is not None for value in (after_acks, after_secs, at)) != 1:
        raise ValueError(f"choose exactly one of {verb}_after_acks, {verb}_after_secs and {verb}_at")
    points: list[FaultAt]
    if after_acks is not None:
        points = [AfterAcknowledged(count) for count in _several(after_acks)]
    elif after_secs is not None:
        points = [AfterSeconds(seconds) for seconds in _several(after_secs)]
    else:
        assert at is not None
        points = [AtFaultPoint(name) for name in ([at] if isinstance(at, str) else list(at))]
    if not points:
        raise ValueError(f"{verb}: no point given")
    return points


def _several(given: Any) -> list[Any]:
    return list(given) if isinstance(given, Sequence) else [given]


def fault_at(*, after_acks: int | None, after_secs: float | None, at: str | None, verb: str = "kill") -> FaultAt:
    """The one point chosen by the ``<verb>_after_acks``, ``<verb>_after_secs`` or ``<verb>_at`` keyword."""
    given: list[FaultAt] = []
    if after_acks is not None:
        given.append(AfterAcknowledged(after_acks))
    if after_secs is not None:
        given.append(AfterSeconds(after_secs))
    if at is not None:
        given.append(AtFaultPoint(at))
    if len(given) != 1:
        raise ValueError(f"choose exactly one of {verb}_after_acks, {verb}_after_secs and {verb}_at")
    return given[0]


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
