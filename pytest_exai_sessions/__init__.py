"""Persistent PostgreSQL-backed sessions, and a pytest plugin that proves they survive a crash.

Importing this package imports the core only (no pytest, no testing tool, no server):
applications use it in production. The testing names re-exported here (``DbClock``,
``assert_full_recovery``, the RLS helpers, ...) are imported on first use.
"""

from importlib import import_module
from typing import Any

from .clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock
from .errors import (
    CommitUncertain,
    ExaiSessionsError,
    MigrationError,
    PersistenceError,
    SchemaMissing,
    SessionConflict,
    SessionLimitExceeded,
    SessionNotFound,
)
from .events import EventStore, SessionLifecycle
from .manager import SessionManager
from .models import (
    ErrorSummary,
    Event,
    EventSeverity,
    EventStatus,
    PerformanceMetrics,
    RecentEvent,
    RecordedEvent,
    Session,
    SessionState,
    UserType,
)
from .schema import apply_migrations, load_migrations, migration_status
from .store import SessionStore

# Testing tools, re-exported lazily: the module of each name.
_TESTING_NAMES = {
    "DbClock": "db_clock",
    "RecoveryDiff": "recovery",
    "assert_full_recovery": "recovery",
    "compare_snapshots": "recovery",
    "snapshot": "recovery",
    "ActingAs": "rls",
    "as_role": "rls",
    "as_service_role": "rls",
    "as_user": "rls",
}


def __getattr__(name: str) -> Any:
    module = _TESTING_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.testing.{module}"), name)
    globals()[name] = value  # once is enough
    return value


__all__ = [
    "SYSTEM_CLOCK",
    "ActingAs",
    "Clock",
    "CommitUncertain",
    "DbClock",
    "ErrorSummary",
    "Event",
    "EventSeverity",
    "EventStatus",
    "EventStore",
    "ExaiSessionsError",
    "ManualClock",
    "MigrationError",
    "PerformanceMetrics",
    "PersistenceError",
    "RecentEvent",
    "RecordedEvent",
    "RecoveryDiff",
    "SchemaMissing",
    "Session",
    "SessionConflict",
    "SessionLifecycle",
    "SessionLimitExceeded",
    "SessionManager",
    "SessionNotFound",
    "SessionState",
    "SessionStore",
    "SystemClock",
    "UserType",
    "apply_migrations",
    "as_role",
    "as_service_role",
    "as_user",
    "assert_full_recovery",
    "compare_snapshots",
    "load_migrations",
    "migration_status",
    "snapshot",
]
