"""Running a workload: in this process, in one child process or in several replicas at once.

Each runs as a ``RunningWorkload`` whose records the driver reads the same way: a child
writes them to a pipe, a workload in this process to a queue. ``drive`` reads them into a
``History`` until the chosen point, fires the fault there (which ends the workload, with
whatever else the fault takes down), and then reads what it wrote before it ended: an
operation it completed is recorded even if the fault came before the driver read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol

from ...manager import SessionManager
from .child import ChildSpec
from .client import Workload, WorkloadContext
from .faults import AfterAcknowledged, AfterSeconds, AtFaultPoint, FaultAt
from .history import History
from .records import Completed, Done, FaultPointReached, Ready, Record, decode

_PIPE_LIMIT = 64 * 1024 * 1024


class RunningWorkload(Protocol):
    """A started workload, as the driver sees it."""

    async def read(self, timeout: float | None = None) -> Record | None:
        """The next record; None once the workload ended (or died) and every record was read."""
        ...

    async def go_on(self) -> None:
        """Let the workload past the fault point it waits at."""

    async def wait(self) -> None:
        """Return once the workload has ended."""


class InProcessWorkload:
    """A workload run as a task of this process, on a manager of the caller's; its records on a queue.

    Its end at a fault is ``kill()``: from then on nothing it does is observed (a record it
    tries to write raises ``CancelledError`` instead), and the task is cancelled until it
    ends. Unlike a killed process, the cancelled code still runs its ``finally`` blocks, and
    code that swallows a cancellation (as some drivers do in a wait) goes on until its next
    recorded operation: whatever it writes then is as unrecorded as a dying process's last
    writes, and the operations in flight stay of unknown outcome.
    """

    def __init__(self, workload: Workload, manager: SessionManager, params: dict[str, Any], dsn: str) -> None:
        self._records: asyncio.Queue[Record | None] = asyncio.Queue()
        self._go_on = asyncio.Queue[None]()
        self._killed = False
        context = WorkloadContext(manager, self, params, dsn)
        self._task = asyncio.ensure_future(self._run(workload, context))

    async def _run(self, workload: Workload, context: WorkloadContext) -> None:
        try:
            self.write(Ready(0))
            await workload(context)
            self.write(Done(0))
        finally:
            self._records.put_nowait(None)

    # the workload's side: a RecordSink

    def write(self, record: Record) -> None:
        if self._killed:
            raise asyncio.CancelledError("the workload was killed")
        self._records.put_nowait(record)

    async def wait_at_fault_point(self, name: str) -> None:
        await self._go_on.get()

    # the driver's side

    async def read(self, timeout: float | None = None) -> Record | None:
        return await asyncio.wait_for(self._records.get(), timeout)

    async def go_on(self) -> None:
        self._go_on.put_nowait(None)

    async def wait(self) -> None:
        while not self._task.done():
            if self._killed:
                self._task.cancel()  # again: a wait somewhere may have swallowed the last one
            await asyncio.wait([self._task], timeout=1.0 if self._killed else None)

    def kill(self) -> None:
        if not self._killed:
            self._killed = True
            self._records.put_nowait(None)  # the end of what the driver reads
        self._task.cancel()

    def result(self) -> None:
        """Raise what the workload raised, if it ended by failing."""
        if self._task.done() and not self._task.cancelled():
            self._task.result()


class WorkloadChild:
    """One workload process, the pipe its records come on, and its output (kept for errors)."""

    def __init__(self, process: asyncio.subprocess.Process, reader: asyncio.StreamReader, pipe: Any, output: IO[bytes]):
        self.process = process
        self._reader = reader
        self._pipe = pipe
        self._output = output

    @classmethod
    async def start(cls, spec: ChildSpec, output: IO[bytes]) -> WorkloadChild:
        read_end, write_end = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pytest_exai_sessions.testing.crash.child",
                replace(spec, record_fd=write_end).to_json(),
                stdin=asyncio.subprocess.PIPE,
                stdout=output,
                stderr=output,
                pass_fds=(write_end,),
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        reader = asyncio.StreamReader(limit=_PIPE_LIMIT)
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
        )
        return cls(process, reader, pipe, output)

    async def read(self, timeout: float | None = None) -> Record | None:
        """The next record; None once the child closed the pipe (it ended or died)."""
        line = await asyncio.wait_for(self._reader.readline(), timeout)
        return decode(line) if line else None

    async def go_on(self) -> None:
        """Let the child past the fault point it waits at."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"continue\n")
        await self.process.stdin.drain()

    async def wait(self) -> None:
        await self.process.wait()

    def output_tail(self) -> str:
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-3000:]

    async def close(self) -> None:
        """Kill the child if it still runs, and reap it. Never signal one that exited: asyncio reaps it."""
        self._pipe.close()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class ReplicaGroup:
    """Several children of one workload, read as one: their records merged in the order they come.

    A fault point counts whichever replica reaches it; ``go_on`` lets that one on.
    """

    def __init__(self, children: list[WorkloadChild]) -> None:
        self.children = children
        self._records: asyncio.Queue[tuple[WorkloadChild, Record] | None] = asyncio.Queue()
        self._open = len(children)
        self._waiting: list[WorkloadChild] = []
        self._failures: list[BaseException] = []
        self._readers = [asyncio.ensure_future(self._forward(child)) for child in children]

    async def _forward(self, child: WorkloadChild) -> None:
        try:
            while (record := await child.read()) is not None:
                self._records.put_nowait((child, record))
        except (ValueError, TypeError) as error:  # a line that is no record: raised by read()
            self._failures.append(error)
        finally:
            self._records.put_nowait(None)

    async def read(self, timeout: float | None = None) -> Record | None:
        while True:
            item = await asyncio.wait_for(self._records.get(), timeout)
            if self._failures:
                raise self._failures[0]
            if item is None:
                self._open -= 1
                if self._open == 0:
                    return None
                continue
            child, record = item
            if isinstance(record, FaultPointReached):
                self._waiting.append(child)
            return record

    async def go_on(self) -> None:
        await self._waiting.pop(0).go_on()

    async def wait(self) -> None:
        await asyncio.gather(*(child.wait() for child in self.children))

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for child in self.children:
            await child.close()


