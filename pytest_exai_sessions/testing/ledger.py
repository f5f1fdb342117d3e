"""Checking a crashed workload's ledger against what the database recovered, Jepsen-style.

For every session the ledger names: with nothing in flight, the recovered session must equal
the last acknowledged state exactly (or be absent, if that state was a removal). With
operations in flight at the kill, it may also equal the last acknowledged state with some
of them wholly applied; anything else (half an update, a lost acknowledged write, a row that
does not load) is a violation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models import Session

# Fields a write sets to "now": their exact value is unknown for a write in flight.
_CLOCK_FIELDS = frozenset({"last_activity", "created_at"})
_MAX_IN_FLIGHT_COMBINATIONS = 4


@dataclass(frozen=True)
class Intent:
    sequence: int
    session_id: str
    operation: str
    args: dict[str, Any]
    expect: dict[str, Any] | None


@dataclass
class Violation:
    session_id: str
    problem: str

    def __str__(self) -> str:
        return f"session {self.session_id!r}: {self.problem}"


@dataclass
class CrashReport:
    """What a process crash test found; ``assert_ok()`` fails naming each violated session."""

    killed_at: str
    acknowledged: int
    in_flight: int
    sessions_checked: int
    recovered: int
    violations: list[Violation] = field(default_factory=list)
    fault_points: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def assert_ok(self) -> None:
        if self.violations:
            lines = "\n".join(str(v) for v in self.violations[:50])
            more = f"\n... and {len(self.violations) - 50} more" if len(self.violations) > 50 else ""
            raise AssertionError(
                f"crash {self.killed_at}: {len(self.violations)} of {self.sessions_checked} sessions violate the "
                f"ledger ({self.acknowledged} acknowledged writes, {self.in_flight} in flight):\n{lines}{more}"
            )

    def summary(self) -> str:
        return (
            f"killed {self.killed_at}: {self.acknowledged} acknowledged, {self.in_flight} in flight, "
            f"{self.sessions_checked} sessions checked, {self.recovered} recovered, {len(self.violations)} violations"
        )


@dataclass
class _SessionHistory:
    acknowledged: dict[str, Any] | None = None  # the last acknowledged state; None = absent
    in_flight: list[Intent] = field(default_factory=list)


class LedgerBook:
    """Reads the records a workload wrote and remembers, per session, what was acknowledged."""

    def __init__(self) -> None:
        self.acknowledged = 0
        self.fault_points: list[str] = []
        self.finished = False
        self._histories: dict[str, _SessionHistory] = {}
        self._pending: dict[int, Intent] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        kind = record["t"]
        if kind == "intent":
            intent = Intent(record["seq"], record["sid"], record["op"], record["args"], record["expect"])
            self._pending[intent.sequence] = intent
            self._histories.setdefault(intent.session_id, _SessionHistory()).in_flight.append(intent)
        elif kind == "ack":
            intent = self._pending.pop(record["seq"])
            history = self._histories[intent.session_id]
            history.in_flight.remove(intent)
            history.acknowledged = record["state"]
            self.acknowledged += 1
        elif kind == "fault":
            self.fault_points.append(record["name"])
        elif kind == "done":
            self.finished = True
        # "ready" (the child started its workload) only matters to the process driving it.

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def check(self, recovered: Mapping[str, Session], killed_at: str) -> CrashReport:
        """Compare the recovered sessions with the ledger."""
        violations = []
        for session_id, history in self._histories.items():
            problem = _judge(history, recovered.get(session_id))
            if problem:
                violations.append(Violation(session_id, problem))
        return CrashReport(
            killed_at=killed_at,
            acknowledged=self.acknowledged,
            in_flight=self.in_flight,
            sessions_checked=len(self._histories),
            recovered=len(recovered),
            violations=violations,
            fault_points=list(self.fault_points),
        )


def _judge(history: _SessionHistory, found: Session | None) -> str | None:
    """None when ``found`` is a state the ledger allows, else what is wrong with it."""
    found_state = None if found is None else found.model_dump(mode="json")
    if found_state == history.acknowledged:
        return None  # exactly the last acknowledged state
    if not history.in_flight:
        return _difference(history.acknowledged, found_state)
    for applied in _subsets(history.in_flight):
        if _matches_applied(history.acknowledged, applied, found_state):
            return None
    in_flight = ", ".join(f"{i.operation}{i.args or ''}" for i in history.in_flight)
    return f"neither the acknowledged state nor it with [{in_flight}] wholly applied: " + _difference(
        history.acknowledged, found_state
    )


def _subsets(intents: list[Intent]) -> Iterable[list[Intent]]:
    if len(intents) > _MAX_IN_FLIGHT_COMBINATIONS:
        # Too many to enumerate: accept any order-preserving prefix.
        return (intents[:n] for n in range(1, len(intents) + 1))
    return (
        list(combination)
        for size in range(1, len(intents) + 1)
        for combination in itertools.combinations(intents, size)
    )


def _matches_applied(base: dict[str, Any] | None, intents: list[Intent], found: dict[str, Any] | None) -> bool:
    expected = base
    unknown: frozenset[str] = frozenset()
    for intent in intents:
        expected, unknown_now = _apply(expected, intent)
        unknown |= unknown_now
    if expected is None or found is None:
        return expected is found
    return all(found.get(name) == value for name, value in expected.items() if name not in unknown)


def _apply(state: dict[str, Any] | None, intent: Intent) -> tuple[dict[str, Any] | None, frozenset[str]]:
    """The state after ``intent`` took effect, and the fields whose new value cannot be known."""
    if intent.operation == "remove":
        return None, frozenset()
    if intent.operation in ("update_activity", "request"):
        if state is None:
            return None, frozenset()
        duration = intent.args.get("request_duration_ms", 0)
        # A request's duration is measured inside the child: any non-negative addition fits.
        unknown = _CLOCK_FIELDS | ({"total_duration_ms"} if intent.operation == "request" else frozenset())
        return {
            **state,
            "request_count": state["request_count"] + 1,
            "total_duration_ms": state["total_duration_ms"] + duration,
            "version": state["version"] + 1,
        }, unknown
    if intent.operation == "ensure" and state is not None:
        return state, frozenset()  # ensure of a live session changes nothing
    expect = intent.expect
    if expect is None:
        # An application's operation that did not say what it sets: only "it loads" is checked.
        return (state or {}), frozenset(state or {}) | {"session_id", "state"}
    if state is None:
        # Created by this write: only what it was given is known (a restarted id's version
        # goes on from the old row's, which the ledger may not know).
        return {"session_id": intent.session_id, **expect}, _CLOCK_FIELDS | {"version"}
    # Every write of the row moves its version by one.
    return {**state, **expect, "version": state["version"] + 1}, _CLOCK_FIELDS


def _difference(expected: dict[str, Any] | None, found: dict[str, Any] | None) -> str:
    if expected is None:
        return "present after recovery, but its last acknowledged write removed it (or it was never created)"
    if found is None:
        return "acknowledged, but missing after recovery"
    fields = [
        f"{name}: acknowledged={expected[name]!r} recovered={found.get(name)!r}"
        for name in expected
        if found.get(name) != expected[name]
    ]
    return "; ".join(fields)
