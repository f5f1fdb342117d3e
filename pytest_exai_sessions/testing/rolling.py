"""A rolling restart: replacement replicas start while the old ones serve, then the old ones crash.

What a deploy does to a running app, in one test: requests keep arriving throughout, spread
over whichever replicas the "load balancer" has. The check: every request the app
acknowledged is counted in the database exactly once, every session is still there, and no
request sent to a replacement replica failed at any point.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..manager import SessionManager

if TYPE_CHECKING:
    from .crash import CrashHarness

# One request of the application: it must go through ``manager.request(session_id)`` once,
# as a request middleware does, so that the database counts it.
RequestHandler = Callable[[SessionManager, str], Awaitable[Any]]


async def count_one_request(manager: SessionManager, session_id: str) -> None:
    """The default handler: an empty request."""
    async with manager.request(session_id):
        pass


@dataclass
class RollingRestartReport:
    """What a rolling restart did and found; ``assert_ok()`` fails naming each problem."""

    acknowledged: int = 0
    # Requests that failed on an old replica as it crashed: their outcome is unknown.
    lost_with_old_replicas: int = 0
    # Requests that failed on a replica that had not crashed (a new one, or an old one before
    # its crash): each is a finding.
    failed_requests: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.violations or self.failed_requests)

    def summary(self) -> str:
        return (
            f"rolling restart ({' -> '.join(self.phases)}): {self.acknowledged} requests acknowledged, "
            f"{self.lost_with_old_replicas} in flight on crashed replicas, "
            f"{len(self.failed_requests)} failed on serving replicas, {len(self.violations)} violations"
        )

    def assert_ok(self) -> None:
        if self.ok:
            return
        lines = [f"request failed: {failure}" for failure in self.failed_requests[:20]]
        lines += self.violations[:50]
        raise AssertionError(self.summary() + "\n" + "\n".join(lines))


class _Traffic:
    """Requests from ``workers`` concurrent clients, spread round-robin over the serving replicas."""

    def __init__(self, session_ids: list[str], handle: RequestHandler, workers: int) -> None:
        self.session_ids = session_ids
        self.handle = handle
        self.workers = workers
        self.serving: list[SessionManager] = []
        self.crashed: set[int] = set()  # id() of the replicas crashed on purpose
        self.acknowledged: Counter[str] = Counter()
        self.uncertain: Counter[str] = Counter()
        self.failed: list[str] = []
        self._turn = itertools.count()

    async def run(self, requests: int, *, halfway: Callable[[], Awaitable[None]] | None = None) -> None:
        """Send ``requests`` requests; ``halfway`` runs (while the others go on) after half of them."""
        sent = done = 0
        half = asyncio.Event()

        async def client() -> None:
            nonlocal sent, done
            while sent < requests:
                sent += 1
                await self._one()
                done += 1
                if done >= requests // 2:
                    half.set()

        clients = [asyncio.create_task(client()) for _ in range(self.workers)]
        try:
            if halfway is not None:
                waiter = asyncio.create_task(half.wait())
                await asyncio.wait([waiter, *clients], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                await halfway()
            await asyncio.gather(*clients)
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

    async def _one(self) -> None:
        turn = next(self._turn)
        manager = self.serving[turn % len(self.serving)]
        session_id = self.session_ids[turn % len(self.session_ids)]
        try:
            await self.handle(manager, session_id)
        except Exception as error:  # noqa: BLE001 - any failure of the app's request is a finding, reported
            if id(manager) in self.crashed:
                self.uncertain[session_id] += 1  # the replica died under it: applied or not
            else:
                self.failed.append(f"{session_id} on replica {manager!r}: {type(error).__name__}: {error}")
            return
        self.acknowledged[session_id] += 1


async def rolling_restart(
    harness: CrashHarness,
    *,
    old_replicas: int = 2,
    new_replicas: int = 2,
    sessions: int = 8,
    requests_per_phase: int = 60,
    clients: int = 4,
    handle: RequestHandler = count_one_request,
    manager_class: type[SessionManager] = SessionManager,
    **options: Any,
) -> RollingRestartReport:
    """Run a rolling restart against the harness's database and check what survived.

    Phases, with ``clients`` concurrent clients sending ``requests_per_phase`` requests each:
    the old replicas serve; the new ones start while the old ones serve; all serve; the old
    ones crash (``CrashHarness.abandon``: no close, their backends ended) halfway through a
    phase while every replica serves; the new ones serve alone. ``handle(manager,
    session_id)`` is one request of your app; it must call ``manager.request(session_id)``
    once. ``options`` go to every replica. Returns the report; call ``assert_ok()``.
    """
    if old_replicas < 1 or new_replicas < 1 or sessions < 1 or clients < 1:
        raise ValueError("old_replicas, new_replicas, sessions and clients must each be at least 1")
    report = RollingRestartReport()
    old = [await harness.new_manager(manager_class, **options) for _ in range(old_replicas)]
    session_ids = [f"rolling-{number}" for number in range(sessions)]
    for session_id in session_ids:
        await old[0].ensure(session_id)
    traffic = _Traffic(session_ids, handle, clients)
    traffic.serving = list(old)

    report.phases.append("old serve")
    await traffic.run(requests_per_phase)

    new: list[SessionManager] = []

    async def start_new_replicas() -> None:
        for _ in range(new_replicas):
            new.append(await harness.new_manager(manager_class, **options))

    report.phases.append("new start while old serve")
    await asyncio.gather(traffic.run(requests_per_phase), start_new_replicas())

    report.phases.append("all serve")
    traffic.serving = [*old, *new]
    await traffic.run(requests_per_phase)

    async def crash_old_replicas() -> None:
        # The load balancer stops routing to them as they die; requests already on them are lost.
        traffic.serving = list(new)
        for manager in old:
            traffic.crashed.add(id(manager))
            await harness.abandon(manager)

    report.phases.append("old crash while all serve")
    traffic.serving = [*old, *new]
    await traffic.run(requests_per_phase, halfway=crash_old_replicas)

    report.phases.append("new serve")
    await traffic.run(requests_per_phase)

    stored = new[0].live_sessions()
    for session_id in session_ids:
        acknowledged, uncertain = traffic.acknowledged[session_id], traffic.uncertain[session_id]
        session = stored.get(session_id)
        if session is None:
            report.violations.append(f"session {session_id!r}: lost ({acknowledged} requests acknowledged)")
        elif not acknowledged <= session.request_count <= acknowledged + uncertain:
            allowed = str(acknowledged) if not uncertain else f"{acknowledged}..{acknowledged + uncertain}"
            report.violations.append(
                f"session {session_id!r}: request_count is {session.request_count}, "
                f"acknowledged requests allow {allowed}"
            )
    report.acknowledged = sum(traffic.acknowledged.values())
    report.lost_with_old_replicas = sum(traffic.uncertain.values())
    report.failed_requests = traffic.failed
    return report