async def drive(
    child: RunningWorkload,
    history: History,
    *,
    at: FaultAt | Sequence[FaultAt] | None,
    fire: Callable[[], None],
    timeout: float | None = None,
    survives: bool = False,
) -> str | None:
    """Read ``child``'s records into ``history``; at the point ``at``, call ``fire``.

    ``fire`` must end the workload, unless it ``survives`` the fault: then a workload waiting
    at the fault point is let on after it, and read until it ends; and ``at`` may be several
    points, in order, each counted from the start. Returns where it fired (e.g. ``"after 12
    acknowledged operations"``; ``;`` between several), or None when the workload ended
    before every point. A point after N seconds counts from the child's ``Ready``; until then
    only ``timeout`` applies.
    """
    pending = deque(at if isinstance(at, Sequence) else [] if at is None else [at])
    if len(pending) > 1 and not survives:
        raise ValueError("several fault points need a fault the workload survives")
    deadline = None if timeout is None else time.monotonic() + timeout
    acknowledged = 0
    ready_at: float | None = None
    fired: list[str] = []
    while True:
        point = pending[0] if pending else None
        limit = ready_at + point.seconds if isinstance(point, AfterSeconds) and ready_at is not None else deadline
        reached: str | None = None
        try:
            record = await child.read(None if limit is None else max(limit - time.monotonic(), 0))
        except TimeoutError:
            if not (isinstance(point, AfterSeconds) and ready_at is not None):
                raise TimeoutError(f"the workload reached no fault point within {timeout}s") from None
            reached = str(point)
        else:
            if record is None:
                await child.wait()
                return None
            history.add(record)
            if isinstance(record, Ready):
                ready_at = time.monotonic()
            elif isinstance(record, Completed) and record.outcome != "uncertain":
                acknowledged += 1
                if isinstance(point, AfterAcknowledged) and acknowledged >= point.count:
                    reached = f"after {acknowledged} acknowledged operations"
            elif isinstance(record, FaultPointReached):
                if isinstance(point, AtFaultPoint) and record.name == point.name:
                    reached = str(point)
                else:
                    await child.go_on()
        if reached is None:
            continue
        fired.append(reached)
        pending.popleft()
        fire()
        if survives and isinstance(point, AtFaultPoint):
            await child.go_on()
        if not pending:
            break
    while (record := await child.read()) is not None:
        history.add(record)
    await child.wait()
    return "; ".join(fired)


