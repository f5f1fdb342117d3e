"""Drop-in for the original in-memory ``SessionManager``: the same API, with optional persistence.

An application written against the original manager (``src.daemon.session_manager``)
switches by changing one import::

    from pytest_exai_sessions.compat import SessionManager, Session

``Session`` is the original plain, mutable dataclass (epoch-second floats, ``inflight``,
``closed``, ``sem``) and ``get`` returns the very object ``ensure`` returned. Underneath,
every operation goes through the core :class:`pytest_exai_sessions.SessionManager`: in
memory only by default, or written through to PostgreSQL with ``enable_persistence=True``
(DSN from ``EXAI_SESSIONS_DSN``), ``dsn=`` or ``store=``. Both run the same code: the
core's store (a ``MemoryStore`` or a ``SessionStore``) is the one difference. A manager on
a DSN connects and recovers on first use, since the original API has no start;
``aclose()`` releases it.

The original's service, ``SupabaseSessionService`` and its process-wide instance from
``get_session_service()``, is here too (from ``session_service``), on the same core store.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any, Self

from .clock import SYSTEM_CLOCK, Clock
from .db import DSN_ENV
from .errors import SessionNotFound
from .manager import SessionManager as CoreSessionManager
from .models import Session as SessionRecord
from .models import SessionState, check_session_id, is_live, stale_before
from .session_service import SupabaseSessionService, get_session_service, reset_session_service
from .store_interface import ManagedStorage

__all__ = [
    "DSN_ENV",
    "Session",
    "SessionManager",
    "SupabaseSessionService",
    "from_epoch_seconds",
    "get_session_service",
    "reset_session_service",
    "to_epoch_seconds",
]

# The variable the plugin and the exai-sessions command read too.
# The original's environment variables and defaults.
TIMEOUT_ENV, DEFAULT_SESSION_TIMEOUT_SECS = "SESSION_TIMEOUT_SECS", 3600
MAX_CONCURRENT_ENV, DEFAULT_MAX_CONCURRENT_SESSIONS = "SESSION_MAX_CONCURRENT", 100
CLEANUP_INTERVAL_ENV, DEFAULT_CLEANUP_INTERVAL_SECS = "SESSION_CLEANUP_INTERVAL", 300
MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT = "EXAI_WS_SESSION_MAX_INFLIGHT", 8

# -- epoch seconds <-> the datetimes the core stores

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_epoch_seconds(moment: datetime) -> float:
    """Seconds since the epoch of an aware datetime, as the float nearest to its exact value.

    Computed from the whole number of microseconds (what PostgreSQL stores), so
    ``from_epoch_seconds(to_epoch_seconds(d)) == d`` for every microsecond datetime up to
    the year 2242 (where doubles get coarser than a microsecond).
    """
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return ((moment - _EPOCH) // _MICROSECOND) / 1_000_000


def from_epoch_seconds(seconds: float) -> datetime:
    """The UTC datetime of ``seconds`` since the epoch, rounded to the nearest microsecond.

    Exact arithmetic (no ``seconds * 1e6`` rounding error): the inverse of
    ``to_epoch_seconds`` for every float that function returns.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"epoch seconds must be a finite number, got {seconds!r}")
    return _EPOCH + timedelta(microseconds=round(Fraction(seconds) * 1_000_000))


# -- settings from arguments and the environment


def _env_text(name: str) -> str | None:
    """The variable's value, or None when it is unset or blank (``VAR=`` in an env file)."""
    raw = os.environ.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def _env_count(name: str, default: int) -> int:
    text = _env_text(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} must be at least 1")
    return value


def _env_seconds(name: str, default: int, *, allow_zero: bool) -> float:
    text = _env_text(name)
    if text is None:
        return default
    try:
        value: float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={os.environ[name]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"environment variable {name}={os.environ[name]!r} must be a finite number {bound}")
    return value


