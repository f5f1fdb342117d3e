"""MemoryStore: the store interface over a dict, for a manager without a database.

It implements ``store_interface.ManagedStorage`` as ``SessionStore`` does, and follows its
SQL statement for statement: the same liveness rule (``models.is_live``), the same
counters, the same answers (None for a session that is not live, all or nothing for a
batch). What it hands out shares nothing with what it keeps, as rows read back from jsonb
share nothing with the objects that were written. Nothing survives the process:
``persistent`` is False. Lifecycle events go to the database, so it has no
``event_store()`` and records none.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self

from .errors import SessionConflict
from .models import Session, SessionMetrics, SessionState, check_json_object
from .store_interface import ManagedStorage

if TYPE_CHECKING:
    from .events import EventStore, SessionEvents


# How many request ids a session remembers, as sql/011_request_ids.sql keeps them.
RECENT_REQUEST_IDS = 32


def _copy(session: Session, **changes: Any) -> Session:
    """A copy whose JSON fields share nothing with ``session``'s (or the caller's) objects."""
    fields = {"data": session.data, "metadata": session.metadata, **changes}
    for name in ("data", "metadata"):
        fields[name] = json.loads(json.dumps(fields[name]))
    return session.model_copy(update=fields)


class MemoryStore(ManagedStorage):
    """Sessions in this process only; the interface and behaviour of ``SessionStore``."""

    persistent = False
    kind = "in memory"

    def __init__(self) -> None:
        self._rows: dict[str, Session] = {}
        # Each session's recent_request_ids column: a retried request id is not counted again.
        self._recent_request_ids: dict[str, list[str]] = {}

    def event_store(self) -> EventStore | None:
        """None: there is no database to record lifecycle events in."""
        return None

    async def close(self) -> None:
        """Nothing to release."""

    async def abandon(self) -> None:
        """Nothing to drop: what a dying process kept in memory dies with it."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _live(self, session_id: str, *, stale_before: datetime, now: datetime) -> Session | None:
        row = self._rows.get(session_id)
        if row is None or not row.is_live(now, stale_before=stale_before):
            return None
        return row

    async def create(
        self,
        session: Session,
        *,
        stale_before: datetime,
        now: datetime,
        limit: int | None = None,
        events: SessionEvents | None = None,
    ) -> Session | None:
        """Insert ``session``, or restart a row under its id that is no longer live.

        None while a live session holds the id, or when ``limit`` sessions are live.
        """
        _no_events(events)
        live = sum(1 for row in self._rows.values() if row.is_live(now, stale_before=stale_before))
        if (limit is not None and live >= limit) or self._live(
            session.session_id, stale_before=stale_before, now=now
        ) is not None:
            return None
        old = self._rows.get(session.session_id)
        # A restarted id goes on from the old row's version, as in the database.
        version = 1 if old is None else old.version + 1
        self._rows[session.session_id] = _copy(session, version=version)
        return _copy(self._rows[session.session_id])

    async def check(self) -> None:
        """Nothing to check: the dict is always there."""

    async def fetch(self, session_id: str) -> Session | None:
        """The row of ``session_id`` in any state, live or not."""
        row = self._rows.get(session_id)
        return None if row is None else _copy(row)

    async def fetch_live(
        self, session_id: str, *, stale_before: datetime, now: datetime, confirmed: bool = False
    ) -> Session | None:
        row = self._live(session_id, stale_before=stale_before, now=now)
        return None if row is None else _copy(row)

    async def record_request(
        self,
        session_id: str,
        *,
        duration_ms: int,
        now: datetime,
        stale_before: datetime,
        request_id: str | None = None,
    ) -> Session | None:
        """Count one request (with ``request_id``: unless counted already); None when no live session has the id."""
        if self._live(session_id, stale_before=stale_before, now=now) is None:
            return None
        count, duration = (1, duration_ms)
        if request_id is not None:
            count, duration = self._count_new(session_id, [(request_id, duration_ms)])
        return await self._change(
            session_id,
            stale_before=stale_before,
            now=now,
            changes_of=lambda row: {
                "request_count": row.request_count + count,
                "total_duration_ms": row.total_duration_ms + duration,
            },
        )

    async def record_requests(
        self,
        requests: Mapping[str, tuple[int, int]],
        *,
        now: datetime,
        stale_before: datetime,
        identified: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    ) -> list[Session]:
        """Count many requests: all or nothing, as one statement in a transaction."""
        identified = identified or {}
        unknown = sorted(set(identified) - set(requests))
        if unknown:
            raise ValueError(f"identified requests of sessions not in requests: {unknown}")
        live = {sid: row for sid in requests if (row := self._live(sid, stale_before=stale_before, now=now))}
        if len(live) != len(requests):
            return [_copy(row) for row in live.values()]  # nothing counted: the caller names the missing
        for session_id, (count, duration_ms) in requests.items():
            row = live[session_id]
            new_count, new_duration = self._count_new(session_id, identified.get(session_id, ()))
            self._rows[session_id] = _copy(
                row,
                request_count=row.request_count + count + new_count,
                total_duration_ms=row.total_duration_ms + duration_ms + new_duration,
                last_activity=now,
                version=row.version + 1,
            )
        return [_copy(self._rows[session_id]) for session_id in requests]

    def _count_new(self, session_id: str, requests: Iterable[tuple[str, int]]) -> tuple[int, int]:
        """unified.count_new_requests: of ``requests``, how many (and how long) are new; remember their ids."""
        recent = self._recent_request_ids.setdefault(session_id, [])
        count = duration = 0
        for request_id, duration_ms in requests:
            if request_id not in recent:
                recent.append(request_id)
                count, duration = count + 1, duration + duration_ms
        del recent[:-RECENT_REQUEST_IDS]
        return count, duration

    async def update(
        self,
        session_id: str,
        changes: Mapping[str, Any],
        *,
        now: datetime,
        stale_before: datetime,
        expected_version: int | None = None,
    ) -> Session | None:
        """Set the given fields and ``last_activity``; None when no live session has the id.

        ``expected_version``: only at that version, else ``SessionConflict``.
        """
        row = self._live(session_id, stale_before=stale_before, now=now)
        if row is not None and expected_version is not None and row.version != expected_version:
            raise SessionConflict(session_id, expected_version=expected_version, current_version=row.version)
        return await self._change(session_id, stale_before=stale_before, now=now, changes_of=lambda _row: dict(changes))

    async def merge_data(
        self, session_id: str, patch: Mapping[str, Any], *, now: datetime, stale_before: datetime
    ) -> Session | None:
        """Merge ``patch``'s top-level keys into ``data``; None when not live; the size limit holds for the result."""
        row = self._live(session_id, stale_before=stale_before, now=now)
        if row is None:
            return None
        check_json_object({**row.data, **patch})
        return await self._change(
            session_id, stale_before=stale_before, now=now, changes_of=lambda row: {"data": {**row.data, **patch}}
        )

    async def live_ids(self, *, stale_before: datetime, now: datetime) -> list[str]:
        return sorted(self.read_live(stale_before=stale_before, now=now))

    async def metrics(self, *, stale_before: datetime, now: datetime) -> SessionMetrics:
        """Counts and ages (seconds at ``now``) of the sessions still marked active."""
        active = [row for row in self._rows.values() if row.state is SessionState.ACTIVE]
        ages = [(now - row.created_at).total_seconds() for row in active]
        live = sum(1 for row in active if row.is_live(now, stale_before=stale_before))
        average = sum(ages) / len(ages) if ages else 0.0
        return SessionMetrics(len(active), live, max(ages, default=0.0), min(ages, default=0.0), average)

    async def _change(
        self,
        session_id: str,
        *,
        stale_before: datetime,
        now: datetime,
        changes_of: Callable[[Session], dict[str, Any]],
    ) -> Session | None:
        """Apply ``changes_of(row)`` and ``last_activity = now`` to a live row; None when there is none."""
        row = self._live(session_id, stale_before=stale_before, now=now)
        if row is None:
            return None
        self._rows[session_id] = _copy(row, **changes_of(row), last_activity=now, version=row.version + 1)
        return _copy(self._rows[session_id])

    async def delete(self, session_id: str, *, events: SessionEvents | None = None) -> bool:
        _no_events(events)
        self._recent_request_ids.pop(session_id, None)
        return self._rows.pop(session_id, None) is not None

    async def expire_stale(
        self, *, stale_before: datetime, now: datetime, events: SessionEvents | None = None, batch_size: int = 5000
    ) -> list[str]:
        """Mark every active session that is no longer live expired; return their ids."""
        _no_events(events)
        expired = []
        for session_id, row in list(self._rows.items()):
            if row.state is SessionState.ACTIVE and not row.is_live(now, stale_before=stale_before):
                self._rows[session_id] = _copy(row, state=SessionState.EXPIRED, version=row.version + 1)
                expired.append(session_id)
        return expired

    async def iter_live(
        self, *, stale_before: datetime, now: datetime, batch_size: int = 2000
    ) -> AsyncIterator[Session]:
        for row in list(self._rows.values()):
            if row.is_live(now, stale_before=stale_before):
                yield _copy(row)

    # CrashTestable (and abandon, beside close): for the crash tools, never the application.

    def read_live(self, *, stale_before: datetime, now: datetime) -> dict[str, Session]:
        """Every live session by id, without an event loop."""
        return {
            session_id: _copy(row)
            for session_id, row in self._rows.items()
            if row.is_live(now, stale_before=stale_before)
        }

    async def delete_all(self) -> int:
        count = len(self._rows)
        self._rows.clear()
        self._recent_request_ids.clear()
        return count

    async def iter_all(self, *, batch_size: int = 2000) -> AsyncIterator[Session]:
        for row in list(self._rows.values()):
            yield _copy(row)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self._rows)} rows>"


def _no_events(events: SessionEvents | None) -> None:
    if events is not None:
        raise ValueError("lifecycle events are written to the database: a MemoryStore records none")
