"""Checking the merged history of several crashed replicas against what the database recovered.

Each replica (a child process, see ``workload.py``) records every operation's intent and,
once the awaited call returned, its acknowledgement, both with the replica's number and a
``time.monotonic()`` reading. CLOCK_MONOTONIC is one clock for every process on the host,
so an acknowledgement that happened before another operation's intent really came first:
an operation commits between its intent and its acknowledgement.

The checks (``HistoryBook.check``), per session:

- increments: the recovered ``request_count`` is the acknowledged increments plus some of
  those in flight, and no two acknowledged ``update_activity`` returned the same count;
- versions: no two acknowledged writes returned the same version, a compare-and-set that
  succeeded returned its ``expected_version`` + 1, the recovered version is not behind any;
- merges: every acknowledged merge key is present with its value (unless a write that may
  have come after it set it), and no key is present that no operation wrote;
- compare-and-set logs (``update(data={"log": [...]}, expected_version=v)``, where the last
  element is the write's id): every acknowledged id exactly once, in the order of the
  versions the acks returned, no refused id, nothing unknown;
- last writer: a field set by plain updates holds the value of the acknowledged update with
  the highest returned version, or of one in flight;
- removal: no read (``get``, ``request``) that started after a removal was acknowledged was
  served, and the row is gone at the end, unless something created it again meanwhile;
- presence: a session acknowledged and never removed is live after recovery;
- stale read: a ``get`` that started after a write was acknowledged served that write's
  version or a later one (per session, reads are linearizable with the writes).

A check only runs where the session's history makes it decidable: a session that also saw
an application's own operations (``ctx.operation``, effects unknown) gets the removal and
version checks only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models import Session

# The operations whose effect the checks know; anything else is an application's own.
_KNOWN_OPERATIONS = frozenset({"ensure", "update", "merge_data", "update_activity", "request", "get", "remove"})
_INCREMENTS = frozenset({"update_activity", "request"})
# Operations that change the row whenever they succeed (ensure of a live session does not).
_WRITES = frozenset({"update", "merge_data", "update_activity"})
_READS = frozenset({"get", "request"})
_LAST_WRITER_FIELDS = ("metadata", "user_id", "user_type", "ip_address", "user_agent", "expires_at", "state")


@dataclass
class Operation:
    """One operation of one replica: its intent and, unless it was in flight, its outcome."""

    replica: int
    sequence: int
    session_id: str
    name: str
    args: dict[str, Any]
    intent_at: float
    ack_at: float | None = None
    # "ok" (returned), "conflict" (compare-and-set refused), "not_found"; None: in flight.
    outcome: str | None = None
    state: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def in_flight(self) -> bool:
        return self.outcome is None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

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
        """Certainly took effect before ``other`` did: acknowledged before it started."""
        return self.ack_at is not None and self.ack_at < other.intent_at

    def __str__(self) -> str:
        args = "".join(f" {name}={value!r}" for name, value in self.args.items())
        if self.in_flight:
            outcome = "in flight"
        elif self.outcome == "ok":
            returned = "None" if self.state is None else f"v{self.version}"
            outcome = f"ok -> {returned}"
        elif self.outcome == "conflict":
            outcome = f"conflict (current v{self.details.get('current_version')})"
        else:
            outcome = self.outcome or ""
        return f"replica {self.replica} #{self.sequence} {self.name}{args}: {outcome}"


@dataclass
class Violation:
    session_id: str
    rule: str
    problem: str
    operations: list[Operation] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"session {self.session_id!r} [{self.rule}]: {self.problem}"]
        lines += [f"    {operation}" for operation in self.operations[:20]]
        if len(self.operations) > 20:
            lines.append(f"    ... and {len(self.operations) - 20} more operations")
        return "\n".join(lines)


@dataclass
class HistoryReport:
    """What a multi-writer crash test found; ``assert_ok()`` fails naming each violation."""

    replicas: int
    killed: list[str]
    acknowledged: int
    in_flight: int
    sessions_checked: int
    recovered: int
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

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
        return (
            f"{self.replicas} replicas, {self.kill_points} killed, {self.acknowledged} acknowledged, "
            f"{self.in_flight} in flight, {self.sessions_checked} sessions checked, {self.recovered} recovered, "
            f"{len(self.violations)} violations"
        )


class HistoryBook:
    """Merges the ledger records of any number of replicas into one history per session."""

    def __init__(self) -> None:
        self.replicas: set[int] = set()
        self.killed: list[str] = []
        self.finished: set[int] = set()
        self._operations: dict[tuple[int, int], Operation] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        kind = record["t"]
        replica = int(record.get("r", 0))
        self.replicas.add(replica)
        if kind == "intent":
            self._operations[replica, record["seq"]] = Operation(
                replica=replica,
                sequence=record["seq"],
                session_id=record["sid"],
                name=record["op"],
                args=dict(record["args"]),
                intent_at=record["at"],
            )
        elif kind in ("ack", "refused"):
            operation = self._operations[replica, record["seq"]]
            operation.ack_at = record["at"]
            operation.outcome = "ok" if kind == "ack" else record["outcome"]
            operation.state = record.get("state")
            operation.details = dict(record.get("details") or {})
        elif kind == "done":
            self.finished.add(replica)
        # "ready" and "fault" only matter to the process driving the child.

    def add_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.add(record)

    def mark_killed(self, replica: int, description: str) -> None:
        self.killed.append(f"replica {replica} {description}")

    @property
    def operations(self) -> list[Operation]:
        return sorted(self._operations.values(), key=lambda op: op.intent_at)

    def check(self, rows: Mapping[str, Session]) -> HistoryReport:
        """Compare every stored row (``rows``: all of them, live or not, by id) with the history."""
        by_session: dict[str, list[Operation]] = {}
        for operation in self.operations:
            by_session.setdefault(operation.session_id, []).append(operation)
        violations: list[Violation] = []
        for session_id, operations in by_session.items():
            found = rows.get(session_id)
            violations += _SessionCheck(session_id, operations, found).run()
        acknowledged = sum(1 for op in self._operations.values() if not op.in_flight)
        return HistoryReport(
            replicas=len(self.replicas),
            killed=list(self.killed),
            acknowledged=acknowledged,
            in_flight=len(self._operations) - acknowledged,
            sessions_checked=len(by_session),
            recovered=sum(1 for row in rows.values() if row.state == "active"),
            violations=violations,
        )


class _SessionCheck:
    def __init__(self, session_id: str, operations: list[Operation], found: Session | None) -> None:
        self.session_id = session_id
        self.operations = operations  # in order of intent
        self.found = None if found is None else found.model_dump(mode="json")
        self.violations: list[Violation] = []
        self.removals = [op for op in operations if op.name == "remove"]
        self.known = all(op.name in _KNOWN_OPERATIONS for op in operations)

    def violation(self, rule: str, problem: str, operations: Iterable[Operation]) -> None:
        self.violations.append(Violation(self.session_id, rule, problem, list(operations)))

    def run(self) -> list[Violation]:
        self.check_removal()
        if self.removals:
            # Its row may have restarted: counts, versions and data begin again, so only
            # the removal rules are decidable.
            return self.violations
        self.check_versions()
        if self.known:
            self.check_presence()
            if self.found is not None:
                self.check_increments()
                self.check_merges()
                self.check_logs()
                self.check_last_writer()
        return self.violations

    # removal

    def _recreated_after(self, removal: Operation, before: float | None) -> bool:
        """An ensure that may have created the session again after ``removal`` committed."""
        return any(
            op.name == "ensure"
            and (op.ack_at is None or removal.ack_at is None or op.ack_at > removal.ack_at)
            and (before is None or op.intent_at < before)
            for op in self.operations
        )

    def check_removal(self) -> None:
        acknowledged = [op for op in self.removals if op.ok and op.ack_at is not None]
        if not acknowledged:
            return
        first = min(acknowledged, key=lambda op: op.ack_at or 0.0)
        for read in self.operations:
            if read.name not in _READS or not read.served or read.ack_at is None:
                continue
            for removal in acknowledged:
                if removal.committed_before(read) and not self._recreated_after(removal, read.ack_at):
                    self.violation(
                        "served after removal",
                        f"a {read.name} that started after the removal was acknowledged was served",
                        [removal, read],
                    )
                    break
        last = max(acknowledged, key=lambda op: op.ack_at or 0.0)
        if self.found is not None and not self._recreated_after(last, None):
            self.violation(
                "present after removal",
                f"its removal was acknowledged, but a row ({self.found['state']}, v{self.found['version']}) is stored",
                [first, last] if first is not last else [last],
            )

    # versions

    def check_versions(self) -> None:
        writes = [op for op in self.operations if op.name in _WRITES and op.ok and op.version is not None]
        by_version: dict[int, list[Operation]] = {}
        for write in writes:
            by_version.setdefault(write.version or 0, []).append(write)
        for version, same in sorted(by_version.items()):
            if len(same) > 1:
                self.violation(
                    "one version, two writes",
                    f"{len(same)} acknowledged writes returned version {version}: one of them was lost or merged",
                    same,
                )
        for write in writes:
            if write.expected_version is not None and write.version != write.expected_version + 1:
                self.violation(
                    "compare-and-set",
                    f"a compare-and-set at v{write.expected_version} returned v{write.version}, not "
                    f"v{write.expected_version + 1}",
                    [write],
                )
        for read in self.operations:
            if read.name != "get" or not read.served or read.version is None:
                continue
            seen = [write for write in writes if write.committed_before(read) and (write.version or 0) > read.version]
            if seen:
                newest = max(seen, key=lambda op: op.version or 0)
                self.violation(
                    "stale read",
                    f"a get that started after v{newest.version} was acknowledged served v{read.version}",
                    [newest, read],
                )
        if self.found is not None and writes:
            newest = max(writes, key=lambda op: op.version or 0)
            if self.found["version"] < (newest.version or 0):
                self.violation(
                    "version went back",
                    f"recovered at v{self.found['version']}, behind the acknowledged v{newest.version}",
                    [newest],
                )

    # presence

    def check_presence(self) -> None:
        created = [op for op in self.operations if op.ok and op.state is not None and op.name != "get"]
        if not created:
            return
        if self.found is None or self.found["state"] != "active":
            what = "missing" if self.found is None else f"stored as {self.found['state']}"
            self.violation("lost session", f"acknowledged and never removed, but {what} after recovery", created[-1:])

    # increments

    def check_increments(self) -> None:
        assert self.found is not None
        increments = [op for op in self.operations if op.name in _INCREMENTS]
        # A request whose counting found the session gone counted nothing.
        acknowledged = [op for op in increments if op.ok]
        in_flight = [op for op in increments if op.in_flight]
        count = self.found["request_count"]
        if not len(acknowledged) <= count <= len(acknowledged) + len(in_flight):
            if count < len(acknowledged):
                problem = f"request_count is {count}, but {len(acknowledged)} increments were acknowledged"
            else:
                problem = (
                    f"request_count is {count}: more than the {len(acknowledged)} acknowledged increments "
                    f"and {len(in_flight)} in flight"
                )
            self.violation("increments", problem, acknowledged + in_flight)
        counted: dict[int, list[Operation]] = {}
        for op in acknowledged:
            if op.name == "update_activity" and op.state is not None:
                counted.setdefault(op.state["request_count"], []).append(op)
        for value, same in sorted(counted.items()):
            if len(same) > 1:
                self.violation(
                    "increments", f"{len(same)} acknowledged increments all returned request_count {value}", same
                )
        durations = sum(op.args.get("request_duration_ms", 0) for op in acknowledged if op.name == "update_activity")
        if self.found["total_duration_ms"] < durations:
            self.violation(
                "increments",
                f"total_duration_ms is {self.found['total_duration_ms']}, below the {durations} acknowledged",
                [op for op in acknowledged if op.name == "update_activity"],
            )

    # merges

    def _data_writers(self) -> list[Operation]:
        return [
            op
            for op in self.operations
            if op.outcome not in ("conflict", "not_found")
            and (op.name == "merge_data" or (op.name in ("update", "ensure") and "data" in op.args))
        ]

    def check_merges(self) -> None:
        assert self.found is not None
        merges = [op for op in self.operations if op.name == "merge_data"]
        if not merges:
            return
        data = self.found["data"]
        writers = self._data_writers()
        for merge in merges:
            if not merge.ok:
                continue
            for key, value in merge.args["patch"].items():
                later = [
                    op
                    for op in writers
                    if op is not merge
                    and not op.committed_before(merge)
                    and (op.name != "merge_data" or key in op.args["patch"])
                ]
                if later:
                    continue  # another write may have set it after this one
                if key not in data:
                    self.violation("merge", f"acknowledged merge key {key!r} is missing", [merge])
                elif data[key] != value:
                    self.violation("merge", f"acknowledged merge key {key!r} is {data[key]!r}, not {value!r}", [merge])
        written: set[str] = set()
        for op in writers:
            written |= set(op.args["patch"] if op.name == "merge_data" else op.args["data"])
        unknown = sorted(set(data) - written)
        if unknown:
            self.violation("merge", f"keys {unknown} are present, but no operation wrote them", [])

    # compare-and-set logs

    def check_logs(self) -> None:
        assert self.found is not None
        writers = [
            op for op in self.operations if op.name == "merge_data" or (op.name == "update" and "data" in op.args)
        ]
        log_writes = [
            op
            for op in writers
            if op.name == "update"
            and op.expected_version is not None
            and isinstance(op.args.get("data", {}).get("log"), list)
            and op.args["data"]["log"]
        ]
        if not log_writes or len(log_writes) != len(writers):
            return  # not a log kept by compare-and-set alone
        log = self.found["data"].get("log")
        if not isinstance(log, list):
            self.violation("compare-and-set log", f"data['log'] is {log!r}, not a list", log_writes)
            return
        by_id = {op.args["data"]["log"][-1]: op for op in log_writes}
        duplicates = sorted({entry for entry in log if log.count(entry) > 1}, key=str)
        for entry in duplicates:
            self.violation(
                "compare-and-set log",
                f"write {entry!r} is in the log {log.count(entry)} times: applied twice",
                [by_id[entry]] if entry in by_id else [],
            )
        for entry in log:
            op = by_id.get(entry)
            if op is None:
                self.violation("compare-and-set log", f"{entry!r} is in the log, but no write of it is known", [])
            elif op.outcome == "conflict":
                self.violation("compare-and-set log", f"write {entry!r} was refused, yet it is in the log", [op])
        acknowledged = sorted((op for op in log_writes if op.ok), key=lambda op: op.version or 0)
        for op in acknowledged:
            entry = op.args["data"]["log"][-1]
            if entry not in log:
                self.violation("compare-and-set log", f"acknowledged write {entry!r} is lost", [op])
            returned = (op.state or {}).get("data", {}).get("log")
            if returned != log[: len(returned or [])]:
                self.violation(
                    "compare-and-set log",
                    f"write {entry!r} returned a log that is not how the final log begins",
                    [op],
                )
        positions = [
            (log.index(op.args["data"]["log"][-1]), op) for op in acknowledged if op.args["data"]["log"][-1] in log
        ]
        for (earlier, first), (later, second) in itertools.pairwise(positions):
            if later < earlier:
                self.violation(
                    "compare-and-set log",
                    "acknowledged writes are in the log in another order than the versions they returned",
                    [first, second],
                )

    # last writer

    def check_last_writer(self) -> None:
        assert self.found is not None
        for name in (*_LAST_WRITER_FIELDS, "data"):
            setters = [op for op in self.operations if op.name == "update" and name in op.args]
            if not setters:
                continue
            if name == "data" and any(op.name == "merge_data" for op in self.operations):
                continue  # merges change data too: the merge rules judge it
            acknowledged = [op for op in setters if op.ok and op.version is not None]
            allowed = [op.args[name] for op in setters if op.in_flight]
            if acknowledged:
                newest = max(acknowledged, key=lambda op: op.version or 0)
                allowed.append(newest.args[name])
                blame = [newest]
            else:
                created = [op for op in self.operations if op.name == "ensure" and op.ok and op.state is not None]
                if not created:
                    continue
                allowed.append(created[0].state[name] if created[0].state else None)
                blame = created[:1]
            if self.found[name] not in allowed:
                self.violation(
                    "last writer",
                    f"{name} is {self.found[name]!r}: neither the acknowledged update with the highest version "
                    "nor one in flight",
                    blame + [op for op in setters if op.in_flight],
                )
