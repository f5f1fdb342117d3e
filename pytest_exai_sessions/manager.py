"""SessionManager: sessions in memory, every change written through to PostgreSQL first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Self

from .clock import SYSTEM_CLOCK, Clock
from .errors import PersistenceError, SessionLimitExceeded, SessionNotFound
from .events import LIFECYCLE_CATEGORY, LIFECYCLE_SOURCE, EventStore, SessionEvents, SessionLifecycle
from .memory import MemoryStore
from .models import Event, Session, SessionState, check_duration_ms, check_session_id, stale_before
from .store import SessionStore

logger = logging.getLogger(__name__)

# What ensure(**attrs) may set when it creates a session.
CREATE_ATTRIBUTES = frozenset({"user_id", "user_type", "ip_address", "user_agent", "data", "metadata", "expires_at"})
UPDATE_ATTRIBUTES = CREATE_ATTRIBUTES | {"state"}


class SessionManager:
    """Sessions in memory with write-through persistence and recovery after a restart.

    With a ``SessionStore``, every call writes to PostgreSQL before it returns, so a crash
    right after a returned ``await`` loses nothing, and ``start()`` recovers every live
    session. With ``store=None`` it keeps sessions in a ``MemoryStore``, in this process only
    (what the original manager did): the same code path over the same interface.

    With ``record_events=True`` it also records its lifecycle in
    ``unified.event_metric_events`` (see ``SessionLifecycle``): a created, expired or
    removed session's event is written by the same statement as the change, so both
    commit or neither does; each recovery records one event with the number of sessions.
    Requests and updates record nothing (the hot path stays one statement).
    """

    def __init__(
        self,
        store: SessionStore | MemoryStore | None = None,
        *,
        session_timeout_secs: float = 3600,
        max_concurrent_sessions: int = 100,
        cleanup_interval_secs: float = 300,
        max_inflight: int = 8,
        close_store: bool = False,
        record_events: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """``close_store=True`` makes ``aclose()`` close the store too (for a store opened just for it).

        ``clock``: where every "now" of the manager comes from (``created_at``,
        ``last_activity``, timeouts, ``expires_at``, cleanup): the real time by default, a
        test's ``ManualClock`` or ``DbClock`` to move time without waiting.
        """
        _require_positive("session_timeout_secs", session_timeout_secs)
        _require_positive("max_concurrent_sessions", max_concurrent_sessions)
        _require_positive("max_inflight", max_inflight)
        if cleanup_interval_secs < 0:
            raise ValueError(
                f"cleanup_interval_secs must be >= 0 (0 turns periodic cleanup off), got {cleanup_interval_secs}"
            )
        if record_events and not isinstance(store, SessionStore):
            raise ValueError(
                "record_events=True needs a store: the events are written to the database, which a MemoryStore has not"
            )
        if not isinstance(clock, Clock):
            raise TypeError(f"clock must have a now() method returning an aware datetime, got {clock!r}")
        self.clock = clock
        self.store: SessionStore | MemoryStore = store if store is not None else MemoryStore()
        self.record_events = bool(record_events)
        self.events: EventStore | None = (
            EventStore(store.database) if isinstance(store, SessionStore) and record_events else None
        )
        self.session_timeout_secs = session_timeout_secs
        self.max_concurrent_sessions = max_concurrent_sessions
        self.cleanup_interval_secs = cleanup_interval_secs
        self.max_inflight = max_inflight
        self.last_cleanup_error: BaseException | None = None
        self._sessions: dict[str, Session] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        # One write at a time per session: rows come back in commit order, so the copy
        # in memory never goes back to an older version of the row.
        self._write_locks: dict[str, asyncio.Lock] = {}
        self._creating = 0
        self._cleanup_task: asyncio.Task[None] | None = None
        self._owns_store = close_store
        self._started = False

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options this manager was built with (a restart reuses them)."""
        return {
            "session_timeout_secs": self.session_timeout_secs,
            "max_concurrent_sessions": self.max_concurrent_sessions,
            "cleanup_interval_secs": self.cleanup_interval_secs,
            "max_inflight": self.max_inflight,
            "record_events": self.record_events,
            "clock": self.clock,
        }

    @property
    def persistence_enabled(self) -> bool:
        return self.store.persistent

    @classmethod
    async def open(cls, dsn: str, *, store_options: Mapping[str, Any] | None = None, **options: Any) -> Self:
        """The one way to build a persistent manager on a DSN: open its store, recover, start.

        ``store_options`` go to ``SessionStore.open`` (pool sizes, timeouts); ``options`` to
        the constructor (of ``cls``, so a subclass builds itself). ``aclose()`` closes the
        store too. Every fixture, the crash harness, its child processes and compat use it.
        """
        store = await SessionStore.open(dsn, **(store_options or {}))
        try:
            manager = cls(store, close_store=True, **options)
            await manager.start()
        except BaseException:
            await store.close()
            raise
        return manager

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, dsn: str, *, store_options: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncIterator[Self]:
        """``open()`` as an ``async with`` block: the started manager, closed (with its store) on exit."""
        manager = await cls.open(dsn, store_options=store_options, **options)
        try:
            yield manager
        finally:
            await manager.aclose()

    # lifecycle

    async def start(self) -> Self:
        """Recover persisted sessions and start periodic cleanup; calling it again does nothing."""
        if self._started:
            return self
        await self.recover_all_sessions()
        if self.cleanup_interval_secs > 0:
            self._cleanup_task = asyncio.create_task(self._cleanup_periodically(), name="exai-sessions-cleanup")
        self._started = True
        return self

    async def aclose(self) -> None:
        """Stop periodic cleanup and release connections (the store too if this manager opened it)."""
        await self._stop_cleanup()
        self._started = False
        if self._owns_store:
            await self.store.close()

    async def abandon(self) -> None:
        """Stop as a killed process would: no flush, no graceful close. For crash tests."""
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            self._cleanup_task = None
        self._started = False
        await self.store.abandon()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _stop_cleanup(self) -> None:
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _cleanup_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval_secs)
            try:
                await self.cleanup_stale_sessions()
                self.last_cleanup_error = None
            except PersistenceError as error:
                # Nobody awaits this task: keep the error where callers can see it and try
                # again next round, since an outage should not end cleanup for good.
                self.last_cleanup_error = error
                logger.warning(
                    "periodic session cleanup failed, retrying in %ss: %s", self.cleanup_interval_secs, error
                )

    # time

    def _now(self) -> datetime:
        return self.clock.now()

    def _stale_before(self, now: datetime) -> datetime:
        return stale_before(now, self.session_timeout_secs)

    def is_session_timed_out(self, session: Session) -> bool:
        """True when the session is not active, idle past the timeout, or past ``expires_at``."""
        now = self._now()
        return not session.is_live(now, stale_before=self._stale_before(now))

    def _live_in_memory(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and self.is_session_timed_out(session):
            return None
        return session

    def _forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._slots.pop(session_id, None)
        lock = self._write_locks.get(session_id)
        if lock is not None and not lock.locked():
            # A held lock stays: a writer queued behind it must still be ordered by it.
            del self._write_locks[session_id]

    def _write_lock(self, session_id: str) -> asyncio.Lock:
        lock = self._write_locks.get(session_id)
        if lock is None:
            # Only when missing: every write takes this lock, and most find it there.
            lock = self._write_locks[session_id] = asyncio.Lock()
        return lock

    def _lifecycle(self, event_type: SessionLifecycle, **data: Any) -> SessionEvents | None:
        """The lifecycle events a store call should record along with its change, if any."""
        return SessionEvents(event_type, data) if self.record_events else None

    # operations

    async def ensure(self, session_id: str | None = None, **attrs: Any) -> Session:
        """Return the live session ``session_id``, creating it (or a new id) if there is none."""
        unknown = set(attrs) - CREATE_ATTRIBUTES
        if unknown:
            raise TypeError(f"ensure() got unknown attributes {sorted(unknown)}; allowed: {sorted(CREATE_ATTRIBUTES)}")
        # Only None and "" ask for a new id: any other falsy value (0, b"") is a bad id, not a request.
        if session_id is None or session_id == "":
            session_id = secrets.token_urlsafe(32)
        else:
            session_id = check_session_id(session_id)
        now = self._now()
        # Validate before anything is written: bad input raises here and writes nothing. This
        # comes before the in-memory lookup so that bad attrs raise whether or not the session exists.
        candidate = Session(session_id=session_id, created_at=now, last_activity=now, **attrs)
        existing = self._live_in_memory(session_id)
        if existing is not None:
            return existing
        # A timed-out copy must neither be returned nor count towards the limit.
        self._forget(session_id)
        async with self._write_lock(session_id):
            # Another task may have created it while this one waited for the lock.
            existing = self._live_in_memory(session_id)
            if existing is not None:
                return existing
            stored = await self._create_or_load(candidate, now)
            self._sessions[session_id] = stored
        return stored

    async def _create_or_load(self, candidate: Session, now: datetime) -> Session:
        stale_before = self._stale_before(now)
        session_id = candidate.session_id
        if len(self._sessions) + self._creating >= self.max_concurrent_sessions:
            # At the limit only an existing session may come in: loading is never refused.
            loaded = await self.store.fetch_live(session_id, stale_before=stale_before, now=now)
            if loaded is None:
                raise SessionLimitExceeded(self.max_concurrent_sessions)
            return loaded
        self._creating += 1
        events = self._lifecycle(SessionLifecycle.CREATED)
        try:
            created = await self.store.create(candidate, stale_before=stale_before, now=now, events=events)
            if created is not None:
                return created
            loaded = await self.store.fetch_live(session_id, stale_before=stale_before, now=now)
            if loaded is not None:
                return loaded
            # The live row went stale between the two statements: creating now succeeds.
            created = await self.store.create(candidate, stale_before=stale_before, now=now, events=events)
            if created is None:
                raise PersistenceError(f"session {session_id!r} changed concurrently while being created; retry")
            return created
        finally:
            self._creating -= 1

    async def get(self, session_id: str) -> Session | None:
        """The live session ``session_id`` (from memory, else the database), or None; never creates."""
        # A bad id is bad input (ValueError), not a database error from the lookup.
        check_session_id(session_id)
        session = self._live_in_memory(session_id)
        if session is not None:
            return session
        now = self._now()
        loaded = await self.store.fetch_live(session_id, stale_before=self._stale_before(now), now=now)
        if loaded is None:
            # A timed-out copy stays for cleanup_stale_sessions(), which counts it and expires its row.
            return None
        self._sessions[session_id] = loaded
        return loaded

    async def remove(self, session_id: str) -> None:
        """Delete the session from memory and the database; unknown ids are ignored."""
        check_session_id(session_id)  # ignored means unknown, not invalid: a bad id raises ValueError
        async with self._write_lock(session_id):
            await self.store.delete(session_id, events=self._lifecycle(SessionLifecycle.REMOVED))
        self._forget(session_id)

    async def list_ids(self) -> list[str]:
        return list(self._sessions)

    async def update_activity(self, session_id: str, request_duration_ms: int | None = None) -> Session:
        """Count one request: ``request_count`` + 1, the duration added, ``last_activity`` = now."""
        check_session_id(session_id)  # a ValueError, not a PersistenceError from the database
        duration = 0 if request_duration_ms is None else check_duration_ms(request_duration_ms)
        async with self._write_lock(session_id):
            # Read once the lock is held: writes of one session commit in the order of their times.
            now = self._now()
            stored = await self.store.record_request(
                session_id, duration_ms=duration, now=now, stale_before=self._stale_before(now)
            )
            updated = self._require_stored(session_id, stored)
            self._sessions[session_id] = updated
        return updated

    async def update_activity_many(self, requests: Iterable[tuple[str, int | None]]) -> dict[str, Session]:
        """Count many requests at once: ``[(session_id, duration_ms or None), ...]``.

        For high-rate callers: one statement for the whole batch (an id may appear more than
        once). All or nothing: if any session is unknown or not live, nothing is counted and
        ``SessionNotFound`` names the first such id. Returns the sessions by id, as stored.
        """
        totals: dict[str, tuple[int, int]] = {}
        for session_id, duration_ms in requests:
            duration = 0 if duration_ms is None else check_duration_ms(duration_ms)
            count, total = totals.get(session_id, (0, 0))
            totals[session_id] = (count + 1, total + duration)
        for session_id in totals:
            check_session_id(session_id)  # once per session, not per request: batches repeat ids
        if not totals:
            return {}
        async with contextlib.AsyncExitStack() as locks:
            # In a fixed order, so two overlapping batches cannot wait for each other.
            for session_id in sorted(totals):
                await locks.enter_async_context(self._write_lock(session_id))
            now = self._now()
            stored = await self.store.record_requests(totals, now=now, stale_before=self._stale_before(now))
            found = {session.session_id: session for session in stored}
            missing = [sid for sid in totals if sid not in found]
            if missing:
                raise SessionNotFound(missing[0])
            self._sessions.update(found)
        return found

    async def update(
        self,
        session_id: str,
        *,
        data: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        user_id: str | None = None,
        user_type: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        expires_at: datetime | None = None,
        state: str | None = None,
    ) -> Session:
        """Replace the given fields (None leaves a field as it is) and refresh ``last_activity``."""
        given = {
            "data": data,
            "metadata": metadata,
            "user_id": user_id,
            "user_type": user_type,
            "ip_address": ip_address,
            "user_agent": user_agent,
            "expires_at": expires_at,
            "state": state,
        }
        given = {name: value for name, value in given.items() if value is not None}
        # Validated as a whole record, so update() obeys exactly the rules ensure() does.
        validated = Session.model_validate({"session_id": session_id, **given})
        changes = {name: getattr(validated, name) for name in given}
        async with self._write_lock(session_id):
            now = self._now()
            stored = await self.store.update(session_id, changes, now=now, stale_before=self._stale_before(now))
            updated = self._require_stored(session_id, stored)
            self._apply_update(session_id, updated)
        return updated

    def _apply_update(self, session_id: str, updated: Session) -> None:
        if updated.state is SessionState.ACTIVE:
            self._sessions[session_id] = updated
        else:
            self._forget(session_id)

    @asynccontextmanager
    async def request(self, session_id: str) -> AsyncIterator[Session]:
        """Hold one of the session's ``max_inflight`` slots; on exit count the request and its duration."""
        session = await self.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        slot = self._slots.setdefault(session_id, asyncio.Semaphore(self.max_inflight))
        async with slot:
            started = time.monotonic()
            try:
                yield session
            finally:
                elapsed_ms = int((time.monotonic() - started) * 1000)
                await self.update_activity(session_id, request_duration_ms=elapsed_ms)

    async def cleanup_stale_sessions(self) -> int:
        """Drop timed-out sessions from memory and mark them expired in the database; return how many."""
        stale = [sid for sid, session in self._sessions.items() if self.is_session_timed_out(session)]
        if not stale:
            return 0
        now = self._now()
        await self.store.expire(
            stale,
            stale_before=self._stale_before(now),
            now=now,
            events=self._lifecycle(SessionLifecycle.EXPIRED, reason="timed out"),
        )
        for session_id in stale:
            self._forget(session_id)
        return len(stale)

    async def get_session_metrics(self) -> dict[str, Any]:
        """Counts and ages (seconds) of the sessions in memory."""
        now = self._now()
        ages = [(now - session.created_at).total_seconds() for session in self._sessions.values()]
        active = sum(1 for session in self._sessions.values() if not self.is_session_timed_out(session))
        return {
            "total_sessions": len(ages),
            "active_sessions": active,
            "oldest_session_age": max(ages, default=0.0),
            "newest_session_age": min(ages, default=0.0),
            "avg_session_age": sum(ages) / len(ages) if ages else 0.0,
            "persistence_enabled": self.persistence_enabled,
        }

    async def recover_all_sessions(self) -> int:
        """Load every live persisted session into memory, however many, even above the limit."""
        now = self._now()
        started = time.monotonic()
        recovered = 0
        async for session in self.store.iter_live(stale_before=self._stale_before(now), now=now):
            self._sessions[session.session_id] = session
            recovered += 1
        if self.events is not None:
            # After loading: the sessions in memory are what the database holds either way,
            # and a failure to record raises like any other database error.
            await self.events.record(
                Event(
                    event_type=SessionLifecycle.RECOVERED,
                    event_category=LIFECYCLE_CATEGORY,
                    source_system=LIFECYCLE_SOURCE,
                    event_metrics={"sessions": recovered},
                    duration_ms=int((time.monotonic() - started) * 1000),
                )
            )
        return recovered

    def in_memory(self, session_id: str) -> Session | None:
        """The record held in memory for ``session_id``, live or not; no database call."""
        return self._sessions.get(session_id)

    def sessions(self) -> dict[str, Session]:
        """A copy of the in-memory sessions by id (the records are immutable)."""
        return dict(self._sessions)

    def _require_stored(self, session_id: str, stored: Session | None) -> Session:
        if stored is None:
            self._forget(session_id)
            raise SessionNotFound(session_id)
        return stored

    def __repr__(self) -> str:
        where = "persisted" if self.persistence_enabled else "in memory"
        return f"<{type(self).__name__} {len(self._sessions)} sessions, {where}>"


def _require_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
