"""Snapshots of a manager's sessions and a comparison that says exactly what differs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..models import Session

if TYPE_CHECKING:
    from ..manager import SessionManager

Snapshot = dict[str, Session]


def snapshot(source: SessionManager | Mapping[str, Session]) -> Snapshot:
    """What a manager would serve (every live session in its store), or a mapping of sessions, by id.

    Read from the database, not from anything a manager keeps in memory: after a crash, the
    database is all there is.
    """
    if isinstance(source, Mapping):
        return dict(source)
    return source.live_sessions()


@dataclass
class RecoveryDiff:
    """What separates two snapshots: sessions missing, extra, or with differing fields."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    compared: int = 0

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.changed)

    def lines(self, limit: int = 50) -> list[str]:
        """Human-readable lines, one per problem (at most ``limit``, then a count of the rest)."""
        problems: list[str] = [f"missing after recovery: {sid!r}" for sid in self.missing]
        problems += [f"extra after recovery: {sid!r}" for sid in self.extra]
        for sid, fields in self.changed.items():
            for name, (before, after) in fields.items():
                problems.append(f"session {sid!r} field {name}: before={before!r} after={after!r}")
        if len(problems) > limit:
            problems = [*problems[:limit], f"... and {len(problems) - limit} more"]
        return problems

    def summary(self) -> str:
        return (
            f"{self.compared} sessions before: {len(self.missing)} missing, {len(self.extra)} extra, "
            f"{len(self.changed)} with different fields"
        )


def compare_snapshots(before: Mapping[str, Session], after: Mapping[str, Session]) -> RecoveryDiff:
    diff = RecoveryDiff(compared=len(before))
    diff.missing = sorted(set(before) - set(after))
    diff.extra = sorted(set(after) - set(before))
    for session_id in sorted(set(before) & set(after)):
        old, new = before[session_id].model_dump(), after[session_id].model_dump()
        fields = {name: (old[name], new[name]) for name in old if old[name] != new[name]}
        if fields:
            diff.changed[session_id] = fields
    return diff


def assert_full_recovery(
    before: SessionManager | Mapping[str, Session], after: SessionManager | Mapping[str, Session]
) -> None:
    """Pass when both hold the same sessions with every persisted field equal.

    Otherwise raise AssertionError listing each missing, extra or different session
    with the fields that differ.
    """
    diff = compare_snapshots(snapshot(before), snapshot(after))
    if diff:
        raise AssertionError("sessions not fully recovered: " + diff.summary() + "\n" + "\n".join(diff.lines()))
