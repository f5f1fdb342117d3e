"""Exceptions of the core store: what went wrong and, where it helps, what to do."""

from __future__ import annotations


class ExaiSessionsError(Exception):
    """Base class of every error this package raises on purpose."""


class SessionLimitExceeded(ExaiSessionsError, RuntimeError):
    """Creating one more session would pass ``max_concurrent_sessions``."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Maximum concurrent sessions ({limit}) reached: remove or clean up sessions, "
            "or raise max_concurrent_sessions"
        )
        self.limit = limit


class SessionNotFound(ExaiSessionsError, KeyError):
    """No active, not timed-out session has this id."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"no active session {self.session_id!r} (unknown, removed, expired or timed out)"


class SessionConflict(ExaiSessionsError):
    """A compare-and-set write found another version than it expected; nothing was written."""

    def __init__(self, session_id: str, *, expected_version: int, current_version: int) -> None:
        super().__init__(session_id, expected_version, current_version)
        self.session_id = session_id
        self.expected_version = expected_version
        self.current_version = current_version

    def __str__(self) -> str:
        return (
            f"session {self.session_id!r} is at version {self.current_version}, not {self.expected_version}: "
            "another writer changed it; read it again and retry"
        )


class PersistenceError(ExaiSessionsError):
    """The database refused or could not be reached; the operation did not take effect.

    Unless it is a ``CommitUncertain``: then nobody can tell whether it did. Every other
    PersistenceError is a promise that nothing was written, so retrying is always safe.
    """


class CommitUncertain(PersistenceError):
    """The write may or may not have taken effect: the answer that would tell was lost.

    The connection broke after the statement was sent (the server crashed or ended the
    session, the network or our own deadline cut it off), or the write committed on this
    server but its wait for a synchronous standby was cancelled, so a failover may lose
    it. Read the session again before acting on it; retry only an idempotent write (an
    ``update`` of whole fields, ``update_activity`` with a ``request_id``).
    ``action``: what was attempted; ``reason``: why its outcome is unknown.
    """

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(
            f"{action} failed: its outcome is unknown, it may or may not have taken effect ({reason}); "
            "read it again before relying on it, and retry only an idempotent operation"
        )
        self.action = action
        self.reason = reason


class SchemaMissing(PersistenceError):
    """The database lacks the table, or a column, the store needs: the unified schema is not (fully) applied."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"public.sessions is not as the store needs it ({reason}): apply the unified schema's migrations "
            "to this database (exai-sessions migrate)"
        )
        self.reason = reason


class MigrationError(ExaiSessionsError):
    """A migration file could not be applied, or an applied one has changed since."""
