"""The rules for a session several replicas wrote at once, decided from the merged history.

Each replica stamps every invocation and every answer with ``time.monotonic()``, one clock
for every process on the host: an operation answered before another was invoked really
came first, and an operation takes effect between its invocation and its answer. An
operation of unknown outcome (in flight at a kill, or ``uncertain``) may have taken effect
or not; a ``fail`` did not. Per session:

- increments: the recovered ``request_count`` is the acknowledged increments plus some of
  those of unknown outcome, and no two acknowledged ``update_activity`` returned the same count;
- versions: no two acknowledged writes returned the same version, a compare-and-set that
  succeeded returned its ``expected_version`` + 1, the recovered version is not behind any;
- merges: every acknowledged merge key is present with its value (unless a write that may
  have come after it set it), and no key is present that no operation wrote;
- compare-and-set logs (``update(data={"log": [...]}, expected_version=v)``, where the last
  element is the write's id): every acknowledged id exactly once, in the order of the
  versions the acks returned, no refused id, nothing unknown;
- whole updates: an update of several fields, one of which shows in the row with a value
  no other operation gave it, set all of them (or a write that may have come later did);
- last writer: a field set by plain updates holds the value of the acknowledged update with
  the highest returned version, or of one of unknown outcome;
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
from collections.abc import Iterable

from .history import Operation, Problem, State

# The operations whose effect the checks know; anything else is an application's own.
_KNOWN_OPERATIONS = frozenset({"ensure", "update", "merge_data", "update_activity", "request", "get", "remove"})
_INCREMENTS = frozenset({"update_activity", "request"})
# Operations that change the row whenever they succeed (ensure of a live session does not).
_WRITES = frozenset({"update", "merge_data", "update_activity"})
_READS = frozenset({"get", "request"})
_LAST_WRITER_FIELDS = ("metadata", "user_id", "user_type", "ip_address", "user_agent", "expires_at", "state")


def judge(operations: list[Operation], before: State, found: State) -> list[Problem]:
    """The violations of the rules by the row ``found``; ``operations`` in the order they were invoked."""
    return _SessionCheck(operations, before, found).run()


class _SessionCheck:
    def __init__(self, operations: list[Operation], before: State, found: State) -> None:
        self.operations = operations
        self.before = before
        self.found = found
        self.violations: list[Problem] = []
        self.removals = [op for op in operations if op.name == "remove"]
        self.known = all(op.name in _KNOWN_OPERATIONS for op in operations)

    def violation(self, rule: str, problem: str, operations: Iterable[Operation]) -> None:
        self.violations.append((rule, problem, list(operations)))

    def run(self) -> list[Problem]:
        self.check_removal()
        if self.removals:
            # Its row may have restarted: counts, versions and data begin again, so only
            # the removal rules are decidable.
            return self.violations
        self.check_versions()
        self.check_whole_updates()
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

    # whole updates

    def check_whole_updates(self) -> None:
        """An update of several fields whose value of one is in the row set all of them."""
        if self.found is None:
            return
        for write in self.operations:
            fields = {name: value for name, value in write.args.items() if name != "expected_version"}
            if write.name != "update" or write.failed or len(fields) < 2:
                continue
            shown = [
                name for name, value in fields.items() if self.found.get(name) == value and self._only(write, name)
            ]
            if not shown:
                continue  # no field proves it took effect
            for name, value in fields.items():
                later = [
                    op
                    for op in self.operations
                    if op is not write and not op.failed and name in op.args and not op.committed_before(write)
                ]
                if self.found.get(name) != value and not later:
                    self.violation(
                        "whole update",
                        f"its {shown[0]} is in the row, but its {name} is not ({self.found.get(name)!r}): half applied",
                        [write],
                    )

    def _only(self, write: Operation, name: str) -> bool:
        """No other operation, and not the state before, gave ``name`` the value ``write`` gives it."""
        value = write.args[name]
        if (self.before or {}).get(name) == value:
            return False
        return not any(
            op is not write and (op.args.get(name) == value or (op.state or {}).get(name) == value)
            for op in self.operations
            if op.name != "update" or not op.failed
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
        # A row stored before the workload began counts on from what it held.
        count = self.found["request_count"] - (self.before or {}).get("request_count", 0)
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
            if not op.failed and (op.name == "merge_data" or (op.name in ("update", "ensure") and "data" in op.args))
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
        written: set[str] = set((self.before or {}).get("data", {}))
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
            elif op.failed:
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