async def run_one(
    spec: ChildSpec, history: History, *, at: FaultAt, fire: Callable[[WorkloadChild], None], timeout: float
) -> str:
    """Run one child until ``at``; ``fire(child)`` kills it there. The workload must not end before."""
    with tempfile.TemporaryFile() as output:
        child = await WorkloadChild.start(spec, output)
        try:
            fired = await drive(child, history, at=at, fire=lambda: fire(child), timeout=timeout)
        finally:
            await child.close()
        if fired is None:
            raise RuntimeError(
                f"the workload ended (exit {child.process.returncode}) before the kill point "
                f"({history.acknowledged} acknowledged operations); output:\n{child.output_tail()}"
            )
    history.fired(fired)
    return fired


async def run_through(
    spec: ChildSpec, history: History, *, at: Sequence[FaultAt], fire: Callable[[], None], timeout: float, what: str
) -> str:
    """Run one child; at each point of ``at`` call ``fire``, which leaves it running. It must go on to its end.

    For a fault the application outlives (a failover): what it does after is recorded too.
    ``what`` the fault killed, for the report ("the primary").
    """
    with tempfile.TemporaryFile() as output:
        child = await WorkloadChild.start(spec, output)
        try:
            async with asyncio.timeout(timeout):
                fired = await drive(child, history, at=at, fire=fire, survives=True)
        except TimeoutError:
            raise TimeoutError(f"the workload did not end within {timeout}s; output:\n{child.output_tail()}") from None
        finally:
            await child.close()
        if fired is None:
            raise RuntimeError(
                f"the workload ended (exit {child.process.returncode}) before the fault point "
                f"({history.acknowledged} acknowledged operations); output:\n{child.output_tail()}"
            )
        if child.process.returncode != 0:
            raise RuntimeError(
                f"the workload failed after the fault (exit {child.process.returncode}): it must run through it; "
                f"output:\n{child.output_tail()}"
            )
    history.fired(f"{what} {fired}")
    return fired


async def run_in_process(running: InProcessWorkload, history: History, *, at: FaultAt, timeout: float) -> str:
    """Run a workload of this process until ``at``, and kill it there. It must not end before."""
    try:
        fired = await drive(running, history, at=at, fire=running.kill, timeout=timeout)
        if fired is None:
            running.result()  # what it raised, if it failed
            raise RuntimeError(
                f"the workload ended before the kill point ({history.acknowledged} acknowledged operations)"
            )
    finally:
        running.kill()
        await running.wait()
    history.fired(fired)
    return fired


