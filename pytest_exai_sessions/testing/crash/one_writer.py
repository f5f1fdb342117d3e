"""The rule for a session one replica wrote: its row is exactly what the history allows.

With no operation of unknown outcome, the row equals the state of the last ``ok``
operation (or the state before the workload, if none). With some, it may also equal that
state with some of them wholly applied; anything else (half an update, a lost acknowledged
write, a refused write's effect) is a violation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from .history import Operation, Problem, State

# Fields a write sets to "now": their exact value is unknown for a write in flight.
_CLOCK_FIELDS = frozenset({"last_activity", "created_at"})
_MAX_IN_FLIGHT_COMBINATIONS = 4


def judge(operations: list[Operation], before: State, found: State) -> list[Problem]:
    acknowledged = [op for op in operations if op.ok]
    expected = max(acknowledged, key=lambda op: op.ack_at or 0.0).state if acknowledged else before
    if found == expected:
        return []
    unknown = [op for op in operations if op.in_flight]
    if not unknown:
        return [(None, difference(expected, found), [])]
    for applied in _subsets(unknown):
        if _matches_applied(expected, applied, found):
            return []
    names = ", ".join(f"{op.name}{op.args or ''}" for op in unknown)
    problem = f"neither the acknowledged state nor it with [{names}] wholly applied: " + difference(expected, found)
    return [(None, problem, [])]


def _subsets(operations: list[Operation]) -> Iterable[list[Operation]]:
    if len(operations) > _MAX_IN_FLIGHT_COMBINATIONS:
        # Too many to enumerate: accept any order-preserving prefix.
        return (operations[:n] for n in range(1, len(operations) + 1))
    return (
        list(combination)
        for size in range(1, len(operations) + 1)
        for combination in itertools.combinations(operations, size)
    )


def _matches_applied(base: State, operations: list[Operation], found: State) -> bool:
    expected = base
    unknown: frozenset[str] = frozenset()
    for operation in operations:
        expected, unknown_now = _apply(expected, operation)
        unknown |= unknown_now
    if expected is None or found is None:
        return expected is found
    return all(found.get(name) == value for name, value in expected.items() if name not in unknown)


def _apply(state: State, operation: Operation) -> tuple[State, frozenset[str]]:
    """The state after ``operation`` took effect, and the fields whose new value cannot be known."""
    name = operation.name
    if name == "remove":
        return None, frozenset()
    if name == "get":
        return state, frozenset()
    if name in ("update_activity", "request"):
        if state is None:
            return None, frozenset()
        duration = operation.args.get("request_duration_ms", 0)
        # A request's duration is measured inside the workload: any non-negative addition fits.
        unknown = _CLOCK_FIELDS | ({"total_duration_ms"} if name == "request" else frozenset())
        return {
            **state,
            "request_count": state["request_count"] + 1,
            "total_duration_ms": state["total_duration_ms"] + duration,
            "version": state["version"] + 1,
        }, unknown
    if name == "ensure" and state is not None:
        return state, frozenset()  # ensure of a live session changes nothing
    expect = operation.expect
    if expect is None:
        # An application's operation that did not say what it sets: only "it loads" is checked.
        return (state or {}), frozenset(state or {}) | {"session_id", "state"}
    if state is None:
        # Created by this write: only what it was given is known (a restarted id's version
        # goes on from the old row's, which the history may not know).
        return {"session_id": operation.session_id, **expect}, _CLOCK_FIELDS | {"version"}
    # Every write of the row moves its version by one.
    return {**state, **expect, "version": state["version"] + 1}, _CLOCK_FIELDS


def difference(expected: State, found: State) -> str:
    if expected is None:
        return "present after recovery, but its last acknowledged write removed it (or it was never created)"
    if found is None:
        return "acknowledged, but missing after recovery"
    fields: list[Any] = [
        f"{name}: acknowledged={expected[name]!r} recovered={found.get(name)!r}"
        for name in expected
        if found.get(name) != expected[name]
    ]
    return "; ".join(fields)
