"""SessionManager: sessions in PostgreSQL, every read and write against the database, coherent across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Self, TypedDict

from .clock import SYSTEM_CLOCK, Clock
from .errors import PersistenceError, SessionLimitExceeded, SessionNotFound
from .events import LIFECYCLE_CATEGORY, LIFECYCLE_SOURCE, EventStore, SessionEvents, SessionLifecycle
from .memory import MemoryStore
from .models import MAX_ID_LENGTH, Event, Session, check_duration_ms, check_session_id, stale_before
from .store import SessionStore
from .store_interface import ManagedStorage

logger = logging.getLogger(__name__)

# What ensure(**attrs) may set when it creates a session.
CREATE_ATTRIBUTES = frozenset({"user_id", "user_type", "ip_address", "user_agent", "data", "metadata", "expires_at"})
UPDATE_ATTRIBUTES = CREATE_ATTRIBUTES | {"state"}


class SessionManager:
    """Sessions in PostgreSQL, served coherently by any number of managers (replicas) at once.

    The database is the one source of truth: every read (``get``, ``ensure``, ``request``,
    ``list_ids``, metrics) asks it, and every write is one statement that commits before the
    call returns. So a change acknowledged by one manager is seen by every call that starts
    after it, on any manager, and a crash right after a returned ``await`` loses nothing.
    Nothing is loaded at ``start()``: a replica serves at once, however many rows there are.
    Process-local, and documented as such: the ``max_inflight`` slots of ``request()`` and
    the periodic cleanup task (whose sweep is global: any replica's expires any session).

    It speaks to its store only through ``store_interface.ManagedStorage``. With
    ``store=None`` it keeps sessions in a ``MemoryStore``, in this process only (what the
    original manager did): the same code path over the same interface.

    With ``record_events=True`` it also records its lifecycle in
    ``unified.event_metric_events`` (see ``SessionLifecycle``): a created, expired or
    removed session's event is written by the same statement as the change, so both
    commit or neither does, once per change whichever replica made it; each
    ``recover_all_sessions()`` records one event with the number of sessions. Requests and
    updates record nothing (the hot path stays one statement).
    """

    def __init__(
        self,
        store: ManagedStorage | None = None,
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

        ``max_concurrent_sessions``: how many sessions may be live in the store at once, for
        every manager on it together (counted in the database when a session is created).
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
        if not isinstance(clock, Clock):
            raise TypeError(f"clock must have a now() method returning an aware datetime, got {clock!r}")
        self.clock = clock
        self.store: ManagedStorage = store if store is not None else MemoryStore()
        self.record_events = bool(record_events)
        # The store knows where its lifecycle events can go: a MemoryStore has nowhere.
        self.events: EventStore | None = self.store.event_store() if self.record_events else None
        if self.record_events and self.events is None:
            raise ValueError(
                f"record_events=True needs a store with a database: the events are written there, and {self.store!r}"
                " has none"
            )
        self.session_timeout_secs = session_timeout_secs
        self.max_concurrent_sessions = max_concurrent_sessions
        self.cleanup_interval_secs = cleanup_interval_secs
        self.max_inflight = max_inflight
        self.last_cleanup_error: BaseException | None = None
        # Process-local: the request() slots of the sessions this process is serving now.
        self._slots: dict[str, _Slot] = {}
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
        """True when what the store writes survives this process (the store answers)."""
        return self.store.persistent

    @classmethod
    async def open(cls, dsn: str, *, store_options: Mapping[str, Any] | None = None, **options: Any) -> Self:
        """The one way to build a persistent manager on a DSN: open its store, start.

        ``store_options`` go to ``SessionStore.open`` (pool sizes, timeouts,
        ``prepared_statements``); ``options`` to the constructor (of ``cls``, so a subclass
        builds itself). ``aclose()`` closes the store too. Every fixture, the crash harness,
        its child processes and compat use it.
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
        """Start periodic cleanup; calling it again does nothing.

        Nothing is loaded: every session is read from the store when it is used, so a
        replica starts in the same time over ten rows or ten million.
        """
        if self._started:
            return self
        # One bounded query (no rows): a database without the schema fails here, not at the first request.
        await self.store.check()
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

    def _window(self) -> _Window:
        """``now`` and ``stale_before``, as every store call takes them."""
        now = self._now()
        return {"now": now, "stale_before": self._stale_before(now)}

    def is_session_timed_out(self, session: Session) -> bool:
        """True when the session is not active, idle past the timeout, or past ``expires_at``."""
        now = self._now()
        return not session.is_live(now, stale_before=self._stale_before(now))

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
        window = self._window()
        # Validate before anything is written: bad input raises here and writes nothing,
        # whether or not the session exists.
        now = window["now"]
        candidate = Session(session_id=session_id, created_at=now, last_activity=now, **attrs)
        # Confirmed: the session it hands out as existing is on the synchronous standbys, even one
        # whose creation raised CommitUncertain (committed here, not confirmed by a standby).
        existing = await self.store.fetch_live(session_id, confirmed=True, **window)
        if existing is not None:
            return existing
        events = self._lifecycle(SessionLifecycle.CREATED)
        # Twice at most: a live row that went stale between the statements, then creating succeeds.
        for _attempt in range(2):
            created = await self.store.create(candidate, limit=self.max_concurrent_sessions, events=events, **window)
            if created is not None:
                return created
            # Another replica (or task) created it meanwhile, or every slot is taken.
            existing = await self.store.fetch_live(session_id, confirmed=True, **window)
            if existing is not None:
                return existing
        # At the limit only an existing session comes in: loading is never refused.
        raise SessionLimitExceeded(self.max_concurrent_sessions)

    async def get(self, session_id: str, *, confirmed: bool = False) -> Session | None:
        """The live session ``session_id`` as the database holds it now, or None; never creates.

        Under synchronous replication the primary shows a commit before its standbys confirm
        it (and keeps one whose wait for them was cancelled). ``confirmed=True`` returns only
        once they have every commit it may have read, so what it returns survives a failover:
        the read to make after a ``CommitUncertain``. It then commits, as a write does, and
        raises ``CommitUncertain`` itself if that cannot be confirmed.
        """
        # A bad id is bad input (ValueError), not a database error from the lookup.
        check_session_id(session_id)
        return await self.store.fetch_live(session_id, confirmed=confirmed, **self._window())

    async def remove(self, session_id: str) -> None:
        """Delete the session, for every manager at once; unknown ids are ignored."""
        check_session_id(session_id)  # ignored means unknown, not invalid: a bad id raises ValueError
        await self.store.delete(session_id, events=self._lifecycle(SessionLifecycle.REMOVED))

    async def list_ids(self) -> list[str]:
        """The ids of every live session in the store (every replica's), sorted."""
        return await self.store.live_ids(**self._window())

    async def update_activity(
        self, session_id: str, request_duration_ms: int | None = None, *, request_id: str | None = None
    ) -> Session:
        """Count one request: ``request_count`` + 1, the duration added, ``last_activity`` = now.

        ``request_id``: the request's own id, which makes the call safe to retry. A request
        whose id is among the session's last 32 counted is not counted again (the session is
        still refreshed, and returned as stored): after ``CommitUncertain``, send the same
        call again, and the request is counted exactly once.
        """
        check_session_id(session_id)  # a ValueError, not a PersistenceError from the database
        duration = 0 if request_duration_ms is None else check_duration_ms(request_duration_ms)
        if request_id is not None:
            _check_request_id(request_id)
        stored = await self.store.record_request(
            session_id, duration_ms=duration, request_id=request_id, **self._window()
        )
        return _require_stored(session_id, stored)

    async def update_activity_many(
        self, requests: Iterable[tuple[str, int | None] | tuple[str, int | None, str | None]]
    ) -> dict[str, Session]:
        """Count many requests at once: ``[(session_id, duration_ms or None), ...]``.

        For high-rate callers: one statement for the whole batch (an id may appear more than
        once). A request may carry its ``request_id`` as a third item: it is counted as
        ``update_activity(..., request_id=...)`` counts it, once. All or nothing: if any
        session is unknown or not live, nothing is counted and ``SessionNotFound`` names the
        first such id. Returns the sessions by id, as stored.
        """
        totals: dict[str, tuple[int, int]] = {}
        identified: dict[str, list[tuple[str, int]]] = {}
        for session_id, duration_ms, *rest in requests:
            duration = 0 if duration_ms is None else check_duration_ms(duration_ms)
            count, total = totals.get(session_id, (0, 0))
            request_id = rest[0] if rest else None
            if request_id is None:
                totals[session_id] = (count + 1, total + duration)
            else:
                totals[session_id] = (count, total)
                identified.setdefault(session_id, []).append((_check_request_id(request_id), duration))
        for session_id in totals:
            check_session_id(session_id)  # once per session, not per request: batches repeat ids
        if not totals:
            return {}
        stored = await self.store.record_requests(totals, identified=identified or None, **self._window())
        found = {session.session_id: session for session in stored}
        missing = [sid for sid in totals if sid not in found]
        if missing:
            raise SessionNotFound(missing[0])
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
        expected_version: int | None = None,
    ) -> Session:
        """Replace the given fields (None leaves a field as it is) and refresh ``last_activity``.

        ``expected_version``: compare-and-set. Write only if the stored ``version`` is that
        one; otherwise raise ``SessionConflict`` (with ``current_version``) and write nothing.
        """
        if expected_version is not None:
            _require_version(expected_version)
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
        stored = await self.store.update(session_id, changes, expected_version=expected_version, **self._window())
        return _require_stored(session_id, stored)

    async def merge_data(self, session_id: str, patch: dict[str, Any]) -> Session:
        """Merge ``patch``'s top-level keys into ``data`` in the database; return the stored session.

        One statement: concurrent merges from any number of managers all survive (a key set
        twice keeps the last write). The patch obeys the rules of ``data``, and so does the
        merged object (its size): bad input raises ValueError and writes nothing.
        """
        validated = Session.model_validate({"session_id": session_id, "data": patch})
        stored = await self.store.merge_data(session_id, validated.data, **self._window())
        return _require_stored(session_id, stored)

    @asynccontextmanager
    async def request(self, session_id: str) -> AsyncIterator[Session]:
        """Hold one of the session's ``max_inflight`` slots; on exit count the request and its duration.

        The slots are this process's: each replica allows ``max_inflight`` of its own.
        """
        session = await self.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        slot = self._slots.get(session_id)
        if slot is None:
            slot = self._slots[session_id] = _Slot(asyncio.Semaphore(self.max_inflight))
        slot.holders += 1
        try:
            async with slot.semaphore:
                started = time.monotonic()
                try:
                    yield session
                finally:
                    elapsed_ms = int((time.monotonic() - started) * 1000)
                    await self.update_activity(session_id, request_duration_ms=elapsed_ms)
        finally:
            slot.holders -= 1
            if slot.holders == 0:
                del self._slots[session_id]  # nobody holds or waits for it: nothing to keep

    async def cleanup_stale_sessions(self) -> int:
        """Mark every timed-out session of the store expired (any replica's); return how many.

        Two managers sweeping at once expire each session once (and record its event once).
        """
        expired = await self.store.expire_stale(
            events=self._lifecycle(SessionLifecycle.EXPIRED, reason="timed out"), **self._window()
        )
        return len(expired)

    async def get_session_metrics(self) -> dict[str, Any]:
        """Counts and ages (seconds) of the store's sessions still marked active (every replica's)."""
        metrics = await self.store.metrics(**self._window())
        return {
            "total_sessions": metrics.total,
            "active_sessions": metrics.live,
            "oldest_session_age": metrics.oldest_age,
            "newest_session_age": metrics.newest_age,
            "avg_session_age": metrics.average_age,
            "persistence_enabled": self.persistence_enabled,
        }

    async def recover_all_sessions(self) -> dict[str, Session]:
        """Every live session in the store by id, however many: a complete recovery, on request.

        Streamed from the database in batches. With ``record_events`` it records one
        RECOVERED event with the number of sessions.
        """
        started = time.monotonic()
        recovered = {session.session_id: session async for session in self.store.iter_live(**self._window())}
        if self.events is not None:
            # A failure to record raises like any other database error.
            await self.events.record(
                Event(
                    event_type=SessionLifecycle.RECOVERED,
                    event_category=LIFECYCLE_CATEGORY,
                    source_system=LIFECYCLE_SOURCE,
                    event_metrics={"sessions": len(recovered)},
                    duration_ms=int((time.monotonic() - started) * 1000),
                )
            )
        return recovered

    def live_sessions(self) -> dict[str, Session]:
        """What this manager would serve now: every live session in the store, by id.

        Synchronous (a connection of its own, no event loop), for snapshots in crash tests;
        it works on an abandoned manager too.
        """
        now = self._now()
        return self.store.read_live(stale_before=self._stale_before(now), now=now)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store.kind}, {self.store!r}>"


class _Window(TypedDict):
    now: datetime
    stale_before: datetime


class _Slot:
    """A session's ``request()`` semaphore, and how many callers hold or wait for it."""

    __slots__ = ("holders", "semaphore")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore = semaphore
        self.holders = 0


def _require_stored(session_id: str, stored: Session | None) -> Session:
    if stored is None:
        raise SessionNotFound(session_id)
    return stored


def _check_request_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or "\x00" in value:
        raise ValueError(
            f"request_id must be a non-empty str of at most {MAX_ID_LENGTH} characters without NUL, got {value!r}"
        )
    return value


def _require_version(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected_version must be a whole number >= 1 (a Session.version), got {value!r}")


def _require_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
