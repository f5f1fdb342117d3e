"""The verdict of a crash test: the whole history against every row the database holds after it.

Each session the history names is judged by one of two rule sets:

- a history of one process (``run_and_kill``): the row must be exactly the state of its
  last ``ok`` operation, or that state with some of its operations of unknown outcome
  wholly applied (``one_writer.py``). A ``fail`` changes nothing, so its effect must be absent;
- a history of replicas run at once (``run_replicas``), ordered only by time: the rules of
  ``many_writers.py`` (increments, versions, merges, compare-and-set logs, last writer,
  removal, presence, stale reads), where a ``fail`` wrote nothing too.

Both also get the rule of ``real_time.py``: versions never go back, so a lost acknowledged
write shows even when later writes replaced it in the final row.

Every other row must be explained by the state before the workload began (``initial``):
a row no operation touched is either exactly as it was, or a violation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ...models import Session
from . import many_writers, one_writer, real_time
from .history import History, Operation, State


@dataclass
class Violation:
    session_id: str
    problem: str
    # The rule broken; None for the one-writer rule, whose problem names the fields.
    rule: str | None = None
    operations: list[Operation] = field(default_factory=list)

    def __str__(self) -> str:
        rule = f" [{self.rule}]" if self.rule else ""
        lines = [f"session {self.session_id!r}{rule}: {self.problem}"]
        lines += [f"    {operation}" for operation in self.operations[:20]]
        if len(self.operations) > 20:
            lines.append(f"    ... and {len(self.operations) - 20} more operations")
        return "\n".join(lines)


@dataclass
class CrashReport:
    """What a crash test found; ``assert_ok()`` fails naming each violation.

    Counts: ``acknowledged`` operations the store answered (``ok`` or ``fail``), of which
    ``failed`` were refused (they must have written nothing); ``uncertain`` ones that raised
    without an answer (present or absent, never in part); ``in_flight`` ones that never
    completed; ``sessions_checked`` sessions the history names; ``recovered`` rows in state
    ``active`` after recovery.
    """

    killed: list[str]
    replicas: int
    acknowledged: int
    uncertain: int
    in_flight: int
    sessions_checked: int
    recovered: int
    violations: list[Violation] = field(default_factory=list)
    fault_points: list[str] = field(default_factory=list)
    failed: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def killed_at(self) -> str:
        """Where the fault fired (``after 0.8s``, ``at fault point 'x'``, ...); ``;`` between several."""
        return "; ".join(self.killed)

    @property
    def kill_points(self) -> int:
        return len(self.killed)

    def violations_of(self, session_id: str) -> list[Violation]:
        return [v for v in self.violations if v.session_id == session_id]

    def assert_ok(self) -> None:
        if self.violations:
            lines = "\n".join(str(v) for v in self.violations[:30])
            more = f"\n... and {len(self.violations) - 30} more" if len(self.violations) > 30 else ""
            raise AssertionError(
                f"{len(self.violations)} violations of the acknowledged history ({self.summary()}):\n{lines}{more}"
            )

    def summary(self) -> str:
        killed = f"killed {self.killed_at}" if self.killed else "nothing killed"
        return (
            f"{killed}: {self.replicas} replicas, {self.acknowledged} acknowledged ({self.failed} refused), "
            f"{self.uncertain} uncertain, "
            f"{self.in_flight} in flight, {self.sessions_checked} sessions checked, {self.recovered} recovered, "
            f"{len(self.violations)} violations"
        )


def check(
    history: History, rows: Mapping[str, Session], *, initial: Mapping[str, Session] | None = None
) -> CrashReport:
    """Judge ``rows`` (every stored session, live or not, by id) against ``history``.

    ``initial``: the rows stored before the workload began (none if not given).
    """
    before = {session_id: _dump(row) for session_id, row in (initial or {}).items()}
    by_session: dict[str, list[Operation]] = {}
    for operation in history.operations:
        by_session.setdefault(operation.session_id, []).append(operation)
    violations: list[Violation] = []
    for session_id, operations in by_session.items():
        found = _dump(rows.get(session_id))
        rules = many_writers if history.many_writers else one_writer
        problems = rules.judge(operations, before.get(session_id), found) + real_time.judge(
            operations, reads=not history.many_writers
        )
        violations += [Violation(session_id, problem, rule, ops) for rule, problem, ops in problems]
    for session_id in sorted((rows.keys() | before.keys()) - by_session.keys()):
        problem = _unexplained(before.get(session_id), _dump(rows.get(session_id)))
        if problem:
            violations.append(Violation(session_id, problem, "unexplained row"))
    return CrashReport(
        killed=list(history.faults),
        replicas=len(history.replicas),
        acknowledged=history.acknowledged,
        uncertain=history.count("uncertain"),
        in_flight=history.count(None),
        sessions_checked=len(by_session),
        recovered=sum(1 for row in rows.values() if row.state == "active"),
        violations=violations,
        fault_points=list(history.fault_points),
        failed=history.count("fail"),
    )


def _dump(session: Session | None) -> State:
    return None if session is None else session.model_dump(mode="json")


def _unexplained(before: State, found: State) -> str | None:
    if before is None:
        assert found is not None
        return (
            f"stored after recovery ({found['state']}, v{found['version']}), "
            "but no recorded operation wrote it and it was not there before"
        )
    if found is None:
        return "stored before the workload began, missing after recovery, and no recorded operation removed it"
    if found != before:
        return "changed, but no recorded operation touched it: " + one_writer.difference(before, found)
    return None
