"""The client side of a crash test: a workload's operations, each recorded as it happens.

A workload is an ``async def workload(ctx: WorkloadContext)``. Before each operation the
context records its invocation; after the awaited call, its outcome (see ``records.py``).
A ``SessionConflict`` or ``SessionNotFound`` is a ``fail``: the store answered and wrote
nothing. So is a ``PersistenceError`` that is not a ``CommitUncertain``, for an operation
that is one write of the store (``applied_only_on_success``): the store promises that it did
not take effect, and the checker holds it to that. Any other exception is ``uncertain``: the
write may or may not have taken effect.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from ...errors import CommitUncertain, PersistenceError, SessionConflict, SessionNotFound
from ...manager import SessionManager
from ...models import Session
from .records import Completed, FaultPointReached, Invoked, Outcome, Record, encode

Workload = Callable[["WorkloadContext"], Awaitable[None]]


class RecordSink(Protocol):
    """Where a workload's records go: a pipe to the driver, or the driver's queue in-process."""

    def write(self, record: Record) -> None: ...

    async def wait_at_fault_point(self, name: str) -> None:
        """Return once the driver lets the workload go on past ``name``."""


class PipeSink:
    """JSON lines on a pipe to the parent; each written whole before the next starts."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, record: Record) -> None:
        data = encode(record)
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    async def wait_at_fault_point(self, name: str) -> None:
        # Blocking the event loop on purpose: nothing else in this process may run past the point.
        answer = sys.stdin.readline()
        if answer.strip() != "continue":
            raise SystemExit(f"fault point {name!r}: no word from the parent ({answer!r})")


