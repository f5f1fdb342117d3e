"""The child side of a process crash test: run a workload and report each acknowledged write.

``CrashHarness.run_and_kill`` starts ``python -m pytest_exai_sessions.workload`` and kills it
with SIGKILL. The workload writes through a ``WorkloadContext``: before each operation it
records the intent, and only after the operation's ``await`` returned, the acknowledgement
with the state it returned. The parent reads this ledger and checks the database against it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..clock import SYSTEM_CLOCK, ManualClock
from ..errors import SessionConflict, SessionNotFound
from ..manager import SessionManager
from ..models import Session

Workload = Callable[["WorkloadContext"], Awaitable[None]]


def import_object(path: str) -> Any:
    """``package.module:attribute`` (or ``package.module.attribute``) to the object it names."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not an importable name like 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def object_path(target: Any) -> str:
    """The importable name of a module-level function or class, for the child to import."""
    if isinstance(target, str):
        return target
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise ValueError(f"{target!r} must be a module-level function or class that the child process can import")
    return f"{module}:{qualname}"


class Ledger:
    """JSON lines on a pipe to the parent; each written whole before the next starts.

    Every record names the ``replica`` (the child's number among those run at once), so
    the parent can merge the ledgers of several children into one history.
    """

    def __init__(self, fd: int, replica: int = 0) -> None:
        self._fd = fd
        self.replica = replica
        self._sequence = 0

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "r": self.replica}
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        while data:
            written = os.write(self._fd, data)
            data = data[written:]


def _state(session: Session | None) -> dict[str, Any] | None:
    return None if session is None else session.model_dump(mode="json")


