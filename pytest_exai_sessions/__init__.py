"""Persistent PostgreSQL-backed sessions, and a pytest plugin that proves they survive a crash.

Importing this package does not import pytest: applications use the core in production.
"""

from .clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock
from .errors import (
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
from .testing.db_clock import DbClock
from .testing.recovery import RecoveryDiff, assert_full_recovery, compare_snapshots, snapshot
from .testing.rls import ActingAs, as_role, as_service_role, as_user

__all__ = [
    "SYSTEM_CLOCK",
    "ActingAs",
    "Clock",
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
