"""SessionStore: every statement that reads or writes ``public.sessions``.

Each write is one autocommit statement, so a returned ``await`` means committed, and
counters are incremented in SQL so that concurrent writers never lose an update.
Every method returns the row as PostgreSQL stored it: what a manager keeps in
memory is, by construction, what a reload after a crash returns.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self, Unpack

from psycopg import Rollback, sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from .db import Database, PoolOptions, Query, tuple_cursor
from .errors import PersistenceError
from .models import Session

if TYPE_CHECKING:
    from .events import SessionEvents

# Python field -> column of public.sessions; the one place that knows the mapping.
COLUMNS: Mapping[str, str] = {
    "session_id": "session_id",
    "state": "session_state",
    "user_id": "user_id",
    "user_type": "user_type",
    "ip_address": "ip_address",
    "user_agent": "user_agent",
    "data": "session_data",
    "metadata": "metadata",
    "request_count": "request_count",
    "total_duration_ms": "total_duration_ms",
    "created_at": "created_at",
    "last_activity": "last_activity_at",
    "expires_at": "expires_at",
}
# Sessions come back as tuples in this order, the order of _RETURNING's columns.
_FIELDS = tuple(COLUMNS)
_JSON_FIELDS = frozenset({"data", "metadata"})
_TABLE = sql.Identifier("public", "sessions")


def _select_list() -> sql.Composable:
    # host() gives the bare address back; inet's text form would add a /32 mask.
    items = [
        sql.SQL("host({c}) AS {f}").format(c=sql.Identifier(column), f=sql.Identifier(field))
        if field == "ip_address"
        else sql.SQL("{c} AS {f}").format(c=sql.Identifier(column), f=sql.Identifier(field))
        for field, column in COLUMNS.items()
    ]
    return sql.SQL(", ").join(items)


_RETURNING = _select_list()
# A row the manager may use: active, not idle past the cutoff, not past its expiry.
_LIVE = sql.SQL(
    "{t}.session_state = 'active' AND {t}.last_activity_at >= %(stale_before)s"
    " AND ({t}.expires_at IS NULL OR {t}.expires_at > %(now)s)"
)
_LIVE_SESSIONS = _LIVE.format(t=sql.Identifier("sessions"))
# The same test for a statement on one session_id, as a CASE, which the planner cannot use to
# choose an index: it is checked on the row the session_id index finds. As plain conditions,
# on a table without statistics yet (every new test database), they got the
# (session_state, last_activity_at) index chosen, and each call read every live session.
_LIVE_FOUND = sql.SQL("CASE WHEN {live} THEN true ELSE false END").format(live=_LIVE_SESSIONS)


# The name under which a change's rows are handed to the lifecycle-event INSERT.
_CHANGED = sql.Identifier("changed")


def _logged(change: sql.Composed, events: SessionEvents | None, result: sql.SQL) -> tuple[sql.Composed, dict[str, Any]]:
    """``change`` alone, or with an event per changed row inserted by the same statement.

    One statement, so the session change and its events commit together or not at all, in
    one round trip. ``change`` must return ``session_id`` and ``user_id``; ``result`` is
    what the whole statement then returns of those rows. The event SQL lives in events.py.
    """
    if events is None:
        return change, {}
    insert, params = events.insert_from(_CHANGED)
    query = sql.SQL("WITH {changed} AS ({change}), logged AS ({insert}) SELECT {result} FROM {changed}").format(
        changed=_CHANGED, change=change, insert=insert, result=result
    )
    return query, params


def _compiled(query: sql.Composable) -> bytes:
    return query.as_bytes(None)


def _create_query_composed() -> sql.Composed:
    columns = sql.SQL(", ").join(sql.Identifier(column) for column in COLUMNS.values())
    values = sql.SQL(", ").join(sql.Placeholder(field) for field in COLUMNS)
    # created_at restarts too: a restarted id is a new session.
    updates = sql.SQL(", ").join(
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(column))
        for field, column in COLUMNS.items()
        if field != "session_id"
    )
    return sql.SQL(
        "INSERT INTO {table} AS sessions ({columns}) VALUES ({values})"
        " ON CONFLICT (session_id) DO UPDATE SET {updates} WHERE NOT ({live}) RETURNING {returning}"
    ).format(table=_TABLE, columns=columns, values=values, updates=updates, live=_LIVE_SESSIONS, returning=_RETURNING)


@functools.cache
def _create_query() -> bytes:
    return _compiled(_create_query_composed())


@functools.cache
def _fetch_live_query() -> bytes:
    return _compiled(
        sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE session_id = %(id)s AND {live}").format(
            returning=_RETURNING, table=_TABLE, live=_LIVE_FOUND
        )
    )


@functools.cache
def _record_request_query() -> bytes:
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET request_count = request_count + 1,"
            " total_duration_ms = total_duration_ms + %(duration_ms)s, last_activity_at = %(now)s"
            " WHERE session_id = %(id)s AND {live} RETURNING {returning}"
        ).format(table=_TABLE, live=_LIVE_FOUND, returning=_RETURNING)
    )


@functools.cache
def _record_requests_query() -> bytes:
    # "= ANY" as well as the join: the planner then reads the batch's rows through the
    # session_id index, also on a table without statistics, instead of every live session.
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET request_count = request_count + batch.requests,"
            " total_duration_ms = total_duration_ms + batch.duration_ms, last_activity_at = %(now)s"
            " FROM unnest(%(ids)s::text[], %(counts)s::bigint[], %(durations)s::bigint[])"
            " AS batch(batch_session_id, requests, duration_ms)"
            " WHERE sessions.session_id = ANY(%(ids)s::text[]) AND sessions.session_id = batch.batch_session_id"
            " AND {live} RETURNING {returning}"
        ).format(table=_TABLE, live=_LIVE_FOUND, returning=_RETURNING)
    )


def _update_query(fields: Iterable[str]) -> sql.Composed:
    """Set each of ``fields`` from the parameter ``set_<field>``, and ``last_activity`` from ``now``."""
    assignments: list[sql.Composable] = [
        sql.SQL("{c} = {p}").format(c=sql.Identifier(COLUMNS[f]), p=sql.Placeholder(f"set_{f}")) for f in fields
    ]
    assignments.append(sql.SQL("last_activity_at = %(now)s"))
    return sql.SQL(
        "UPDATE {table} AS sessions SET {assignments} WHERE session_id = %(id)s AND {live} RETURNING {returning}"
    ).format(table=_TABLE, assignments=sql.SQL(", ").join(assignments), live=_LIVE_FOUND, returning=_RETURNING)


def _param(field: str, value: Any) -> Any:
    if field in _JSON_FIELDS:
        return Jsonb(value)
    if field in ("state", "user_type"):
        return str(value)
    return value


def _to_session(row: Sequence[Any]) -> Session:
    """The session in a row of ``_RETURNING``'s columns."""
    try:
        return Session.from_database(dict(zip(_FIELDS, row, strict=True)))
    except (ValueError, KeyError, AttributeError) as error:
        session_id = row[0] if row else None
        raise PersistenceError(
            f"row of public.sessions with session_id {session_id!r} is not a valid session: {error}"
        ) from error