class WorkloadContext:
    """What a workload gets: a started manager and recorded versions of its writes.

    ``ensure``, ``update`` (also a compare-and-set with ``expected_version``), ``merge_data``,
    ``update_activity``, ``remove``, ``request`` and ``get`` (a read: what it served) record
    intent and acknowledgement themselves, each with the replica's number and
    ``time.monotonic()``. A ``SessionConflict`` or ``SessionNotFound`` is recorded as a
    ``refused`` acknowledgement (nothing written) and raised on. For an application's own operations, wrap the call in
    ``async with ctx.operation(session_id, "name", expect={...}) as op:`` and hand the
    resulting Session to ``op.acknowledge(session)``; ``expect`` lists the fields the
    operation sets, so that a crash in flight can be told apart from corruption.
    """

    def __init__(self, manager: SessionManager, ledger: Ledger, params: dict[str, Any], dsn: str) -> None:
        self.manager = manager
        self.params = params
        self.dsn = dsn
        self._ledger = ledger

    @property
    def replica(self) -> int:
        """This child's number among the replicas run at once (0 for a single child)."""
        return self._ledger.replica

    @asynccontextmanager
    async def operation(
        self, session_id: str, name: str, *, expect: dict[str, Any] | None = None, args: dict[str, Any] | None = None
    ) -> AsyncIterator[Acknowledgement]:
        sequence = self._ledger.next_sequence()
        # CLOCK_MONOTONIC is one clock for every process on the host: the parent orders
        # the intents and acknowledgements of all replicas by these times.
        self._ledger.write(
            {
                "t": "intent",
                "seq": sequence,
                "sid": session_id,
                "op": name,
                "args": args or {},
                "expect": expect,
                "at": time.monotonic(),
            }
        )
        acknowledgement = Acknowledgement()
        try:
            yield acknowledgement
        except SessionConflict as conflict:
            # Acknowledged as refused: the store answered, and wrote nothing.
            self._refused(sequence, session_id, "conflict", acknowledgement, current_version=conflict.current_version)
            raise
        except SessionNotFound:
            self._refused(sequence, session_id, "not_found", acknowledgement)
            raise
        # Only now, after the awaited call returned: this write is acknowledged.
        self._ledger.write(
            {
                "t": "ack",
                "seq": sequence,
                "sid": session_id,
                "state": acknowledgement.state,
                "details": acknowledgement.details,
                "at": time.monotonic(),
            }
        )

    def _refused(
        self, sequence: int, session_id: str, outcome: str, acknowledgement: Acknowledgement, **details: Any
    ) -> None:
        # A record type of its own: the single-writer LedgerBook ignores it and keeps the
        # intent in flight, which allows both outcomes there.
        self._ledger.write(
            {
                "t": "refused",
                "seq": sequence,
                "sid": session_id,
                "outcome": outcome,
                "details": {**acknowledgement.details, **details},
                "at": time.monotonic(),
            }
        )

    async def ensure(self, session_id: str, **attrs: Any) -> Session:
        expect = {"state": "active", **{k: v for k, v in attrs.items() if k in ("data", "metadata", "user_id")}}
        async with self.operation(session_id, "ensure", expect=expect, args=attrs) as op:
            session = await self.manager.ensure(session_id, **attrs)
            op.acknowledge(session)
        return session

    async def update(self, session_id: str, *, expected_version: int | None = None, **changes: Any) -> Session:
        """``manager.update``; with ``expected_version`` a compare-and-set.

        A ``SessionConflict`` is recorded as an acknowledged ``conflict`` (nothing written,
        with the ``current_version`` the store reported) and raised on.
        """
        args = dict(changes) if expected_version is None else {**changes, "expected_version": expected_version}
        async with self.operation(session_id, "update", expect=dict(changes), args=args) as op:
            session = await self.manager.update(session_id, expected_version=expected_version, **changes)
            op.acknowledge(session)
        return session

    async def merge_data(self, session_id: str, patch: dict[str, Any]) -> Session:
        """``manager.merge_data``: the acknowledged state is the merged session it returned."""
        async with self.operation(session_id, "merge_data", args={"patch": patch}) as op:
            session = await self.manager.merge_data(session_id, patch)
            op.acknowledge(session)
        return session

    async def get(self, session_id: str) -> Session | None:
        """``manager.get``, recorded as a read: the state it served (None: it served nothing)."""
        async with self.operation(session_id, "get") as op:
            session = await self.manager.get(session_id)
            op.acknowledge(session)
        return session

    async def update_activity(self, session_id: str, request_duration_ms: int | None = None) -> Session:
        args = {"request_duration_ms": request_duration_ms or 0}
        async with self.operation(session_id, "update_activity", args=args) as op:
            session = await self.manager.update_activity(session_id, request_duration_ms)
            op.acknowledge(session)
        return session

    async def remove(self, session_id: str) -> None:
        async with self.operation(session_id, "remove") as op:
            await self.manager.remove(session_id)
            op.acknowledge(None)

    @asynccontextmanager
    async def request(self, session_id: str) -> AsyncIterator[Session]:
        async with self.operation(session_id, "request") as op:
            async with self.manager.request(session_id) as session:
                # Served, whatever happens next: counting it may still find it removed.
                op.details["served_version"] = session.version
                yield session
            op.acknowledge(await self.manager.get(session_id))

    async def fault_point(self, name: str) -> None:
        """Tell the parent this point is reached; it kills here if asked to, else lets it go on."""
        self._ledger.write({"t": "fault", "name": name})
        # Blocking on purpose: nothing else in this process may run past the point.
        answer = sys.stdin.readline()
        if answer.strip() != "continue":
            raise SystemExit(f"fault point {name!r}: no word from the parent ({answer!r})")


class Acknowledgement:
    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        # What the ack record carries besides the state (e.g. the version a request served).
        self.details: dict[str, Any] = {}

    def acknowledge(self, session: Session | None) -> None:
        """Record the session as the awaited call returned it (None: it no longer exists)."""
        self.state = _state(session)


async def _run(spec: dict[str, Any], ledger: Ledger) -> None:
    workload: Workload = import_object(spec["workload"])
    manager_class: type[SessionManager] = import_object(spec["manager_class"])
    # The parent's test clock as it stood at the start: moving it later does not reach the child.
    clock = ManualClock(spec["clock"]) if spec.get("clock") else SYSTEM_CLOCK
    manager = await manager_class.open(spec["dsn"], clock=clock, **spec["options"])
    # The parent's kill_after_secs counts from here: starting Python and importing takes
    # a varying part of a second that says nothing about the workload.
    ledger.write({"t": "ready"})
    await workload(WorkloadContext(manager, ledger, spec["params"], spec["dsn"]))
    ledger.write({"t": "done"})
    await manager.aclose()


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    spec = json.loads(arguments[0])
    ledger = Ledger(int(spec["ledger_fd"]), int(spec.get("replica", 0)))
    asyncio.run(_run(spec, ledger))
    return 0


if __name__ == "__main__":
    sys.exit(main())