def _count(name: str, value: int | None, env: str, default: int) -> int:
    if value is None:
        return _env_count(env, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _seconds(name: str, value: float | None, env: str, default: int, *, allow_zero: bool = False) -> float:
    if value is None:
        return _env_seconds(env, default, allow_zero=allow_zero)
    valid = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not valid or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def default_max_inflight() -> int:
    """``EXAI_WS_SESSION_MAX_INFLIGHT`` (8 when unset), read when a Session is built."""
    return _env_count(MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT)


def _whole_milliseconds(value: float | None) -> int | None:
    """A request duration as the core stores it: whole milliseconds (floats are rounded)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return round(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # the core refuses negative and implausible values
    raise ValueError(f"request_duration_ms must be a non-negative number of milliseconds, got {value!r}")


def _storable_id(value: object) -> bool:
    try:
        check_session_id(value)
    except ValueError:
        return False
    return True


# -- the original API


@dataclass
class Session:
    """One session, as the original manager's dataclass: a plain, mutable object.

    ``created_at`` and ``last_activity`` are epoch seconds. Those the manager hands out are
    the stored microsecond timestamps, so after a restart they come back equal. Assigning
    attributes changes this object only; ``update_activity``, ``remove`` and
    ``cleanup_stale_sessions`` are what persist. ``inflight`` and ``sem`` belong to the
    running process and start afresh after a restart.
    """

    session_id: str
    created_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)
    inflight: int = 0
    closed: bool = False
    max_inflight: int = field(default_factory=default_max_inflight)
    # Built here, yet bound to no event loop: since Python 3.10 asyncio primitives take the
    # running loop on first use, so a Session can be built at import time.
    sem: asyncio.BoundedSemaphore = field(init=False, repr=False, compare=False)
    # Beyond the original (the seed's enhanced manager had them): what update_activity counts.
    request_count: int = field(default=0, kw_only=True)
    total_duration_ms: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        self.sem = asyncio.BoundedSemaphore(self.max_inflight)


class SessionManager:
    """The original in-memory manager's API over the core manager, persistent on request.

    Arguments left as None take their defaults from the environment when the manager is
    built: ``SESSION_TIMEOUT_SECS`` (3600), ``SESSION_MAX_CONCURRENT`` (100),
    ``SESSION_CLEANUP_INTERVAL`` (300) and ``EXAI_WS_SESSION_MAX_INFLIGHT`` (8).

    Persistence is off unless asked for: ``enable_persistence=True`` with the DSN in
    ``EXAI_SESSIONS_DSN``, or ``dsn=``, or ``store=`` (a store the caller opened and
    closes, such as a :class:`SessionStore`). Building the manager touches neither a
    database nor an event loop; one on a DSN connects and recovers on its first use. In
    memory and persisted it runs the same code over its core's store. Like the original it
    runs no cleanup by itself: the application calls ``cleanup_stale_sessions()`` every
    ``cleanup_interval_secs``.
    """

    def __init__(
        self,
        session_timeout_secs: float | None = None,
        max_concurrent_sessions: int | None = None,
        cleanup_interval_secs: float | None = None,
        enable_persistence: bool | None = None,
        *,
        max_inflight: int | None = None,
        dsn: str | None = None,
        store: ManagedStorage | None = None,
        store_options: Mapping[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """``store_options`` go to ``SessionStore.open`` (pool sizes, timeouts) when it opens ``dsn``.

        ``clock``: the core manager's clock, which timeouts and ages here read too (a test's
        ``exai_db_clock`` moves them without waiting).
        """
        self.session_timeout_secs = _seconds(
            "session_timeout_secs", session_timeout_secs, TIMEOUT_ENV, DEFAULT_SESSION_TIMEOUT_SECS
        )
        self.max_concurrent_sessions = _count(
            "max_concurrent_sessions", max_concurrent_sessions, MAX_CONCURRENT_ENV, DEFAULT_MAX_CONCURRENT_SESSIONS
        )
        self.cleanup_interval_secs = _seconds(
            "cleanup_interval_secs",
            cleanup_interval_secs,
            CLEANUP_INTERVAL_ENV,
            DEFAULT_CLEANUP_INTERVAL_SECS,
            allow_zero=True,
        )
        self.max_inflight = _count("max_inflight", max_inflight, MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT)
        self.clock = clock
        self._dsn, given_store = _persistence_target(enable_persistence, dsn, store)
        self._store_options = dict(store_options or {})
        # With a DSN the core is built on first use, once its store is open.
        self._core: CoreSessionManager | None = None if self._dsn is not None else self._new_core(given_store)
        self._sessions: dict[str, Session] = {}
        # The stored expires_at of each object (the original's Session has no such field).
        self._expires_at: dict[str, datetime | None] = {}
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False

    @property
    def persistence_enabled(self) -> bool:
        """True on a DSN (its store opens on first use), else as the core's store answers."""
        return self._dsn is not None or self.core.persistence_enabled

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options this manager was built with (a restarted one can reuse them)."""
        return {
            "session_timeout_secs": self.session_timeout_secs,
            "max_concurrent_sessions": self.max_concurrent_sessions,
            "cleanup_interval_secs": self.cleanup_interval_secs,
            "max_inflight": self.max_inflight,
        }

    @property
    def core(self) -> CoreSessionManager:
        """The core manager underneath (its pydantic records, its store), e.g. for crash tests."""
        if self._core is None:
            raise RuntimeError(
                "this persistent SessionManager connects on first use: await one of its methods "
                "(or start()) before using .core"
            )
        return self._core

    def _core_options(self) -> dict[str, Any]:
        # No periodic cleanup in the core: it would drop sessions behind this manager's back.
        # As with the original, the application decides when cleanup_stale_sessions() runs.
        return {
            "session_timeout_secs": self.session_timeout_secs,
            "max_concurrent_sessions": self.max_concurrent_sessions,
            "cleanup_interval_secs": 0,
            "max_inflight": self.max_inflight,
            "clock": self.clock,
        }

    def _new_core(self, store: ManagedStorage | None) -> CoreSessionManager:
        """The core on a store the caller owns (or none: memory only)."""
        return CoreSessionManager(store, **self._core_options())

    # lifecycle (the original had none: every method starts the manager when it must)

    async def start(self) -> Self:
        """Connect and recover now rather than on first use; calling it again does nothing."""
        await self._ready()
        return self

    async def aclose(self) -> None:
        """Release the database connections (a store passed in stays open); the manager is done after."""
        if self._closed:
            return
        self._closed = True
        self._started = False
        if self._core is not None:
            await self._core.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _ready(self) -> CoreSessionManager:
        if self._closed:
            raise RuntimeError(f"{self!r} was closed with aclose()")
        if self._started and self._core is not None:
            return self._core
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self._start_core()
        return self.core

    async def _start_core(self) -> None:
        core = self._core
        if core is None:
            assert self._dsn is not None
            core = await CoreSessionManager.open(self._dsn, store_options=self._store_options, **self._core_options())
        else:
            await core.start()
        self._core = core
        self._started = True

    # keeping one object per id in step with the core's records

    def _adopt(self, records: Iterable[SessionRecord]) -> int:
        """Keep a Session for each record; return how many were new."""
        known = len(self._sessions)
        for record in records:
            self._keep(record)
        return len(self._sessions) - known

    def _keep(self, record: SessionRecord) -> Session:
        session = self._sessions.get(record.session_id)
        if session is None:
            session = Session(record.session_id, max_inflight=self.max_inflight)
            self._sessions[record.session_id] = session
        _copy_record(record, session)
        self._expires_at[record.session_id] = record.expires_at
        return session

    def _drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._expires_at.pop(session_id, None)

    # the original API

    async def ensure(self, session_id: str | None = None) -> Session:
        """The session ``session_id`` (the same object every time), created if it does not exist.

        None or "" creates one with a new id (``secrets.token_urlsafe(32)``). Over
        ``max_concurrent_sessions`` it raises ``SessionLimitExceeded``, a ``RuntimeError``
        whose message starts with "Maximum concurrent sessions".
        """
        core = await self._ready()
        # The store decides, so a session another replica removed is not handed out again;
        # the object this manager already gave out is refreshed, not replaced.
        record = await core.ensure(session_id or None)
        return self._keep(record)

    async def get(self, session_id: str) -> Session | None:
        """The object ``ensure`` returned for ``session_id``, or None; never creates.

        It asks the store every time: a persistent manager returns a live session another
        manager created (or changed, refreshed in place) and None for one another manager
        removed or expired.
        """
        core = await self._ready()
        if not _storable_id(session_id):
            return None  # ensure() refuses such an id: no session has it
        record = await core.get(session_id)
        if record is None:
            self._drop(session_id)
            return None
        return self._keep(record)

    async def remove(self, session_id: str) -> None:
        """Forget the session (and delete its row); unknown ids are ignored."""
        core = await self._ready()
        if _storable_id(session_id):
            await core.remove(session_id)
        self._drop(session_id)

    async def list_ids(self) -> list[str]:
        """The ids of the live sessions in the store; a persistent manager's are every replica's."""
        core = await self._ready()
        return await core.list_ids()

    async def update_activity(self, session_id: str, request_duration_ms: float | None = None) -> None:
        """Move ``last_activity`` to now and count a request (unknown ids are ignored).

        A session that timed out but was not cleaned up yet comes alive again, as in the
        original; the store restarts it under the same id (so ``created_at`` moves too).
        """
        duration = _whole_milliseconds(request_duration_ms)
        core = await self._ready()
        if not _storable_id(session_id):
            return  # no session has it
        session = self._sessions.get(session_id)
        try:
            record = await core.update_activity(session_id, request_duration_ms=duration)
        except SessionNotFound:
            # Revive only what timed out without being cleaned up: a row still marked active.
            # Removed, expired or ended, by this manager or another, it stays gone.
            row = await core.store.fetch(session_id)
            if row is None or row.state is not SessionState.ACTIVE or self._sessions.get(session_id) is not session:
                self._drop(session_id)
                return
            await core.ensure(session_id)
            record = await core.update_activity(session_id, request_duration_ms=duration)
        self._keep(record)

    def is_session_timed_out(self, session: Session) -> bool:
        """True when the session is closed, idle past ``session_timeout_secs``, or past its ``expires_at``.

        The core's rule (``models.is_live``), applied to this object's ``closed`` and
        ``last_activity`` as the application set them.
        """
        now = self.clock.now()
        return not is_live(
            SessionState.INACTIVE if session.closed else SessionState.ACTIVE,
            from_epoch_seconds(session.last_activity),
            self._expires_at.get(session.session_id),
            now=now,
            stale_before=stale_before(now, self.session_timeout_secs),
        )

    async def cleanup_stale_sessions(self) -> int:
        """Remove closed and timed-out sessions; return how many left ``list_ids()``.

        With persistence a timed-out session's row is marked expired and a closed one's
        inactive, so neither comes back after a restart.
        """
        core = await self._ready()
        ended = 0
        for session in [s for s in self._sessions.values() if self.is_session_timed_out(s)]:
            # Stale here: closed by the application, timed out, or its last_activity set back
            # by hand. Where the store still has it live, end it there too.
            state = SessionState.INACTIVE if session.closed else SessionState.EXPIRED
            with contextlib.suppress(SessionNotFound):
                await core.update(session.session_id, state=state)
                ended += 1
        expired = await core.cleanup_stale_sessions()
        # Whatever is no longer live in the store leaves here too.
        live = set(await core.list_ids())
        for session_id in [sid for sid in self._sessions if sid not in live]:
            self._drop(session_id)
        return ended + expired

    async def get_session_metrics(self) -> dict[str, Any]:
        """Counts and ages (seconds) of the store's sessions, and ``persistence_enabled``.

        A persistent manager counts every session in the database (every replica's).
        """
        core = await self._ready()
        return await core.get_session_metrics()

    async def recover_all_sessions(self) -> int:
        """Load every live session of the store; return how many were new here.

        0 in memory: this manager already holds every session its own store has.
        """
        core = await self._ready()
        return self._adopt((await core.recover_all_sessions()).values())

    def __repr__(self) -> str:
        return (
            f"<compat {type(self).__name__} {len(self._sessions)} sessions,"
            f" persistence_enabled={self.persistence_enabled}>"
        )


def _copy_record(record: SessionRecord, session: Session) -> None:
    """Bring the object up to date with the stored record (floats derived from its datetimes)."""
    session.created_at = to_epoch_seconds(record.created_at)
    session.last_activity = to_epoch_seconds(record.last_activity)
    session.request_count = record.request_count
    session.total_duration_ms = record.total_duration_ms


def _persistence_target(
    enable_persistence: bool | None, dsn: str | None, store: ManagedStorage | None
) -> tuple[str | None, ManagedStorage | None]:
    """Where to persist: (dsn, None), (None, store), or (None, None) for memory only."""
    if dsn is not None and store is not None:
        raise ValueError("pass dsn= or store=, not both")
    if enable_persistence is False and (dsn is not None or store is not None):
        raise ValueError("enable_persistence=False contradicts the dsn= or store= given")
    if enable_persistence and dsn is None and store is None:
        dsn = _env_text(DSN_ENV)
        if dsn is None:
            raise ValueError(
                f"enable_persistence=True needs a database: set {DSN_ENV} to its DSN, or pass dsn= or store="
            )
    return dsn, store
