"""The history of a crash test: every operation of every replica, with its outcome, in one place."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .records import Completed, Done, FaultPointReached, Invoked, Outcome, Ready, Record

# A session as JSON (``Session.model_dump(mode="json")``); None: no row.
State = dict[str, Any] | None


@dataclass
class Operation:
    """One operation of one replica: its invocation and, if it completed, its outcome."""

    replica: int
    sequence: int
    session_id: str
    name: str
    args: dict[str, Any]
    expect: dict[str, Any] | None
    intent_at: float
    # None: in flight when its process died. "uncertain": it raised; either way unknown.
    outcome: Outcome | None = None
    # When the store answered (ok or fail); never set for an unknown outcome.
    ack_at: float | None = None
    state: dict[str, Any] | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def in_flight(self) -> bool:
        """Its outcome is unknown: it may have taken effect or not, but never in part."""
        return self.outcome is None or self.outcome == "uncertain"

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def failed(self) -> bool:
        """The store refused it: it wrote nothing."""
        return self.outcome == "fail"

    @property
    def version(self) -> int | None:
        """The version the acknowledged call returned, if it returned a session."""
        return None if self.state is None else self.state.get("version")

    @property
    def served(self) -> bool:
        """A read that handed the caller a session."""
        if self.name == "get":
            return self.ok and self.state is not None
        if self.name == "request":
            return self.ok or "served_version" in self.details
        return False

    @property
    def expected_version(self) -> int | None:
        return self.args.get("expected_version")

    def committed_before(self, other: Operation) -> bool:
        """Certainly settled before ``other`` began: the store answered before it was invoked."""
        return self.ack_at is not None and self.ack_at < other.intent_at

    def __str__(self) -> str:
        args = "".join(f" {name}={value!r}" for name, value in self.args.items())
        if self.outcome is None:
            outcome = "in flight"
        elif self.outcome == "ok":
            returned = "None" if self.state is None else f"v{self.version}"
            outcome = f"ok -> {returned}"
        elif self.reason == "conflict":
            outcome = f"conflict (current v{self.details.get('current_version')})"
        else:
            outcome = f"{self.outcome} ({self.reason})" if self.reason else self.outcome
        return f"replica {self.replica} #{self.sequence} {self.name}{args}: {outcome}"


class History:
    """Merges the records of any number of replicas into one history of operations.

    ``many_writers``: the records come from replicas that ran at once, and are ordered
    only by their times; else from one process, in the order they happened there.
    """

    def __init__(self, *, many_writers: bool = False) -> None:
        self.many_writers = many_writers
        self.replicas: set[int] = set()
        self.finished: set[int] = set()
        self.fault_points: list[str] = []
        self.faults: list[str] = []
        self._operations: dict[tuple[int, int], Operation] = {}

    def add(self, record: Record) -> None:
        self.replicas.add(record.replica)
        if isinstance(record, Invoked):
            self._operations[record.replica, record.sequence] = Operation(
                replica=record.replica,
                sequence=record.sequence,
                session_id=record.session_id,
                name=record.operation,
                args=dict(record.args),
                expect=record.expect,
                intent_at=record.at,
            )
        elif isinstance(record, Completed):
            operation = self._operations[record.replica, record.sequence]
            operation.outcome = record.outcome
            operation.reason = record.reason
            operation.details = dict(record.details)
            if record.outcome != "uncertain":
                operation.ack_at = record.at
                operation.state = record.state
        elif isinstance(record, FaultPointReached):
            self.fault_points.append(record.name)
        elif isinstance(record, Done):
            self.finished.add(record.replica)
        else:
            assert isinstance(record, Ready)

    def add_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.add(record)

    def fired(self, where: str) -> None:
        """Note that a fault fired, and where (``after 12 acknowledged operations``, ...)."""
        self.faults.append(where)

    @property
    def operations(self) -> list[Operation]:
        """Every operation, in the order they were invoked."""
        return sorted(self._operations.values(), key=lambda op: op.intent_at)

    def count(self, outcome: Outcome | None) -> int:
        return sum(1 for op in self._operations.values() if op.outcome == outcome)

    @property
    def acknowledged(self) -> int:
        """Operations the store answered: ``ok`` or ``fail``."""
        return self.count("ok") + self.count("fail")


# A broken rule (None: the one-writer rule, whose problem names the fields), what is wrong,
# and the operations that show it.
Problem = tuple[str | None, str, list[Operation]]
