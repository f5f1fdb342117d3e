"""The seed's ``SupabaseSessionService`` (and ``get_session_service()``) over the core store.

Application code written against the original service keeps its calls: ``save_session``,
``load_session``, ``delete_session``, ``list_sessions``, ``cleanup_expired_sessions``,
``update_session_activity`` and the two (de)serialisers. Each call is one statement on
``public.sessions`` through a :class:`pytest_exai_sessions.store.SessionStore`: reads and
deletes are the store's; the statements only this API runs, which act on rows in any state
unlike the manager's, are below, built from the store's column list. Unlike the original,
a database error raises ``PersistenceError`` and bad input ``ValueError`` (nothing
written), instead of a logged False or None.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Self

from psycopg import sql

from .clock import SYSTEM_CLOCK, Clock
from .db import DSN_ENV, Database, Query
from .errors import PersistenceError
from .models import BIGINT_MAX, Session, SessionState, check_duration_ms, check_session_id
from .store import COLUMNS, RETURNING, TABLE, SessionStore, column_params, count_request_query, insert_lists, to_session

__all__ = [
    "DEFAULT_METADATA",
    "SupabaseSessionService",
    "get_session_service",
    "reset_session_service",
]

# What save_session stores as metadata when the caller gives none (the original's default).
DEFAULT_METADATA: Mapping[str, str] = {"version": "1.0", "schema": "standard", "source": "session_manager"}
# The keys of session_data that fill columns of their own, with the defaults the original used.
_DATA_COLUMNS: Mapping[str, Any] = {
    "state": SessionState.ACTIVE,
    "user_id": None,
    "user_type": "human",
    "ip_address": None,
    "user_agent": None,
    "request_count": 0,
    "total_duration_ms": 0,
}
# The manager's view of a session (the original's serialize/deserialize) and the table's
# column of each key: the store's field names, except that the view calls the session id "id".
_VIEW_TO_COLUMN: Mapping[str, str] = {"id": "session_id", **{f: c for f, c in COLUMNS.items() if f != "session_id"}}
_COLUMN_TO_VIEW: Mapping[str, str] = {column: key for key, column in _VIEW_TO_COLUMN.items()}
# Columns of public.sessions the view has no key for: a row read with "SELECT *" carries them.
_ROW_ONLY_COLUMNS = frozenset({"id", "updated_at"})
# The alias every returned row carries besides its column: what the original's callers read.
_ROW_ALIASES: Mapping[str, str] = {"last_activity": "last_activity_at"}


def _dsn_from_environment() -> str | None:
    value = os.environ.get(DSN_ENV, "").strip()
    return value or None


class SupabaseSessionService:
    """The original service's API on ``public.sessions``, through a ``SessionStore`` it opens itself.

    ``dsn``: the database; None takes ``EXAI_SESSIONS_DSN`` (``enabled`` is False when neither
    names one, and every call then raises ``PersistenceError``). Nothing connects before the
    first call. A store's pool belongs to the event loop it was opened on: each loop that
    calls gets its own (a closed loop's is dropped), so one service serves ``asyncio.run()``
    after ``asyncio.run()``, test after test, and threads with loops of their own.
    ``aclose()`` releases the running loop's connections; a later call connects again.
    ``clock``: where "now" comes from (a test's ``exai_db_clock``); ``store_options`` go to
    ``SessionStore.open`` (pool sizes, timeouts).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        if dsn is not None and (not isinstance(dsn, str) or not dsn.strip()):
            raise ValueError(f"dsn must be a non-blank connection string, got {dsn!r}; or None for {DSN_ENV}")
        self._dsn = dsn if dsn is not None else _dsn_from_environment()
        self.clock = clock
        self._store_options = dict(store_options or {})
        # One store per event loop: a psycopg pool works on the loop it was opened on only.
        self._stores: dict[asyncio.AbstractEventLoop, SessionStore] = {}
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    @property
    def enabled(self) -> bool:
        """True when a database is configured (an argument or ``EXAI_SESSIONS_DSN``)."""
        return self._dsn is not None

    @property
    def store(self) -> SessionStore | None:
        """The store open on the running event loop's behalf, if any (None outside a loop)."""
        try:
            return self._stores.get(asyncio.get_running_loop())
        except RuntimeError:  # no running loop
            return None

    # connecting, per event loop

    async def _ready(self) -> SessionStore:
        if self._dsn is None:
            raise PersistenceError(f"no database configured for the session service: set {DSN_ENV} or pass dsn=")
        loop = asyncio.get_running_loop()
        store = self._stores.get(loop)
        if store is not None:
            return store
        self._forget_closed_loops()
        async with self._opening.setdefault(loop, asyncio.Lock()):
            store = self._stores.get(loop)
            if store is None:
                store = self._stores[loop] = await SessionStore.open(self._dsn, **self._store_options)
        return store

    async def _database(self) -> Database:
        """The store's database, for the statements of this API alone."""
        return (await self._ready()).database

    def _forget_closed_loops(self) -> None:
        """Drop the stores of event loops that are closed: nothing can run on them any more.

        Their pools are not closed: psycopg_pool closes a pool only on its own loop, and from
        another one it waits on that loop's tasks (a closed loop's never finish). After
        ``asyncio.run`` or pytest-asyncio those tasks are cancelled, and the idle connections
        end when the pool is collected.
        """
        for loop in list(self._opening):
            if loop.is_closed():
                self._stores.pop(loop, None)
                self._opening.pop(loop, None)

    async def aclose(self) -> None:
        """Close the running loop's connections; the service stays usable (the next call connects again).

        A pool open on another event loop that is still open is closed by ``aclose()`` on that loop.
        """
        self._forget_closed_loops()
        store = self._stores.pop(asyncio.get_running_loop(), None)
        if store is not None:
            await store.close()

    async def abandon(self) -> None:
        """Drop the running loop's connections without waiting for anything, as a dying process would."""
        store = self._stores.pop(asyncio.get_running_loop(), None)
        if store is not None:
            await store.abandon()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # the original API

    async def save_session(
        self, session_id: str, session_data: dict[str, Any], metadata: dict[str, Any] | None = None
    ) -> bool:
        """Insert the session or overwrite the row of ``session_id`` (any state); True once committed.

        ``session_data`` is stored whole as the session's data; its keys ``state`` (default
        ``active``), ``user_id``, ``user_type`` (default ``human``), ``ip_address``,
        ``user_agent``, ``request_count`` (default 0) and ``total_duration_ms`` (default 0)
        also fill those columns. The last activity is now; an overwritten row keeps its
        ``created_at``. ``metadata`` defaults to ``DEFAULT_METADATA``.
        """
        check_session_id(session_id)
        _check_dict("session_data", session_data)
        if metadata is None:
            metadata = dict(DEFAULT_METADATA)
        _check_dict("metadata", metadata)
        now = self.clock.now()
        columns = {key: session_data.get(key, default) for key, default in _DATA_COLUMNS.items()}
        for counter in ("request_count", "total_duration_ms"):
            if isinstance(columns[counter], int) and columns[counter] > BIGINT_MAX:
                raise ValueError(f"session_data[{counter!r}] = {columns[counter]} does not fit a bigint column")
        # Validated in full before anything is sent: a pydantic ValidationError is a ValueError.
        record = Session(
            session_id=session_id, data=session_data, metadata=metadata, created_at=now, last_activity=now, **columns
        )
        await _save(await self._database(), record)
        return True

    async def load_session(self, session_id: str) -> dict[str, Any] | None:
        """The row of ``session_id``, in whatever state, as a dict keyed by column name; None if there is none."""
        check_session_id(session_id)
        record = await (await self._ready()).fetch(session_id)
        return None if record is None else _row(record)

    async def delete_session(self, session_id: str) -> bool:
        """Delete the row; True when there was one."""
        check_session_id(session_id)
        return await (await self._ready()).delete(session_id)

    async def list_sessions(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` rows (of ``state``, or of any state), the most recently active first."""
        wanted = None if state is None else _state(state)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")
        records = await _recent(await self._database(), state=wanted, limit=limit)
        return [_row(record) for record in records]

    async def cleanup_expired_sessions(self, older_than_days: int = 7) -> int:
        """Delete the sessions, in any state, last active more than ``older_than_days`` days ago; return how many.

        The cutoff is now minus that many days of 24 hours, on any date.
        """
        if isinstance(older_than_days, bool) or not isinstance(older_than_days, int) or older_than_days < 0:
            raise ValueError(f"older_than_days must be a whole number >= 0, got {older_than_days!r}")
        try:
            cutoff = self.clock.now() - timedelta(days=older_than_days)
        except OverflowError:
            raise ValueError(f"older_than_days={older_than_days} reaches before the year 1") from None
        return await _delete_idle(await self._database(), before=cutoff)

    async def update_session_activity(self, session_id: str, request_duration_ms: int | None = None) -> bool:
        """Count one request, add its duration and move the last activity to now, in one statement.

        True when the session (in any state) exists. ``request_duration_ms``: whole
        milliseconds, or None for none.
        """
        check_session_id(session_id)
        duration = 0 if request_duration_ms is None else check_duration_ms(request_duration_ms)
        counted = await _count_request(await self._database(), session_id, duration_ms=duration, now=self.clock.now())
        return counted is not None

    @staticmethod
    def serialize_session(session: dict[str, Any]) -> dict[str, Any]:
        """The manager's view of a session as the table's columns: ``id`` -> ``session_id``, ``state`` ->
        ``session_state``, ``data`` -> ``session_data``, ``last_activity`` -> ``last_activity_at``, ...

        Values are kept as they are. A key may already be the column's name; a key that is
        neither raises ``ValueError``, as do two keys for one column with different values.
        """
        return _renamed(session, {**_VIEW_TO_COLUMN, **{column: column for column in _COLUMN_TO_VIEW}}, frozenset())

    @staticmethod
    def deserialize_session(record: dict[str, Any]) -> dict[str, Any]:
        """A row (as ``load_session`` returns it, or ``SELECT *``) in the manager's view: the inverse mapping.

        The table's ``id`` and ``updated_at``, which the view has no key for, are left out.
        """
        return _renamed(record, {**_COLUMN_TO_VIEW, **{key: key for key in _ROW_ALIASES}}, _ROW_ONLY_COLUMNS)

    def __repr__(self) -> str:
        where = f"connected on {len(self._stores)} event loop(s)" if self._stores else "not connected"
        return f"<{type(self).__name__} {'enabled' if self.enabled else 'disabled'}, {where}>"


# -- the statements of this API alone

# What save_session keeps of a row it overwrites: when the session began, its expiry, and
# its version, which goes on from the old row's.
_KEPT_BY_SAVE = frozenset({"session_id", "created_at", "expires_at", "version"})


@functools.cache
def _save_query() -> bytes:
    columns, values = insert_lists()
    updates: list[sql.Composable] = [
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(column))
        for field, column in COLUMNS.items()
        if field not in _KEPT_BY_SAVE
    ]
    updates.append(sql.SQL("version = sessions.version + 1"))
    return (
        sql.SQL(
            "INSERT INTO {table} AS sessions ({columns}) VALUES ({values})"
            " ON CONFLICT (session_id) DO UPDATE SET {updates} RETURNING {returning}"
        )
        .format(table=TABLE, columns=columns, values=values, updates=sql.SQL(", ").join(updates), returning=RETURNING)
        .as_bytes(None)
    )


@functools.cache
def _recent_query(*, of_one_state: bool) -> bytes:
    where = sql.SQL(" WHERE session_state = %(state)s") if of_one_state else sql.SQL("")
    return (
        sql.SQL(
            "SELECT {returning} FROM {table} AS sessions{where}"
            " ORDER BY last_activity_at DESC, session_id LIMIT %(limit)s"
        )
        .format(returning=RETURNING, table=TABLE, where=where)
        .as_bytes(None)
    )


@functools.cache
def _delete_idle_query() -> bytes:
    # In batches, as SessionStore.expire_stale. The DELETE checks the cutoff again on the row
    # it locked: a session used meanwhile (its last_activity_at moved past it) stays.
    return (
        sql.SQL(
            "WITH idle AS (SELECT id FROM {table} WHERE last_activity_at < %(before)s LIMIT %(batch)s),"
            " gone AS (DELETE FROM {table} AS sessions USING idle"
            " WHERE sessions.id = idle.id AND sessions.last_activity_at < %(before)s RETURNING 1)"
            " SELECT count(*) FROM gone"
        )
        .format(table=TABLE)
        .as_bytes(None)
    )


async def _fetch_session(database: Database, action: str, query: Query, params: Mapping[str, Any]) -> Session | None:
    row = await database.fetch_one(action, query, params)
    return None if row is None else to_session(row)


async def _save(database: Database, session: Session) -> Session:
    """Insert ``session``, or overwrite the row of its id in whatever state, in one statement.

    Overwriting keeps the row's ``created_at``, ``expires_at`` and version history (its
    version goes up by one); every other field is ``session``'s.
    """
    action = f"saving session {session.session_id!r}"
    stored = await _fetch_session(database, action, _save_query(), column_params(session))
    assert stored is not None  # an upsert returns its row
    return stored


async def _count_request(database: Database, session_id: str, *, duration_ms: int, now: datetime) -> Session | None:
    """Count one request atomically on the row in whatever state; None when there is no row."""
    params = {"id": session_id, "duration_ms": duration_ms, "now": now}
    action = f"counting a request of session {session_id!r}"
    return await _fetch_session(database, action, count_request_query(), params)


async def _recent(database: Database, *, state: SessionState | None, limit: int) -> list[Session]:
    """Up to ``limit`` rows (of one ``state``, or any), the most recently active first."""
    query = _recent_query(of_one_state=state is not None)
    params = {"state": None if state is None else str(state), "limit": limit}
    rows = await database.fetch_all("listing sessions", query, params, writes=False)
    return [to_session(row) for row in rows]


async def _delete_idle(database: Database, *, before: datetime, batch_size: int = 5000) -> int:
    """Delete every row, in any state, last active before ``before``; return how many."""
    params = {"before": before, "batch": batch_size}
    deleted = 0
    while True:
        row = await database.fetch_one("deleting idle sessions", _delete_idle_query(), params)
        assert row is not None  # an aggregate always returns its row
        batch: int = row[0]
        deleted += batch
        if batch < batch_size:
            return deleted


# -- conversions


def _check_dict(name: str, value: object) -> None:
    if type(value) is not dict:
        raise ValueError(f"{name} must be a dict, not {type(value).__name__}")


def _state(value: str) -> SessionState:
    try:
        return SessionState(value)
    except ValueError:
        known = ", ".join(repr(str(s)) for s in SessionState)
        raise ValueError(f"unknown session state {value!r}; one of {known}") from None


def _row(record: Session) -> dict[str, Any]:
    """A stored session keyed by column name, plus the aliases the original's callers read."""
    row = {COLUMNS[field]: getattr(record, field) for field in COLUMNS}
    row["session_state"], row["user_type"] = str(record.state), str(record.user_type)
    for alias, column in _ROW_ALIASES.items():
        row[alias] = row[column]
    return row


def _renamed(source: dict[str, Any], names: Mapping[str, str], dropped: frozenset[str]) -> dict[str, Any]:
    _check_dict("a session", source)
    renamed: dict[str, Any] = {}
    for key, value in source.items():
        if key in dropped:
            continue
        if key not in names:
            raise ValueError(f"unknown session key {key!r}; known: {sorted(names)}")
        target = names[key]
        if target in renamed and renamed[target] != value:
            raise ValueError(f"two different values for {target!r}: {renamed[target]!r} and {value!r} (as {key!r})")
        renamed[target] = value
    return renamed


# -- the process-wide service


class _Shared:
    """The one service of the process, built on first use (thread-safe)."""

    def __init__(self) -> None:
        self._service: SupabaseSessionService | None = None
        self._lock = threading.Lock()

    def get(self) -> SupabaseSessionService:
        with self._lock:
            if self._service is None:
                self._service = SupabaseSessionService()
            return self._service

    def take(self) -> SupabaseSessionService | None:
        with self._lock:
            service, self._service = self._service, None
            return service


_shared = _Shared()


def get_session_service() -> SupabaseSessionService:
    """The process-wide service, built on first call with the DSN in ``EXAI_SESSIONS_DSN``.

    Every call returns the same object until ``reset_session_service()``.
    """
    return _shared.get()


async def reset_session_service() -> None:
    """Close the process-wide service and forget it: the next ``get_session_service()`` builds a new one.

    For tests (each with its database in ``EXAI_SESSIONS_DSN``) and for shutdown.
    """
    service = _shared.take()
    if service is not None:
        await service.aclose()
