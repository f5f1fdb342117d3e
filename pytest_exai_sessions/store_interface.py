"""The interfaces of a session store: what a manager asks of one, and what crash tools do to one.

``SessionStore`` (PostgreSQL, store.py) and ``MemoryStore`` (this process only, memory.py)
implement both. ``SessionManager`` and compat speak only to these, so a manager in memory
and a persisted one run the same code; where the two stores differ (what survives the
process, where lifecycle events go), each store answers for itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from .models import Session, SessionMetrics

if TYPE_CHECKING:
    from .events import EventStore, SessionEvents


class SessionStorage(Protocol):
    """Where a manager keeps its sessions: every read and write it makes, each one step.

    A call given ``now`` and ``stale_before`` applies the one liveness rule
    (``models.is_live``) at that moment, and answers None for a session that is not live.
    What a call returns shares nothing with what the store keeps.
    """

    @property
    def persistent(self) -> bool:
        """True when what the store writes survives this process."""
        ...

    @property
    def kind(self) -> str:
        """How a manager's ``repr`` names where its sessions are: "persisted" or "in memory"."""
        ...

    def event_store(self) -> EventStore | None:
        """Where the lifecycle events of this store's changes go, or None for a store that has nowhere to put them."""
        ...

    async def check(self) -> None:
        """Raise unless the store can hold sessions (``SchemaMissing``: no table); reads no session."""
        ...

    async def close(self) -> None: ...

    async def create(
        self,
        session: Session,
        *,
        stale_before: datetime,
        now: datetime,
        limit: int | None = None,
        events: SessionEvents | None = None,
    ) -> Session | None:
        """Insert ``session`` or restart its id if no longer live; None while it is live or ``limit`` are."""
        ...

    async def fetch(self, session_id: str) -> Session | None:
        """The session in any state, live or not."""
        ...

    async def fetch_live(
        self, session_id: str, *, stale_before: datetime, now: datetime, confirmed: bool = False
    ) -> Session | None:
        """The live session; ``confirmed``: not before every commit it may have read is on the synchronous standbys."""
        ...

    async def record_request(
        self,
        session_id: str,
        *,
        duration_ms: int,
        now: datetime,
        stale_before: datetime,
        request_id: str | None = None,
    ) -> Session | None:
        """Count one request; with ``request_id``, only if that id is not among the session's last 32 counted."""
        ...

    async def record_requests(
        self,
        requests: Mapping[str, tuple[int, int]],
        *,
        now: datetime,
        stale_before: datetime,
        identified: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    ) -> list[Session]:
        """All or nothing: when one is not live, nothing is counted and only the live ones are returned.

        ``identified``: ``{session_id: [(request_id, duration_ms), ...]}``, each counted as
        ``record_request`` counts one with an id; their sessions are in ``requests`` too.
        """
        ...

    async def update(
        self,
        session_id: str,
        changes: Mapping[str, Any],
        *,
        now: datetime,
        stale_before: datetime,
        expected_version: int | None = None,
    ) -> Session | None:
        """Set ``changes`` and ``last_activity``; ``SessionConflict`` when not at ``expected_version``."""
        ...

    async def merge_data(
        self, session_id: str, patch: Mapping[str, Any], *, now: datetime, stale_before: datetime
    ) -> Session | None: ...

    async def delete(self, session_id: str, *, events: SessionEvents | None = None) -> bool: ...

    async def expire_stale(
        self, *, stale_before: datetime, now: datetime, events: SessionEvents | None = None, batch_size: int = 5000
    ) -> list[str]:
        """Mark every active session that is no longer live expired; return their ids."""
        ...

    async def live_ids(self, *, stale_before: datetime, now: datetime) -> list[str]: ...

    async def metrics(self, *, stale_before: datetime, now: datetime) -> SessionMetrics: ...

    def iter_live(self, *, stale_before: datetime, now: datetime, batch_size: int = 2000) -> AsyncIterator[Session]:
        """Every live session, however many (a complete recovery)."""
        ...


class CrashTestable(Protocol):
    """What crash tools do to a store and no application should: die, read every row, wipe it."""

    async def abandon(self) -> None:
        """Let go of everything at once, as a dying process would."""
        ...

    def read_live(self, *, stale_before: datetime, now: datetime) -> dict[str, Session]:
        """Every live session by id, without an event loop (a snapshot, also of an abandoned store)."""
        ...

    def iter_all(self, *, batch_size: int = 2000) -> AsyncIterator[Session]:
        """Every session, live or not."""
        ...

    async def delete_all(self) -> int:
        """Delete every session; return how many (a test that starts afresh)."""
        ...


class ManagedStorage(SessionStorage, CrashTestable, Protocol):
    """The store a ``SessionManager`` holds: it serves through ``SessionStorage``; its
    ``abandon()``, ``live_sessions()`` and the crash tools (through ``manager.store``) use
    ``CrashTestable``."""