class SessionStore:
    """Async access to ``public.sessions`` through a ``Database`` (its pool, deadlines and errors)."""

    persistent = True  # what it writes survives the process (MemoryStore: False)

    def __init__(self, database: Database, *, close_database: bool = True) -> None:
        """Use ``await SessionStore.open(...)``, or pass a ``Database`` another store shares.

        ``close_database``: ``close()`` closes the database too (the default: this store owns it).
        """
        self.database = database
        self._owns_database = close_database

    @classmethod
    async def open(cls, conninfo: str, **pool_options: Unpack[PoolOptions]) -> Self:
        """A store with a pool of its own (``Database.open``), ready when one connection works.

        ``timeout`` bounds how long a call waits for a connection, so an unreachable
        database raises ``PersistenceError`` instead of hanging.
        """
        return cls(await Database.open(conninfo, **pool_options))

    # What a crash helper needs to open an equal store again, or to find its backends.
    @property
    def conninfo(self) -> str:
        return self.database.conninfo

    @property
    def application_name(self) -> str:
        return self.database.application_name

    @property
    def pool_options(self) -> dict[str, Any]:
        return self.database.pool_options

    async def close(self) -> None:
        if self._owns_database:
            await self.database.close()

    async def abandon(self) -> None:
        """Drop the pool without waiting for anything, as a dying process would."""
        await self.database.abandon()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _fetch_one(self, action: str, query: Query, params: Mapping[str, Any]) -> Session | None:
        row = await self.database.fetch_one(action, query, params)
        return None if row is None else _to_session(row)

    async def create(
        self, session: Session, *, stale_before: datetime, now: datetime, events: SessionEvents | None = None
    ) -> Session | None:
        """Insert ``session``, or restart a row under its id that is no longer live.

        Returns the stored row, or None when a live session already holds the id.
        ``events``: also record a lifecycle event for the row, in the same statement.
        """
        query: Query = _create_query()
        params: dict[str, Any] = {}
        if events is not None:
            query, params = _logged(_create_query_composed(), events, sql.SQL("*"))
        params.update({f: _param(f, getattr(session, f)) for f in COLUMNS})
        params.update(stale_before=stale_before, now=now)
        return await self._fetch_one(f"creating session {session.session_id!r}", query, params)

    async def fetch_live(self, session_id: str, *, stale_before: datetime, now: datetime) -> Session | None:
        params = {"id": session_id, "stale_before": stale_before, "now": now}
        return await self._fetch_one(f"loading session {session_id!r}", _fetch_live_query(), params)

    async def record_request(
        self, session_id: str, *, duration_ms: int, now: datetime, stale_before: datetime
    ) -> Session | None:
        """Count one request atomically; None when no live session has the id."""
        params = {"id": session_id, "duration_ms": duration_ms, "now": now, "stale_before": stale_before}
        return await self._fetch_one(f"recording a request of session {session_id!r}", _record_request_query(), params)

    async def record_requests(
        self, requests: Mapping[str, tuple[int, int]], *, now: datetime, stale_before: datetime
    ) -> list[Session]:
        """Count many requests in one statement: ``{session_id: (count, duration_ms)}``.

        All or nothing: when a session is not live, nothing is counted and the result lists
        only the live ones, so the caller can tell which are missing.
        """
        ids = list(requests)
        query = _record_requests_query()
        params = {
            "ids": ids,
            "counts": [requests[i][0] for i in ids],
            "durations": [requests[i][1] for i in ids],
            "now": now,
            "stale_before": stale_before,
        }
        action = f"recording requests of {len(ids)} sessions"
        async with self.database.connection(action) as conn, conn.transaction() as transaction:
            cur = tuple_cursor(conn.cursor(row_factory=tuple_row))
            await cur.execute(query, params)
            rows = await cur.fetchall()
            if len(rows) != len(ids):
                raise Rollback(transaction)  # leaves the block quietly, nothing counted
        return [_to_session(row) for row in rows]

    async def update(
        self, session_id: str, changes: Mapping[str, Any], *, now: datetime, stale_before: datetime
    ) -> Session | None:
        """Set the given fields and ``last_activity``; None when no live session has the id."""
        params: dict[str, Any] = {f"set_{f}": _param(f, value) for f, value in changes.items()}
        params.update(id=session_id, now=now, stale_before=stale_before)
        return await self._fetch_one(f"updating session {session_id!r}", _update_query(changes), params)

    async def delete(self, session_id: str, *, events: SessionEvents | None = None) -> bool:
        """Delete the row; False when there was none. ``events``: record it, in the same statement."""
        change = sql.SQL("DELETE FROM {table} WHERE session_id = %(id)s RETURNING session_id, user_id").format(
            table=_TABLE
        )
        query, params = _logged(change, events, sql.SQL("session_id"))
        params["id"] = session_id
        async with self.database.connection(f"deleting session {session_id!r}") as conn:
            cur = await conn.execute(query, params)
            return cur.rowcount > 0

    async def expire(
        self, session_ids: list[str], *, stale_before: datetime, now: datetime, events: SessionEvents | None = None
    ) -> list[str]:
        """Mark the given sessions expired where they are no longer live; return those ids.

        The liveness guard keeps a session another replica just used from being expired.
        ``events``: record one event per expired session, in the same statement.
        """
        change = sql.SQL(
            "UPDATE {table} AS sessions SET session_state = 'expired'"
            " WHERE session_id = ANY(%(ids)s) AND session_state = 'active' AND NOT ({live})"
            " RETURNING session_id, user_id"
        ).format(table=_TABLE, live=_LIVE_SESSIONS)
        query, params = _logged(change, events, sql.SQL("session_id"))
        params.update(ids=session_ids, stale_before=stale_before, now=now)
        async with self.database.connection(f"expiring {len(session_ids)} sessions") as conn:
            cur = await conn.execute(query, params)
            return [row[0] for row in await cur.fetchall()]

    async def delete_all(self) -> int:
        """Delete every row, live or not; return how many (for tests that start afresh, never in production)."""
        query = sql.SQL("DELETE FROM {table}").format(table=_TABLE)
        async with self.database.connection("deleting every session") as conn:
            cur = await conn.execute(query)
            return cur.rowcount

    async def iter_live(
        self, *, stale_before: datetime, now: datetime, batch_size: int = 2000
    ) -> AsyncIterator[Session]:
        """Yield every live session, streamed through a server-side cursor (no page limit)."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE {live}").format(
            returning=_RETURNING, table=_TABLE, live=_LIVE_SESSIONS
        )
        params = {"stale_before": stale_before, "now": now}
        async for row in self.database.stream("recovering sessions", query, params, batch_size=batch_size):
            yield _to_session(row)

    async def iter_all(self, *, batch_size: int = 2000) -> AsyncIterator[Session]:
        """Every row, live or not (for checks after a crash), streamed like ``iter_live``."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions").format(returning=_RETURNING, table=_TABLE)
        async for row in self.database.stream("reading all sessions", query, {}, batch_size=batch_size):
            yield _to_session(row)