class WorkloadContext:
    """What a workload gets: a started manager and recorded versions of its writes.

    ``ensure``, ``update`` (also a compare-and-set with ``expected_version``), ``merge_data``,
    ``update_activity``, ``remove``, ``request`` and ``get`` (a read: what it served) record
    invocation and outcome themselves, each with the replica's number and
    ``time.monotonic()``. For an application's own operations, wrap the call in
    ``async with ctx.operation(session_id, "name", expect={...}) as op:`` and hand the
    resulting Session to ``op.acknowledge(session)``; ``expect`` lists the fields the
    operation sets, so that a crash in flight can be told apart from corruption.
    """

    # Which of the recorded operations are a single write of the store (reads before or
    # after it aside), so that a PersistenceError other than CommitUncertain means it wrote
    # nothing: ensure (a create that returned nothing wrote nothing), update, merge_data (one
    # transaction), update_activity (one statement, never batched) and remove. Not request:
    # it is the application's block and then a write.

    def __init__(
        self, manager: SessionManager, sink: RecordSink, params: dict[str, Any], dsn: str, *, replica: int = 0
    ) -> None:
        self.manager = manager
        self.params = params
        self.dsn = dsn
        self._sink = sink
        self._replica = replica
        self._sequence = 0

    @property
    def replica(self) -> int:
        """This workload's number among the replicas run at once (0 for a single one)."""
        return self._replica

    @asynccontextmanager
    async def operation(
        self,
        session_id: str,
        name: str,
        *,
        expect: dict[str, Any] | None = None,
        args: dict[str, Any] | None = None,
        applied_only_on_success: bool = False,
    ) -> AsyncIterator[Acknowledgement]:
        """Record one operation around the block.

        ``applied_only_on_success=True``: the block makes at most one write through the
        store, so a ``PersistenceError`` other than ``CommitUncertain`` means it wrote
        nothing, and is recorded ``fail`` (the checker then requires its effect absent).
        Otherwise any exception but a conflict or not-found is ``uncertain``.
        """
        self._sequence += 1
        sequence = self._sequence
        self._sink.write(Invoked(self._replica, sequence, session_id, name, args or {}, expect, at=time.monotonic()))
        acknowledgement = Acknowledgement()

        def complete(outcome: Outcome, reason: str | None = None, **details: Any) -> None:
            self._sink.write(
                Completed(
                    self._replica,
                    sequence,
                    session_id,
                    outcome,
                    acknowledgement.state if outcome == "ok" else None,
                    reason,
                    {**acknowledgement.details, **details},
                    at=time.monotonic(),
                )
            )

        try:
            yield acknowledgement
        except SessionConflict as conflict:
            complete("fail", "conflict", current_version=conflict.current_version)
            raise
        except SessionNotFound:
            complete("fail", "not_found")
            raise
        except PersistenceError as error:
            if applied_only_on_success and not isinstance(error, CommitUncertain):
                complete("fail", f"not_applied: {error}")
            else:
                complete("uncertain", f"{type(error).__name__}: {error}")
            raise
        except BaseException as error:
            # Raised, cancelled or interrupted: whether the write took effect is unknown.
            complete("uncertain", f"{type(error).__name__}: {error}")
            raise
        # Only now, after the awaited call returned: this write is acknowledged.
        complete("ok")

    async def ensure(self, session_id: str, **attrs: Any) -> Session:
        expect = {"state": "active", **{k: v for k, v in attrs.items() if k in ("data", "metadata", "user_id")}}
        async with self.operation(session_id, "ensure", expect=expect, args=attrs, applied_only_on_success=True) as op:
            session = await self.manager.ensure(session_id, **attrs)
            op.acknowledge(session)
        return session

    async def update(self, session_id: str, *, expected_version: int | None = None, **changes: Any) -> Session:
        """``manager.update``; with ``expected_version`` a compare-and-set.

        A ``SessionConflict`` is recorded as a ``fail`` (nothing written, with the
        ``current_version`` the store reported) and raised on.
        """
        args = dict(changes) if expected_version is None else {**changes, "expected_version": expected_version}
        async with self.operation(
            session_id, "update", expect=dict(changes), args=args, applied_only_on_success=True
        ) as op:
            session = await self.manager.update(session_id, expected_version=expected_version, **changes)
            op.acknowledge(session)
        return session

    async def merge_data(self, session_id: str, patch: dict[str, Any]) -> Session:
        """``manager.merge_data``: the acknowledged state is the merged session it returned."""
        async with self.operation(session_id, "merge_data", args={"patch": patch}, applied_only_on_success=True) as op:
            session = await self.manager.merge_data(session_id, patch)
            op.acknowledge(session)
        return session

    async def get(self, session_id: str) -> Session | None:
        """``manager.get``, recorded as a read: the state it served (None: it served nothing)."""
        async with self.operation(session_id, "get") as op:
            session = await self.manager.get(session_id)
            op.acknowledge(session)
        return session

    async def update_activity(
        self, session_id: str, request_duration_ms: int | None = None, *, request_id: str | None = None
    ) -> Session:
        """``manager.update_activity``; with ``request_id`` a retry after an uncertain outcome counts once."""
        args: dict[str, Any] = {"request_duration_ms": request_duration_ms or 0}
        # Passed on only when given: a manager a test built over an older signature still works.
        options = {} if request_id is None else {"request_id": request_id}
        args.update(options)
        async with self.operation(session_id, "update_activity", args=args, applied_only_on_success=True) as op:
            session = await self.manager.update_activity(session_id, request_duration_ms, **options)
            op.acknowledge(session)
        return session

    async def remove(self, session_id: str) -> None:
        async with self.operation(session_id, "remove", applied_only_on_success=True) as op:
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
        """Tell the driver this point is reached; a fault set for it fires here, else the workload goes on."""
        self._sink.write(FaultPointReached(self._replica, name))
        await self._sink.wait_at_fault_point(name)


class Acknowledgement:
    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        # What the completion carries besides the state (e.g. the version a request served).
        self.details: dict[str, Any] = {}

    def acknowledge(self, session: Session | None) -> None:
        """Record the session as the awaited call returned it (None: it no longer exists)."""
        self.state = None if session is None else session.model_dump(mode="json")
