"""The rule on the order of acknowledgements, for either kind of history: versions never go back.

A session's version grows by one with every change of its row. So an operation that
started after another was acknowledged must see that version or a later one, and one that
changed the row a later one. A version that goes back means acknowledged writes were
lost and the session went on from an older row: a failover to a standby that had not
received them, where later writes then overwrote the loss in the final row.

A session that saw a removal is left out: its row may have begun again at version 1. For
replicas at once, reads are the "stale read" rule's (``many_writers.py``): here only writes.
"""

from __future__ import annotations

from .history import Operation, Problem

RULE = "versions go forward"
# Operations that change the row whenever they succeed.
_CHANGES = frozenset({"update", "merge_data", "update_activity"})


def judge(operations: list[Operation], *, reads: bool = True) -> list[Problem]:
    """The operations that saw a version older than one acknowledged before they started; ``reads``: reads too."""
    if any(op.name == "remove" for op in operations):
        return []
    answered = sorted((op for op in operations if op.ok and op.version is not None), key=_acked)
    judged = [op for op in answered if reads or op.name in _CHANGES]
    problems: list[Problem] = []
    latest: Operation | None = None  # the highest version acknowledged before the current start
    index = 0
    for op in sorted(judged, key=lambda op: op.intent_at):
        while index < len(answered) and _acked(answered[index]) < op.intent_at:
            earlier = answered[index]
            if latest is None or _version(earlier) > _version(latest):
                latest = earlier
            index += 1
        if latest is None:
            continue
        went_back = _version(op) < _version(latest) or (op.name in _CHANGES and _version(op) == _version(latest))
        if went_back:
            problems.append(
                (
                    RULE,
                    f"acknowledged v{_version(op)} after v{_version(latest)} was acknowledged: the session went on "
                    "from an older row, so acknowledged writes were lost",
                    [latest, op],
                )
            )
    return problems


def _acked(op: Operation) -> float:
    return op.ack_at if op.ack_at is not None else float("inf")


def _version(op: Operation) -> int:
    assert op.version is not None
    return op.version