async def run_group(
    spec: ChildSpec,
    history: History,
    *,
    replicas: int,
    at: FaultAt,
    fire: Callable[[list[WorkloadChild]], None],
    timeout: float,
) -> str:
    """Run ``replicas`` children at once until ``at``, counted over all of them; ``fire`` ends them all there."""
    if replicas < 1:
        raise ValueError(f"need replicas >= 1, got {replicas}")
    with contextlib.ExitStack() as outputs:
        children: list[WorkloadChild] = []
        group: ReplicaGroup | None = None
        try:
            for replica in range(replicas):
                output = outputs.enter_context(tempfile.TemporaryFile())
                children.append(await WorkloadChild.start(replace(spec, replica=replica), output))
            group = ReplicaGroup(children)
            fired = await drive(group, history, at=at, fire=lambda: fire(children), timeout=timeout)
        finally:
            if group is not None:
                await group.close()
            else:
                for child in children:
                    await child.close()
        if fired is None:
            codes = [child.process.returncode for child in children]
            raise RuntimeError(
                f"the replicas ended (exit codes {codes}) before the fault point ({history.acknowledged} "
                f"acknowledged operations); output of replica 0:\n{children[0].output_tail()}"
            )
    history.fired(f"{replicas} replicas {fired}")
    return fired


@dataclass(frozen=True)
class ReplicaPlan:
    """Which replicas run, and after how many acknowledged operations each killed one dies.

    Slot 0 is never killed: some replica always goes on to the end. Each kill hits a slot
    after a random (seeded) number of its acknowledged operations between 1 and ``steps``;
    with ``replace_killed`` a new replica takes the killed one's place.
    """

    kills_per_slot: list[list[int]]
    replace_killed: bool

    @classmethod
    def draw(cls, *, replicas: int, kills: int, replace_killed: bool, seed: int, steps: int) -> ReplicaPlan:
        if replicas < 1 or kills < 0:
            raise ValueError(f"need replicas >= 1 and kills >= 0, got replicas={replicas}, kills={kills}")
        if kills and replicas < 2:
            raise ValueError("killing needs replicas >= 2: one replica is never killed")
        if not replace_killed and kills > replicas - 1:
            raise ValueError(f"without replace_killed at most replicas - 1 = {replicas - 1} can be killed, not {kills}")
        rng = random.Random(seed)
        plans: list[list[int]] = [[] for _ in range(replicas)]
        victims = (
            [rng.randrange(1, replicas) for _ in range(kills)]
            if replace_killed
            else rng.sample(range(1, replicas), kills)
        )
        for slot in victims:
            plans[slot].append(rng.randint(1, steps))
        return cls(plans, replace_killed)

    @property
    def replica_numbers(self) -> int:
        """How many replicas the run starts in all."""
        kills = sum(len(plan) for plan in self.kills_per_slot)
        return len(self.kills_per_slot) + (kills if self.replace_killed else 0)


async def run_replicas(
    spec: ChildSpec,
    history: History,
    plan: ReplicaPlan,
    *,
    fire: Callable[[WorkloadChild], None],
    timeout: float,
) -> None:
    """Run the replicas of ``plan`` at once; each killed one by ``fire`` at its point, the rest to their end."""
    numbers = iter(range(plan.replica_numbers))

    async def run_replica(kill_after: int | None) -> None:
        replica = next(numbers)
        at = None if kill_after is None else AfterAcknowledged(kill_after)
        with tempfile.TemporaryFile() as output:
            child = await WorkloadChild.start(replace(spec, replica=replica), output)
            try:
                fired = await drive(child, history, at=at, fire=lambda: fire(child))
            finally:
                await child.close()
            if fired is not None:
                history.fired(f"replica {replica} {fired}")
            elif child.process.returncode != 0:
                raise RuntimeError(
                    f"replica {replica} failed (exit {child.process.returncode}); output:\n{child.output_tail()}"
                )
            elif at is not None:
                raise RuntimeError(
                    f"replica {replica} ended before its kill point ({kill_after} acknowledged operations): "
                    "give the workload more steps"
                )

    async def run_slot(kills: list[int]) -> None:
        for kill_after in kills:
            await run_replica(kill_after)
        if plan.replace_killed or not kills:
            await run_replica(None)

    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            for kills in plan.kills_per_slot:
                group.create_task(run_slot(kills))
    except TimeoutError:
        raise TimeoutError(f"the replicas did not finish within {timeout}s") from None
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from failures
